"""Tests for embedder.losses against a plain numpy reference written from the formulas.

The reference below loops over examples i and candidates j in Python and uses
float64; it shares no code with the JAX implementation.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from embedder import losses
from embedder.losses import ContrastiveLossConfig

# ---------------------------------------------------------------------------
# Independent numpy reference.
# ---------------------------------------------------------------------------


def _unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _logsumexp(values):
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def ref_per_example(
    query,
    positive,
    negatives=None,
    *,
    tau,
    same_tower=False,
    symmetric=False,
    mask_duplicates=True,
    share=False,
    alpha=0.0,
    query_ids=None,
    positive_ids=None,
    weights=None,
    frozen_negative_sims=None,
):
    """Per-example loss and top-1 correctness, one example and one candidate at a time.

    ``frozen_negative_sims[i][j][m]`` replaces s(q_i, n_jm) inside the hardness
    weight (stop-gradient semantics for finite differences).
    """
    q, p = _unit(query), _unit(positive)
    batch = len(q)
    n = None if negatives is None else _unit(negatives)
    k = 0 if n is None else n.shape[1]
    w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)

    def in_batch_candidate(i, j):
        if w[j] <= 0:
            return False
        if mask_duplicates and query_ids is not None and query_ids[i] == query_ids[j]:
            return False
        if mask_duplicates and positive_ids is not None and positive_ids[i] == positive_ids[j]:
            return False
        return True

    per_example, correct = [], []
    for i in range(batch):
        pos = float(q[i] @ p[i])
        logits, other_sims = [pos / tau], []
        for j in range(batch):
            if j == i or not in_batch_candidate(i, j):
                continue
            s = float(q[i] @ p[j])
            logits.append(s / tau)
            other_sims.append(s)
            if same_tower:
                s = float(q[i] @ q[j])
                logits.append(s / tau)
                other_sims.append(s)
        owners = [j for j in range(batch) if j == i or w[j] > 0] if share else [i]
        for j in owners:
            for m in range(k):
                s = float(q[i] @ n[j, m])
                s_hard = s if frozen_negative_sims is None else frozen_negative_sims[i][j][m]
                logits.append(s / tau + alpha * s_hard)
                other_sims.append(s)
        loss = _logsumexp(logits) - pos / tau
        correct.append(pos > max(other_sims, default=-math.inf))
        if symmetric:
            logits = [pos / tau]
            for j in range(batch):
                if j == i or not in_batch_candidate(i, j):
                    continue
                logits.append(float(p[i] @ q[j]) / tau)
                if same_tower:
                    logits.append(float(p[i] @ p[j]) / tau)
            loss = 0.5 * (loss + _logsumexp(logits) - pos / tau)
        per_example.append(loss)
    return np.array(per_example), np.array(correct)


def ref_spread_out(query, positive, *, query_ids=None, positive_ids=None, weights=None):
    """EmbeddingGemma's spread-out term: per tower, weighted mean of (x_i . x_j)^2, summed."""
    batch = len(query)
    w = np.ones(batch) if weights is None else np.asarray(weights, np.float64)
    total = 0.0
    for x in (_unit(query), _unit(positive)):
        num = den = 0.0
        for i in range(batch):
            for j in range(batch):
                if i == j:
                    continue
                if query_ids is not None and query_ids[i] == query_ids[j]:
                    continue
                if positive_ids is not None and positive_ids[i] == positive_ids[j]:
                    continue
                num += w[i] * w[j] * float(x[i] @ x[j]) ** 2
                den += w[i] * w[j]
        total += num / den if den > 0 else 0.0
    return total


def ref_loss(query, positive, negatives=None, *, spread_weight=0.0, weights=None, **kwargs):
    """Weighted-mean NCE plus spread-out at one resolution; returns (loss, accuracy)."""
    per_example, correct = ref_per_example(query, positive, negatives, weights=weights, **kwargs)
    w = np.ones(len(query)) if weights is None else np.asarray(weights, np.float64)
    loss = float(np.sum(w * per_example) / np.sum(w))
    accuracy = float(np.sum(w * correct) / np.sum(w))
    if spread_weight:
        mask = kwargs.get("mask_duplicates", True)
        loss += spread_weight * ref_spread_out(
            query,
            positive,
            query_ids=kwargs.get("query_ids") if mask else None,
            positive_ids=kwargs.get("positive_ids") if mask else None,
            weights=weights,
        )
    return loss, accuracy


def ref_matryoshka(query, positive, negatives, dims, dim_weights, **kwargs):
    total = 0.0
    for dim, c in zip(dims, dim_weights, strict=True):
        neg = None if negatives is None else negatives[..., :dim]
        total += c * ref_loss(query[:, :dim], positive[:, :dim], neg, **kwargs)[0]
    return total


# ---------------------------------------------------------------------------
# Fixtures and helpers.
# ---------------------------------------------------------------------------

BATCH, DIM, K = 8, 16, 3


def _random_batch(seed, batch=BATCH, dim=DIM, k=K, dtype=np.float32):
    rng = np.random.default_rng(seed)
    query = rng.normal(size=(batch, dim)).astype(dtype)
    # Positives near their queries so the logits are not all alike.
    positive = (query + 0.8 * rng.normal(size=(batch, dim))).astype(dtype)
    negatives = (query[:, None, :] + 1.2 * rng.normal(size=(batch, k, dim))).astype(dtype)
    return query, positive, negatives


@functools.cache
def _jitted(fn_name):
    """One jitted function per loss entry point, reused across tests (config static)."""
    return jax.jit(getattr(losses, fn_name), static_argnames=("config",))


def jax_loss(query, positive, negatives=None, *, config, **kwargs):
    loss, metrics = _jitted("contrastive_loss")(query, positive, negatives, config=config, **kwargs)
    return float(loss), jax.tree.map(float, metrics)


def jax_per_example(query, positive, negatives=None, *, config, **kwargs):
    out = _jitted("per_example_contrastive_loss")(query, positive, negatives, config=config, **kwargs)
    return np.asarray(out.loss), np.asarray(out.correct)


TOL = dict(rtol=2e-5, atol=2e-5)

# ---------------------------------------------------------------------------
# 1. Each term against the numpy reference.
# ---------------------------------------------------------------------------


def test_plain_in_batch_matches_reference():
    query, positive, _ = _random_batch(0)
    config = ContrastiveLossConfig(temperature=0.1)
    loss, metrics = jax_loss(query, positive, config=config)
    want, want_acc = ref_loss(query, positive, tau=0.1)
    np.testing.assert_allclose(loss, want, **TOL)
    np.testing.assert_allclose(metrics["accuracy"], want_acc)
    np.testing.assert_allclose(metrics["temperature"], 0.1)
    # k = 0 hard negatives is the same as none.
    empty = np.zeros((BATCH, 0, DIM), np.float32)
    np.testing.assert_allclose(jax_loss(query, positive, empty, config=config)[0], want, **TOL)


def test_inputs_are_normalised_inside():
    query, positive, negatives = _random_batch(1)
    config = ContrastiveLossConfig()
    scale = np.arange(1, BATCH + 1, dtype=np.float32)[:, None]
    base = jax_loss(query, positive, negatives, config=config)[0]
    scaled = jax_loss(3 * scale * query, positive / scale, 7 * negatives, config=config)[0]
    np.testing.assert_allclose(scaled, base, rtol=1e-5)


@pytest.mark.parametrize("share", [False, True])
def test_hard_negatives_match_reference(share):
    query, positive, negatives = _random_batch(2)
    config = ContrastiveLossConfig(share_hard_negatives=share)
    loss, metrics = jax_loss(query, positive, negatives, config=config)
    want, want_acc = ref_loss(query, positive, negatives, tau=0.05, share=share)
    np.testing.assert_allclose(loss, want, **TOL)
    np.testing.assert_allclose(metrics["accuracy"], want_acc)
    without = ref_loss(query, positive, tau=0.05)[0]
    assert loss > without + 1e-3  # the negatives did enter the denominator


def test_sharing_hard_negatives_adds_other_examples_negatives():
    query, positive, negatives = _random_batch(3)
    own = jax_loss(query, positive, negatives, config=ContrastiveLossConfig())[0]
    shared = jax_loss(query, positive, negatives, config=ContrastiveLossConfig(share_hard_negatives=True))[0]
    assert shared > own + 1e-3


@pytest.mark.parametrize("same_tower,symmetric", [(True, False), (False, True), (True, True)], ids=str)
def test_same_tower_and_symmetric_match_reference(same_tower, symmetric):
    query, positive, negatives = _random_batch(4)
    config = ContrastiveLossConfig(temperature=0.07, same_tower_negatives=same_tower, symmetric=symmetric)
    loss, _ = jax_loss(query, positive, negatives, config=config)
    want, _ = ref_loss(query, positive, negatives, tau=0.07, same_tower=same_tower, symmetric=symmetric)
    np.testing.assert_allclose(loss, want, **TOL)
    plain = ref_loss(query, positive, negatives, tau=0.07)[0]
    assert abs(loss - plain) > 1e-3


def _planted_duplicates():
    query, positive, negatives = _random_batch(5)
    # Example 3 repeats example 0's query text (another positive); example 5
    # repeats example 2's positive text (another query). Same text, same vector.
    query[3] = query[0]
    positive[5] = positive[2]
    query_ids = np.array([10, 11, 12, 10, 14, 15, 16, 17], np.int32)
    positive_ids = np.array([20, 21, 22, 23, 24, 22, 26, 27], np.int32)
    return query, positive, negatives, query_ids, positive_ids


@pytest.mark.parametrize("same_tower", [False, True])
def test_duplicate_mask_matches_reference(same_tower):
    query, positive, negatives, query_ids, positive_ids = _planted_duplicates()
    ids = dict(query_ids=query_ids, positive_ids=positive_ids)
    for symmetric in (False, True):
        config = ContrastiveLossConfig(same_tower_negatives=same_tower, symmetric=symmetric)
        got, _ = jax_per_example(query, positive, negatives, config=config, **ids)
        want, _ = ref_per_example(
            query, positive, negatives, tau=0.05, same_tower=same_tower, symmetric=symmetric, **ids
        )
        np.testing.assert_allclose(got, want, **TOL)
        # Switching the mask off changes only rows that have a duplicate (rows 0/3
        # share a query, 2/5 a positive), and at least one of them visibly.
        off = ContrastiveLossConfig(
            same_tower_negatives=same_tower, symmetric=symmetric, mask_duplicates=False
        )
        unmasked, _ = jax_per_example(query, positive, negatives, config=off, **ids)
        want_unmasked, _ = ref_per_example(
            query,
            positive,
            negatives,
            tau=0.05,
            same_tower=same_tower,
            symmetric=symmetric,
            mask_duplicates=False,
            **ids,
        )
        np.testing.assert_allclose(unmasked, want_unmasked, **TOL)
        changed = set(np.flatnonzero(np.abs(unmasked - got) > 1e-3))
        assert changed and changed <= {0, 2, 3, 5}, changed


def test_duplicate_of_positive_is_not_a_false_negative():
    # q_0 duplicated as q_1 with the SAME positive text: unmasked, p_1 == p_0 is a
    # candidate as good as the positive; masked, the loss sees only true negatives.
    query, positive, _ = _random_batch(6)
    query[1], positive[1] = query[0], positive[0]
    ids = dict(query_ids=np.arange(BATCH, dtype=np.int32), positive_ids=np.arange(BATCH))
    ids["positive_ids"][1] = 0
    config = ContrastiveLossConfig()
    masked, _ = jax_per_example(query, positive, config=config, **ids)
    unmasked, _ = jax_per_example(query, positive, config=ContrastiveLossConfig(mask_duplicates=False), **ids)
    want, _ = ref_per_example(query, positive, tau=0.05, **ids)
    np.testing.assert_allclose(masked, want, **TOL)
    assert unmasked[0] > masked[0] + 0.5  # log 2 from the duplicate, roughly


@pytest.mark.parametrize("share", [False, True])
def test_hardness_weight_matches_reference(share):
    query, positive, negatives = _random_batch(7)
    config = ContrastiveLossConfig(hardness_alpha=5.0, share_hard_negatives=share)
    loss, metrics = jax_loss(query, positive, negatives, config=config)
    want, want_acc = ref_loss(query, positive, negatives, tau=0.05, alpha=5.0, share=share)
    np.testing.assert_allclose(loss, want, **TOL)
    # Accuracy ranks raw similarities: the weight does not change it.
    np.testing.assert_allclose(metrics["accuracy"], want_acc)
    assert loss > ref_loss(query, positive, negatives, tau=0.05, share=share)[0] + 1e-3


def test_spread_out_matches_reference():
    query, positive, negatives, query_ids, positive_ids = _planted_duplicates()
    weights = np.array([1, 1, 1, 1, 1, 1, 0, 1], np.float32)
    ids = dict(query_ids=query_ids, positive_ids=positive_ids)
    got = float(losses.spread_out_loss(query, positive, weights=weights, **ids))
    want = ref_spread_out(query, positive, weights=weights, **ids)
    np.testing.assert_allclose(got, want, **TOL)
    config = ContrastiveLossConfig(spread_out_weight=0.3)
    loss, metrics = jax_loss(query, positive, negatives, config=config, weights=weights, **ids)
    np.testing.assert_allclose(metrics["loss/spread_out"], want, **TOL)
    want_total, _ = ref_loss(query, positive, negatives, tau=0.05, spread_weight=0.3, weights=weights, **ids)
    np.testing.assert_allclose(loss, want_total, **TOL)


EVERYTHING_ON = ContrastiveLossConfig(
    temperature=0.1,
    same_tower_negatives=True,
    symmetric=True,
    share_hard_negatives=True,
    hardness_alpha=2.0,
    spread_out_weight=0.5,
)
EVERYTHING_REF = dict(tau=0.1, same_tower=True, symmetric=True, share=True, alpha=2.0, spread_weight=0.5)


@pytest.mark.parametrize("share", [False, True])
def test_padding_example_changes_nothing_for_the_others(share):
    query, positive, negatives, query_ids, positive_ids = _planted_duplicates()
    config = (
        EVERYTHING_ON
        if share
        else ContrastiveLossConfig(
            temperature=0.1, same_tower_negatives=True, symmetric=True, spread_out_weight=0.5
        )
    )
    pad = 4
    # Padding rows are often zeros: they must neither matter nor produce NaNs.
    query[pad], positive[pad], negatives[pad] = 0.0, 0.0, 0.0
    weights = np.ones(BATCH, np.float32)
    weights[pad] = 0.0
    keep = np.arange(BATCH) != pad
    ids = dict(query_ids=query_ids, positive_ids=positive_ids)
    padded, padded_metrics = jax_loss(query, positive, negatives, config=config, weights=weights, **ids)
    removed, removed_metrics = jax_loss(
        query[keep],
        positive[keep],
        negatives[keep],
        config=config,
        query_ids=query_ids[keep],
        positive_ids=positive_ids[keep],
    )
    np.testing.assert_allclose(padded, removed, rtol=1e-6)
    np.testing.assert_allclose(padded_metrics["accuracy"], removed_metrics["accuracy"])
    ref_kwargs = dict(EVERYTHING_REF, share=share, alpha=2.0 if share else 0.0)
    want, _ = ref_loss(
        query[keep],
        positive[keep],
        negatives[keep],
        query_ids=query_ids[keep],
        positive_ids=positive_ids[keep],
        **ref_kwargs,
    )
    np.testing.assert_allclose(padded, want, **TOL)
    grads = jax.jit(
        jax.grad(
            lambda q, p, n: losses.contrastive_loss(q, p, n, config=config, weights=weights, **ids)[0],
            argnums=(0, 1, 2),
        )
    )(query, positive, negatives)
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(np.asarray(g)[pad], 0.0)


def test_weights_scale_examples():
    query, positive, negatives = _random_batch(8)
    weights = np.array([1, 2, 0.5, 1, 3, 1, 1, 0.25], np.float32)
    config = ContrastiveLossConfig()
    loss, _ = jax_loss(query, positive, negatives, config=config, weights=weights)
    want, _ = ref_loss(query, positive, negatives, tau=0.05, weights=weights)
    np.testing.assert_allclose(loss, want, **TOL)


def test_all_padding_batch_is_zero_not_nan():
    query, positive, negatives = _random_batch(9)
    loss, metrics = jax_loss(
        query, positive, negatives, config=EVERYTHING_ON, weights=np.zeros(BATCH, np.float32)
    )
    assert loss == 0.0 and metrics["accuracy"] == 0.0


def test_matryoshka_matches_reference():
    query, positive, negatives, query_ids, positive_ids = _planted_duplicates()
    config = ContrastiveLossConfig(
        temperature=0.1,
        same_tower_negatives=True,
        spread_out_weight=0.5,
        matryoshka_dims=(16, 8, 3),
        matryoshka_weights=(1.0, 0.5, 2.0),
    )
    ids = dict(query_ids=query_ids, positive_ids=positive_ids)
    loss, metrics = _jitted("matryoshka_contrastive_loss")(query, positive, negatives, config=config, **ids)
    kwargs = dict(tau=0.1, same_tower=True, spread_weight=0.5, **ids)
    want = ref_matryoshka(query, positive, negatives, (16, 8, 3), (1.0, 0.5, 2.0), **kwargs)
    np.testing.assert_allclose(float(loss), want, **TOL)
    for dim in (16, 8, 3):
        # Each prefix is re-normalised on its own.
        want_dim, want_acc = ref_loss(query[:, :dim], positive[:, :dim], negatives[..., :dim], **kwargs)
        np.testing.assert_allclose(float(metrics[f"loss/dim_{dim}"]), want_dim, **TOL)
        np.testing.assert_allclose(float(metrics[f"accuracy/dim_{dim}"]), want_acc)
    assert set(metrics) == {
        "loss/dim_16",
        "loss/dim_8",
        "loss/dim_3",
        "accuracy/dim_16",
        "accuracy/dim_8",
        "accuracy/dim_3",
        "loss/spread_out/dim_16",
        "loss/spread_out/dim_8",
        "loss/spread_out/dim_3",
        "accuracy",
        "temperature",
    }
    assert metrics["accuracy"] == metrics["accuracy/dim_16"]


def test_matryoshka_without_dims_is_the_full_loss():
    query, positive, negatives = _random_batch(10)
    config = ContrastiveLossConfig()
    loss, metrics = _jitted("matryoshka_contrastive_loss")(query, positive, negatives, config=config)
    np.testing.assert_allclose(float(loss), jax_loss(query, positive, negatives, config=config)[0])
    assert set(metrics) == {f"loss/dim_{DIM}", f"accuracy/dim_{DIM}", "accuracy", "temperature"}


def test_bfloat16_inputs_give_float32_loss():
    query, positive, negatives = _random_batch(11)
    as_bf16 = [jnp.asarray(x, jnp.bfloat16) for x in (query, positive, negatives)]
    loss, metrics = _jitted("contrastive_loss")(*as_bf16, config=ContrastiveLossConfig())
    assert loss.dtype == jnp.float32 and metrics["accuracy"].dtype == jnp.float32
    rounded = [np.asarray(x.astype(jnp.float32)) for x in as_bf16]
    want, _ = ref_loss(*rounded, tau=0.05)
    np.testing.assert_allclose(float(loss), want, **TOL)


def test_learned_temperature_bounds():
    config = ContrastiveLossConfig(
        temperature=0.05, learn_temperature=True, min_temperature=0.02, max_temperature=0.5
    )
    scale = losses.initial_logit_scale(0.05)
    np.testing.assert_allclose(scale, math.log(20.0))
    np.testing.assert_allclose(losses.learned_temperature(scale, config), 0.05, rtol=1e-6)
    # Clipped at both bounds, with no gradient pushing further out.
    np.testing.assert_allclose(losses.learned_temperature(10.0, config), 0.02, rtol=1e-6)
    np.testing.assert_allclose(losses.learned_temperature(-3.0, config), 0.5, rtol=1e-6)
    grad = jax.grad(lambda s: losses.learned_temperature(s, config))
    assert float(grad(10.0)) == 0.0 and float(grad(-3.0)) == 0.0
    np.testing.assert_allclose(grad(scale), -0.05, rtol=1e-5)  # d exp(-s)/ds

    query, positive, negatives = _random_batch(12)
    fixed = jax_loss(query, positive, negatives, config=ContrastiveLossConfig(temperature=0.05))
    learned = jax_loss(
        query,
        positive,
        negatives,
        config=config,
        temperature=losses.learned_temperature(scale, config),
    )
    np.testing.assert_allclose(learned[0], fixed[0], rtol=1e-5)
    np.testing.assert_allclose(learned[1]["temperature"], 0.05, rtol=1e-6)

    def loss_of_scale(s):
        tau = losses.learned_temperature(s, config)
        return losses.contrastive_loss(query, positive, negatives, config=config, temperature=tau)[0]

    assert abs(float(jax.jit(jax.grad(loss_of_scale))(scale))) > 1e-4
    with pytest.raises(ValueError, match="learn_temperature"):
        losses.contrastive_loss(query, positive, config=config)


# ---------------------------------------------------------------------------
# 2. Gradients against central finite differences in float64.
# ---------------------------------------------------------------------------


def test_gradient_matches_finite_differences_float64():
    batch, dim, k = 4, 6, 2
    dims, dim_weights = (6, 3), (1.0, 0.5)
    config = ContrastiveLossConfig(
        temperature=0.2,
        learn_temperature=True,
        same_tower_negatives=True,
        symmetric=True,
        share_hard_negatives=True,
        hardness_alpha=1.5,
        spread_out_weight=0.3,
        matryoshka_dims=dims,
        matryoshka_weights=dim_weights,
    )
    query, positive, negatives = _random_batch(13, batch, dim, k, np.float64)
    query_ids = np.array([0, 1, 0, 3])  # a planted duplicate query: 0 and 2
    positive_ids = np.array([0, 1, 2, 3])
    weights = np.array([1.0, 1.0, 1.0, 0.0])  # one padding example
    logit_scale = losses.initial_logit_scale(0.2)
    ids = dict(query_ids=query_ids, positive_ids=positive_ids)

    def jax_objective(q, p, n, s):
        tau = losses.learned_temperature(s, config)
        return losses.matryoshka_contrastive_loss(
            q, p, n, config=config, temperature=tau, weights=jnp.asarray(weights), **ids
        )[0]

    with jax.enable_x64(True):
        args = [jnp.asarray(x, jnp.float64) for x in (query, positive, negatives)]
        args.append(jnp.asarray(logit_scale, jnp.float64))
        value, grads = jax.jit(jax.value_and_grad(jax_objective, argnums=(0, 1, 2, 3)))(*args)
        assert value.dtype == jnp.float64
        grads = [np.asarray(g) for g in grads]

    # The hardness weight is under stop_gradient: hold it at the base point's value.
    def frozen_sims(d):
        q, n = _unit(query[:, :d]), _unit(negatives[..., :d])
        return [[[float(q[i] @ n[j, m]) for m in range(k)] for j in range(batch)] for i in range(batch)]

    frozen = {d: frozen_sims(d) for d in dims}

    def ref_objective(q, p, n, s):
        tau = min(max(math.exp(-s), config.min_temperature), config.max_temperature)
        total = 0.0
        for d, c in zip(dims, dim_weights, strict=True):
            total += (
                c
                * ref_loss(
                    q[:, :d],
                    p[:, :d],
                    n[..., :d],
                    tau=tau,
                    same_tower=True,
                    symmetric=True,
                    share=True,
                    alpha=1.5,
                    spread_weight=0.3,
                    weights=weights,
                    frozen_negative_sims=frozen[d],
                    **ids,
                )[0]
            )
        return total

    base = [query, positive, negatives, np.array(logit_scale)]
    np.testing.assert_allclose(float(value), ref_objective(*base), rtol=1e-12)
    eps = 1e-6
    for which, grad in enumerate(grads):
        numeric = np.zeros_like(base[which])
        for index in np.ndindex(base[which].shape):
            plus = [x.copy() for x in base]
            minus = [x.copy() for x in base]
            plus[which][index] += eps
            minus[which][index] -= eps
            numeric[index] = (ref_objective(*plus) - ref_objective(*minus)) / (2 * eps)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)
    # The padding example gets no gradient at all.
    for g in grads[:3]:
        np.testing.assert_array_equal(g[3], 0.0)


# ---------------------------------------------------------------------------
# 3. Sharding over 8 devices changes nothing; hard negatives stay with their query.
# ---------------------------------------------------------------------------

SHARDED_BATCH = 16
SHARDED_CONFIG = ContrastiveLossConfig(
    temperature=0.1,
    same_tower_negatives=True,
    symmetric=True,
    hardness_alpha=2.0,
    spread_out_weight=0.5,
    matryoshka_dims=(16, 4),
    matryoshka_weights=(1.0, 0.5),
)


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices from conftest.py")
    # Auto axes: with Explicit ones a global q @ p.T on batch-sharded operands is a
    # sharding type error; Auto lets XLA insert the all-gather.
    return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@functools.cache
def _value_and_grad(config):
    def objective(q, p, n, query_ids, positive_ids, weights):
        return losses.matryoshka_contrastive_loss(
            q,
            p,
            n,
            config=config,
            query_ids=query_ids,
            positive_ids=positive_ids,
            weights=weights,
        )

    return jax.jit(jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def _per_example(config):
    return jax.jit(functools.partial(losses.per_example_contrastive_loss, config=config))


def _shard(mesh, arrays):
    sharding = NamedSharding(mesh, P("data"))
    return [jax.device_put(x, sharding) for x in arrays]


def _sharded_inputs(seed):
    query, positive, negatives = _random_batch(seed, SHARDED_BATCH, 16, 2)
    query_ids = np.arange(SHARDED_BATCH, dtype=np.int32)
    positive_ids = np.arange(SHARDED_BATCH, dtype=np.int32) + 100
    query_ids[9] = query_ids[2]  # a duplicate across devices (shards 1 and 4)
    query[9] = query[2]
    weights = np.ones(SHARDED_BATCH, np.float32)
    weights[13] = 0.0
    return [query, positive, negatives, query_ids, positive_ids, weights]


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.slow
def test_sharded_loss_and_grads_match_single_device(mesh, share):
    config = dataclasses.replace(SHARDED_CONFIG, share_hard_negatives=share)
    inputs = _sharded_inputs(14)
    step = _value_and_grad(config)
    device = jax.devices()[0]
    (loss_1, metrics_1), grads_1 = step(*[jax.device_put(x, device) for x in inputs])
    sharded = _shard(mesh, inputs)
    assert sharded[0].sharding.shard_shape(sharded[0].shape) == (2, 16)
    (loss_8, metrics_8), grads_8 = step(*sharded)
    # The step really ran distributed: gradients come back batch-sharded.
    assert all(g.sharding.spec == P("data") for g in grads_8)
    np.testing.assert_allclose(float(loss_8), float(loss_1), rtol=1e-6, atol=1e-6)
    for key in metrics_1:
        np.testing.assert_allclose(float(metrics_8[key]), float(metrics_1[key]), rtol=1e-6)
    for g8, g1 in zip(grads_8, grads_1, strict=True):
        np.testing.assert_allclose(np.asarray(g8), np.asarray(g1), rtol=1e-6, atol=1e-6)
    # And both against the numpy reference.
    query, positive, negatives, query_ids, positive_ids, weights = inputs
    want = ref_matryoshka(
        query,
        positive,
        negatives,
        (16, 4),
        (1.0, 0.5),
        tau=0.1,
        same_tower=True,
        symmetric=True,
        share=share,
        alpha=2.0,
        spread_weight=0.5,
        weights=weights,
        query_ids=query_ids,
        positive_ids=positive_ids,
    )
    np.testing.assert_allclose(float(loss_8), want, **TOL)


def _planted_negatives(seed):
    """Each example's hard negative is a near copy of its OWN query.

    Paired correctly, every query has a negative scoring ~1, far above its
    positive; paired with any other query's negative the score is ~0. The loss is
    only right when the negatives stay attached to their queries.
    """
    rng = np.random.default_rng(seed)
    batch, dim = SHARDED_BATCH, 32
    query = rng.normal(size=(batch, dim)).astype(np.float32)
    positive = (query + 1.0 * rng.normal(size=(batch, dim))).astype(np.float32)
    negatives = (query + 0.05 * rng.normal(size=(batch, dim)))[:, None, :].astype(np.float32)
    return query, positive, negatives


def test_hard_negatives_stay_with_their_query_when_sharded(mesh):
    config = ContrastiveLossConfig(temperature=0.1, same_tower_negatives=True, symmetric=True)
    query, positive, negatives = _planted_negatives(15)
    ref_kwargs = dict(tau=0.1, same_tower=True, symmetric=True)
    per_example = _per_example(config)

    got = np.asarray(per_example(*_shard(mesh, [query, positive, negatives])).loss)
    want, _ = ref_per_example(query, positive, negatives, **ref_kwargs)
    np.testing.assert_allclose(got, want, **TOL)

    # Permuting examples together with their negatives permutes the per-example losses.
    perm = np.random.default_rng(0).permutation(SHARDED_BATCH)
    permuted = _shard(mesh, [query[perm], positive[perm], negatives[perm]])
    np.testing.assert_allclose(np.asarray(per_example(*permuted).loss), want[perm], **TOL)

    # Permuting only the negatives detaches them: the planted negative no longer
    # competes, so every loss drops, and the reference agrees on the new values.
    shift = np.roll(np.arange(SHARDED_BATCH), 3)  # crosses device boundaries
    detached = np.asarray(per_example(*_shard(mesh, [query, positive, negatives[shift]])).loss)
    want_detached, _ = ref_per_example(query, positive, negatives[shift], **ref_kwargs)
    np.testing.assert_allclose(detached, want_detached, **TOL)
    assert np.all(detached < want - 0.5)


def test_shared_hard_negatives_are_a_pool_when_sharded(mesh):
    # With sharing on, every query sees every negative: reordering the negatives
    # alone must not change the loss.
    config = ContrastiveLossConfig(temperature=0.1, share_hard_negatives=True)
    query, positive, negatives = _planted_negatives(16)
    per_example = _per_example(config)
    shift = np.roll(np.arange(SHARDED_BATCH), 5)
    attached = np.asarray(per_example(*_shard(mesh, [query, positive, negatives])).loss)
    reordered = np.asarray(per_example(*_shard(mesh, [query, positive, negatives[shift]])).loss)
    np.testing.assert_allclose(reordered, attached, rtol=1e-5)
    want, _ = ref_per_example(query, positive, negatives, tau=0.1, share=True)
    np.testing.assert_allclose(attached, want, **TOL)


# ---------------------------------------------------------------------------
# 4. Bad configurations and inputs.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(temperature=0.0), "temperature must be > 0, got 0.0"),
        (dict(temperature=-0.1), "temperature must be > 0"),
        (dict(min_temperature=0.0), "min_temperature"),
        (dict(min_temperature=0.5, max_temperature=0.1), "min_temperature"),
        (dict(learn_temperature=True, temperature=2.0), "outside"),
        (dict(matryoshka_dims=(256, 768)), r"strictly decreasing.*\(256, 768\)"),
        (dict(matryoshka_dims=(768, 768, 64)), r"duplicates.*\(768, 768, 64\)"),
        (dict(matryoshka_dims=(768, 0)), "positive integers"),
        (dict(matryoshka_dims=(768, 64), matryoshka_weights=(1.0,)), "needs 2"),
        (dict(spread_out_weight=-1.0), "spread_out_weight"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ContrastiveLossConfig(**kwargs)


def test_config_from_lists_is_hashable():
    # Gin passes lists; the config must still be a valid jit static argument.
    config = ContrastiveLossConfig(matryoshka_dims=[8, 4], matryoshka_weights=[1, 0.5])
    assert config.matryoshka_dims == (8, 4)
    hash(config)


def test_matryoshka_dim_larger_than_embedding_raises():
    query, positive, _ = _random_batch(17)
    config = ContrastiveLossConfig(matryoshka_dims=(32, 8))
    with pytest.raises(ValueError, match=r"32 larger than the embedding size 16.*\(8, 16\)"):
        losses.matryoshka_contrastive_loss(query, positive, config=config)


def test_bad_temperature_argument_raises():
    query, positive, _ = _random_batch(18)
    config = ContrastiveLossConfig()
    with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
        losses.contrastive_loss(query, positive, config=config, temperature=0.0)
    with pytest.raises(ValueError, match=r"scalar, got shape \(2,\)"):
        losses.contrastive_loss(query, positive, config=config, temperature=jnp.ones(2))
    with pytest.raises(ValueError, match="initial_logit_scale|temperature must be > 0"):
        losses.initial_logit_scale(-1.0)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(positive=np.zeros((8, 12))), r"positive shape \(8, 12\).*query shape \(8, 16\)"),
        (dict(positive=np.zeros((7, 16))), r"positive shape \(7, 16\)"),
        (dict(query=np.zeros((8, 2, 16)), positive=np.zeros((8, 2, 16))), r"\(8, 2, 16\)"),
        (dict(negatives=np.zeros((8, 16))), r"negatives must be.*got shape \(8, 16\)"),
        (dict(negatives=np.zeros((4, 3, 16))), r"\[8, k, 16\].*got shape \(4, 3, 16\)"),
        (dict(negatives=np.zeros((8, 3, 32))), r"got shape \(8, 3, 32\)"),
        (dict(query_ids=np.zeros(7, np.int32)), r"query_ids must be \[batch\].*\(7,\)"),
        (dict(positive_ids=np.zeros((8, 1), np.int32)), r"positive_ids.*\(8, 1\)"),
        (dict(query_ids=np.zeros(8, np.float32)), "integer example ids.*float32"),
        (dict(weights=np.ones(9, np.float32)), r"weights must be \[batch\].*\(9,\)"),
    ],
)
@pytest.mark.parametrize("fn", ["contrastive_loss", "matryoshka_contrastive_loss"])
def test_bad_inputs_raise(change, match, fn):
    query, positive, negatives = _random_batch(19)
    kwargs = {**dict(query=query, positive=positive, negatives=negatives), **change}
    config = ContrastiveLossConfig(matryoshka_dims=(8,) if fn.startswith("m") else ())
    with pytest.raises(ValueError, match=match):
        getattr(losses, fn)(config=config, **kwargs)
