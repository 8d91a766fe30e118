"""Quantisation: int8 / int4 weights for quantisation-aware training and export, and
int8 / binary output embeddings for retrieval with full-precision rescoring.

Weights (EmbeddingGemma ships int8 and int4 variants trained this way, Vera et al.
2025, arXiv:2509.20354): per-channel symmetric quantisation of every kernel,
one scale per output channel::

    scale_c = max_{inputs} |w_{.., c}| / qmax          qmax = 127 (int8), 7 (int4)
    q       = clip(round(w / scale), -qmax, qmax)      the integers an export stores
    w_hat   = q * scale                                what the forward pass uses

Quantisation-aware training runs the forward pass on ``w_hat`` and passes the
gradient through the rounding unchanged inside the clip range (the
straight-through estimator, Bengio et al. 2013, arXiv:1308.3432; as in Jacob et
al. 2018, arXiv:1712.05877): ``d w_hat / d w = 1`` where ``|w / scale| <= qmax``,
0 outside. The scale is not differentiated (it follows ``max |w|``).

Why not qwix (google/qwix, on PyPI as 0.1.x, development status alpha): qwix does
QAT by intercepting ``dot_general`` / ``einsum`` calls inside Flax modules that a
regex over module paths selects (``qwix.quantize_model``), deciding each op's
channel axes from its contracting dimensions, and its PTQ weights are
``WithAux(QArray)`` leaves. Here the weights are quantised as a pure function of
the params pytree instead, because (1) it needs no change to the models and works
the same for the BERT and LLM blocks and whatever is added, inside the gradient
cache's re-encoding too; (2) checkpoints, soups and exports keep plain arrays,
and the stored integers are by construction the ones the forward pass used
(``dequantize(quantize(w)) == fake_quantize(w)`` bit for bit); (3) the scale is
``max|w| / qmax`` as int8 consumers (torch, ONNX per-channel
``QuantizeLinear``) expect, where qwix uses ``max|w| / (qmax + 0.5)``; and (4) it
is not a dependency of the project. The whole quantiser is a dozen lines.

Embeddings: int8 with a per-dimension range calibrated on a sample of
embeddings, as sentence-transformers' ``quantize_embeddings`` does (identical
values, so its int8 embeddings and these are interchangeable), and binary (one
sign bit per dimension, packed with ``np.packbits``, searched by Hamming
distance). Per-dimension rather than one global scale: embedding dimensions have
very different spreads (a Matryoshka model's leading dimensions carry the most
variance), and one global range would leave the narrow dimensions a handful of
the 256 levels. Search keeps the quantised corpus in memory, takes the top
``rescore_multiplier * k`` candidates, and rescores only those in full precision
(sentence-transformers' ``semantic_search_faiss`` / usearch's rescoring).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from embedder.errors import ConfigError, DataError

PyTree = Any

# ---------------------------------------------------------------------------
# Weights: fake quantisation with a straight-through estimator, and the real one.
# ---------------------------------------------------------------------------

QMAX = {8: 127, 4: 7}

# Kernels whose LAST two axes are outputs: [embed, heads, head_dim] projections;
# the attention output projection [heads, head_dim, embed] contracts its first two.
_OUTPUT_PROJECTIONS = ("out", "o_proj")
# Embedding tables, quantised (one scale per row) only on request.
_EMBEDDING_NAMES = re.compile(r"^(embedding|.*_embed)$")


def _qmax(bits: int) -> int:
    if bits not in QMAX:
        raise ConfigError(f"weight quantisation bits must be one of {sorted(QMAX)}, got {bits}.")
    return QMAX[bits]


@struct.dataclass
class QuantizedTensor:
    """A quantised weight as an export stores it.

    Attributes:
      values: int8 integers in ``[-qmax, qmax]`` (int4 values also live in int8;
        ``pack_int4`` packs two to a byte), the kernel's shape.
      scale: float32, the kernel's shape with the input axes kept as 1.
      bits: 8 or 4.
      dtype: the dtype of the weight it came from (what ``dequantize`` returns).
    """

    values: jax.Array
    scale: jax.Array
    bits: int = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)


def _integers(w: jax.Array, scale: jax.Array, qmax: float) -> jax.Array:
    """``clip(round(w / scale), -qmax, qmax)`` as floats: the one place the integers come from."""
    return jnp.clip(jnp.round(w / scale), -qmax, qmax)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _fake_quantize(w: jax.Array, scale: jax.Array, qmax: float) -> jax.Array:
    return _integers(w, scale, qmax) * scale


@_fake_quantize.defjvp
def _fake_quantize_jvp(qmax, primals, tangents):
    # Straight-through: the identity where the clip leaves the rounded value alone,
    # 0 where it clips; the scale is not differentiated.
    w, scale = primals
    dw, _ = tangents
    rounded = jnp.round(w / scale)
    out = jnp.clip(rounded, -qmax, qmax) * scale
    return out, jnp.where(jnp.abs(rounded) <= qmax, dw, jnp.zeros_like(dw))


def channel_scale(w: jax.Array, input_axes: Sequence[int], bits: int = 8) -> jax.Array:
    """Per-output-channel scale ``max |w| / qmax`` over the input axes (kept as size 1).

    An all-zero channel gets scale 1 (its integers are 0 either way), never 0.

    Args:
      w: the kernel.
      input_axes: its contracting (input) axes.
      bits: 8 or 4.

    Returns:
      float32 scale, ``w``'s shape with ``input_axes`` of size 1.
    """
    absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=tuple(input_axes), keepdims=True)
    return jnp.where(absmax > 0, absmax / _qmax(bits), 1.0)


def fake_quantize(w: jax.Array, *, bits: int = 8, input_axes: Sequence[int] = (0,)) -> jax.Array:
    """``clip(round(w / scale), -qmax, qmax) * scale`` with a straight-through gradient.

    Args:
      w: a kernel, e.g. [in, out] or [embed, heads, head_dim].
      bits: 8 or 4.
      input_axes: the axes the kernel contracts; the others are output channels.

    Returns:
      The dequantised kernel in ``w``'s dtype; its gradient w.r.t. ``w`` is exactly
      the identity wherever the clip does not act (everywhere, with this scale).
    """
    qmax = _qmax(bits)
    scale = jax.lax.stop_gradient(channel_scale(w, input_axes, bits))
    return _fake_quantize(w.astype(jnp.float32), scale, float(qmax)).astype(w.dtype)


def quantize(w: jax.Array, *, bits: int = 8, input_axes: Sequence[int] = (0,)) -> QuantizedTensor:
    """The integers and per-channel scales of ``w``: what an export stores.

    Args:
      w, bits, input_axes: as for ``fake_quantize``.

    Returns:
      ``QuantizedTensor`` with ``dequantize(quantize(w)) == fake_quantize(w)`` exactly.
    """
    qmax = _qmax(bits)
    scale = channel_scale(w, input_axes, bits)
    values = _integers(jnp.asarray(w).astype(jnp.float32), scale, float(qmax)).astype(jnp.int8)
    return QuantizedTensor(values=values, scale=scale, bits=bits, dtype=jnp.dtype(w.dtype).name)


def dequantize(tensor: QuantizedTensor) -> jax.Array:
    """``values * scale`` in the original weight's dtype."""
    return (tensor.values.astype(jnp.float32) * tensor.scale).astype(tensor.dtype)


def kernel_input_axes(path: Sequence[str], shape: Sequence[int]) -> tuple[int, ...]:
    """The contracting axes of a kernel, from its place in the params tree.

    ``[in, out]`` and the ``[embed, heads, head_dim]`` query/key/value projections
    contract axis 0; the attention output projection ``[heads, head_dim, embed]``
    (module ``out`` / ``o_proj``) contracts axes 0 and 1; an embedding table
    ``[vocab, embed]`` is read by rows, so each row is a channel (axis 1 reduced).

    Raises:
      ConfigError: a weight of a rank this rule does not know.
    """
    name = path[-1]
    if _EMBEDDING_NAMES.match(name) and len(shape) == 2:
        return (1,)
    if len(shape) == 2:
        return (0,)
    if len(shape) == 3:
        return (0, 1) if len(path) > 1 and path[-2] in _OUTPUT_PROJECTIONS else (0,)
    raise ConfigError(f"no channel rule for the weight {'/'.join(path)} of shape {tuple(shape)}.")


def is_quantized_weight(path: Sequence[str], include_embeddings: bool = False) -> bool:
    """Dense / attention / MLP kernels; norms, biases, scalars and (by default) embeddings not."""
    if any("norm" in part for part in path):
        return False
    if path[-1] == "kernel":
        return True
    return include_embeddings and bool(_EMBEDDING_NAMES.match(path[-1]))


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def _map_weights(fn: Callable[[jax.Array, tuple[int, ...]], Any], params: PyTree, include_embeddings: bool):
    def visit(path, leaf):
        names = _path_names(path)
        if not is_quantized_weight(names, include_embeddings):
            return leaf
        return fn(leaf, kernel_input_axes(names, leaf.shape))

    return jax.tree_util.tree_map_with_path(visit, params)


def fake_quantize_params(params: PyTree, *, bits: int = 8, include_embeddings: bool = False) -> PyTree:
    """``fake_quantize`` on every kernel of a params tree (the QAT forward pass's weights).

    Call it inside the loss or ``embed_fn`` on the parameters being trained: the
    optimiser keeps updating the float weights, the model sees their quantised
    values, and the straight-through gradient reaches the float weights.

    Args:
      params: a model's params (plain arrays, not boxed).
      bits: 8 or 4.
      include_embeddings: also the token / position / type embedding tables.

    Returns:
      The same tree, kernels replaced by their dequantised values.
    """
    return _map_weights(
        lambda w, axes: fake_quantize(w, bits=bits, input_axes=axes), params, include_embeddings
    )


# Jitted: one compile for the whole tree, where op-by-op each kernel shape compiles
# every op of its own (seconds for a model, most of an export's time).
@functools.partial(jax.jit, static_argnames=("bits", "include_embeddings"))
def quantize_params(params: PyTree, *, bits: int = 8, include_embeddings: bool = False) -> PyTree:
    """``quantize`` on every kernel: the tree with ``QuantizedTensor`` leaves an export writes."""
    return _map_weights(lambda w, axes: quantize(w, bits=bits, input_axes=axes), params, include_embeddings)


@jax.jit
def dequantize_params(params: PyTree) -> PyTree:
    """Undoes ``quantize_params``: equal to ``fake_quantize_params`` of the source, bit for bit."""
    return jax.tree.map(
        lambda x: dequantize(x) if isinstance(x, QuantizedTensor) else x,
        params,
        is_leaf=lambda x: isinstance(x, QuantizedTensor),
    )


WEIGHT_FORMATS = {"int8": 8, "int4": 4}
SCHEME = (
    "symmetric, per output channel: scale = max|w| / qmax over the input axes, "
    "q = clip(round(w / scale), -qmax, qmax), w_hat = q * scale"
)


def weight_bits(name: str) -> int:
    """8 or 4 for ``"int8"`` / ``"int4"`` (the ``--quantize`` values)."""
    if name not in WEIGHT_FORMATS:
        raise ConfigError(f"quantize={name!r}: expected one of {sorted(WEIGHT_FORMATS)}")
    return WEIGHT_FORMATS[name]


def describe_weights(params: PyTree, *, bits: int, include_embeddings: bool = False) -> dict[str, Any]:
    """What an export records about its quantised weights, so a loader knows.

    Args:
      params: the float params (names, shapes and dtypes are read, nothing computed).
      bits: 8 or 4.
      include_embeddings: whether the embedding tables were quantised too.

    Returns:
      {"bits", "qmax", "scheme", "include_embeddings", "weights": {"a/b/kernel":
      {"shape", "input_axes", "dtype"}}}: every quantised weight, its contracting axes
      (the others are output channels, one scale each) and its float dtype.
    """
    qmax = _qmax(bits)
    weights = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = _path_names(path)
        if is_quantized_weight(names, include_embeddings):
            weights["/".join(names)] = {
                "shape": list(leaf.shape),
                "input_axes": list(kernel_input_axes(names, leaf.shape)),
                "dtype": jnp.dtype(leaf.dtype).name,
            }
    return {
        "bits": bits,
        "qmax": qmax,
        "scheme": SCHEME,
        "include_embeddings": include_embeddings,
        "weights": weights,
    }


def pack_int4(values: np.ndarray) -> np.ndarray:
    """Two int4 values in [-8, 7] to a byte along the last axis (low nibble first), uint8.

    An odd last axis is padded with a 0 nibble; ``unpack_int4`` needs the length.
    """
    values = np.asarray(values)
    if values.size and (values.min() < -8 or values.max() > 7):
        raise DataError(f"int4 values must lie in [-8, 7], got [{values.min()}, {values.max()}].")
    nibbles = (values.astype(np.int16) & 0xF).astype(np.uint8)
    if nibbles.shape[-1] % 2:
        nibbles = np.concatenate([nibbles, np.zeros((*nibbles.shape[:-1], 1), np.uint8)], axis=-1)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_int4(packed: np.ndarray, length: int) -> np.ndarray:
    """The inverse of ``pack_int4``: int8 values, the last axis cut to ``length``."""
    packed = np.asarray(packed, np.uint8)
    nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)[..., :length]
    return np.where(nibbles >= 8, nibbles.astype(np.int16) - 16, nibbles).astype(np.int8)


# ---------------------------------------------------------------------------
# Output embeddings: int8 / binary corpora, searched then rescored in full precision.
# ---------------------------------------------------------------------------

PRECISIONS = ("float32", "int8", "binary")


def embedding_bytes(dim: int, precision: str) -> int:
    """Bytes per stored vector: 4 * dim (float32), dim (int8), ceil(dim / 8) (binary).

    An int8 corpus also stores its calibration ranges once ([2, dim] float32).
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"embedding precision must be one of {PRECISIONS}, got {precision!r}.")
    return {"float32": 4 * dim, "int8": dim, "binary": -(-dim // 8)}[precision]


def calibration_ranges(embeddings: np.ndarray) -> np.ndarray:
    """[2, dim] float32: each dimension's minimum and maximum over a calibration sample."""
    embeddings = np.asarray(embeddings, np.float32)
    if embeddings.ndim != 2 or len(embeddings) < 2:
        raise DataError(
            f"int8 calibration needs at least 2 embeddings [n, dim], got shape {embeddings.shape}: "
            "pass a representative sample of the corpus."
        )
    return np.stack([embeddings.min(axis=0), embeddings.max(axis=0)])


def quantize_embeddings(
    embeddings: np.ndarray, precision: str, ranges: np.ndarray | None = None
) -> np.ndarray:
    """Quantised embeddings: int8 by per-dimension buckets, or packed sign bits.

    int8 (sentence-transformers' formula): 256 equal buckets between each
    dimension's calibrated minimum and maximum,
    ``clip(floor((x - min) / step), 0, 255) - 128`` with ``step = (max - min) / 255``.
    binary: ``np.packbits(x > 0)``, ``ceil(dim / 8)`` uint8 per vector.

    Args:
      embeddings: [n, dim] float embeddings.
      precision: ``"int8"``, ``"binary"`` or ``"float32"`` (a copy in float32).
      ranges: [2, dim] from ``calibration_ranges`` (int8 only); ``None`` calibrates on
        ``embeddings`` themselves (fine for a whole corpus, not for a few queries).

    Returns:
      [n, dim] int8, [n, ceil(dim / 8)] uint8, or [n, dim] float32.
    """
    embedding_bytes(1, precision)
    embeddings = np.asarray(embeddings, np.float32)
    if precision == "float32":
        return embeddings.copy()
    if precision == "binary":
        return np.packbits(embeddings > 0, axis=-1)
    ranges = calibration_ranges(embeddings) if ranges is None else np.asarray(ranges, np.float32)
    if ranges.shape != (2, embeddings.shape[-1]):
        raise DataError(f"int8 ranges must be [2, dim] = [2, {embeddings.shape[-1]}], got {ranges.shape}.")
    starts = ranges[0]
    steps = (ranges[1] - starts) / 255
    steps = np.where(steps == 0, 1, steps)
    return (np.clip(np.floor((embeddings - starts) / steps), 0, 255) - 128).astype(np.int8)


def dequantize_int8_embeddings(quantized: np.ndarray, ranges: np.ndarray) -> np.ndarray:
    """Each int8 value back to the middle of its bucket, float32."""
    ranges = np.asarray(ranges, np.float32)
    steps = (ranges[1] - ranges[0]) / 255
    steps = np.where(steps == 0, 1, steps)
    return ranges[0] + steps * (quantized.astype(np.float32) + 128.5)


def hamming_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[n_a, n_b] int32: differing bits between packed binary codes (popcount of XOR).

    Rows of ``a`` go 64 at a time, so the XOR never holds more than 64 x n_b codes.
    """
    out = np.empty((len(a), len(b)), np.int32)
    for start in range(0, len(a), 64):
        rows = a[start : start + 64, None, :] ^ b[None, :, :]
        out[start : start + 64] = np.bitwise_count(rows).sum(axis=-1, dtype=np.int32)
    return out


def _top(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the k highest scores; equal scores keep the lower id first."""
    order = np.lexsort((ids, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, -1), np.take_along_axis(ids, order, -1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def quantized_search(
    queries: np.ndarray,
    corpus: np.ndarray,
    k: int,
    *,
    precision: str,
    ranges: np.ndarray | None = None,
    rescore_corpus: np.ndarray | None = None,
    rescore_multiplier: int = 4,
    rescore: bool = True,
    block_size: int = 4096,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k over a quantised corpus, then the candidates rescored in full precision.

    First stage, over the whole quantised corpus in blocks of ``block_size`` rows:
    int8, the float query against the dequantised corpus (``q . x_hat``); binary,
    the query's sign bits against the corpus's by Hamming distance (score =
    minus the distance). The top ``rescore_multiplier * k`` candidates are then
    rescored by cosine with the float query: against ``rescore_corpus`` (the
    full-precision vectors, e.g. a memory-mapped file) when given, else against
    the quantised vectors (dequantised int8, or the 0/1 bits as
    sentence-transformers does). When the candidates cover the corpus and
    ``rescore_corpus`` is given, the result is the exact float32 cosine ranking.

    Args:
      queries: [num_queries, dim] float embeddings.
      corpus: [num_docs, dim] int8 or [num_docs, ceil(dim / 8)] uint8 from
        ``quantize_embeddings``.
      k: results per query (at most num_docs).
      precision: ``"int8"`` or ``"binary"``: what ``corpus`` holds.
      ranges: the int8 corpus's calibration ranges (required for int8).
      rescore_corpus: [num_docs, dim] full-precision corpus, or None.
      rescore_multiplier: candidates per result kept for rescoring (>= 1).
      rescore: False returns the first stage's top k and scores.
      block_size: corpus rows scored at once.

    Returns:
      ``(scores, ids)``: [num_queries, k] float32 scores in descending order and
      int64 corpus rows, ties broken by the lower row.
    """
    if precision not in ("int8", "binary"):
        raise ConfigError(f"quantized search precision must be 'int8' or 'binary', got {precision!r}.")
    queries = np.asarray(queries, np.float32)
    num_docs, dim = len(corpus), queries.shape[-1]
    expected = (num_docs, dim) if precision == "int8" else (num_docs, -(-dim // 8))
    if queries.ndim != 2 or corpus.shape != expected or num_docs == 0:
        raise DataError(
            f"queries {queries.shape} and a {precision} corpus {corpus.shape} do not fit: the corpus must be "
            f"[num_docs, {expected[1]}] with num_docs > 0 for {dim}-dimensional queries."
        )
    if precision == "int8" and ranges is None:
        raise ConfigError("an int8 corpus needs its calibration ranges to be searched.")
    if rescore_multiplier < 1 or k < 1:
        raise ConfigError(f"k={k} and rescore_multiplier={rescore_multiplier} must be >= 1.")
    if rescore_corpus is not None and np.shape(rescore_corpus) != (num_docs, dim):
        raise DataError(f"rescore_corpus must be [{num_docs}, {dim}], got {np.shape(rescore_corpus)}.")
    k = min(k, num_docs)
    candidates = min(k * rescore_multiplier, num_docs) if rescore else k
    packed_queries = np.packbits(queries > 0, axis=-1) if precision == "binary" else None

    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, num_docs, block_size):
        block = corpus[start : start + block_size]
        if precision == "int8":
            scores = queries @ dequantize_int8_embeddings(block, ranges).T
        else:
            scores = -hamming_distances(packed_queries, block).astype(np.float32)
        ids = np.broadcast_to(np.arange(start, start + len(block)), scores.shape)
        best_scores, best_ids = _top(
            np.concatenate([best_scores, scores], axis=1), np.concatenate([best_ids, ids], axis=1), candidates
        )
    if not rescore:
        return best_scores, best_ids

    if rescore_corpus is not None:
        vectors = np.asarray(rescore_corpus[best_ids.ravel()], np.float32)
    elif precision == "int8":
        vectors = dequantize_int8_embeddings(corpus[best_ids.ravel()], ranges)
    else:
        vectors = np.unpackbits(corpus[best_ids.ravel()], axis=-1)[:, :dim].astype(np.float32)
    vectors = _unit(vectors).reshape(*best_ids.shape, dim)  # [num_queries, candidates, dim]
    rescored = np.einsum("qd,qcd->qc", _unit(queries), vectors).astype(np.float32)
    return _top(rescored, best_ids, k)


def _exact_search(
    queries: np.ndarray, corpus: np.ndarray, k: int, block_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by cosine over a float corpus, in blocks; ties by the lower row."""
    queries = _unit(np.asarray(queries, np.float32))
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(corpus), block_size):
        block = _unit(np.asarray(corpus[start : start + block_size], np.float32))
        scores = queries @ block.T
        ids = np.broadcast_to(np.arange(start, start + len(block)), scores.shape)
        best_scores, best_ids = _top(
            np.concatenate([best_scores, scores], axis=1), np.concatenate([best_ids, ids], axis=1), k
        )
    return best_scores, best_ids


@dataclasses.dataclass(frozen=True)
class QuantizedIndex:
    """A corpus's embeddings stored at one precision, searched with ``quantized_search``.

    Attributes:
      codes: what the index keeps in memory: [n, dim] float32, [n, dim] int8, or
        [n, ceil(dim / 8)] uint8 sign bits.
      precision: ``"float32"``, ``"int8"`` or ``"binary"``.
      dim: the embedding size.
      ranges: [2, dim] int8 calibration ranges (int8 only).
      full_precision: [n, dim] float vectors the candidates are rescored against
        (e.g. a ``np.load(..., mmap_mode="r")`` array: only the candidates' rows
        are read), or None to rescore against the quantised vectors.
    """

    codes: np.ndarray
    precision: str
    dim: int
    ranges: np.ndarray | None = None
    full_precision: np.ndarray | None = None

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        precision: str,
        *,
        calibration: np.ndarray | None = None,
        keep_full_precision: bool = True,
    ) -> QuantizedIndex:
        """Quantises a corpus's embeddings into an index.

        Args:
          embeddings: [n, dim] float embeddings of the corpus.
          precision: one of ``PRECISIONS``.
          calibration: [m, dim] embeddings the int8 ranges are taken from (None:
            the corpus itself).
          keep_full_precision: keep ``embeddings`` for rescoring (in practice a
            memory-mapped file beside the index; not counted in ``nbytes``).

        Returns:
          The index.
        """
        embedding_bytes(1, precision)
        embeddings = np.asarray(embeddings, np.float32)
        if embeddings.ndim != 2 or not len(embeddings):
            raise DataError(
                f"an index needs [num_docs, dim] embeddings with num_docs > 0, got {embeddings.shape}"
            )
        ranges = None
        if precision == "int8":
            ranges = calibration_ranges(embeddings if calibration is None else calibration)
        return cls(
            codes=quantize_embeddings(embeddings, precision, ranges),
            precision=precision,
            dim=embeddings.shape[1],
            ranges=ranges,
            full_precision=embeddings if keep_full_precision and precision != "float32" else None,
        )

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def nbytes(self) -> int:
        """Bytes the index holds in memory: the codes, plus the int8 ranges."""
        return int(self.codes.nbytes + (self.ranges.nbytes if self.ranges is not None else 0))

    def search(
        self, queries: np.ndarray, k: int, *, rescore_multiplier: int = 4, block_size: int = 4096
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k corpus rows for each query (see ``quantized_search``; float32: exact cosine).

        Args:
          queries: [num_queries, dim] float query embeddings.
          k: results per query (at most the corpus size).
          rescore_multiplier: candidates per result rescored in full precision (>= 1).
          block_size: corpus rows scored at once.

        Returns:
          ``(scores, ids)``: [num_queries, min(k, n)] float32 descending and int64 rows.
        """
        queries = np.asarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DataError(f"queries must be [num_queries, {self.dim}] for this index, got {queries.shape}")
        if k < 1 or rescore_multiplier < 1:
            raise ConfigError(f"k={k} and rescore_multiplier={rescore_multiplier} must be >= 1.")
        if self.precision == "float32":
            return _exact_search(queries, self.codes, min(k, len(self)), block_size)
        return quantized_search(
            queries,
            self.codes,
            k,
            precision=self.precision,
            ranges=self.ranges,
            rescore_corpus=self.full_precision,
            rescore_multiplier=rescore_multiplier,
            block_size=block_size,
        )
