"""The causal LM computes what transformers' Gemma3ForCausalLM / Qwen3ForCausalLM compute.

Small random models of the real architectures (grouped-query attention, a
sliding window shorter than the prompts, Gemma's tied head and final logit
soft-capping, Qwen3's separate head), built and saved with transformers' own
code (the helpers of test_llm_parity), loaded by `embedder.lm.model.load`.
"""

import json
import os

import numpy as np
import pytest
import torch

from embedder import partitioning
from embedder.lm import decode, score
from embedder.lm import model as model_lib
from tests import test_llm_parity as llm

transformers = pytest.importorskip("transformers")

LENGTHS = llm.LENGTHS  # (11, 4, 9, 1, 7): mixed, most longer than the window of 4
NEW_TOKENS = 20
SOFTCAP = 3.0  # small enough to change the logits of a random model


def _gemma3():
    config = llm._gemma3_config(bidirectional=False)
    config.final_logit_softcapping = SOFTCAP
    return transformers.Gemma3ForCausalLM, config


def _qwen3():
    config = llm._qwen3_config()
    config.tie_word_embeddings = False
    return transformers.Qwen3ForCausalLM, config


FAMILIES = {"gemma3": _gemma3, "qwen3": _qwen3}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (torch model, our LanguageModel on an 8-device data mesh), built once."""
    # Two of the eight fake devices: the batch is split, the compiles stay small.
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, num_devices=2))
    out = {}
    for name, make in FAMILIES.items():
        folder = str(tmp_path_factory.mktemp(name))
        cls, config = make()
        model = llm._build(cls, config, folder)
        out[name] = (model, model_lib.load(folder, mesh=mesh))
    return out


def _prompts(seed=0):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(2, llm.VOCAB, size=n)) for n in LENGTHS]


def _padded(prompts, side):
    length = max(map(len, prompts))
    tokens = np.zeros((len(prompts), length), np.int32)
    mask = np.zeros_like(tokens, bool)
    for row, ids in enumerate(prompts):
        cols = slice(0, len(ids)) if side == "right" else slice(length - len(ids), length)
        tokens[row, cols], mask[row, cols] = ids, True
    return tokens, mask


def _torch_logits(model, tokens, mask):
    position_ids = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(mask).long(),
            position_ids=torch.tensor(position_ids, dtype=torch.long),
        )
    return out.logits.float().numpy()


def test_head_tying_and_softcap_come_from_the_checkpoint(models):
    gemma, qwen = models["gemma3"][1], models["qwen3"][1]
    assert (gemma.config.tied, gemma.config.final_logit_softcap) == (True, SOFTCAP)
    assert "lm_head" not in gemma.params
    assert (qwen.config.tied, qwen.config.final_logit_softcap) == (False, None)
    want = models["qwen3"][0].lm_head.weight.detach().numpy().T
    np.testing.assert_array_equal(np.asarray(qwen.params["lm_head"]), want)


@pytest.mark.parametrize("name", list(FAMILIES))
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_of_a_padded_batch_match_transformers(models, name, side):
    model, lm = models[name]
    tokens, mask = _padded(_prompts(), side)
    want = _torch_logits(model, tokens, mask)
    got = np.asarray(model_lib.forward(lm.module, lm.params, tokens, mask))
    np.testing.assert_allclose(got[mask], want[mask], atol=1e-4, rtol=0)
    if name == "gemma3":
        assert np.abs(want[mask]).max() <= SOFTCAP  # the cap is in force


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_decoding_equals_transformers_generate_for_each_prompt(models, name):
    model, lm = models[name]
    prompts = _prompts()
    want = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], dtype=torch.long),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                pad_token_id=0,
            )
        want.append(out[0, len(ids) :].tolist())
    sampling = decode.SamplingConfig(max_new_tokens=NEW_TOKENS)
    # Left-padded into prompt buckets (8 and 16 tokens: two prefill shapes, one step shape).
    batch = decode.BatchConfig(batch_size=8, max_prompt_len=16, min_bucket=8)
    got = decode.generate(lm, prompts, sampling, batch)
    assert got == want
    short = [i for i, p in enumerate(prompts) if len(p) <= 8]  # a batch in the 8-token bucket
    assert decode.generate(lm, [prompts[i] for i in short], sampling, batch) == [want[i] for i in short]
    # Two prompt buckets: two prefill compiles; one decode-step compile for both.
    prefill, step = decode._compiled(lm.module, 16 + NEW_TOKENS, 0.0, 1.0, lm.mesh)
    assert (prefill._cache_size(), step._cache_size()) == (2, 1)
    assert sum(len(w) for w in want) > len(want)  # the prompts do generate, not stop at once
    # Right-padded as given: holes between each prompt and its new tokens.
    tokens, mask = _padded(prompts, "right")
    # At the shapes `generate` compiled: [8 rows, bucket 16], the same cache length.
    pad = ((0, 3), (0, 16 - tokens.shape[1]))
    right = decode.generate_padded(
        lm, np.pad(tokens, pad), np.pad(mask, pad), sampling, cache_len=16 + NEW_TOKENS
    )
    assert [[int(t) for t in row if t >= 0] for row in right[: len(prompts)]] == want


@pytest.mark.slow
def test_sampling_is_a_function_of_seed_and_row_id(models):
    _, lm = models["qwen3"]
    prompts = _prompts(1)
    sampling = decode.SamplingConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    batch = decode.BatchConfig(batch_size=8, max_prompt_len=16, min_bucket=16)  # one prefill shape
    whole = decode.generate(lm, prompts, sampling, batch)
    # The same rows, alone and in another order, sample the same tokens.
    alone = decode.generate(lm, prompts[3:4], sampling, batch, row_ids=[3])
    assert alone == whole[3:4]
    reordered = decode.generate(lm, prompts[::-1], sampling, batch, row_ids=range(4, -1, -1))
    assert reordered == whole[::-1]
    other_seed = decode.generate(lm, prompts, decode.SamplingConfig(6, 1.0, 0.9, seed=4), batch)
    assert other_seed != whole


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILIES))
def test_continuation_logprobs_equal_scoring_one_sequence_at_a_time(models, name):
    model, lm = models[name]
    prompts = _prompts(2)
    continuations = [list(np.random.default_rng(i).integers(2, llm.VOCAB, size=1 + i % 4)) for i in range(5)]
    got = score.continuation_logprobs(lm, prompts, continuations, decode.BatchConfig(max_prompt_len=16))
    for prompt, cont, ours in zip(prompts, continuations, got, strict=True):
        ids = torch.tensor([prompt + cont], dtype=torch.long)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1).numpy()
        want = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(cont)]
        np.testing.assert_allclose(ours, want, atol=1e-4, rtol=0)
    nxt = score.next_token_logprobs(lm, prompts, [5, 7], decode.BatchConfig(max_prompt_len=16))
    firsts = score.continuation_logprobs(lm, prompts, [[5]] * 5, decode.BatchConfig(max_prompt_len=16))
    np.testing.assert_allclose(nxt[:, 0], [f[0] for f in firsts], atol=1e-5)


def test_untied_checkpoint_without_its_head_is_a_weights_error(models, tmp_path):
    from safetensors.torch import save_file

    from embedder import errors

    model, _ = models["qwen3"]
    tensors = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = json.loads(model.config.to_json_string())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(errors.WeightsError, match="lm_head.weight"):
        model_lib.load(str(tmp_path))
    assert os.path.exists(tmp_path / "config.json")
