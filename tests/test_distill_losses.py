"""The teacher terms of embedder.losses against plain numpy loops written from the formulas.

The references loop over examples and candidates in Python float64 and share no
code with the JAX implementation. Beyond the values: gradients against central
finite differences of the references, 8 sharded devices against one, no gradient
into the teacher, and the gradient cache against the plain step.
"""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from embedder import gradcache, losses, partitioning
from embedder.errors import ConfigError, DataError
from embedder.models import dual_encoder, transformer

# ---------------------------------------------------------------------------
# Independent numpy references.
# ---------------------------------------------------------------------------


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _log_softmax(values):
    top = max(values)
    log_z = top + math.log(sum(math.exp(v - top) for v in values))
    return [v - log_z for v in values]


def _kl(teacher_logits, student_logits):
    log_t, log_s = _log_softmax(teacher_logits), _log_softmax(student_logits)
    return sum(math.exp(a) * (a - b) for a, b in zip(log_t, log_s, strict=True))


def _dims(dims, dim_weights, full):
    dims = dims or (full,)
    return list(zip(dims, dim_weights or (1.0,) * len(dims), strict=True))


def ref_embedding_matching(
    student, teacher, *, projection=None, metric="cosine", weights=None, dims=(), dim_weights=None
):
    student = np.asarray(student, np.float64).reshape(-1, student.shape[-1])
    teacher = np.asarray(teacher, np.float64).reshape(-1, teacher.shape[-1])
    w = np.ones(len(student)) if weights is None else np.asarray(weights, np.float64).reshape(-1)
    total = 0.0
    for d, c in _dims(dims, dim_weights, student.shape[1]):
        num = 0.0
        for i in range(len(student)):
            if projection is None:
                s, t = student[i, :d], teacher[i, :d]
            else:
                s = sum(student[i, e] * np.asarray(projection[e], np.float64) for e in range(d))
                t = teacher[i]
            if metric == "cosine":
                term = 1.0 - _cos(s, t)
            else:
                term = sum((a - b) ** 2 for a, b in zip(s, t, strict=True)) / len(s)
            num += w[i] * term
        total += c * num / w.sum()
    return total


def ref_score_distillation(
    q, p, n, tq, tp, tn, *, tau, tau_t, weights=None, negative_mask=None, dims=(), dim_weights=None
):
    batch = len(q)
    k = 0 if n is None else n.shape[1]
    w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
    total = 0.0
    for d, c in _dims(dims, dim_weights, q.shape[1]):
        num = 0.0
        for i in range(batch):
            student, teacher = [], []
            for j in range(batch):
                if j == i or w[j] > 0:
                    student.append(_cos(q[i, :d], p[j, :d]) / tau)
                    teacher.append(_cos(tq[i], tp[j]) / tau_t)
            for j in range(batch):
                for m in range(k):
                    if w[j] > 0 and (negative_mask is None or negative_mask[j][m]):
                        student.append(_cos(q[i, :d], n[j, m, :d]) / tau)
                        teacher.append(_cos(tq[i], tn[j, m]) / tau_t)
            num += w[i] * _kl(teacher, student)
        total += c * num / w.sum()
    return total


def _list_scores(q, p, n, i, d):
    """The student's cosines of query i with its positive, then its negatives, at size d."""
    k = 0 if n is None else n.shape[1]
    return [_cos(q[i, :d], p[i, :d])] + [_cos(q[i, :d], n[i, m, :d]) for m in range(k)]


def ref_margin_mse(q, p, n, scores, *, tau=1.0, mask=None, weights=None, dims=(), dim_weights=None):
    batch, k = len(q), n.shape[1]
    w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
    total = 0.0
    for d, c in _dims(dims, dim_weights, q.shape[1]):
        num = den = 0.0
        for i in range(batch):
            s = [x / tau for x in _list_scores(q, p, n, i, d)]
            for m in range(1, k + 1):
                if mask is not None and not (mask[i][0] and mask[i][m]):
                    continue
                num += w[i] * ((s[0] - s[m]) - (scores[i][0] - scores[i][m])) ** 2
                den += w[i]
        total += c * (num / den if den else 0.0)
    return total


def ref_listwise_kl(q, p, n, scores, *, tau, tau_t=1.0, mask=None, weights=None, dims=(), dim_weights=None):
    batch = len(q)
    w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
    total = 0.0
    for d, c in _dims(dims, dim_weights, q.shape[1]):
        num = den = 0.0
        for i in range(batch):
            entries = [m for m in range(scores.shape[1]) if mask is None or mask[i][m]]
            if not entries:
                continue
            s = _list_scores(q, p, n, i, d)
            num += w[i] * _kl([scores[i][m] / tau_t for m in entries], [s[m] / tau for m in entries])
            den += w[i]
        total += c * (num / den if den else 0.0)
    return total


# ---------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------


def _batch(seed, batch=8, dim=12, k=3, teacher_dim=20, dtype=np.float32):
    """Student and teacher embeddings of the same texts, and the teacher's scores."""
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(batch, dim))
    p = q + 0.8 * rng.normal(size=(batch, dim))
    n = q[:, None] + 1.2 * rng.normal(size=(batch, k, dim))
    tq = rng.normal(size=(batch, teacher_dim))
    tp = tq + 0.6 * rng.normal(size=(batch, teacher_dim))
    tn = tq[:, None] + 1.0 * rng.normal(size=(batch, k, teacher_dim))
    scores = rng.normal(scale=3.0, size=(batch, 1 + k))
    scores[:, 0] += 4.0  # a cross-encoder usually ranks the positive first
    return [x.astype(dtype) for x in (q, p, n, tq, tp, tn, scores)]


TOL = dict(rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------------------
# 1. Each term against its reference.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "mse"])
@pytest.mark.parametrize("mapped", [False, True])
def test_embedding_matching_matches_reference(metric, mapped):
    q, p, n, tq, tp, tn, _ = _batch(0)
    teacher = tq if mapped else tq[:, :12]
    projection = np.random.default_rng(1).normal(size=(12, 20)).astype(np.float32) if mapped else None
    weights = np.array([1, 1, 0.5, 1, 0, 1, 2, 1], np.float32)
    dims, dim_weights = (12, 8, 4), (1.0, 0.5, 0.25)
    loss, metrics = jax.jit(
        functools.partial(
            losses.embedding_matching_loss,
            metric=metric,
            matryoshka_dims=dims,
            matryoshka_weights=dim_weights,
        )
    )(q, teacher, projection=projection, weights=weights)
    want = ref_embedding_matching(
        q, teacher, projection=projection, metric=metric, weights=weights, dims=dims, dim_weights=dim_weights
    )
    np.testing.assert_allclose(float(loss), want, **TOL)
    want_4 = ref_embedding_matching(
        q, teacher, projection=projection, metric=metric, weights=weights, dims=(4,)
    )
    np.testing.assert_allclose(float(metrics["loss/embedding_matching/dim_4"]), want_4, **TOL)


def test_embedding_matching_takes_any_leading_shape():
    """Hard negatives [batch, k, dim] with a [batch, k] mask are rows like any other."""
    _, _, n, _, _, tn, _ = _batch(2)
    mask = np.ones((8, 3), np.float32)
    mask[1, 2] = mask[5, 0] = 0.0
    loss, _ = losses.embedding_matching_loss(n, tn[..., :12], weights=mask)
    want = ref_embedding_matching(n, tn[..., :12], weights=mask)
    np.testing.assert_allclose(float(loss), want, **TOL)


def test_embedding_matching_is_zero_when_the_student_is_the_teacher():
    q = _batch(3)[0]
    loss, _ = losses.embedding_matching_loss(q, q, matryoshka_dims=(12, 6))
    assert abs(float(loss)) < 1e-6
    loss, _ = losses.embedding_matching_loss(q, q, metric="mse")
    assert float(loss) == 0.0


@pytest.mark.parametrize("with_negatives", [False, True])
def test_score_distillation_matches_reference(with_negatives):
    q, p, n, tq, tp, tn, _ = _batch(4)
    if not with_negatives:
        n = tn = None
    weights = np.array([1, 1, 1, 0, 1, 1, 2, 1], np.float32)  # example 3 is padding
    mask = np.ones((8, 3), bool)
    mask[0, 1] = mask[6, 2] = False  # missing hard negatives
    mask = mask if with_negatives else None
    kwargs = dict(
        temperature=0.05, teacher_temperature=0.1, matryoshka_dims=(12, 6), matryoshka_weights=(1.0, 0.5)
    )
    loss, metrics = jax.jit(functools.partial(losses.score_distillation_loss, **kwargs))(
        q, p, n, tq, tp, tn, weights=weights, negative_mask=mask
    )
    want = ref_score_distillation(
        q,
        p,
        n,
        tq,
        tp,
        tn,
        tau=0.05,
        tau_t=0.1,
        weights=weights,
        negative_mask=mask,
        dims=(12, 6),
        dim_weights=(1.0, 0.5),
    )
    np.testing.assert_allclose(float(loss), want, **TOL)
    assert set(metrics) == {"loss/score_distillation/dim_12", "loss/score_distillation/dim_6"}


def test_score_distillation_is_zero_when_the_student_is_the_teacher():
    q, p, n, *_ = _batch(5)
    loss, _ = losses.score_distillation_loss(q, p, n, q, p, n, temperature=0.07, teacher_temperature=0.07)
    assert abs(float(loss)) < 1e-6


def test_margin_mse_matches_reference():
    q, p, n, _, _, _, scores = _batch(6)
    mask = np.ones((8, 4), bool)
    mask[2, 3] = mask[4, 1] = False  # missing negatives
    mask[7, 0] = False  # no score for the positive: every pair of example 7 goes
    weights = np.array([1, 1, 1, 1, 0, 1, 1, 1], np.float32)
    kwargs = dict(temperature=0.25, matryoshka_dims=(12, 4), matryoshka_weights=(1.0, 2.0))
    loss, _ = jax.jit(functools.partial(losses.margin_mse_loss, **kwargs))(
        q, p, n, scores, score_mask=mask, weights=weights
    )
    want = ref_margin_mse(
        q, p, n, scores, tau=0.25, mask=mask, weights=weights, dims=(12, 4), dim_weights=(1.0, 2.0)
    )
    np.testing.assert_allclose(float(loss), want, **TOL)


def test_missing_scores_are_masked_not_filled():
    """Whatever placeholder sits under a masked score, the loss and gradient are the same."""
    q, p, n, _, _, _, scores = _batch(7)
    mask = np.ones((8, 4), bool)
    mask[1, 2] = mask[3, 0] = False
    changed = scores.copy()
    changed[1, 2], changed[3, 0] = 1e4, np.nan
    for fn in (
        functools.partial(losses.margin_mse_loss, temperature=0.2),
        functools.partial(losses.listwise_kl_loss, temperature=0.05),
    ):
        grad = jax.jit(jax.value_and_grad(lambda q, s, fn=fn: fn(q, p, n, s, score_mask=mask)[0]))
        (a, ga), (b, gb) = grad(q, scores), grad(q, changed)
        assert np.isfinite(float(a))
        np.testing.assert_array_equal(float(a), float(b))
        np.testing.assert_array_equal(np.asarray(ga), np.asarray(gb))


def test_listwise_kl_matches_reference():
    q, p, n, _, _, _, scores = _batch(8)
    mask = np.ones((8, 4), bool)
    mask[0, 2] = mask[5, 3] = mask[5, 1] = False
    mask[6] = False  # nothing valid: the example weighs 0
    weights = np.array([1, 2, 1, 1, 1, 1, 1, 0.5], np.float32)
    kwargs = dict(temperature=0.05, teacher_temperature=2.0, matryoshka_dims=(12, 6))
    loss, metrics = jax.jit(functools.partial(losses.listwise_kl_loss, **kwargs))(
        q, p, n, scores, score_mask=mask, weights=weights
    )
    want = ref_listwise_kl(q, p, n, scores, tau=0.05, tau_t=2.0, mask=mask, weights=weights, dims=(12, 6))
    np.testing.assert_allclose(float(loss), want, **TOL)
    want_6 = ref_listwise_kl(q, p, n, scores, tau=0.05, tau_t=2.0, mask=mask, weights=weights, dims=(6,))
    np.testing.assert_allclose(float(metrics["loss/listwise_kl/dim_6"]), want_6, **TOL)


def test_all_padding_batch_is_zero_not_nan():
    q, p, n, tq, tp, tn, scores = _batch(9)
    zeros = np.zeros(8, np.float32)
    values = [
        losses.embedding_matching_loss(q, tq[:, :12], weights=zeros)[0],
        losses.score_distillation_loss(
            q, p, n, tq, tp, tn, temperature=0.05, teacher_temperature=0.05, weights=zeros
        )[0],
        losses.margin_mse_loss(q, p, n, scores, weights=zeros)[0],
        losses.listwise_kl_loss(q, p, n, scores, temperature=0.05, weights=zeros)[0],
    ]
    assert [float(v) for v in values] == [0.0] * 4


# ---------------------------------------------------------------------------
# 2. Gradients against central finite differences of the references, in float64.
# ---------------------------------------------------------------------------


def _finite_differences(fn, args, which, eps=1e-6):
    numeric = np.zeros_like(args[which])
    for index in np.ndindex(args[which].shape):
        plus = [x.copy() for x in args]
        minus = [x.copy() for x in args]
        plus[which][index] += eps
        minus[which][index] -= eps
        numeric[index] = (fn(*plus) - fn(*minus)) / (2 * eps)
    return numeric


def _check_gradients(jax_fn, ref_fn, args, which):
    with jax.enable_x64(True):
        jax_args = [jnp.asarray(x, jnp.float64) for x in args]
        value, grads = jax.jit(jax.value_and_grad(jax_fn, argnums=which))(*jax_args)
        assert value.dtype == jnp.float64
        grads = [np.asarray(g) for g in grads]
    np.testing.assert_allclose(float(value), ref_fn(*args), rtol=1e-12)
    for index, grad in zip(which, grads, strict=True):
        np.testing.assert_allclose(grad, _finite_differences(ref_fn, args, index), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("metric", ["cosine", "mse"])
def test_embedding_matching_gradient_matches_finite_differences(metric):
    q, *_ = _batch(10, batch=4, dim=6, k=2, teacher_dim=5, dtype=np.float64)
    teacher = _batch(11, batch=4, dim=6, k=2, teacher_dim=5, dtype=np.float64)[3]
    projection = np.random.default_rng(12).normal(size=(6, 5))
    weights = np.array([1.0, 0.5, 0.0, 2.0])
    kwargs = dict(metric=metric, weights=weights, dims=(6, 3), dim_weights=(1.0, 0.5))

    def jax_fn(s, t, w):
        return losses.embedding_matching_loss(
            s,
            t,
            projection=w,
            metric=metric,
            weights=jnp.asarray(weights),
            matryoshka_dims=(6, 3),
            matryoshka_weights=(1.0, 0.5),
        )[0]

    _check_gradients(
        jax_fn,
        lambda s, t, w: ref_embedding_matching(s, t, projection=w, **kwargs),
        [q, teacher, projection],
        (0, 2),
    )


def test_score_distillation_gradient_matches_finite_differences():
    q, p, n, tq, tp, tn, _ = _batch(13, batch=4, dim=5, k=2, teacher_dim=7, dtype=np.float64)
    weights = np.array([1.0, 1.0, 0.0, 2.0])
    mask = np.array([[True, False], [True, True], [True, True], [False, True]])
    kwargs = dict(
        tau=0.2, tau_t=0.1, weights=weights, negative_mask=mask, dims=(5, 2), dim_weights=(1.0, 0.5)
    )

    def jax_fn(q, p, n):
        return losses.score_distillation_loss(
            q, p, n, tq, tp, tn,
            temperature=0.2, teacher_temperature=0.1, weights=jnp.asarray(weights), negative_mask=jnp.asarray(mask),
            matryoshka_dims=(5, 2), matryoshka_weights=(1.0, 0.5),
        )[0]  # fmt: skip

    _check_gradients(
        jax_fn, lambda q, p, n: ref_score_distillation(q, p, n, tq, tp, tn, **kwargs), [q, p, n], (0, 1, 2)
    )


@pytest.mark.parametrize("term", ["margin_mse", "listwise_kl"])
def test_given_score_gradients_match_finite_differences(term):
    q, p, n, _, _, _, scores = _batch(14, batch=4, dim=5, k=3, dtype=np.float64)
    mask = np.ones((4, 4), bool)
    mask[1, 2] = mask[3, 0] = False
    weights = np.array([1.0, 2.0, 1.0, 1.0])
    if term == "margin_mse":
        ref = lambda q, p, n: ref_margin_mse(
            q, p, n, scores, tau=0.5, mask=mask, weights=weights, dims=(5, 3)
        )  # noqa: E731
        fn = functools.partial(losses.margin_mse_loss, temperature=0.5)
    else:
        ref = lambda q, p, n: ref_listwise_kl(
            q, p, n, scores, tau=0.1, tau_t=1.5, mask=mask, weights=weights, dims=(5, 3)
        )  # noqa: E731
        fn = functools.partial(losses.listwise_kl_loss, temperature=0.1, teacher_temperature=1.5)

    def jax_fn(q, p, n):
        return fn(
            q,
            p,
            n,
            jnp.asarray(scores),
            score_mask=jnp.asarray(mask),
            weights=jnp.asarray(weights),
            matryoshka_dims=(5, 3),
        )[0]

    _check_gradients(jax_fn, ref, [q, p, n], (0, 1, 2))


# ---------------------------------------------------------------------------
# 3. The teacher gets no gradient.
# ---------------------------------------------------------------------------


def test_teacher_gets_exactly_zero_gradient():
    q, p, n, tq, tp, tn, scores = _batch(15)
    projection = np.random.default_rng(16).normal(size=(12, 20)).astype(np.float32)

    def everything(q, p, n, tq, tp, tn, scores):
        total = losses.embedding_matching_loss(q, tq, projection=projection)[0]
        total += losses.embedding_matching_loss(n, tn[..., :12], metric="mse")[0]
        total += losses.score_distillation_loss(
            q, p, n, tq, tp, tn, temperature=0.05, teacher_temperature=0.05
        )[0]
        total += losses.margin_mse_loss(q, p, n, scores, temperature=0.1)[0]
        total += losses.listwise_kl_loss(q, p, n, scores, temperature=0.05)[0]
        return total

    grads = jax.jit(jax.grad(everything, argnums=tuple(range(7))))(q, p, n, tq, tp, tn, scores)
    for g in grads[:3]:
        assert float(jnp.max(jnp.abs(g))) > 0  # the student does learn
    for g in grads[3:]:
        np.testing.assert_array_equal(np.asarray(g), 0.0)


# ---------------------------------------------------------------------------
# 4. 8 sharded devices give what one device gives.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices from conftest.py")
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _all_terms(q, p, n, tq, tp, tn, scores, weights, negative_mask, score_mask):
    terms = {
        "matching": losses.embedding_matching_loss(q, tq[:, :12], weights=weights, matryoshka_dims=(12, 4))[
            0
        ],
        "score": losses.score_distillation_loss(
            q,
            p,
            n,
            tq,
            tp,
            tn,
            temperature=0.05,
            teacher_temperature=0.1,
            weights=weights,
            negative_mask=negative_mask,
            matryoshka_dims=(12, 4),
        )[0],  # fmt: skip
        "margin": losses.margin_mse_loss(
            q, p, n, scores, temperature=0.2, score_mask=score_mask, weights=weights
        )[0],
        "listwise": losses.listwise_kl_loss(
            q, p, n, scores, temperature=0.05, score_mask=score_mask, weights=weights
        )[0],
    }
    return sum(terms.values()), terms


@pytest.mark.slow
def test_sharded_terms_and_grads_match_single_device(mesh):
    q, p, n, tq, tp, tn, scores = _batch(17, batch=16)
    weights = np.ones(16, np.float32)
    weights[13] = 0.0
    negative_mask = np.ones((16, 3), bool)
    negative_mask[4, 1] = negative_mask[11, 0] = False
    score_mask = np.concatenate([np.ones((16, 1), bool), negative_mask], axis=1)
    inputs = [q, p, n, tq, tp, tn, scores, weights, negative_mask, score_mask]
    step = jax.jit(jax.value_and_grad(_all_terms, argnums=(0, 1, 2), has_aux=True))
    (loss_1, terms_1), grads_1 = step(*[jax.device_put(x, jax.devices()[0]) for x in inputs])
    sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in inputs]
    assert sharded[0].sharding.shard_shape(sharded[0].shape) == (2, 12)
    (loss_8, terms_8), grads_8 = step(*sharded)
    assert all(g.sharding.spec == P("data") for g in grads_8)
    for key in terms_1:
        np.testing.assert_allclose(float(terms_8[key]), float(terms_1[key]), rtol=1e-6, atol=1e-7)
    for g8, g1 in zip(grads_8, grads_1, strict=True):
        np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-5, atol=1e-7)
    want = ref_score_distillation(
        q, p, n, tq, tp, tn, tau=0.05, tau_t=0.1, weights=weights, negative_mask=negative_mask, dims=(12, 4)
    )
    np.testing.assert_allclose(float(terms_8["score"]), want, **TOL)


# ---------------------------------------------------------------------------
# 5. With the contrastive loss through the gradient cache: the plain step's value and gradients.
# ---------------------------------------------------------------------------

MODEL = transformer.TransformerConfig(
    family="bert", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=64
)
GC_BATCH, GC_NEGATIVES, TEACHER_DIM = 32, 2, 20


def _tokens(rng, shape, length):
    lengths = rng.integers(2, length + 1, size=shape)
    tokens = rng.integers(1, 128, size=(*shape, length)).astype(np.int32)
    tokens[np.arange(length) >= lengths[..., None]] = 0
    return tokens


@pytest.mark.slow
def test_teacher_terms_through_the_gradient_cache_equal_the_plain_step():
    rng = np.random.default_rng(18)
    module = dual_encoder.DualEncoder(MODEL, projection_dim=16)
    query_tokens = _tokens(rng, (GC_BATCH,), 8)
    positive_tokens = _tokens(rng, (GC_BATCH,), 12)
    model_params = nn.unbox(module.init(jax.random.key(0), query_tokens, positive_tokens))["params"]
    # The map to the teacher's width is a parameter of the step, beside the model's.
    params = {
        "model": model_params,
        "to_teacher": rng.normal(size=(16, TEACHER_DIM)).astype(np.float32) * 0.3,
    }
    # Precomputed teacher embeddings are per-example inputs, chunked with the tokens.
    inputs = {
        "query_tokens": query_tokens,
        "positive_tokens": positive_tokens,
        "negative_tokens": _tokens(rng, (GC_BATCH, GC_NEGATIVES), 12),
        "teacher_query": rng.normal(size=(GC_BATCH, TEACHER_DIM)).astype(np.float32),
        "teacher_positive": rng.normal(size=(GC_BATCH, TEACHER_DIM)).astype(np.float32),
        "teacher_negatives": rng.normal(size=(GC_BATCH, GC_NEGATIVES, TEACHER_DIM)).astype(np.float32),
    }
    scores = rng.normal(size=(GC_BATCH, 1 + GC_NEGATIVES)).astype(np.float32)
    weights = np.ones(GC_BATCH, np.float32)
    weights[-2:] = 0.0
    config = losses.ContrastiveLossConfig(temperature=0.05, matryoshka_dims=(16, 8))

    def embed_fn(p, chunk):
        emb = module.apply(
            {"params": p["model"]}, chunk["query_tokens"], chunk["positive_tokens"], chunk["negative_tokens"]
        )
        return emb | {key: chunk[key] for key in ("teacher_query", "teacher_positive", "teacher_negatives")}

    def loss_fn(p, emb, scores, weights):
        q, pos, neg = emb["query"], emb["positive"], emb["negatives"]
        nce, _ = losses.matryoshka_contrastive_loss(q, pos, neg, config=config, weights=weights)
        matching, _ = losses.embedding_matching_loss(
            jnp.concatenate([q, pos]),
            jnp.concatenate([emb["teacher_query"], emb["teacher_positive"]]),
            projection=p["to_teacher"],
            weights=jnp.concatenate([weights, weights]),
            matryoshka_dims=(16, 8),
        )
        kl, _ = losses.score_distillation_loss(
            q, pos, neg, emb["teacher_query"], emb["teacher_positive"], emb["teacher_negatives"],
            temperature=0.05, teacher_temperature=0.1, weights=weights, matryoshka_dims=(16, 8),
        )  # fmt: skip
        margin, _ = losses.margin_mse_loss(q, pos, neg, scores, temperature=0.2, weights=weights)
        return nce + 0.5 * matching + kl + 0.1 * margin, {"nce": nce, "matching": matching, "kl": kl}

    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=8))

    def plain(p, x, s, w):
        return jax.value_and_grad(lambda p: loss_fn(p, embed_fn(p, x), s, w), has_aux=True)(p)

    def cached(p, x, s, w):
        return gradcache.cached_value_and_grad(
            embed_fn, lambda p, e: loss_fn(p, e, s, w), p, x, chunk_size=8, num_shards=8
        )

    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
        shard = lambda x: jax.device_put(x, partitioning.batch_sharding(mesh, x.ndim))  # noqa: E731
        x, s, w = jax.tree.map(shard, inputs), shard(scores), shard(weights)
        (loss_p, aux_p), grads_p = jax.jit(plain)(params, x, s, w)
        (loss_c, aux_c), grads_c = jax.jit(cached)(params, x, s, w)
    assert np.isfinite(float(loss_p)) and float(aux_p["matching"]) > 0 and float(aux_p["kl"]) > 0
    np.testing.assert_allclose(float(loss_c), float(loss_p), rtol=1e-5)
    for key in aux_p:
        np.testing.assert_allclose(float(aux_c[key]), float(aux_p[key]), rtol=1e-5, atol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_p))
    assert float(np.abs(grads_p["to_teacher"]).max()) > 0
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=1e-4),
        grads_c,
        grads_p,
    )


# ---------------------------------------------------------------------------
# 5. Errors name what is wrong.
# ---------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    q, p, n, tq, tp, tn, scores = _batch(19)
    with pytest.raises(ConfigError, match="pass a projection"):
        losses.embedding_matching_loss(q, tq)
    with pytest.raises(ConfigError, match=r"projection must be \[student_dim, teacher_dim\] = \[12, 20\]"):
        losses.embedding_matching_loss(q, tq, projection=np.zeros((20, 12), np.float32))
    with pytest.raises(ConfigError, match="metric must be 'cosine' or 'mse'"):
        losses.embedding_matching_loss(q, q, metric="l1")
    with pytest.raises(DataError, match="must cover the same texts"):
        losses.embedding_matching_loss(q, q[:4])
    with pytest.raises(ConfigError, match="larger than the student's embedding size 12"):
        losses.embedding_matching_loss(q, q, matryoshka_dims=(16, 8))
    with pytest.raises(DataError, match=r"scores must be \[batch, 1 \+ negatives\] = \[8, 4\]"):
        losses.margin_mse_loss(q, p, n, scores[:, :3])
    with pytest.raises(DataError, match="score_mask must have the shape of scores"):
        losses.listwise_kl_loss(q, p, n, scores, temperature=0.05, score_mask=np.ones((8, 3), bool))
    with pytest.raises(DataError, match="negatives and teacher_negatives must be given together"):
        losses.score_distillation_loss(q, p, n, tq, tp, None, temperature=0.05, teacher_temperature=0.05)
    with pytest.raises(ConfigError, match="teacher_temperature must be > 0"):
        losses.score_distillation_loss(q, p, n, tq, tp, tn, temperature=0.05, teacher_temperature=0.0)
    with pytest.raises(DataError, match=r"negative_mask must be \[batch, k\] = \[8, 3\]"):
        losses.score_distillation_loss(
            q,
            p,
            n,
            tq,
            tp,
            tn,
            temperature=0.05,
            teacher_temperature=0.05,
            negative_mask=np.ones((8, 2), bool),
        )


# ---------------------------------------------------------------------------
# 6. The terms together, as the train step adds them.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["margin_mse", "listwise_kl"])
def test_teacher_loss_is_the_weighted_sum_of_the_terms(given):
    q, p, n, tq, tp, tn, scores = _batch(20)
    projection = np.random.default_rng(21).normal(size=(12, 20)).astype(np.float32)
    weights = np.array([1, 1, 0, 1, 1, 2, 1, 1], np.float32)
    negative_mask = np.ones((8, 3), bool)
    negative_mask[3, 1] = False
    score_mask = np.concatenate([np.ones((8, 1), bool), negative_mask], axis=1)
    config = losses.TeacherLossConfig(
        embedding_matching_weight=0.5,
        score_distillation_weight=2.0,
        teacher_temperature=0.1,
        given_scores_loss=given,
        given_scores_weight=0.25,
        given_scores_temperature=3.0,
    )
    loss, metrics = losses.teacher_loss(
        {"query": q, "positive": p, "negatives": n},
        {"query": tq, "positive": tp, "negatives": tn},
        config=config,
        temperature=0.05,
        projection=projection,
        scores=scores,
        score_mask=score_mask,
        negative_mask=negative_mask,
        weights=weights,
        matryoshka_dims=(12, 6),
    )
    # Embedding matching pools the queries, positives and present hard negatives.
    rows_student = np.concatenate([q, p, n.reshape(24, 12)])
    rows_teacher = np.concatenate([tq, tp, tn.reshape(24, 20)])
    row_weights = np.concatenate([weights, weights, (weights[:, None] * negative_mask).reshape(-1)])
    matching = ref_embedding_matching(
        rows_student, rows_teacher, projection=projection, weights=row_weights, dims=(12, 6)
    )
    score = ref_score_distillation(
        q, p, n, tq, tp, tn, tau=0.05, tau_t=0.1, weights=weights, negative_mask=negative_mask, dims=(12, 6)
    )
    if given == "margin_mse":
        given_value = ref_margin_mse(
            q, p, n, scores, tau=0.05, mask=score_mask, weights=weights, dims=(12, 6)
        )
    else:
        given_value = ref_listwise_kl(
            q, p, n, scores, tau=0.05, tau_t=3.0, mask=score_mask, weights=weights, dims=(12, 6)
        )
    np.testing.assert_allclose(float(metrics["loss/embedding_matching"]), matching, **TOL)
    np.testing.assert_allclose(float(metrics["loss/score_distillation"]), score, **TOL)
    np.testing.assert_allclose(float(metrics[f"loss/{given}"]), given_value, **TOL)
    np.testing.assert_allclose(float(loss), 0.5 * matching + 2.0 * score + 0.25 * given_value, **TOL)
    assert float(metrics["loss/teacher"]) == float(loss)


def test_teacher_loss_off_terms_need_nothing_and_missing_inputs_are_errors():
    q, p, n, *_ = _batch(22)
    student = {"query": q, "positive": p, "negatives": n}
    loss, metrics = losses.teacher_loss(student, config=losses.TeacherLossConfig(), temperature=0.05)
    assert float(loss) == 0.0 and set(metrics) == {"loss/teacher"}
    with pytest.raises(ConfigError, match="no teacher embeddings were given"):
        losses.teacher_loss(
            student, config=losses.TeacherLossConfig(score_distillation_weight=1.0), temperature=0.05
        )
    with pytest.raises(DataError, match="the batch has no 'scores'"):
        losses.teacher_loss(
            student, config=losses.TeacherLossConfig(given_scores_weight=1.0), temperature=0.05
        )
    with pytest.raises(DataError, match="teacher embeddings have no 'negatives'"):
        losses.teacher_loss(
            student,
            {"query": q, "positive": p},
            config=losses.TeacherLossConfig(embedding_matching_weight=1.0),
            temperature=0.05,
        )
    with pytest.raises(ConfigError, match="given_scores_loss must be 'margin_mse' or 'listwise_kl'"):
        losses.TeacherLossConfig(given_scores_loss="mse")
    with pytest.raises(ConfigError, match="score_distillation_weight must be >= 0"):
        losses.TeacherLossConfig(score_distillation_weight=-1.0)
