"""EmbeddingGemma-style sentence-transformers folders in and out, checked against sentence-transformers.

The folders are built here from small random models of the real architectures
(transformers' own Gemma 3 with bidirectional attention, and a causal Qwen3),
saved with `save_pretrained`, with tokenizers trained here from local text.
The EmbeddingGemma-style folder is Transformer + Pooling (mean) + Dense + Dense
(no bias, no activation) + Normalize with a prompts dict; the Qwen3 one is
Transformer + Pooling (last token) + Dense (with bias) + Normalize. The
reference is `SentenceTransformer(path)` itself.
"""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from embedder import cli, inference
from embedder.formats import huggingface
from tests.parity_inputs import PARITY_INPUTS

pytestmark = [pytest.mark.slow]

transformers = pytest.importorskip("transformers")
sentence_transformers = pytest.importorskip("sentence_transformers")

VOCAB, WIDTH, WINDOW, MAX_SEQ = 256, 32, 8, 40
QWEN_VOCAB = 400  # a byte-level BPE starts from 256 bytes
TOLERANCE = 1e-4
PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "Clustering": "task: clustering | query: ",
}
# One text a line for `embedder encode --input`: no line breaks of any kind.
_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
TEXTS = [t for t in PARITY_INPUTS if t and not any(c in t for c in _BREAKS)]


def _corpus(tmp_path_factory) -> str:
    import collections
    import inspect

    texts = [collections.__doc__, inspect.__doc__, json.__doc__, os.__doc__]
    for module in (collections, inspect):
        texts += [
            m.__doc__ for _, m in inspect.getmembers(module) if isinstance(getattr(m, "__doc__", None), str)
        ]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(t for t in texts if t))
    return str(path)


def _gemma_tokenizer(corpus: str, folder: str) -> None:
    """A Metaspace Unigram that writes <bos> text <eos>, as EmbeddingGemma's sentence-transformers folder."""
    tok = RustTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=VOCAB - 16, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], unk_token="<unk>"
    )
    tok.train([corpus], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)]
    )
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "unk_token": "<unk>",
        "model_max_length": 2048,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def _qwen_tokenizer(corpus: str, folder: str) -> None:
    """A byte-level BPE that appends <|endoftext|> (also the padding token), as Qwen3-Embedding's."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=QWEN_VOCAB - 16,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([corpus], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", tok.token_to_id("<|endoftext|>"))]
    )
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<|endoftext|>",
        "model_max_length": 2048,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def _randomise_norms(model, seed: int, centre: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + centre)


def _add_module(folder: str, modules: list, kind: str, config: dict | None = None) -> str:
    path = f"{len(modules)}_{kind}"
    modules.append(
        {
            "idx": len(modules),
            "name": str(len(modules)),
            "path": path,
            "type": f"sentence_transformers.models.{kind}",
        }
    )
    os.makedirs(os.path.join(folder, path))
    if config is not None:
        with open(os.path.join(folder, path, "config.json"), "w") as f:
            json.dump(config, f)
    return os.path.join(folder, path)


def _dense(folder, modules, in_features, out_features, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    config = {
        "in_features": in_features,
        "out_features": out_features,
        "bias": bias,
        "activation_function": "torch.nn.modules.linear.Identity",
    }
    path = _add_module(folder, modules, "Dense", config)
    tensors = {"linear.weight": torch.randn(out_features, in_features, generator=gen) / in_features**0.5}
    if bias:
        tensors["linear.bias"] = torch.randn(out_features, generator=gen) * 0.1
    save_file(tensors, os.path.join(path, "model.safetensors"))


def _pooling(folder, modules, mode):
    keys = (
        "cls_token",
        "mean_tokens",
        "max_tokens",
        "mean_sqrt_len_tokens",
        "weightedmean_tokens",
        "lasttoken",
    )
    config = {"word_embedding_dimension": WIDTH, **{f"pooling_mode_{k}": k == mode for k in keys}}
    _add_module(folder, modules, "Pooling", config)


def _finish(folder, modules, prompts):
    modules.insert(0, {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"})
    for i, m in enumerate(modules):
        m["idx"], m["name"] = i, str(i)
    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump(modules, f)
    with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": MAX_SEQ, "do_lower_case": False}, f)
    with open(os.path.join(folder, "config_sentence_transformers.json"), "w") as f:
        json.dump({"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}, f)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _corpus(tmp_path_factory)


@pytest.fixture(scope="module")
def gemma_folder(corpus, tmp_path_factory):
    """EmbeddingGemma's layout: bidirectional Gemma 3, mean pooling, Dense 32 -> 96 -> 32, Normalize."""
    folder = str(tmp_path_factory.mktemp("embeddinggemma"))
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_theta=10000.0,
        rope_local_base_freq=100.0,
        query_pre_attn_scalar=20,
        use_bidirectional_attention=True,
        max_position_embeddings=256,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.Gemma3TextModel(config).eval()
    _randomise_norms(model, 1, 0.0)
    model.save_pretrained(folder)
    _gemma_tokenizer(corpus, folder)
    modules: list = []
    _pooling(folder, modules, "mean_tokens")
    _dense(folder, modules, WIDTH, 3 * WIDTH, bias=False, seed=2)
    _dense(folder, modules, 3 * WIDTH, WIDTH, bias=False, seed=3)
    _add_module(folder, modules, "Normalize")
    _finish(folder, modules, PROMPTS)
    return folder


@pytest.fixture(scope="module")
def qwen_folder(corpus, tmp_path_factory):
    """Qwen3-Embedding's layout: causal Qwen3, last-token pooling, one Dense with a bias, Normalize."""
    folder = str(tmp_path_factory.mktemp("qwen3"))
    config = transformers.Qwen3Config(
        vocab_size=QWEN_VOCAB,
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=12,
        max_position_embeddings=256,
        rope_theta=1000.0,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3Model(config).eval()
    _randomise_norms(model, 1, 1.0)
    model.save_pretrained(folder)
    _qwen_tokenizer(corpus, folder)
    modules: list = []
    _pooling(folder, modules, "lasttoken")
    _dense(folder, modules, WIDTH, 16, bias=True, seed=2)
    _add_module(folder, modules, "Normalize")
    _finish(folder, modules, {"query": "Instruct: find the code\nQuery: ", "document": ""})
    return folder


def _peer(folder):
    return sentence_transformers.SentenceTransformer(folder, device="cpu")


def test_embeddinggemma_folder_encodes_as_sentence_transformers(gemma_folder):
    ours = inference.Embedder.load(gemma_folder)
    assert ours.module.projection_hidden_dim == 3 * WIDTH and ours.module.projection_dim == WIDTH
    assert ours.module.config.sliding_window == WINDOW // 2 + 1 and not ours.module.config.causal
    peer = _peer(gemma_folder)
    want_q = peer.encode_query(TEXTS, convert_to_numpy=True)
    want_d = peer.encode_document(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours.encode(TEXTS, kind="query"), want_q, atol=TOLERANCE)
    np.testing.assert_allclose(ours.encode(TEXTS, kind="document"), want_d, atol=TOLERANCE)
    # The prompts matter: without them the vectors differ.
    assert np.abs(peer.encode(TEXTS, convert_to_numpy=True) - want_q).max() > 10 * TOLERANCE


def test_encode_command_takes_the_folder(gemma_folder, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "documents.npy"
    argv = ["encode", f"--model={gemma_folder}", f"--input={texts}", f"--output={out}", "--kind=document"]
    assert cli.main(argv) == 0
    want = _peer(gemma_folder).encode_document(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(np.load(out), want, atol=TOLERANCE)


@pytest.mark.parametrize("name", ["gemma3", "qwen3"])
def test_written_folder_loads_in_sentence_transformers_with_equal_outputs(
    name, gemma_folder, qwen_folder, tmp_path
):
    source = {"gemma3": gemma_folder, "qwen3": qwen_folder}[name]
    loaded = huggingface.read(source)
    out = huggingface.write(loaded, str(tmp_path / "export"))
    with open(os.path.join(source, "config.json")) as f:
        original = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        written = json.load(f)
    for key in ("model_type", "sliding_window", "layer_types", "num_key_value_heads", "head_dim"):
        assert written.get(key) == original.get(key), key
    if name == "gemma3":
        assert written["use_bidirectional_attention"] is True
    peer, exported = _peer(source), _peer(out)
    for encode in ("encode_query", "encode_document"):
        want = getattr(peer, encode)(TEXTS, convert_to_numpy=True)
        np.testing.assert_allclose(
            getattr(exported, encode)(TEXTS, convert_to_numpy=True), want, atol=TOLERANCE
        )
    ours = inference.Embedder.load(source)
    np.testing.assert_allclose(
        ours.encode(TEXTS, kind="query"), exported.encode_query(TEXTS, convert_to_numpy=True), atol=TOLERANCE
    )


def test_trained_llm_family_checkpoint_exports_to_a_folder_sentence_transformers_reproduces(
    gemma_folder, tmp_path
):
    """A few training steps of tiny_llm.gin (Gemma 3 block) with the Gemma folder's tokenizer.json,
    then `embedder export --format=sentence-transformers`: the folder encodes as the checkpoint."""
    from embedder import gin_utils, train_loop
    from embedder.data import jsonl, stdlib_pairs

    train_file = str(tmp_path / "train.jsonl")
    jsonl.write_jsonl(train_file, stdlib_pairs.build_pairs("train")[:64])
    gin_utils.parse(
        ["runs/finetune.gin", "models/tiny_llm.gin", "mesh/cpu.gin"],
        [
            f"TOKENIZER_DIR = '{gemma_folder}'",
            f"TRAIN_FILES = ['{train_file}']",
            "TRAIN_STEPS = 3",
            "BATCH_SIZE = 8",
            "QUERY_LEN = 16",
            "DOC_LEN = 32",
            "transformer.TransformerConfig.vocab_size = 256",
            "dual_encoder.DualEncoder.projection_dim = 24",
            "dual_encoder.DualEncoder.projection_hidden_dim = 48",
        ],
    )
    run = tmp_path / "run"
    gin_utils.configured(train_loop.train)(model_dir=str(run))
    out = tmp_path / "export"
    assert cli.main(["export", f"--model={run}", "--format=sentence-transformers", f"--output={out}"]) == 0
    with open(out / "modules.json") as f:
        kinds = [m["type"].rsplit(".", 1)[-1] for m in json.load(f)]
    assert kinds == ["Transformer", "Pooling", "Dense", "Dense", "Normalize"]
    ours = inference.Embedder.from_checkpoint(str(run))
    exported = _peer(str(out))
    np.testing.assert_allclose(
        exported.encode(TEXTS, convert_to_numpy=True), ours.encode(TEXTS, kind="query"), atol=TOLERANCE
    )


def test_model_spec_initialises_the_two_layer_head_from_the_folder_s_dense_modules(gemma_folder):
    import jax
    from safetensors.numpy import load_file

    from embedder import errors
    from embedder.formats import hf_llm
    from embedder.models import dual_encoder, spec

    with open(os.path.join(gemma_folder, "modules.json")) as f:
        dense = [m["path"] for m in json.load(f) if m["type"].endswith("Dense")]
    weights = [
        load_file(os.path.join(gemma_folder, path, "model.safetensors"))["linear.weight"] for path in dense
    ]
    config = hf_llm.config_from_hf(gemma_folder)
    module = dual_encoder.DualEncoder(config, projection_hidden_dim=3 * WIDTH, projection_dim=WIDTH)
    params = spec.ModelSpec(module, vocab_dir=gemma_folder, init_from=gemma_folder).init_params(
        jax.random.key(0)
    )
    np.testing.assert_array_equal(params["projection_hidden"]["kernel"], weights[0].T)
    np.testing.assert_array_equal(params["projection"]["kernel"], weights[1].T)
    one_layer = dual_encoder.DualEncoder(config, projection_dim=WIDTH)
    with pytest.raises(errors.WeightsError, match="projection_hidden_dim=96"):
        spec.ModelSpec(one_layer, vocab_dir=gemma_folder, init_from=gemma_folder).init_params(
            jax.random.key(0)
        )


def test_saved_model_of_a_non_wordpiece_model_is_an_export_error_naming_the_alternatives(
    gemma_folder, tmp_path
):
    from embedder import errors
    from embedder.formats import saved_model

    with pytest.raises(errors.ExportError, match="HuggingFaceTokenizer.*--format=bundle"):
        saved_model.write(huggingface.read(gemma_folder), str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists()
