"""Gemma 3 and Qwen3 checkpoints load into our encoder and compute what transformers computes.

The reference is transformers' own torch code: small random models of the real
architectures (grouped-query attention, a sliding window shorter than the
inputs, local and global layers with different RoPE bases), saved with
`save_pretrained` as safetensors and read back by `embedder.formats.hf_llm`.
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from embedder import errors, partitioning
from embedder.formats import hf_llm
from embedder.models import dual_encoder, transformer

transformers = pytest.importorskip("transformers")

VOCAB, WIDTH, LAYERS = 128, 64, 3
LENGTHS = (11, 4, 9, 1, 7)  # mixed, several longer than the sliding window
WINDOW = 4
TOLERANCE = 1e-4


def _gemma3_config(bidirectional: bool):
    return transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_theta=10000.0,
        rope_local_base_freq=100.0,
        query_pre_attn_scalar=20,
        use_bidirectional_attention=bidirectional,
        max_position_embeddings=64,
        pad_token_id=0,
    )


def _qwen3_config():
    return transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=96,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,  # 4 * 24 != 64: head_dim independent of the width
        use_sliding_window=True,
        sliding_window=WINDOW,
        max_window_layers=1,
        max_position_embeddings=64,
        rope_theta=1000.0,
    )


def _randomise(model, seed):
    """Every norm weight away from its init, so a missed (1 + w) or norm shows."""
    gen = torch.Generator().manual_seed(seed)
    centre = 0.0 if model.config.model_type == "gemma3_text" else 1.0  # Gemma scales by 1 + w
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + centre)
    return model


def _build(model_cls, config, folder):
    torch.manual_seed(0)
    model = _randomise(model_cls(config).eval(), seed=1)
    model.save_pretrained(folder)
    return model


MODELS = {
    # name: (model class, config, padding side, pooling)
    "gemma3_bidirectional": (
        lambda: transformers.Gemma3TextModel,
        lambda: _gemma3_config(True),
        "right",
        "mean",
    ),
    "gemma3_causal_lm": (
        lambda: transformers.Gemma3ForCausalLM,
        lambda: _gemma3_config(False),
        "right",
        "mean",
    ),
    "qwen3": (lambda: transformers.Qwen3Model, _qwen3_config, "left", "last"),
    "qwen3_causal_lm": (lambda: transformers.Qwen3ForCausalLM, _qwen3_config, "right", "last"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each model built once with transformers' code and saved as safetensors."""
    out = {}
    for name, (cls, cfg, _, _) in MODELS.items():
        folder = str(tmp_path_factory.mktemp(name))
        out[name] = (folder, _build(cls(), cfg(), folder))
    return out


def _batch(padding: str, pad_id: int = 0):
    rng = np.random.default_rng(0)
    length = max(LENGTHS)
    tokens = np.full((len(LENGTHS), length), pad_id, np.int32)
    mask = np.zeros_like(tokens, bool)
    for row, n in enumerate(LENGTHS):
        ids = rng.integers(1, VOCAB, size=n)
        cols = slice(0, n) if padding == "right" else slice(length - n, length)
        tokens[row, cols], mask[row, cols] = ids, True
    return tokens, mask


def _torch_hidden(model, tokens, mask):
    base = model.model if hasattr(model, "lm_head") else model
    with torch.no_grad():
        out = base(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask).long())
    return out.last_hidden_state.float().numpy()


def _reference_pool(hidden, mask, method):
    """numpy pooling: mean of real tokens, or the last real token."""
    if method == "mean":
        m = mask[..., None].astype(np.float64)
        return (hidden * m).sum(1) / m.sum(1)
    last = np.array([np.nonzero(row)[0][-1] for row in mask])
    return hidden[np.arange(len(mask)), last]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_hidden_states_and_pooled_embeddings_match_transformers(saved, name):
    folder, model = saved[name]
    _, _, padding, pooling = MODELS[name]
    config = hf_llm.config_from_hf(folder)
    params = hf_llm.load_llm_params(folder, config)
    tokens, mask = _batch(padding)
    want = _torch_hidden(model, tokens, mask)

    got = np.asarray(transformer.Encoder(config).apply({"params": params}, jnp.asarray(tokens), mask=mask))
    np.testing.assert_allclose(got[mask], want[mask], atol=TOLERANCE, rtol=0)

    module = dual_encoder.DualEncoder(config, pooling=pooling, normalize=False)
    pooled = module.apply({"params": {"encoder": params}}, tokens, mask=mask, method=module.encode)
    np.testing.assert_allclose(
        np.asarray(pooled), _reference_pool(want, mask, pooling), atol=TOLERANCE, rtol=0
    )


def test_config_carries_each_family_s_features(saved):
    gemma = hf_llm.config_from_hf(saved["gemma3_bidirectional"][0])
    assert (gemma.causal, gemma.norm_offset, gemma.post_norms, gemma.qk_norm, gemma.scale_embeddings) == (
        False,
        True,
        True,
        True,
        True,
    )
    assert gemma.attention_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert (gemma.rope_theta, gemma.rope_local_theta, gemma.query_pre_attn_scalar) == (10000.0, 100.0, 20)
    assert hf_llm.config_from_hf(saved["gemma3_causal_lm"][0]).causal
    qwen = hf_llm.config_from_hf(saved["qwen3"][0])
    assert (qwen.causal, qwen.norm_offset, qwen.post_norms, qwen.head_dim, qwen.kv_heads) == (
        True,
        False,
        False,
        24,
        2,
    )
    assert qwen.attention_types == ("full_attention", "sliding_attention", "sliding_attention")


def test_window_and_direction_matter(saved):
    """The features the parity test checks change the output (so it can fail)."""
    folder, model = saved["gemma3_bidirectional"]
    config = hf_llm.config_from_hf(folder)
    params = hf_llm.load_llm_params(folder, config)
    tokens, mask = _batch("right")
    want = _torch_hidden(model, tokens, mask)
    for change in (
        {"sliding_window": None, "layer_types": None},
        {"causal": True},
        {"rope_local_theta": None},
    ):
        other = transformer.TransformerConfig(**{**config.__dict__, **change})
        got = np.asarray(transformer.Encoder(other).apply({"params": params}, jnp.asarray(tokens), mask=mask))
        assert np.abs(got[mask] - want[mask]).max() > 1e-2, change


def test_sharded_bfloat16_folder_loads_tensor_by_tensor_onto_the_mesh(saved, tmp_path):
    _, model = saved["gemma3_bidirectional"]
    folder = str(tmp_path / "bf16")
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="40KB")
    model.to(torch.float32)
    index = json.load(open(os.path.join(folder, hf_llm.INDEX_FILE)))
    assert len(set(index["weight_map"].values())) > 1

    config = hf_llm.config_from_hf(folder)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, model=2))

    def shardings_fn(abstract):
        return partitioning.variable_shardings(abstract, mesh)["params"]

    config, params = hf_llm.load_pretrained(folder, shardings_fn=shardings_fn)
    kernel = params["layer_0"]["mlp"]["wi_gate"]["kernel"]
    assert kernel.dtype == jnp.float32
    assert (
        kernel.sharding.spec
        == partitioning.variable_shardings(
            jax.eval_shape(
                lambda: transformer.Encoder(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
            ),
            mesh,
        )["params"]["layer_0"]["mlp"]["wi_gate"]["kernel"].spec
    )
    # Values: the stored bf16 weights, widened exactly.
    stored = model.layers[0].mlp.gate_proj.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(kernel), stored.T)
    q = model.layers[1].self_attn.q_proj.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(
        np.asarray(params["layer_1"]["attention"]["query"]["kernel"]).reshape(WIDTH, -1), q.T
    )


def test_wrong_shape_names_the_tensor_both_shapes_and_the_file(saved, tmp_path):
    folder, _ = saved["qwen3"]
    bad = tmp_path / "bad"
    bad.mkdir()
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["layers.1.mlp.up_proj.weight"] = torch.zeros(95, WIDTH)
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
    with pytest.raises(errors.WeightsError) as e:
        hf_llm.load_llm_params(str(bad), hf_llm.config_from_hf(str(bad)))
    msg = str(e.value)
    assert "layers.1.mlp.up_proj.weight" in msg and "(95, 64)" in msg and "(96, 64)" in msg
    assert str(bad / "model.safetensors") in msg

    del tensors["layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(errors.WeightsError, match="missing tensor 'layers.1.mlp.up_proj.weight'"):
        hf_llm.load_llm_params(str(bad), hf_llm.config_from_hf(str(bad)))


def test_unsupported_config_is_a_config_error(saved, tmp_path):
    folder, _ = saved["gemma3_bidirectional"]
    hf = json.load(open(os.path.join(folder, "config.json")))
    hf["attn_logit_softcapping"] = 50.0
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(errors.ConfigError, match="attn_logit_softcapping"):
        hf_llm.config_from_hf(str(tmp_path))


def test_tree_matches_our_own_init(saved):
    """The loaded tree has exactly the parameters (names, shapes) our encoder makes."""
    for name in MODELS:
        folder, _ = saved[name]
        config = hf_llm.config_from_hf(folder)
        params = hf_llm.load_llm_params(folder, config)
        ours = nn.unbox(
            jax.eval_shape(
                lambda c=config: transformer.Encoder(c).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
            )
        )["params"]
        assert jax.tree.structure(params) == jax.tree.structure(ours)
        assert jax.tree.map(lambda a: a.shape, params) == jax.tree.map(lambda a: a.shape, ours)


@pytest.mark.slow
def test_model_spec_initialises_from_a_gemma3_folder(saved):
    from embedder.models import spec

    folder, _ = saved["gemma3_bidirectional"]
    config = hf_llm.config_from_hf(folder)
    model = spec.ModelSpec(
        dual_encoder.DualEncoder(config, projection_dim=8), vocab_dir=folder, init_from=folder
    )
    params = model.init_params(jax.random.key(0))
    loaded = hf_llm.load_llm_params(folder, config)
    for got, want in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(loaded), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    assert params["projection"]["kernel"].shape == (WIDTH, 8)
