"""Exports loaded back by their real consumers, equal to the in-framework model; encode; errors.

The model: the real all-MiniLM-L6-v2 encoder with a 128-wide projection (a
sentence-transformers Dense module when exported) and Gecko-style prompts, saved
as a checkpoint. Every consumer must reproduce `Embedder.from_checkpoint` on the
parity inputs within 1e-5 (fp32), at full size and at the Matryoshka size 64.
"""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from embedder import checkpointing, cli, export, inference
from embedder.data import prompts
from embedder.formats import bundle, huggingface
from embedder.models import dual_encoder, pretrained, spec
from tests.parity_inputs import PARITY_INPUTS
from tests.training_helpers import TINY

# Loading MiniLM and writing every format takes longer than the tests that read them.
SLOW_FIXTURES = ("checkpoint", "reference", "exports")


DIM = 64
TOLERANCE = 1e-5
# Texts per forward pass of our encoder. The parity inputs run from 2 to 256 tokens and
# each batch is padded to its longest text's bucket: batches of 8 run about a third of
# the padded tokens that batches of 32 do, for the same embeddings.
BATCH = 8


def _matryoshka(embeddings, dim):
    """Independent of inference.truncate: prefix, then unit length."""
    prefix = embeddings[:, :dim].astype(np.float64)
    return prefix / np.maximum(np.linalg.norm(prefix, axis=1, keepdims=True), 1e-12)


def _assert_close(got, expected, what):
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    diff = np.abs(np.asarray(got, np.float64) - expected).max(axis=1)
    worst = int(diff.argmax())
    assert diff[worst] < TOLERANCE, (
        f"{what}: max abs diff {diff[worst]:.2e} for {PARITY_INPUTS[worst][:60]!r}"
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    vocab_dir = pretrained.minilm_l6_v2_path()
    base = inference.Embedder.from_sentence_transformers(vocab_dir)
    module = dual_encoder.DualEncoder(base.module.config, projection_dim=128)
    params = {
        "encoder": base.params["encoder"],
        "projection": {"kernel": jax.random.normal(jax.random.key(1), (384, 128)) / 20},
    }
    meta = {
        "model_config": spec.describe_module(module),
        "vocab_dir": vocab_dir,
        "step": 7,
        "prompts": dataclasses.asdict(prompts.PromptConfig(enabled=True)),
    }
    model_dir = str(tmp_path_factory.mktemp("minilm_projection"))
    checkpointing.save_model_params(model_dir, 7, params, meta)
    return model_dir


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The in-framework model's embeddings of the parity inputs, as queries and as documents."""
    embedder = inference.Embedder.from_checkpoint(checkpoint)
    assert embedder.max_length == 256  # all-MiniLM-L6-v2's max_seq_length
    return {
        kind: embedder.encode(PARITY_INPUTS, kind=kind, batch_size=BATCH) for kind in ("query", "document")
    }


@pytest.fixture(scope="module")
def exports(checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return {
        fmt: export.export(checkpoint, fmt, str(root / fmt), matryoshka_dims=[DIM, 32])
        for fmt in export.FORMATS
    }


@pytest.mark.slow
def test_sentence_transformers_loads_the_export_and_encodes_as_we_do(exports, reference):
    from sentence_transformers import SentenceTransformer

    folder = exports["sentence-transformers"]
    modules = json.load(open(os.path.join(folder, "modules.json")))
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert "encoder.layer.5.attention.self.query.weight" in load_file(
        os.path.join(folder, "model.safetensors")
    )

    model = SentenceTransformer(folder, device="cpu")
    assert model.max_seq_length == 256
    _assert_close(model.encode_query(PARITY_INPUTS, batch_size=16), reference["query"], "query")
    _assert_close(model.encode_document(PARITY_INPUTS, batch_size=16), reference["document"], "document")
    # Matryoshka: sentence-transformers truncates after Normalize, so re-normalise.
    small = SentenceTransformer(folder, device="cpu", truncate_dim=DIM)
    got = small.encode_query(PARITY_INPUTS, batch_size=16, normalize_embeddings=True)
    _assert_close(got, _matryoshka(reference["query"], DIM), f"query at {DIM}")


def test_bundle_loads_without_gin_files_or_checkpoint(exports, reference):
    folder = exports["bundle"]
    assert not [name for name in os.listdir(folder) if name.endswith(".gin")]
    embedder = inference.Embedder.load(folder)
    assert embedder.prompts == prompts.PromptConfig(enabled=True) and embedder.max_length == 256
    # The vocabulary is the bundle's own copy.
    assert os.path.exists(os.path.join(folder, bundle.TOKENIZER, "vocab.txt"))
    got = embedder.encode(PARITY_INPUTS, kind="document", batch_size=BATCH)
    _assert_close(got, reference["document"], "document")
    got = embedder.encode(PARITY_INPUTS, kind="query", dim=DIM, batch_size=BATCH)
    _assert_close(got, _matryoshka(reference["query"], DIM), f"query at {DIM}")
    config = json.load(open(os.path.join(folder, bundle.CONFIG)))
    assert config["matryoshka_dims"] == [DIM, 32] and config["origin"]["step"] == 7


@pytest.mark.slow
def test_saved_model_takes_raw_strings(exports, reference):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the tokenizer's ops)

    loaded = tf.saved_model.load(exports["saved_model"])
    assert {"serving_default", "query", "document"} <= set(loaded.signatures)
    texts = tf.constant(PARITY_INPUTS)
    query = {k: v.numpy() for k, v in loaded.signatures["serving_default"](texts=texts).items()}
    _assert_close(query["embeddings"], reference["query"], "query")
    _assert_close(query[f"embeddings_{DIM}"], _matryoshka(reference["query"], DIM), f"query at {DIM}")
    document = loaded.signatures["document"](texts=texts)["embeddings"].numpy()
    _assert_close(document, reference["document"], "document")
    empty = loaded.signatures["query"](texts=tf.constant([], tf.string))
    assert empty["embeddings"].shape == (0, 128) and empty[f"embeddings_{DIM}"].shape == (0, DIM)


def test_exported_sentence_transformers_folder_loads_back(exports, reference):
    """Our import reads the Dense module and the prefix prompts that export wrote."""
    embedder = inference.Embedder.load(exports["sentence-transformers"])
    assert embedder.module.projection_dim == 128
    _assert_close(embedder.encode(PARITY_INPUTS, kind="query", batch_size=BATCH), reference["query"], "query")


def test_encode_command_takes_a_bundle_and_a_matryoshka_size(exports, tmp_path, capsys):
    lines = ["How do I sort a list?", "def f(x):", "Ünïcödé", ""]
    (tmp_path / "in.txt").write_text("\n".join(lines) + "\n", "utf-8")
    out = tmp_path / "emb.npy"
    argv = ["encode", f"--model={exports['bundle']}", f"--input={tmp_path / 'in.txt'}", f"--output={out}"]
    assert cli.main([*argv, f"--dim={DIM}", "--kind=document"]) == 0
    got = np.load(out)
    assert got.shape == (len(lines), DIM)
    reference_embedder = inference.Embedder.load(exports["bundle"])
    expected = _matryoshka(reference_embedder.encode(lines, kind="document"), DIM)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert cli.main([*argv, "--dim=500"]) == 2
    assert "dim=500" in capsys.readouterr().err


def test_export_command_of_a_missing_step_names_the_steps(checkpoint, tmp_path, capsys):
    argv = ["export", f"--checkpoint={checkpoint}", "--format=bundle", f"--output={tmp_path / 'out'}"]
    assert cli.main([*argv, "--step=99"]) == 2
    assert "there is no checkpoint of step 99; steps saved: [7]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert cli.main([*argv, "--step=7"]) == 0
    assert "exported bundle" in capsys.readouterr().out
    # An existing output is never overwritten.
    assert cli.main([*argv, "--step=7"]) == 2
    assert "already exists" in capsys.readouterr().err


def _save(tmp_path, module, name):
    params = spec.ModelSpec(module).init_params(jax.random.key(0))
    meta = {
        "model_config": spec.describe_module(module),
        "vocab_dir": pretrained.minilm_l6_v2_path(),
        "step": 1,
    }
    return checkpointing.save_model_params(str(tmp_path / name), 1, params, meta)


def test_sentence_transformers_cannot_express_these(tmp_path):
    llm = dual_encoder.DualEncoder(dataclasses.replace(TINY, family="llm", num_kv_heads=2, activation="silu"))
    llm_checkpoint = _save(tmp_path, llm, "llm")
    with pytest.raises(
        export.ExportError, match="family='llm'.*activation='silu': neither a Gemma 3 nor a Qwen3"
    ):
        export.export(llm_checkpoint, "sentence-transformers", str(tmp_path / "a"))
    two = dual_encoder.DualEncoder(TINY, shared_tower=False)
    with pytest.raises(export.ExportError, match="two towers"):
        export.export(_save(tmp_path, two, "two"), "sentence-transformers", str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # The bundle expresses any architecture (from the checkpoint the refused export left as it was).
    embedder = inference.Embedder.load(export.export(llm_checkpoint, "bundle", str(tmp_path / "c")))
    assert embedder.encode(["x"]).shape == (1, 32)


def test_first_token_pooling_without_projection_or_prompts(tmp_path):
    from sentence_transformers import SentenceTransformer

    module = dual_encoder.DualEncoder(TINY, pooling="first")
    checkpoint = _save(tmp_path, module, "cls")
    folder = export.export(checkpoint, "sentence-transformers", str(tmp_path / "st"))
    expected = inference.Embedder.from_checkpoint(checkpoint).encode(PARITY_INPUTS)
    got = SentenceTransformer(folder, device="cpu").encode(PARITY_INPUTS, batch_size=32)
    _assert_close(got, expected, "first-token pooling")
    assert json.load(open(os.path.join(folder, "config_sentence_transformers.json")))["prompts"] == {}


def test_a_failed_export_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pretrained, "bert_tensors", fail)
    with pytest.raises(OSError, match="disk full"):
        export.export(checkpoint, "sentence-transformers", str(tmp_path / "st"))
    assert os.listdir(tmp_path) == []


def test_prompts_that_are_not_prefixes_are_refused_for_sentence_transformers():
    suffix = prompts.PromptConfig(enabled=True, query_template="{text} (task: {task})")
    with pytest.raises(export.ExportError, match="does not end with the text"):
        huggingface.prompt_prefixes(suffix)
    assert huggingface.prompt_prefixes(prompts.PromptConfig(enabled=True)) == {
        "query": "task: search result | query: ",
        "document": "title: none | text: ",
    }
