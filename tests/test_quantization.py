"""Weight and embedding quantisation against plain numpy references.

Weights: per-channel integers and scales from a loop over output channels, the
straight-through gradient, and the stored integers reproducing the forward
pass's weights bit for bit. Embeddings: sentence-transformers' own int8
quantiser, bit-by-bit Hamming distances, and brute-force rankings.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sentence_transformers.quantization import quantize_embeddings as st_quantize_embeddings

from embedder import quantization
from embedder.errors import ConfigError, DataError
from embedder.models import dual_encoder, transformer

# ---------------------------------------------------------------------------
# Weights.
# ---------------------------------------------------------------------------


def ref_quantize(w, input_axes, bits):
    """Integers and dequantised weights, one output channel at a time, in float32 numpy."""
    qmax = np.float32(2 ** (bits - 1) - 1)
    w = np.asarray(w, np.float32)
    output_axes = [a for a in range(w.ndim) if a not in input_axes]
    moved = np.moveaxis(w, output_axes, list(range(len(output_axes))))  # [outputs..., inputs...]
    ints = np.zeros(moved.shape, np.int8)
    values = np.zeros(moved.shape, np.float32)
    for channel in np.ndindex(moved.shape[: len(output_axes)]):
        absmax = np.float32(np.abs(moved[channel]).max())
        scale = absmax / qmax if absmax > 0 else np.float32(1)
        q = np.clip(np.round(moved[channel] / scale), -qmax, qmax)
        ints[channel] = q.astype(np.int8)
        values[channel] = q * scale
    back = list(range(len(output_axes)))
    return np.moveaxis(ints, back, output_axes), np.moveaxis(values, back, output_axes)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "shape, input_axes", [((24, 10), (0,)), ((16, 4, 8), (0,)), ((4, 8, 16), (0, 1)), ((50, 12), (1,))]
)
def test_fake_and_real_quantisation_match_the_per_channel_reference(bits, shape, input_axes):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.1, 3.0, size=shape[-1]).astype(np.float32)
    w[..., 0] = 0.0  # an all-zero output channel (or input column) stays finite and zero
    want_ints, want_values = ref_quantize(w, input_axes, bits)
    qt = quantization.quantize(jnp.asarray(w), bits=bits, input_axes=input_axes)
    np.testing.assert_array_equal(np.asarray(qt.values), want_ints)
    assert np.abs(np.asarray(qt.values)).max() == 2 ** (bits - 1) - 1
    np.testing.assert_allclose(np.asarray(quantization.dequantize(qt)), want_values, rtol=1e-6, atol=0)
    fake = quantization.fake_quantize(jnp.asarray(w), bits=bits, input_axes=input_axes)
    np.testing.assert_allclose(np.asarray(fake), want_values, rtol=1e-6, atol=0)
    assert qt.scale.shape == tuple(1 if a in input_axes else n for a, n in enumerate(shape))


def test_straight_through_gradient_is_the_identity_inside_the_clip_range():
    rng = np.random.default_rng(1)
    w = jnp.asarray(rng.normal(size=(16, 4, 8)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(16, 4, 8)), jnp.float32)
    for bits in (8, 4):
        grad = jax.grad(lambda w, bits=bits: jnp.sum(cotangent * quantization.fake_quantize(w, bits=bits)))(w)
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(cotangent))
    # Where the clip acts (a scale below max|w| / qmax) nothing passes back.
    x = jnp.asarray([-9.0, -7.0, -3.4, 0.2, 6.6, 7.0, 7.4, 7.6, 12.0])
    fake = lambda x: quantization._fake_quantize(x, jnp.float32(1.0), 7.0)  # noqa: E731
    grad = jax.grad(lambda x: jnp.sum(fake(x) * jnp.arange(9.0)))(x)
    np.testing.assert_array_equal(np.asarray(grad), [0, 1, 2, 3, 4, 5, 6, 0, 0])
    np.testing.assert_array_equal(np.asarray(fake(x)), [-7, -7, -3, 0, 7, 7, 7, 7, 7])


CONFIG = transformer.TransformerConfig(
    family="bert", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=16
)


@pytest.fixture(scope="module")
def model():
    module = dual_encoder.DualEncoder(CONFIG, projection_dim=12)
    tokens = np.random.default_rng(2).integers(1, 64, size=(4, 10)).astype(np.int32)
    params = nn.unbox(module.init(jax.random.key(0), tokens, tokens))["params"]
    return module, params, tokens


def _flat(params):
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.mark.parametrize("include_embeddings", [False, True])
def test_fake_quantize_params_touches_kernels_only(model, include_embeddings):
    _, params, _ = model
    before = _flat(params)
    after = _flat(quantization.fake_quantize_params(params, bits=4, include_embeddings=include_embeddings))
    changed = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    kernels = {k for k in before if k.endswith("['kernel']")}
    embeddings = {k for k in before if "embed'" in k or "['embedding']" in k}
    assert kernels and embeddings
    assert changed == (kernels | embeddings if include_embeddings else kernels)
    # Each kernel in turn matches the reference with its own channel axes.
    out = "['encoder']['layer_0']['attention']['out']['kernel']"
    query = "['encoder']['layer_1']['attention']['query']['kernel']"
    np.testing.assert_allclose(np.asarray(after[out]), ref_quantize(before[out], (0, 1), 4)[1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(after[query]), ref_quantize(before[query], (0,), 4)[1], rtol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stored_integers_reproduce_the_quantised_forward_pass_exactly(model, bits, dtype):
    module, params, tokens = model
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    fake = quantization.fake_quantize_params(params, bits=bits, include_embeddings=True)
    stored = quantization.quantize_params(params, bits=bits, include_embeddings=True)
    leaves = jax.tree.leaves(stored, is_leaf=lambda x: isinstance(x, quantization.QuantizedTensor))
    packed = [x for x in leaves if isinstance(x, quantization.QuantizedTensor)]
    assert packed and all(x.values.dtype == jnp.int8 and x.scale.dtype == jnp.float32 for x in packed)
    # What an export writes and reads back: host arrays.
    stored = jax.tree.map(np.asarray, stored)
    restored = quantization.dequantize_params(stored)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, fake)
    jitted = jax.jit(lambda p: quantization.fake_quantize_params(p, bits=bits, include_embeddings=True))(
        params
    )
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, jitted)
    forward = jax.jit(lambda p: module.apply({"params": p}, tokens, tokens))
    for key, value in forward(fake).items():
        np.testing.assert_array_equal(np.asarray(forward(restored)[key]), np.asarray(value))


@pytest.mark.slow
def test_qat_gradient_is_the_gradient_at_the_quantised_weights(model):
    """STE through the whole model: d L(fq(w)) / dw = (d L / dw)(fq(w)) for every kernel."""
    module, params, tokens = model

    def loss(p):
        emb = module.apply({"params": p}, tokens, tokens)
        return jnp.sum(emb["query"] * emb["positive"])

    qat = jax.jit(jax.grad(lambda p: loss(quantization.fake_quantize_params(p, bits=8))))(params)
    at_quantised = jax.jit(jax.grad(loss))(quantization.fake_quantize_params(params, bits=8))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), qat, at_quantised)


def test_int4_packing_round_trips():
    values = np.random.default_rng(3).integers(-8, 8, size=(5, 7)).astype(np.int8)
    packed = quantization.pack_int4(values)
    assert packed.shape == (5, 4) and packed.dtype == np.uint8
    np.testing.assert_array_equal(quantization.unpack_int4(packed, 7), values)
    assert quantization.pack_int4(np.array([-1, 2], np.int8)).tolist() == [0x2F]
    with pytest.raises(DataError, match=r"int4 values must lie in \[-8, 7\]"):
        quantization.pack_int4(np.array([9]))


def test_bad_weight_settings_raise():
    with pytest.raises(ConfigError, match=r"bits must be one of \[4, 8\], got 2"):
        quantization.fake_quantize(jnp.ones((2, 2)), bits=2)
    with pytest.raises(ConfigError, match="no channel rule for the weight a/kernel of shape"):
        quantization.fake_quantize_params({"a": {"kernel": jnp.ones((2, 2, 2, 2))}})


# ---------------------------------------------------------------------------
# Output embeddings.
# ---------------------------------------------------------------------------


def _embeddings(seed, n, dim=64):
    rng = np.random.default_rng(seed)
    # Dimensions of unequal spread, as a trained model's are.
    x = rng.normal(size=(n, dim)) * np.linspace(2.0, 0.2, dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _ref_ranking(scores, k):
    """Descending scores, lower index first on ties, one row at a time."""
    return np.array([sorted(range(len(row)), key=lambda j: (-row[j], j))[:k] for row in scores])


def test_int8_and_binary_embeddings_equal_sentence_transformers():
    corpus, sample = _embeddings(4, 300), _embeddings(5, 200)
    ranges = quantization.calibration_ranges(sample)
    ours = quantization.quantize_embeddings(corpus, "int8", ranges)
    np.testing.assert_array_equal(ours, st_quantize_embeddings(corpus, "int8", ranges=ranges))
    np.testing.assert_array_equal(
        quantization.quantize_embeddings(corpus, "int8"),
        st_quantize_embeddings(corpus, "int8", calibration_embeddings=corpus),
    )
    bits = quantization.quantize_embeddings(corpus, "binary")
    np.testing.assert_array_equal(bits, st_quantize_embeddings(corpus, "ubinary"))
    # And bit by bit: byte b holds dimensions 8b..8b+7, the first one most significant.
    for row, packed in zip(corpus[:5], bits[:5], strict=True):
        for byte in range(8):
            want = sum(int(row[8 * byte + i] > 0) << (7 - i) for i in range(8))
            assert packed[byte] == want
    # Dequantised int8 stays within one bucket of the original inside the calibrated range.
    back = quantization.dequantize_int8_embeddings(ours, ranges)
    inside = (corpus >= ranges[0]) & (corpus <= ranges[1])
    step = (ranges[1] - ranges[0]) / 255
    assert np.all(np.abs(back - corpus)[inside] <= np.broadcast_to(step, corpus.shape)[inside] * 0.5 + 1e-6)


def test_memory_per_vector():
    assert [quantization.embedding_bytes(384, p) for p in ("float32", "int8", "binary")] == [1536, 384, 48]
    assert quantization.embedding_bytes(100, "binary") == 13
    corpus = _embeddings(6, 10, dim=100)
    for precision in ("float32", "int8", "binary"):
        stored = quantization.quantize_embeddings(corpus, precision)
        assert stored.nbytes == 10 * quantization.embedding_bytes(100, precision)


def test_hamming_distances_count_differing_bits():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 256, size=(70, 5), dtype=np.uint8)  # more than one block of 64 rows
    b = rng.integers(0, 256, size=(9, 5), dtype=np.uint8)
    want = [[sum(bin(int(x) ^ int(y)).count("1") for x, y in zip(r, s, strict=True)) for s in b] for r in a]
    np.testing.assert_array_equal(quantization.hamming_distances(a, b), want)


@pytest.mark.parametrize("block_size", [4096, 37])
def test_binary_search_ranks_by_hamming_distance(block_size):
    corpus, queries = _embeddings(8, 500), _embeddings(9, 20)
    codes = quantization.quantize_embeddings(corpus, "binary")
    scores, ids = quantization.quantized_search(
        queries, codes, 15, precision="binary", rescore=False, block_size=block_size
    )
    query_bits, corpus_bits = (queries > 0).astype(int), (corpus > 0).astype(int)
    distances = np.array([[int(np.sum(q != c)) for c in corpus_bits] for q in query_bits])
    want = _ref_ranking(-distances, 15)  # many ties: the lower row first
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(scores, -np.take_along_axis(distances, want, 1))


def test_int8_search_ranks_by_the_dequantised_corpus():
    corpus, queries = _embeddings(10, 400), _embeddings(11, 12)
    ranges = quantization.calibration_ranges(corpus)
    codes = quantization.quantize_embeddings(corpus, "int8", ranges)
    _, ids = quantization.quantized_search(queries, codes, 10, precision="int8", ranges=ranges, rescore=False)
    lo, step = ranges[0].astype(np.float64), (ranges[1].astype(np.float64) - ranges[0]) / 255
    dequantised = lo + step * (codes.astype(np.float64) + 128.5)
    np.testing.assert_array_equal(ids, _ref_ranking(queries.astype(np.float64) @ dequantised.T, 10))


@pytest.mark.parametrize("precision", ["int8", "binary"])
def test_rescoring_all_candidates_gives_the_float32_ranking_exactly(precision):
    corpus, queries = _embeddings(12, 300), _embeddings(13, 16)
    ranges = quantization.calibration_ranges(corpus)
    codes = quantization.quantize_embeddings(corpus, precision, ranges if precision == "int8" else None)
    scores, ids = quantization.quantized_search(
        queries, codes, 10, precision=precision, ranges=ranges, rescore_corpus=corpus,
        rescore_multiplier=30, block_size=64,
    )  # fmt: skip
    exact = queries.astype(np.float64) @ corpus.astype(np.float64).T
    want = _ref_ranking(exact, 10)
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(exact, want, 1), rtol=1e-6, atol=1e-6)
    # Without the full-precision corpus, candidates are rescored against the quantised vectors.
    _, ids_q = quantization.quantized_search(
        queries, codes, 10, precision=precision, ranges=ranges, rescore_multiplier=30
    )
    if precision == "int8":
        vectors = quantization.dequantize_int8_embeddings(codes, ranges).astype(np.float64)
    else:
        vectors = np.unpackbits(codes, axis=1)[:, :64].astype(np.float64)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    np.testing.assert_array_equal(ids_q, _ref_ranking(queries.astype(np.float64) @ vectors.T, 10))


def test_rescoring_improves_binary_recall():
    # 100 topics of 20 documents each; a query asks about one topic.
    rng = np.random.default_rng(14)
    centres = rng.normal(size=(100, 128))
    corpus = np.repeat(centres, 20, axis=0) + 0.7 * rng.normal(size=(2000, 128))
    queries = centres[:50] + 0.7 * rng.normal(size=(50, 128))
    corpus, queries = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (corpus, queries))
    codes = quantization.quantize_embeddings(corpus, "binary")
    exact = _ref_ranking(queries @ corpus.T, 10)

    def recall(ids):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact, strict=True)])

    _, plain = quantization.quantized_search(queries, codes, 10, precision="binary", rescore=False)
    _, rescored = quantization.quantized_search(
        queries, codes, 10, precision="binary", rescore_corpus=corpus, rescore_multiplier=10
    )
    assert recall(rescored) > recall(plain)
    assert recall(rescored) >= 0.9


def test_bad_search_inputs_raise():
    corpus = _embeddings(16, 20)
    codes = quantization.quantize_embeddings(corpus, "int8")
    with pytest.raises(ConfigError, match="needs its calibration ranges"):
        quantization.quantized_search(corpus[:2], codes, 3, precision="int8")
    with pytest.raises(DataError, match=r"the corpus must be \[num_docs, 8\]"):
        quantization.quantized_search(corpus[:2], codes, 3, precision="binary")
    with pytest.raises(DataError, match=r"int8 calibration needs at least 2 embeddings"):
        quantization.quantize_embeddings(corpus[:1], "int8")
    with pytest.raises(ConfigError, match="embedding precision must be one of"):
        quantization.quantize_embeddings(corpus, "int4")
