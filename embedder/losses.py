"""Contrastive losses on embeddings: the NCE family, its regulariser, Matryoshka.

Everything here is a pure function of arrays. The functions see the GLOBAL batch:
under ``jax.jit`` with batch-sharded inputs XLA inserts the all-gathers that the
[batch, batch] similarity matrices need, so every example is a negative for every
other example on every device.

Notation used in the docstrings (all vectors L2-normalised here, inputs are raw):

- ``q_i``, ``p_i``: query and positive document of example ``i``, ``i = 1..B``.
- ``n_im``: the ``m``-th hard negative of example ``i``, ``m = 1..k``.
- ``s(a, b) = a . b``: cosine similarity; ``tau``: the temperature.
- ``w_i``: example weight (0 = padding of a ragged last batch).

Gin binds ``ContrastiveLossConfig`` from the outside (dynamic registration); the
library itself carries no gin decorators.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from embedder import matryoshka
from embedder.errors import ConfigError, DataError

# Squared-norm floor for the L2 normalisation: keeps all-zero padding rows finite.
_NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class ContrastiveLossConfig:
    """What the contrastive objective contains. Defaults: Gecko's NCE without extras.

    Attributes:
      temperature: fixed temperature ``tau`` (> 0); with ``learn_temperature`` the
        initial value (see ``initial_logit_scale``).
      learn_temperature: the train step owns a learned log-scale parameter and passes
        ``temperature=learned_temperature(logit_scale, config)`` to the loss.
      min_temperature, max_temperature: clip bounds for the learned temperature.
      same_tower_negatives: add Gecko's query-query terms ``s(q_i, q_j), j != i``
        to the denominator (Lee et al. 2024, eq. 1).
      symmetric: also train the document -> query direction; the loss is the mean of
        both directions.
      mask_duplicates: drop in-batch candidates that share the query or positive text
        with the example (Gemini Embedding, Lee et al. 2025). Needs the example ids.
      share_hard_negatives: every example's hard negatives are candidates for every
        query (as sentence-transformers' MultipleNegativesRankingLoss does); off =
        each query sees only its own hard negatives (Gecko).
      hardness_alpha: EmbeddingGemma's hardness weight ``exp(alpha * sg(s(q, n)))``
        on hard negatives (Vera et al. 2025); 0 = off.
      spread_out_weight: weight of the spread-out regulariser; 0 = off.
      matryoshka_dims: nested prefix sizes, strictly decreasing, e.g. ``(768, 256)``;
        ``()`` = only the full embedding. Read by ``matryoshka_contrastive_loss``.
      matryoshka_weights: one weight per Matryoshka dimension; ``None`` = all 1.
    """

    temperature: float = 0.05
    learn_temperature: bool = False
    min_temperature: float = 0.01
    max_temperature: float = 1.0
    same_tower_negatives: bool = False
    symmetric: bool = False
    mask_duplicates: bool = True
    share_hard_negatives: bool = False
    hardness_alpha: float = 0.0
    spread_out_weight: float = 0.0
    matryoshka_dims: tuple[int, ...] = ()
    matryoshka_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        # Gin hands over lists; tuples keep the config hashable (a jit static arg).
        object.__setattr__(self, "matryoshka_dims", tuple(self.matryoshka_dims))
        if self.matryoshka_weights is not None:
            object.__setattr__(self, "matryoshka_weights", tuple(self.matryoshka_weights))
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}.")
        if not 0 < self.min_temperature <= self.max_temperature:
            raise ConfigError(
                "need 0 < min_temperature <= max_temperature, got "
                f"min_temperature={self.min_temperature}, "
                f"max_temperature={self.max_temperature}."
            )
        if self.learn_temperature and not (self.min_temperature <= self.temperature <= self.max_temperature):
            raise ConfigError(
                f"the initial temperature {self.temperature} lies outside "
                f"[{self.min_temperature}, {self.max_temperature}]: clipping would "
                "leave the learned temperature without a gradient."
            )
        if self.spread_out_weight < 0:
            raise ConfigError(f"spread_out_weight must be >= 0, got {self.spread_out_weight}.")
        dims = self.matryoshka_dims
        if any(not isinstance(d, int | np.integer) or d <= 0 for d in dims):
            raise ConfigError(f"matryoshka_dims must be positive integers, got {dims}.")
        if any(a <= b for a, b in zip(dims, dims[1:], strict=False)):
            raise ConfigError(f"matryoshka_dims must be strictly decreasing without duplicates, got {dims}.")
        if self.matryoshka_weights is not None:
            expected = len(dims) if dims else 1
            if len(self.matryoshka_weights) != expected:
                raise ConfigError(
                    f"matryoshka_weights {self.matryoshka_weights} has "
                    f"{len(self.matryoshka_weights)} entries but matryoshka_dims {dims} "
                    f"needs {expected}."
                )
            if any(w < 0 for w in self.matryoshka_weights):
                raise ConfigError(f"matryoshka_weights must be >= 0, got {self.matryoshka_weights}.")


class PerExampleLoss(NamedTuple):
    """Per-example terms of the NCE loss, before the weighted mean.

    Attributes:
      loss: [batch] ``L_i`` (the mean of both directions when symmetric).
      correct: [batch] bool, whether ``p_i`` scores strictly above every other
        query -> document candidate of example ``i`` (top-1 retrieval).
    """

    loss: jax.Array
    correct: jax.Array


def initial_logit_scale(temperature: float) -> float:
    """The learned parameter's initial value for a given temperature.

    CLIP (Radford et al. 2021) learns the log of the inverse temperature,
    ``logit_scale = log(1 / tau)``, so the optimiser steps are multiplicative.

    Args:
      temperature: initial temperature (> 0).

    Returns:
      ``log(1 / temperature)``.
    """
    if not temperature > 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}.")
    return -math.log(temperature)


def learned_temperature(logit_scale: jax.Array, config: ContrastiveLossConfig) -> jax.Array:
    """Temperature from a learned log-scale: ``tau = clip(exp(-logit_scale), min, max)``.

    As CLIP (Radford et al. 2021) clips its scale at 100, the temperature is kept
    within ``[config.min_temperature, config.max_temperature]``; at a bound the
    gradient to ``logit_scale`` is zero, which stops it drifting further.

    Args:
      logit_scale: scalar parameter, ``log(1 / tau)``.
      config: gives the bounds.

    Returns:
      The scalar temperature in float32 (or float64 when the parameter is).
    """
    logit_scale = jnp.asarray(logit_scale)
    dtype = jnp.promote_types(logit_scale.dtype, jnp.float32)
    temperature = jnp.exp(-logit_scale.astype(dtype))
    return jnp.clip(temperature, config.min_temperature, config.max_temperature)


def _l2_normalize(x: jax.Array) -> jax.Array:
    """``x / ||x||`` along the last axis; zero vectors (padding) stay zero."""
    sum_sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sum_sq, _NORM_EPS))


def _dot(a: jax.Array, b: jax.Array, spec: str) -> jax.Array:
    # HIGHEST: on TPU a default-precision f32 matmul rounds inputs to bf16, an
    # error that 1/tau (~20) magnifies in the logits; the [B, B] matmuls are cheap.
    return jnp.einsum(spec, a, b, precision=jax.lax.Precision.HIGHEST)


def _check_inputs(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None,
    query_ids: jax.Array | None,
    positive_ids: jax.Array | None,
    weights: jax.Array | None,
    negative_mask: jax.Array | None = None,
    negative_ids: jax.Array | None = None,
) -> None:
    """Raises ValueError for inputs whose shapes do not describe one batch."""
    if query.ndim != 2:
        raise ValueError(f"query must be [batch, dim], got shape {query.shape}.")
    if positive.shape != query.shape:
        raise ValueError(
            f"positive shape {positive.shape} differs from query shape {query.shape}; "
            "both must be [batch, dim]."
        )
    batch, dim = query.shape
    if negatives is not None and (
        negatives.ndim != 3 or negatives.shape[0] != batch or negatives.shape[2] != dim
    ):
        raise ValueError(
            f"negatives must be [batch, k, dim] = [{batch}, k, {dim}] to match query "
            f"shape {query.shape}, got shape {negatives.shape}."
        )
    for name, ids in (("query_ids", query_ids), ("positive_ids", positive_ids)):
        if ids is None:
            continue
        if ids.shape != (batch,):
            raise ValueError(f"{name} must be [batch] = [{batch}], got shape {ids.shape}.")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} must hold integer example ids, got dtype {ids.dtype}.")
    if weights is not None and weights.shape != (batch,):
        raise ValueError(f"weights must be [batch] = [{batch}], got shape {weights.shape}.")
    k = 0 if negatives is None else negatives.shape[1]
    for name, rows in (("negative_mask", negative_mask), ("negative_ids", negative_ids)):
        if rows is not None and rows.shape != (batch, k):
            raise ValueError(f"{name} must be [batch, k] = [{batch}, {k}], got shape {rows.shape}.")


def _resolve_temperature(
    config: ContrastiveLossConfig, temperature: float | jax.Array | None
) -> float | jax.Array:
    """The temperature to use, checked where its value is known at trace time."""
    if temperature is None:
        if config.learn_temperature:
            raise ValueError(
                "config.learn_temperature is set but no temperature was passed: call the "
                "loss with temperature=learned_temperature(logit_scale, config)."
            )
        return config.temperature
    if jnp.shape(temperature) != ():
        raise ValueError(f"temperature must be a scalar, got shape {jnp.shape(temperature)}.")
    if not isinstance(temperature, jax.core.Tracer) and not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {float(temperature)}.")
    return temperature


def _candidate_mask(
    batch: int,
    query_ids: jax.Array | None,
    positive_ids: jax.Array | None,
    valid: jax.Array,
    mask_duplicates: bool,
) -> jax.Array:
    """[batch, batch] bool: may example j's texts be a negative for example i?

    ``j = i`` (the positive) is always kept. For ``j != i`` the candidate is dropped
    when j is padding, or (Gemini Embedding) when ``q_j`` or ``p_j`` is the same text
    as ``q_i`` or ``p_i`` respectively: a duplicate is never a false negative.
    """
    keep = jnp.broadcast_to(valid[None, :], (batch, batch))
    if mask_duplicates:
        if query_ids is not None:
            keep = keep & (query_ids[:, None] != query_ids[None, :])
        if positive_ids is not None:
            keep = keep & (positive_ids[:, None] != positive_ids[None, :])
    return keep | jnp.eye(batch, dtype=bool)


def per_example_contrastive_loss(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None = None,
    *,
    config: ContrastiveLossConfig,
    temperature: float | jax.Array | None = None,
    query_ids: jax.Array | None = None,
    positive_ids: jax.Array | None = None,
    weights: jax.Array | None = None,
    negative_mask: jax.Array | None = None,
    negative_ids: jax.Array | None = None,
) -> PerExampleLoss:
    """Per-example NCE (InfoNCE) loss over the global batch, before averaging.

    Query -> document direction, for example i. Gecko (Lee et al. 2024,
    arXiv:2403.20327, eq. 1) gives the in-batch, same-tower and own-hard-negative
    terms; ``m_ij`` is the ``mask(i, j)`` of Gemini Embedding's NCE objective (Lee et
    al. 2025, arXiv:2503.07891); ``h`` is the hardness weight ``w_i`` of
    EmbeddingGemma's NCE loss (Vera et al. 2025, arXiv:2509.20354)::

        L_i = -log( e^{s(q_i,p_i)/tau} / Z_i )
        Z_i =   sum_j        m_ij e^{s(q_i,p_j)/tau}            in-batch documents
              + sum_{j != i} m_ij e^{s(q_i,q_j)/tau}            same-tower (switch)
              + sum_{(j,m)}  h_ijm e^{s(q_i,n_jm)/tau}          hard negatives
        h_ijm = exp(alpha * stop_gradient(s(q_i, n_jm)))         hardness weight

    where ``m_ii = 1`` and, for ``j != i``, ``m_ij = 0`` when ``w_j = 0`` or (with
    ``mask_duplicates``) ``qid_j = qid_i`` or ``pid_j = pid_i``, else 1. Hard
    negatives run over ``j = i`` only (Gecko) or over every example with ``w_j > 0``
    (``share_hard_negatives``), and only over present ones: a missing negative
    (``negative_mask`` 0) is left out of ``Z_i``, as Gemini Embedding drops the
    term, never filled with another text; a negative whose text is the query's own
    positive (``negative_ids`` equal to ``positive_ids[i]``) is left out too, shared
    negatives included, so no query ever has its positive among its negatives.
    Document -> query direction (``symmetric``)::

        L'_i = -log( e^{s(p_i,q_i)/tau} / ( sum_j m_ij e^{s(p_i,q_j)/tau}
                                          + sum_{j != i} m_ij e^{s(p_i,p_j)/tau} ) )

    with the same-tower sum only when ``same_tower_negatives``; hard negatives are
    documents and so no candidates there. With ``symmetric`` the per-example loss
    is ``(L_i + L'_i) / 2``.

    Args:
      query: [batch, dim] raw query embeddings (normalised here).
      positive: [batch, dim] raw positive document embeddings.
      negatives: [batch, k, dim] raw hard negatives, row i belonging to query i;
        ``None`` or ``k = 0`` for none.
      config: which terms to include.
      temperature: overrides ``config.temperature`` (required when learned).
      query_ids: [batch] int ids, equal for equal query texts.
      positive_ids: [batch] int ids, equal for equal positive texts.
      weights: [batch] example weights; ``w_j = 0`` removes j as anybody's negative.
      negative_mask: [batch, k], nonzero for a present hard negative; None = all present.
      negative_ids: [batch, k] int ids of the negatives' texts, in the id space of
        ``positive_ids`` (``data.batching.duplicate_id``).

    Returns:
      ``PerExampleLoss(loss [batch], correct [batch])``, in float32 (float64 for
      float64 inputs), whatever the input dtype.
    """
    _check_inputs(query, positive, negatives, query_ids, positive_ids, weights, negative_mask, negative_ids)
    tau = _resolve_temperature(config, temperature)
    batch = query.shape[0]
    # Logits in float32 at least: bf16 cosines carry ~3 significant digits.
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    q = _l2_normalize(query.astype(dtype))  # [batch, dim]
    p = _l2_normalize(positive.astype(dtype))  # [batch, dim]
    valid = jnp.ones((batch,), bool) if weights is None else weights > 0
    keep = _candidate_mask(batch, query_ids, positive_ids, valid, config.mask_duplicates)
    off_diagonal = ~jnp.eye(batch, dtype=bool)

    sim_qp = _dot(q, p, "id,jd->ij")  # [batch, batch]
    positive_sim = jnp.diagonal(sim_qp)  # [batch]
    # (similarities, extra logit term, mask) per block of candidate columns.
    blocks = [(sim_qp, None, keep)]
    if config.same_tower_negatives:
        blocks.append((_dot(q, q, "id,jd->ij"), None, keep & off_diagonal))
    if negatives is not None and negatives.shape[1] > 0:
        k = negatives.shape[1]
        n = _l2_normalize(negatives.astype(dtype))  # [batch, k, dim]
        present = jnp.ones((batch, k), bool) if negative_mask is None else jnp.asarray(negative_mask) != 0
        if config.share_hard_negatives:
            sim_qn = _dot(q, n, "id,jkd->ijk").reshape(batch, batch * k)  # [batch, batch*k]
            # Padding examples' and missing negatives are nobody's candidates.
            present = (present & valid[:, None]).reshape(1, batch * k)
            mask_qn = jnp.broadcast_to(present, sim_qn.shape)
            if negative_ids is not None and positive_ids is not None:
                mask_qn = mask_qn & (negative_ids.reshape(1, batch * k) != positive_ids[:, None])
        else:
            sim_qn = _dot(q, n, "id,ikd->ik")  # [batch, k]
            mask_qn = present
            if negative_ids is not None and positive_ids is not None:
                mask_qn = mask_qn & (negative_ids != positive_ids[:, None])
        # log h = alpha * sg(s): the weight scales the exp term, not its gradient path.
        hardness = (
            config.hardness_alpha * jax.lax.stop_gradient(sim_qn) if config.hardness_alpha != 0 else None
        )
        blocks.append((sim_qn, hardness, mask_qn))

    loss = _nce_from_blocks(blocks, positive_sim, tau)

    # Top-1 accuracy on raw similarities over the same candidates, positive excluded.
    other_max = jnp.full((batch,), -jnp.inf, dtype)
    for i, (sims, _, mask) in enumerate(blocks):
        mask = mask & off_diagonal if i == 0 else mask
        other_max = jnp.maximum(other_max, jnp.max(jnp.where(mask, sims, -jnp.inf), axis=1))
    correct = positive_sim > other_max

    if config.symmetric:
        reverse = [(sim_qp.T, None, keep)]
        if config.same_tower_negatives:
            reverse.append((_dot(p, p, "id,jd->ij"), None, keep & off_diagonal))
        loss = 0.5 * (loss + _nce_from_blocks(reverse, positive_sim, tau))
    return PerExampleLoss(loss=loss, correct=correct)


def _nce_from_blocks(
    blocks: list[tuple[jax.Array, jax.Array | None, jax.Array]],
    positive_sim: jax.Array,
    tau: float | jax.Array,
) -> jax.Array:
    """``logsumexp(candidate logits) - s(pos) / tau`` per row; [batch]."""
    logits, masks = [], []
    for sims, extra, mask in blocks:
        logits.append(sims / tau if extra is None else sims / tau + extra)
        masks.append(mask)
    logits = jnp.concatenate(logits, axis=1)  # [batch, candidates]
    mask = jnp.concatenate(masks, axis=1)
    # Each row keeps its own positive, so the masked logsumexp is always finite.
    return jax.nn.logsumexp(logits, axis=1, where=mask) - positive_sim / tau


def spread_out_loss(
    query: jax.Array,
    positive: jax.Array,
    *,
    query_ids: jax.Array | None = None,
    positive_ids: jax.Array | None = None,
    weights: jax.Array | None = None,
    mask_duplicates: bool = True,
) -> jax.Array:
    """Spread-out regulariser: the second moment of non-matching similarities.

    Zhang et al. 2017, "Learning Spread-out Local Feature Descriptors"
    (arXiv:1708.06320), global orthogonal regularisation: ``M_1^2 + max(0, M_2 - 1/d)``
    with ``M_1``, ``M_2`` the mean and mean square of non-matching pairs'
    similarities. EmbeddingGemma's spread-out loss (Vera et al. 2025,
    arXiv:2509.20354) keeps the second moment only, per tower, summed::

        L_S = sum_{x in {q, p}} sum_{i != j} c_ij (x_i . x_j)^2 / sum_{i != j} c_ij
        c_ij = w_i w_j [not a duplicate pair]

    Pairs with a padding member (``w = 0``) and, with ``mask_duplicates``, pairs
    sharing the query or positive text (which cannot be spread apart) are left out.

    Args:
      query: [batch, dim] raw query embeddings.
      positive: [batch, dim] raw positive embeddings.
      query_ids: [batch] int ids of the query texts, or None.
      positive_ids: [batch] int ids of the positive texts, or None.
      weights: [batch] example weights, or None for all 1.
      mask_duplicates: leave out pairs that share a text.

    Returns:
      The scalar regulariser (0 when no pair is left).
    """
    _check_inputs(query, positive, None, query_ids, positive_ids, weights)
    batch = query.shape[0]
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    w = jnp.ones((batch,), dtype) if weights is None else weights.astype(dtype)
    pair_weight = w[:, None] * w[None, :]  # [batch, batch]
    keep = _candidate_mask(batch, query_ids, positive_ids, w > 0, mask_duplicates)
    pair_weight = jnp.where(keep & ~jnp.eye(batch, dtype=bool), pair_weight, 0)
    total_weight = jnp.sum(pair_weight)
    loss = jnp.zeros((), dtype)
    for x in (query, positive):
        x = _l2_normalize(x.astype(dtype))
        second_moment = jnp.sum(pair_weight * jnp.square(_dot(x, x, "id,jd->ij")))
        loss += second_moment / jnp.maximum(total_weight, jnp.finfo(dtype).tiny)
    return loss


def contrastive_loss(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None = None,
    *,
    config: ContrastiveLossConfig,
    temperature: float | jax.Array | None = None,
    query_ids: jax.Array | None = None,
    positive_ids: jax.Array | None = None,
    weights: jax.Array | None = None,
    negative_mask: jax.Array | None = None,
    negative_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """NCE loss at one resolution (the full embedding), plus the spread-out term.

    ``loss = sum_i w_i L_i / sum_i w_i + spread_out_weight * L_S`` with ``L_i``
    from ``per_example_contrastive_loss`` and ``L_S`` from ``spread_out_loss``.
    The Matryoshka fields of ``config`` are not read here: the train step calls
    ``matryoshka_contrastive_loss``.

    Args:
      query, positive, negatives, config, temperature, query_ids, positive_ids,
        weights, negative_mask, negative_ids: as for ``per_example_contrastive_loss``.

    Returns:
      ``(loss, metrics)``: the scalar loss and a dict of scalars: ``loss/nce``,
      ``loss/spread_out`` (when on), ``accuracy`` (weighted top-1 query ->
      document retrieval over the loss's candidates) and ``temperature``.
    """
    per_example = per_example_contrastive_loss(
        query,
        positive,
        negatives,
        config=config,
        temperature=temperature,
        query_ids=query_ids,
        positive_ids=positive_ids,
        weights=weights,
        negative_mask=negative_mask,
        negative_ids=negative_ids,
    )
    dtype = per_example.loss.dtype
    batch = query.shape[0]
    w = jnp.ones((batch,), dtype) if weights is None else weights.astype(dtype)
    # An all-padding batch yields 0, not NaN.
    total_weight = jnp.maximum(jnp.sum(w), jnp.finfo(dtype).tiny)
    nce = jnp.sum(w * per_example.loss) / total_weight
    metrics = {
        "loss/nce": nce,
        "accuracy": jnp.sum(w * per_example.correct.astype(dtype)) / total_weight,
        "temperature": jnp.asarray(_resolve_temperature(config, temperature), dtype),
    }
    loss = nce
    if config.spread_out_weight > 0:
        spread = spread_out_loss(
            query,
            positive,
            query_ids=query_ids,
            positive_ids=positive_ids,
            weights=weights,
            mask_duplicates=config.mask_duplicates,
        )
        metrics["loss/spread_out"] = spread
        loss = loss + config.spread_out_weight * spread
    return loss, metrics


def matryoshka_contrastive_loss(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None = None,
    *,
    config: ContrastiveLossConfig,
    temperature: float | jax.Array | None = None,
    query_ids: jax.Array | None = None,
    positive_ids: jax.Array | None = None,
    weights: jax.Array | None = None,
    negative_mask: jax.Array | None = None,
    negative_ids: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Multi-resolution (Matryoshka) contrastive loss: the train step's objective.

    Kusupati et al. 2022, "Matryoshka Representation Learning" (arXiv:2205.13147),
    eq. 1: the loss is
    summed over nested prefixes of the embedding, each re-normalised::

        loss = sum_{d in dims} c_d * contrastive_loss(x[..., :d])

    with ``dims = config.matryoshka_dims`` (``()`` = the full size only) and
    ``c_d = config.matryoshka_weights`` (default 1).

    Args:
      query, positive, negatives, config, temperature, query_ids, positive_ids,
        weights, negative_mask, negative_ids: as for ``per_example_contrastive_loss``.

    Returns:
      ``(loss, metrics)``: the scalar loss and a dict of scalars:
      ``loss/dim_{d}`` and ``accuracy/dim_{d}`` per dimension (the former the
      unweighted loss at that size, spread-out included), ``loss/spread_out/dim_{d}``
      when the regulariser is on, ``accuracy`` at the largest dimension and
      ``temperature``.
    """
    # Checked before slicing: a prefix of a too-wide tensor would pass the check.
    _check_inputs(query, positive, negatives, query_ids, positive_ids, weights, negative_mask, negative_ids)
    full_dim = query.shape[-1]
    dims = config.matryoshka_dims or (full_dim,)
    if dims[0] > full_dim:
        raise ConfigError(
            f"matryoshka_dims {dims} has dimension {dims[0]} larger than the embedding "
            f"size {full_dim} (query shape {query.shape})."
        )
    dim_weights = config.matryoshka_weights or (1.0,) * len(dims)
    total = 0.0
    metrics = {}
    for dim, dim_weight in zip(dims, dim_weights, strict=True):
        # The plain prefixes: contrastive_loss normalises its inputs itself.
        loss, dim_metrics = contrastive_loss(
            matryoshka.prefix(query, dim, normalize=False),
            matryoshka.prefix(positive, dim, normalize=False),
            None if negatives is None else matryoshka.prefix(negatives, dim, normalize=False),
            config=config,
            temperature=temperature,
            query_ids=query_ids,
            positive_ids=positive_ids,
            weights=weights,
            negative_mask=negative_mask,
            negative_ids=negative_ids,
        )
        total = total + dim_weight * loss
        metrics[f"loss/dim_{dim}"] = loss
        metrics[f"accuracy/dim_{dim}"] = dim_metrics["accuracy"]
        if "loss/spread_out" in dim_metrics:
            metrics[f"loss/spread_out/dim_{dim}"] = dim_metrics["loss/spread_out"]
        metrics["temperature"] = dim_metrics["temperature"]
    metrics["accuracy"] = metrics[f"accuracy/dim_{dims[0]}"]
    return total, metrics


# ---------------------------------------------------------------------------
# Teacher terms: a frozen teacher's embeddings, or scores given with the data.
#
# Each term is ``(loss, metrics)`` like ``contrastive_loss``, so the train step adds
# ``weight * loss`` to the contrastive objective. The teacher's side is always under
# ``jax.lax.stop_gradient``: a frozen teacher gets no gradient however it is passed.
# ---------------------------------------------------------------------------


def _prefix_dims(
    dims: tuple[int, ...] | list[int], dim_weights: tuple[float, ...] | list[float] | None, full_dim: int
) -> list[tuple[int, float]]:
    """``[(d, c_d)]`` for a Matryoshka loss: ``()`` = the full size with weight 1.

    Raises:
      ConfigError: dims that are not positive, strictly decreasing and at most
        ``full_dim``, or weights of another length or negative.
    """
    dims = tuple(int(d) for d in dims) or (full_dim,)
    if any(d <= 0 for d in dims) or any(a <= b for a, b in zip(dims, dims[1:], strict=False)):
        raise ConfigError(f"matryoshka_dims must be positive and strictly decreasing, got {dims}.")
    if dims[0] > full_dim:
        raise ConfigError(
            f"matryoshka_dims {dims} has dimension {dims[0]} larger than the student's embedding size {full_dim}."
        )
    dim_weights = (1.0,) * len(dims) if dim_weights is None else tuple(float(c) for c in dim_weights)
    if len(dim_weights) != len(dims) or any(c < 0 for c in dim_weights):
        raise ConfigError(
            f"matryoshka_weights {dim_weights} must be {len(dims)} non-negative numbers, one per dimension {dims}."
        )
    return list(zip(dims, dim_weights, strict=True))


def _check_temperature(name: str, value: float | jax.Array) -> None:
    if jnp.shape(value) != ():
        raise ConfigError(f"{name} must be a scalar, got shape {jnp.shape(value)}.")
    if not isinstance(value, jax.core.Tracer) and not float(value) > 0:
        raise ConfigError(f"{name} must be > 0, got {float(value)}.")


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """``sum w v / sum w``; 0 (not NaN) when every weight is 0."""
    total = jnp.maximum(jnp.sum(weights), jnp.finfo(weights.dtype).tiny)
    return jnp.sum(weights * values) / total


def _check_teacher_scores(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None,
    scores: jax.Array,
    score_mask: jax.Array | None,
    weights: jax.Array | None,
) -> None:
    """Raises DataError unless ``scores`` [batch, 1 + k] lines up with positive + negatives."""
    _check_inputs(query, positive, negatives, None, None, weights)
    batch = query.shape[0]
    k = 0 if negatives is None else negatives.shape[1]
    if scores.shape != (batch, 1 + k):
        raise DataError(
            f"scores must be [batch, 1 + negatives] = [{batch}, {1 + k}] (the positive's score, then one per "
            f"hard negative, as the data's 'scores' list), got shape {scores.shape}."
        )
    if score_mask is not None and score_mask.shape != scores.shape:
        raise DataError(f"score_mask must have the shape of scores {scores.shape}, got {score_mask.shape}.")


def embedding_matching_loss(
    student: jax.Array,
    teacher: jax.Array,
    *,
    projection: jax.Array | None = None,
    metric: str = "cosine",
    weights: jax.Array | None = None,
    matryoshka_dims: tuple[int, ...] = (),
    matryoshka_weights: tuple[float, ...] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Embedding matching: the student's embedding against a frozen teacher's, per text.

    EmbeddingGemma (Vera et al. 2025, arXiv:2509.20354) aligns the student's
    embedding space with its teacher's (Gemini Embedding) by matching the
    embeddings of the same queries, positives and hard negatives; as
    sentence-transformers' ``MSELoss`` (Reimers & Gurevych 2020, arXiv:2004.09813)
    does for raw vectors. With ``S_d``, ``T_d`` the student's and the teacher's
    side at Matryoshka size ``d``::

        loss  = sum_d c_d * sum_i w_i l_i(d) / sum_i w_i
        l_i(d) = 1 - cos(S_d(s_i), sg(T_d(t_i)))                metric="cosine"
        l_i(d) = mean_e (S_d(s_i)_e - sg(T_d(t_i))_e)^2         metric="mse" (raw vectors)

    Widths equal, no map: ``S_d(s) = s[:d]`` and ``T_d(t) = t[:d]``: each student
    prefix against the teacher's own prefix. EmbeddingGemma's teacher is itself
    Matryoshka-trained, so its prefix is the teacher's embedding at that size, and a
    student prefix is served alone at that size: matching like against like keeps
    every prefix a copy of the teacher at the same cost, where matching a prefix
    against the full vector would ask a short vector to carry what only the full
    one holds. Widths differ: the caller's linear map ``W`` [student_dim,
    teacher_dim] (its parameters, learned with the student) gives
    ``S_d(s) = s[:d] W[:d]`` (the map of the prefix, zero-padded) and
    ``T_d(t) = t``: the teacher has no prefix of the student's sizes, so every
    prefix is pulled toward the teacher's full embedding through the map's rows of
    that prefix.

    Args:
      student: [..., student_dim] raw student embeddings (queries, documents or
        negatives: any leading shape).
      teacher: [..., teacher_dim] the teacher's embeddings of the same texts,
        the same leading shape.
      projection: [student_dim, teacher_dim] the map to the teacher's width;
        ``None`` when the widths are equal.
      metric: ``"cosine"`` (each side L2-normalised, prefixes re-normalised) or
        ``"mse"`` (raw values, mean over the embedding axis).
      weights: [...] per-example weights; 0 masks an example (padding, a missing
        negative, a text without a teacher embedding).
      matryoshka_dims: student prefix sizes, strictly decreasing; ``()`` = full.
      matryoshka_weights: ``c_d`` per size; ``None`` = all 1.

    Returns:
      ``(loss, metrics)``: the scalar loss; ``loss/embedding_matching/dim_{d}``
      (unweighted by ``c_d``) per size.
    """
    if metric not in ("cosine", "mse"):
        raise ConfigError(f"embedding matching metric must be 'cosine' or 'mse', got {metric!r}.")
    lead, student_dim, teacher_dim = student.shape[:-1], student.shape[-1], teacher.shape[-1]
    if teacher.shape[:-1] != lead:
        raise DataError(
            f"teacher embeddings {teacher.shape} and student embeddings {student.shape} must cover the same "
            "texts: equal shapes but for the last axis."
        )
    if projection is None and teacher_dim != student_dim:
        raise ConfigError(
            f"the student's width {student_dim} differs from the teacher's {teacher_dim}: pass a projection "
            f"[{student_dim}, {teacher_dim}] to map the student to the teacher's width."
        )
    if projection is not None and projection.shape != (student_dim, teacher_dim):
        raise ConfigError(
            f"projection must be [student_dim, teacher_dim] = [{student_dim}, {teacher_dim}], "
            f"got shape {projection.shape}."
        )
    if weights is not None and weights.shape != lead:
        raise DataError(f"weights must have the embeddings' leading shape {lead}, got {weights.shape}.")
    dims = _prefix_dims(matryoshka_dims, matryoshka_weights, student_dim)
    dtype = jnp.promote_types(student.dtype, jnp.float32)
    s = student.astype(dtype).reshape(-1, student_dim)  # [n, student_dim]
    t = jax.lax.stop_gradient(teacher).astype(dtype).reshape(-1, teacher_dim)  # [n, teacher_dim]
    w = jnp.ones(s.shape[:1], dtype) if weights is None else weights.astype(dtype).reshape(-1)
    total = jnp.zeros((), dtype)
    metrics = {}
    for dim, dim_weight in dims:
        if projection is None:
            student_side, teacher_side = s[:, :dim], t[:, :dim]
        else:
            student_side = _dot(s[:, :dim], projection[:dim].astype(dtype), "nd,de->ne")
            teacher_side = t
        if metric == "cosine":
            per_example = 1.0 - jnp.sum(_l2_normalize(student_side) * _l2_normalize(teacher_side), axis=-1)
        else:
            per_example = jnp.mean(jnp.square(student_side - teacher_side), axis=-1)
        loss = _weighted_mean(per_example, w)
        metrics[f"loss/embedding_matching/dim_{dim}"] = loss
        total = total + dim_weight * loss
    return total, metrics


def score_distillation_loss(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None,
    teacher_query: jax.Array,
    teacher_positive: jax.Array,
    teacher_negatives: jax.Array | None,
    *,
    temperature: float | jax.Array,
    teacher_temperature: float | jax.Array,
    weights: jax.Array | None = None,
    negative_mask: jax.Array | None = None,
    matryoshka_dims: tuple[int, ...] = (),
    matryoshka_weights: tuple[float, ...] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Score distillation: KL(teacher || student) of the in-batch similarity distributions.

    Knowledge distillation (Hinton et al. 2015, arXiv:1503.02531) on the
    contrastive task itself: the student's distribution over the candidates of a
    query is pulled toward the frozen teacher's, as in RocketQAv2's listwise
    distillation (Ren et al. 2021, arXiv:2110.07367) but over every document of
    the GLOBAL batch. For query i, over candidates ``c_j`` = all positives
    ``p_1..p_B`` and all hard negatives ``n_11..n_Bk``::

        P_t(j|i) = softmax_j( cos(tq_i, tc_j) / tau_t )        teacher, sg(.)
        P_s(j|i) = softmax_j( cos(q_i[:d], c_j[:d]) / tau )    student, each size d
        loss = sum_d c_d sum_i w_i KL(P_t(.|i) || P_s(.|i)) / sum_i w_i
        KL(P || Q) = sum_j P(j) (log P(j) - log Q(j))

    A candidate is dropped (both sides) when its example has ``w_j = 0`` or, for a
    hard negative, when ``negative_mask`` marks it missing; a query always keeps its
    own positive. Distributions do not depend on the width, so each student prefix
    is distilled from the teacher's full-width distribution.

    Args:
      query, positive: [batch, dim] raw student embeddings.
      negatives: [batch, k, dim] the student's hard negatives, or ``None``.
      teacher_query, teacher_positive: [batch, teacher_dim] the teacher's
        embeddings of the same texts (any width).
      teacher_negatives: [batch, k, teacher_dim], present exactly when
        ``negatives`` is.
      temperature: the student's ``tau`` (> 0), e.g. the contrastive one.
      teacher_temperature: the teacher's ``tau_t`` (> 0).
      weights: [batch] example weights; 0 = padding (nobody's candidate).
      negative_mask: [batch, k] bool, False for a missing hard negative.
      matryoshka_dims, matryoshka_weights: as for ``embedding_matching_loss``.

    Returns:
      ``(loss, metrics)`` with ``loss/score_distillation/dim_{d}`` per size.
    """
    _check_inputs(query, positive, negatives, None, None, weights)
    batch = query.shape[0]
    if (
        teacher_query.ndim != 2
        or teacher_query.shape[0] != batch
        or teacher_positive.shape != teacher_query.shape
    ):
        raise DataError(
            f"teacher_query {teacher_query.shape} and teacher_positive {teacher_positive.shape} must both be "
            f"[batch, teacher_dim] with batch = {batch}."
        )
    if (negatives is None) != (teacher_negatives is None):
        raise DataError("negatives and teacher_negatives must be given together.")
    k = 0 if negatives is None else negatives.shape[1]
    if k and teacher_negatives.shape != (batch, k, teacher_query.shape[1]):
        raise DataError(
            f"teacher_negatives must be [batch, k, teacher_dim] = [{batch}, {k}, {teacher_query.shape[1]}], "
            f"got {teacher_negatives.shape}."
        )
    if negative_mask is not None and negative_mask.shape != (batch, k):
        raise DataError(
            f"negative_mask must be [batch, k] = [{batch}, {k}], got shape {negative_mask.shape}."
        )
    _check_temperature("temperature", temperature)
    _check_temperature("teacher_temperature", teacher_temperature)
    dims = _prefix_dims(matryoshka_dims, matryoshka_weights, query.shape[1])
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    w = jnp.ones((batch,), dtype) if weights is None else weights.astype(dtype)
    valid = w > 0
    # [batch, batch + batch*k]: may candidate j be scored for query i?
    keep_positive = valid[None, :] | jnp.eye(batch, dtype=bool)
    keep_negative = jnp.repeat(valid, k)
    if negative_mask is not None:
        keep_negative = keep_negative & jnp.asarray(negative_mask, bool).reshape(-1)
    keep = jnp.concatenate(
        [keep_positive, jnp.broadcast_to(keep_negative[None, :], (batch, batch * k))], axis=1
    )

    def log_probs(q, p, n, tau):
        q, p = _l2_normalize(q), _l2_normalize(p)
        sims = [_dot(q, p, "id,jd->ij")]
        if k:
            sims.append(_dot(q, _l2_normalize(n).reshape(batch * k, -1), "id,jd->ij"))
        logits = jnp.concatenate(sims, axis=1) / tau  # [batch, candidates]
        return logits - jax.nn.logsumexp(logits, axis=1, where=keep, keepdims=True)

    teacher = tuple(
        None if x is None else jax.lax.stop_gradient(x).astype(dtype)
        for x in (teacher_query, teacher_positive, teacher_negatives)
    )
    log_p_teacher = jax.lax.stop_gradient(log_probs(*teacher, teacher_temperature))
    p_teacher = jnp.where(keep, jnp.exp(log_p_teacher), 0.0)
    total = jnp.zeros((), dtype)
    metrics = {}
    for dim, dim_weight in dims:
        student = [
            x.astype(dtype)[..., :dim] if x is not None else None for x in (query, positive, negatives)
        ]
        log_p_student = log_probs(*student, temperature)
        kl = jnp.sum(jnp.where(keep, p_teacher * (log_p_teacher - log_p_student), 0.0), axis=1)  # [batch]
        loss = _weighted_mean(kl, w)
        metrics[f"loss/score_distillation/dim_{dim}"] = loss
        total = total + dim_weight * loss
    return total, metrics


def _student_list_scores(
    query: jax.Array, positive: jax.Array, negatives: jax.Array | None, dim: int, dtype
) -> jax.Array:
    """[batch, 1 + k]: cos(q_i, p_i), then cos(q_i, n_im), at prefix size ``dim``."""
    q = _l2_normalize(query.astype(dtype)[:, :dim])
    columns = [jnp.sum(q * _l2_normalize(positive.astype(dtype)[:, :dim]), axis=-1, keepdims=True)]
    if negatives is not None and negatives.shape[1]:
        columns.append(_dot(q, _l2_normalize(negatives.astype(dtype)[..., :dim]), "id,ikd->ik"))
    return jnp.concatenate(columns, axis=1)


def margin_mse_loss(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None,
    scores: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    score_mask: jax.Array | None = None,
    weights: jax.Array | None = None,
    matryoshka_dims: tuple[int, ...] = (),
    matryoshka_weights: tuple[float, ...] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MarginMSE on scores given in the data (a cross-encoder's or an LLM reranker's).

    Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation" (arXiv:2010.02666), eq. 1: the
    student's margin between the positive and a negative regresses the teacher's
    margin. With ``t_i0`` the positive's given score, ``t_im`` the m-th negative's,
    and the student's scores its logits ``s_im = cos(q_i[:d], x_im[:d]) / tau``::

        loss = sum_d c_d sum_{i,m} w_i v_im ((s_i0 - s_im) - (t_i0 - t_im))^2
                         / sum_{i,m} w_i v_im
        v_im = mask_i0 and mask_im

    so a missing score (or a missing negative) removes its pair; nothing is filled
    in. ``tau`` sets the student's score scale against the teacher's (a
    cross-encoder's logits span ~[-10, 10], cosines [-1, 1]).

    Args:
      query, positive: [batch, dim] raw student embeddings.
      negatives: [batch, k, dim] raw hard negatives (k >= 1 for any pair).
      scores: [batch, 1 + k] the teacher's scores of positive, then negatives.
      temperature: the student's score scale ``tau`` (> 0).
      score_mask: [batch, 1 + k] bool, False where a score or negative is missing.
      weights: [batch] example weights.
      matryoshka_dims, matryoshka_weights: as for ``embedding_matching_loss``.

    Returns:
      ``(loss, metrics)`` with ``loss/margin_mse/dim_{d}`` per size; 0 without pairs.
    """
    _check_teacher_scores(query, positive, negatives, scores, score_mask, weights)
    _check_temperature("temperature", temperature)
    dims = _prefix_dims(matryoshka_dims, matryoshka_weights, query.shape[1])
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    batch = query.shape[0]
    t = jax.lax.stop_gradient(scores).astype(dtype)
    mask = jnp.ones(t.shape, bool) if score_mask is None else jnp.asarray(score_mask, bool)
    w = jnp.ones((batch,), dtype) if weights is None else weights.astype(dtype)
    pair_weight = w[:, None] * (mask[:, :1] & mask[:, 1:]).astype(dtype)  # [batch, k]
    teacher_margin = t[:, :1] - t[:, 1:]
    total = jnp.zeros((), dtype)
    metrics = {}
    for dim, dim_weight in dims:
        s = _student_list_scores(query, positive, negatives, dim, dtype) / temperature
        # Masked pairs are zeroed before squaring: their scores may be any placeholder.
        error = jnp.where(pair_weight > 0, (s[:, :1] - s[:, 1:]) - teacher_margin, 0.0)
        loss = _weighted_mean(jnp.square(error), pair_weight)
        metrics[f"loss/margin_mse/dim_{dim}"] = loss
        total = total + dim_weight * loss
    return total, metrics


def listwise_kl_loss(
    query: jax.Array,
    positive: jax.Array,
    negatives: jax.Array | None,
    scores: jax.Array,
    *,
    temperature: float | jax.Array,
    teacher_temperature: float | jax.Array = 1.0,
    score_mask: jax.Array | None = None,
    weights: jax.Array | None = None,
    matryoshka_dims: tuple[int, ...] = (),
    matryoshka_weights: tuple[float, ...] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Listwise KL on scores given in the data: each query's own list, positive first.

    RocketQAv2's listwise distillation (Ren et al. 2021, arXiv:2110.07367, eq. 5)
    with a fixed teacher, as FlagEmbedding trains on reranker scores: over the list
    ``x_i0 = p_i, x_im = n_im`` of query i, restricted to its valid entries::

        P_t(m|i) = softmax_m( t_im / tau_t )                        given scores, sg(.)
        P_s(m|i) = softmax_m( cos(q_i[:d], x_im[:d]) / tau )
        loss = sum_d c_d sum_i w_i KL(P_t(.|i) || P_s(.|i)) / sum_i w_i

    A masked entry (missing score or negative) leaves both distributions; a query
    with no valid entry weighs 0.

    Args:
      query, positive, negatives: raw student embeddings as for ``margin_mse_loss``.
      scores: [batch, 1 + k] the teacher's scores of positive, then negatives.
      temperature: the student's ``tau`` (> 0).
      teacher_temperature: ``tau_t`` (> 0) applied to the given scores.
      score_mask: [batch, 1 + k] bool, False where a score or negative is missing.
      weights: [batch] example weights.
      matryoshka_dims, matryoshka_weights: as for ``embedding_matching_loss``.

    Returns:
      ``(loss, metrics)`` with ``loss/listwise_kl/dim_{d}`` per size.
    """
    _check_teacher_scores(query, positive, negatives, scores, score_mask, weights)
    _check_temperature("temperature", temperature)
    _check_temperature("teacher_temperature", teacher_temperature)
    dims = _prefix_dims(matryoshka_dims, matryoshka_weights, query.shape[1])
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    batch = query.shape[0]
    mask = jnp.ones(scores.shape, bool) if score_mask is None else jnp.asarray(score_mask, bool)
    w = jnp.ones((batch,), dtype) if weights is None else weights.astype(dtype)
    w = jnp.where(jnp.any(mask, axis=1), w, 0.0)
    # An all-masked row gets a harmless placeholder so its (zero-weighted) terms stay finite.
    safe_mask = mask.at[:, 0].set(mask[:, 0] | ~jnp.any(mask, axis=1))

    def log_softmax(logits):
        logits = jnp.where(safe_mask, logits, 0.0)
        return logits - jax.nn.logsumexp(logits, axis=1, where=safe_mask, keepdims=True)

    log_p_teacher = log_softmax(jax.lax.stop_gradient(scores).astype(dtype) / teacher_temperature)
    p_teacher = jnp.where(safe_mask, jnp.exp(log_p_teacher), 0.0)
    total = jnp.zeros((), dtype)
    metrics = {}
    for dim, dim_weight in dims:
        log_p_student = log_softmax(
            _student_list_scores(query, positive, negatives, dim, dtype) / temperature
        )
        kl = jnp.sum(jnp.where(safe_mask, p_teacher * (log_p_teacher - log_p_student), 0.0), axis=1)
        loss = _weighted_mean(kl, w)
        metrics[f"loss/listwise_kl/dim_{dim}"] = loss
        total = total + dim_weight * loss
    return total, metrics


@dataclasses.dataclass(frozen=True)
class TeacherLossConfig:
    """Which teacher terms the train step adds to the contrastive objective, and their weights.

    A weight of 0 switches a term off. The student side of every term uses the
    contrastive loss's temperature and Matryoshka sizes (passed at call time).

    Attributes:
      embedding_matching_weight: weight of ``embedding_matching_loss`` over the
        queries, positives and hard negatives together.
      embedding_matching_metric: ``"cosine"`` or ``"mse"``.
      score_distillation_weight: weight of ``score_distillation_loss``.
      teacher_temperature: the teacher's temperature in score distillation.
      given_scores_loss: ``"margin_mse"`` or ``"listwise_kl"``: the term on the
        data's ``scores``.
      given_scores_weight: its weight.
      given_scores_temperature: the temperature applied to the given scores
        (``listwise_kl``'s ``tau_t``); MarginMSE compares the student's logit
        margins (cosine / temperature) with the raw score margins.
    """

    embedding_matching_weight: float = 0.0
    embedding_matching_metric: str = "cosine"
    score_distillation_weight: float = 0.0
    teacher_temperature: float = 0.05
    given_scores_loss: str = "margin_mse"
    given_scores_weight: float = 0.0
    given_scores_temperature: float = 1.0

    def __post_init__(self):
        for name in ("embedding_matching_weight", "score_distillation_weight", "given_scores_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("teacher_temperature", "given_scores_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}.")
        if self.embedding_matching_metric not in ("cosine", "mse"):
            raise ConfigError(
                f"embedding_matching_metric must be 'cosine' or 'mse', got {self.embedding_matching_metric!r}."
            )
        if self.given_scores_loss not in ("margin_mse", "listwise_kl"):
            raise ConfigError(
                f"given_scores_loss must be 'margin_mse' or 'listwise_kl', got {self.given_scores_loss!r}."
            )

    @property
    def needs_teacher_embeddings(self) -> bool:
        return self.embedding_matching_weight > 0 or self.score_distillation_weight > 0

    @property
    def needs_scores(self) -> bool:
        return self.given_scores_weight > 0


def teacher_loss(
    student: dict[str, jax.Array],
    teacher: dict[str, jax.Array] | None = None,
    *,
    config: TeacherLossConfig,
    temperature: float | jax.Array,
    projection: jax.Array | None = None,
    scores: jax.Array | None = None,
    score_mask: jax.Array | None = None,
    negative_mask: jax.Array | None = None,
    weights: jax.Array | None = None,
    matryoshka_dims: tuple[int, ...] = (),
    matryoshka_weights: tuple[float, ...] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The weighted sum of the teacher terms that ``config`` switches on::

        loss = a * embedding_matching + b * score_distillation + c * (margin_mse | listwise_kl)

    Args:
      student: ``{"query": [batch, dim], "positive": [batch, dim], "negatives":
        [batch, k, dim]?}``, the student's raw embeddings (``DualEncoder``'s output).
      teacher: the teacher's embeddings of the same texts, same keys (any width);
        needed when embedding matching or score distillation is on.
      config: the terms and their weights.
      temperature: the student's temperature (the contrastive loss's).
      projection: [dim, teacher_dim] the map to the teacher's width, when they differ.
      scores: [batch, 1 + k] the data's teacher scores; needed for the given-scores term.
      score_mask: [batch, 1 + k] bool, False where a score is missing.
      negative_mask: [batch, k] bool, False for a missing hard negative.
      weights: [batch] example weights.
      matryoshka_dims, matryoshka_weights: the student's Matryoshka sizes.

    Returns:
      ``(loss, metrics)``: the scalar sum and every term's metrics, plus
      ``loss/teacher`` (the sum).
    """
    query, positive, negatives = student["query"], student["positive"], student.get("negatives")
    if negatives is not None and negatives.shape[1] == 0:
        negatives = None
    dims = dict(matryoshka_dims=matryoshka_dims, matryoshka_weights=matryoshka_weights)
    if config.needs_teacher_embeddings and teacher is None:
        raise ConfigError(
            "embedding matching or score distillation is on but no teacher embeddings were given."
        )
    if config.needs_scores and scores is None:
        raise DataError(
            f"the {config.given_scores_loss} term is on (given_scores_weight={config.given_scores_weight}) but "
            "the batch has no 'scores'."
        )
    batch = query.shape[0]
    dtype = jnp.promote_types(query.dtype, jnp.float32)
    w = jnp.ones((batch,), dtype) if weights is None else jnp.asarray(weights).astype(dtype)
    total = jnp.zeros((), dtype)
    metrics = {}
    if config.embedding_matching_weight > 0:
        teacher_negatives = teacher.get("negatives") if negatives is not None else None
        if negatives is not None and teacher_negatives is None:
            raise DataError("the batch has hard negatives but the teacher embeddings have no 'negatives'.")
        rows = [(query, teacher["query"], w), (positive, teacher["positive"], w)]
        if negatives is not None:
            k = negatives.shape[1]
            keep = jnp.ones((batch, k), dtype) if negative_mask is None else jnp.asarray(negative_mask, dtype)
            rows.append(
                (
                    negatives.reshape(batch * k, -1),
                    teacher_negatives.reshape(batch * k, -1),
                    (w[:, None] * keep).reshape(-1),
                )
            )
        loss, term_metrics = embedding_matching_loss(
            jnp.concatenate([r[0] for r in rows]),
            jnp.concatenate([r[1] for r in rows]),
            projection=projection,
            metric=config.embedding_matching_metric,
            weights=jnp.concatenate([r[2] for r in rows]),
            **dims,
        )
        total = total + config.embedding_matching_weight * loss
        metrics |= term_metrics | {"loss/embedding_matching": loss}
    if config.score_distillation_weight > 0:
        loss, term_metrics = score_distillation_loss(
            query,
            positive,
            negatives,
            teacher["query"],
            teacher["positive"],
            teacher.get("negatives") if negatives is not None else None,
            temperature=temperature,
            teacher_temperature=config.teacher_temperature,
            weights=weights,
            negative_mask=negative_mask,
            **dims,
        )
        total = total + config.score_distillation_weight * loss
        metrics |= term_metrics | {"loss/score_distillation": loss}
    if config.given_scores_weight > 0:
        kwargs = dict(score_mask=score_mask, weights=weights, temperature=temperature, **dims)
        if config.given_scores_loss == "margin_mse":
            loss, term_metrics = margin_mse_loss(query, positive, negatives, scores, **kwargs)
        else:
            loss, term_metrics = listwise_kl_loss(
                query,
                positive,
                negatives,
                scores,
                teacher_temperature=config.given_scores_temperature,
                **kwargs,
            )
        total = total + config.given_scores_weight * loss
        metrics |= term_metrics | {f"loss/{config.given_scores_loss}": loss}
    metrics["loss/teacher"] = total
    return total, metrics
