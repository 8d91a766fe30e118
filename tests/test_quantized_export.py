"""Quantised exports and quantised-embedding search, against numpy references.

Exports: a tiny BERT checkpoint exported with `--quantize=int8|int4` stores the
per-channel integers of a channel-by-channel numpy quantiser (int4 two to a
byte), and the bundle loads back to the very weights, and so the very
embeddings, of the quantisation-aware forward pass (`fake_quantize_params` under
`jax.jit`, as the train step runs it): bit for bit. Search: `QuantizedIndex`,
`Embedder.index` / `Embedder.search` and `embedder eval --embedding_precision`
against a brute-force numpy search with the same candidate rescoring.
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from embedder import checkpointing, cli, evaluation, export, inference, quantization
from embedder.data import eval_tasks
from embedder.errors import ConfigError, ExportError
from embedder.formats import bundle, huggingface
from embedder.models import spec
from tests.test_quantization import ref_quantize
from tests.training_helpers import TINY, tiny_spec

TEXTS = [
    "Return the sum of two numbers.",
    "Open a file and read its lines",
    "def parse(text): return json.loads(text)",
    "a",
    "Sort the list in place, stable, with an optional key function.",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny BERT (MiniLM's vocabulary, width 32) with a 24-wide projection, saved at step 3.

    Its weights are drawn in numpy on the shapes `init` would make (nothing compiled).
    """
    model = tiny_spec(TINY)
    module = model.module.clone(projection_dim=24)
    tokens = np.ones((1, 4), np.int32)
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), tokens, tokens))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.05).astype(s.dtype), shapes)
    meta = {"model_config": spec.describe_module(module), "vocab_dir": model.vocab_dir, "step": 3}
    model_dir = str(tmp_path_factory.mktemp("tiny_checkpoint"))
    checkpointing.save_model_params(model_dir, 3, params, meta)
    return model_dir


@pytest.fixture(scope="module")
def float_embedder(checkpoint):
    return inference.Embedder.from_checkpoint(checkpoint)


def _qat_params(params, bits):
    """The weights the quantisation-aware train step's forward pass uses (trainer._embed)."""
    return jax.jit(lambda p: quantization.fake_quantize_params(p, bits=bits))(params)


def _assert_trees_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


@pytest.mark.slow
@pytest.mark.parametrize("quantize, bits", [("int8", 8), ("int4", 4)])
def test_quantized_bundle_stores_integers_and_reproduces_the_qat_forward_pass(
    checkpoint, float_embedder, tmp_path, quantize, bits
):
    out = str(tmp_path / "bundle")
    if bits == 8:
        export.export(checkpoint, "bundle", out, quantize=quantize)
    else:  # the command's flag
        assert cli.main(["export", "--model", checkpoint, "--format", "bundle", "--quantize", quantize,
                         "--output", out]) == 0  # fmt: skip
    params = float_embedder.params
    tensors = load_file(os.path.join(out, bundle.PARAMS))
    config = json.load(open(os.path.join(out, bundle.CONFIG)))
    assert config["version"] == bundle.QUANTIZED_VERSION
    record = config["quantization"]
    assert record["bits"] == bits
    kernels = {"/".join(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    kernels = {name for name in kernels if name.endswith("kernel")}
    assert set(record["weights"]) == kernels
    for name, weight in record["weights"].items():
        w = np.asarray(_leaf(params, name))
        want_ints, _ = ref_quantize(w, tuple(weight["input_axes"]), bits)
        stored = tensors[name + (bundle.INT8 if bits == 8 else bundle.INT4)]
        assert name not in tensors
        if bits == 8:
            assert stored.dtype == np.int8
            got = stored
        else:  # two values a byte, low nibble first
            assert stored.dtype == np.uint8 and stored.shape[-1] == -(-w.shape[-1] // 2)
            got = quantization.unpack_int4(stored, w.shape[-1])
            low = (stored & 0xF).astype(np.int16)
            np.testing.assert_array_equal(np.where(low >= 8, low - 16, low), got[..., 0::2])
        scale = tensors[name + bundle.SCALE]
        assert scale.dtype == np.float32
        # XLA's float32 division may differ from numpy's in the last bit, which moves a
        # value lying on a rounding boundary (x.5) to the neighbouring integer.
        off = got != want_ints
        assert np.all(np.abs(got.astype(int) - want_ints)[off] == 1), name
        ratio = np.abs(w.astype(np.float64) / np.broadcast_to(scale, w.shape))
        assert np.all(np.abs(ratio % 1 - 0.5)[off] < 1e-5), name
    # The embedding tables and norms stay float.
    assert tensors["encoder/token_embed/embedding"].dtype == np.float32

    loaded = inference.Embedder.from_bundle(out)
    qat = _qat_params(params, bits)
    _assert_trees_equal(loaded.params, qat)
    want = inference.Embedder(
        float_embedder.module, qat, float_embedder.tokenizer, float_embedder.max_length
    ).encode(TEXTS)
    np.testing.assert_array_equal(loaded.encode(TEXTS), want)
    assert not np.array_equal(want, float_embedder.encode(TEXTS))  # the quantisation did something

    # `embedder encode` of the bundle: the same vectors.
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    assert cli.main(["encode", "--model", out, "--input", str(tmp_path / "texts.txt"),
                     "--output", str(tmp_path / "e.npy")]) == 0  # fmt: skip
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), want)


def _leaf(params, name):
    node = params
    for key in name.split("/"):
        node = node[key]
    return node


def test_quantized_sentence_transformers_folder_holds_the_dequantized_weights(
    checkpoint, float_embedder, tmp_path
):
    out = export.export(checkpoint, "sentence-transformers", str(tmp_path / "st"), quantize="int8")
    record = json.load(open(os.path.join(out, huggingface.QUANTIZATION)))
    assert record["bits"] == 8 and "encoder/layer_0/mlp/wi/kernel" in record["weights"]
    read_back = huggingface.read(out).params
    _assert_trees_equal(read_back, _qat_params(float_embedder.params, 8))


def test_bad_quantized_exports_are_refused(checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="int2"):
        export.export(checkpoint, "bundle", str(tmp_path / "a"), quantize="int2")
    with pytest.raises(ExportError, match="quantize_embeddings"):
        export.export(checkpoint, "bundle", str(tmp_path / "b"), quantize_embeddings=True)
    out = export.export(checkpoint, "bundle", str(tmp_path / "c"), quantize="int8")
    tensors = load_file(os.path.join(out, bundle.PARAMS))
    del tensors["encoder/layer_0/mlp/wi/kernel" + bundle.SCALE]
    from safetensors.numpy import save_file

    save_file(tensors, os.path.join(out, bundle.PARAMS))
    with pytest.raises(ExportError, match=r"layer_0/mlp/wi/kernel"):
        bundle.read(out)


# ---------------------------------------------------------------- search


def _reference_search(queries, corpus, k, precision, multiplier):
    """Brute force: first-stage scores of every row, the top k * multiplier (stable), rescored by cosine."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    if precision == "float32":
        first = unit(queries) @ unit(corpus).T
        candidates = corpus.shape[0]
    elif precision == "int8":
        lo, hi = corpus.min(0), corpus.max(0)
        step = (hi - lo) / 255
        codes = np.clip(np.floor((corpus - lo) / step), 0, 255)
        first = queries @ (lo + step * (codes + 0.5)).T
        candidates = k * multiplier
    else:
        bits_q, bits_c = (queries > 0).astype(int), (corpus > 0).astype(int)
        first = -(bits_q[:, None, :] != bits_c[None, :, :]).sum(-1)
        candidates = k * multiplier
    ids, scores = [], []
    for row in range(len(queries)):
        kept = np.argsort(-first[row], kind="stable")[:candidates]
        cos = unit(corpus[kept]) @ unit(queries[row : row + 1])[0]
        order = np.lexsort((kept, -cos))[:k]
        ids.append(kept[order])
        scores.append(cos[order])
    return np.array(scores), np.array(ids)


@pytest.mark.parametrize("precision", ["float32", "int8", "binary"])
def test_index_search_is_the_brute_force_search_with_rescoring(precision):
    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(300, 20)).astype(np.float32)
    queries = corpus[:12] + 0.8 * rng.normal(size=(12, 20)).astype(np.float32)
    index = quantization.QuantizedIndex.build(corpus, precision)
    scores, ids = index.search(queries, 5, rescore_multiplier=3, block_size=64)
    want_scores, want_ids = _reference_search(queries, corpus, 5, precision, 3)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    assert (
        index.nbytes == {"float32": 300 * 20 * 4, "int8": 300 * 20 + 2 * 20 * 4, "binary": 300 * 3}[precision]
    )


def test_embedder_search_finds_what_the_numpy_reference_finds(float_embedder):
    documents = [f"{t} ({i})" for i, t in enumerate(TEXTS * 8)]
    queries = TEXTS[:3]
    index = float_embedder.index(documents, "binary", dim=16)
    assert index.codes.shape == (40, 2) and index.codes.dtype == np.uint8
    scores, ids = float_embedder.search(queries, index, k=4, rescore_multiplier=2)
    doc_vectors = float_embedder.encode(documents, kind="document", dim=16)
    query_vectors = float_embedder.encode(queries, dim=16)
    want_scores, want_ids = _reference_search(query_vectors, doc_vectors, 4, "binary", 2)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="precision"):
        float_embedder.index(documents, "int4")


def test_eval_reports_each_precision_and_its_index_bytes(tmp_path):
    rng = np.random.default_rng(1)
    num = 60
    doc_vectors = rng.normal(size=(num, 32)).astype(np.float32)
    query_vectors = doc_vectors + 1.5 * rng.normal(size=(num, 32)).astype(np.float32)
    task = eval_tasks.RetrievalTask(
        name="toy",
        query_ids=tuple(f"q{i}" for i in range(num)),
        queries=tuple(f"q{i}" for i in range(num)),
        doc_ids=tuple(f"d{i}" for i in range(num)),
        documents=tuple(f"d{i}" for i in range(num)),
        qrels={f"q{i}": {f"d{i}": 1} for i in range(num)},
    )

    def encoder(texts, kind, task=None):
        return (query_vectors if kind == "query" else doc_vectors)[[int(t[1:]) for t in texts]]

    results = evaluation.evaluate(
        [task],
        encoder,
        dims=(32, 16),
        k_values=(10,),
        precisions=("float32", "int8", "binary"),
        rescore_multiplier=2,
    )["toy"]
    precisions = results["precisions"]
    # float32 through the index is the exact search.
    assert precisions["float32"]["metrics"] == results["metrics"]
    assert precisions["int8"]["index_bytes"] == {32: num * 32 + 2 * 32 * 4, 16: num * 16 + 2 * 16 * 4}
    assert precisions["binary"]["index_bytes"] == {32: num * 4, 16: num * 2}
    # Each precision's nDCG@10 is the metric of the reference search's ranking.
    row_ids = sorted(task.doc_ids, reverse=True)  # the evaluator's row order (ties by the higher id)
    order = [task.doc_ids.index(d) for d in row_ids]
    for precision in ("int8", "binary"):
        for dim in (32, 16):
            q = query_vectors[:, :dim] / np.linalg.norm(query_vectors[:, :dim], axis=1, keepdims=True)
            d = doc_vectors[order, :dim] / np.linalg.norm(doc_vectors[order, :dim], axis=1, keepdims=True)
            _, ids = _reference_search(q, d, 10, precision, 2)
            run = {f"q{i}": {row_ids[j]: 10.0 - r for r, j in enumerate(ids[i])} for i in range(num)}
            want = evaluation.retrieval_metrics(run, task.qrels, (10,))["ndcg@10"]
            assert precisions[precision]["metrics"][dim]["ndcg@10"] == pytest.approx(want, abs=1e-12)
    assert "binary index, rescored x2" in evaluation.format_table({"toy": results})


@pytest.mark.slow
def test_eval_command_writes_the_precisions_into_results_json(checkpoint, tmp_path, capsys):
    pairs = str(tmp_path / "pairs.jsonl")
    rows = [{"query": f"{text} ({i})", "positive": f"{text[::-1]} {i}"} for i, text in enumerate(TEXTS * 4)]
    with open(pairs, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", checkpoint, "--tasks", pairs, "--dims", "24", "16", "--k", "10",
                     "--embedding_precision", "float32", "binary", "--rescore_multiplier", "2",
                     "--output", str(out)]) == 0  # fmt: skip
    record = json.load(open(out / "results.json"))
    (task,) = record["tasks"].values()
    assert record["embedding_precisions"] == ["float32", "binary"] and record["rescore_multiplier"] == 2
    assert task["precisions"]["float32"]["metrics"] == task["metrics"]
    docs = task["num_documents"]
    assert task["precisions"]["binary"]["index_bytes"] == {"24": docs * 3, "16": docs * 2}
    assert "binary index, rescored x2" in capsys.readouterr().out
