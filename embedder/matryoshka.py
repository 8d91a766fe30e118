"""Matryoshka sizes: the prefix of an embedding, re-normalised, and the check of the sizes.

Kusupati et al. 2022, "Matryoshka Representation Learning" (arXiv:2205.13147):
a model trained with the multi-resolution loss is used at size d by keeping the
first d components of each embedding and re-normalising them to unit length, as
the loss trains them. Inference, evaluation, export, the search and the loss all
take their prefixes from here, on numpy or jax arrays alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from embedder.errors import ConfigError

# The norm floor: torch's F.normalize (x / max(||x||, eps)), so an all-zero row stays zero.
EPS = 1e-12


def prefix(embeddings: Any, dim: int, normalize: bool = True, eps: float = EPS) -> Any:
    """The Matryoshka embedding of size `dim`: x[..., :dim] / max(||x[..., :dim]||, eps).

    Args:
      embeddings: [..., full] numpy or jax array (a jax array, or a tracer, stays one).
      dim: the size, 1 <= dim <= full.
      normalize: re-normalise to unit length; False: the plain prefix (for a model
        that does not normalise, or a caller that normalises itself, as the loss).
      eps: the norm floor.

    Returns:
      [..., dim] in the input's dtype (numpy input re-normalised: float32).
    """
    if isinstance(embeddings, jax.Array):
        part = embeddings[..., :dim]
        if not normalize:
            return part
        norm = jnp.sqrt(jnp.sum(jnp.square(part), axis=-1, keepdims=True))
        return part / jnp.maximum(norm, eps)
    if not normalize:
        return np.asarray(embeddings)[..., :dim]
    part = np.asarray(embeddings, np.float32)[..., :dim]
    norm = np.sqrt(np.sum(np.square(part), axis=-1, keepdims=True))
    return part / np.maximum(norm, np.float32(eps))


def check_dims(dims: Sequence[int] | None, full_dim: int) -> tuple[int, ...]:
    """Validated Matryoshka sizes: largest first, without repeats; None or empty: the full size.

    Args:
      dims: the sizes asked for.
      full_dim: the model's embedding size.

    Returns:
      The sizes, descending.

    Raises:
      ConfigError: a size outside [1, full_dim] (naming the sizes and the model's size).
    """
    if not dims:
        return (full_dim,)
    bad = [d for d in dims if not 0 < int(d) <= full_dim]
    if bad:
        raise ConfigError(f"Matryoshka dims {bad} are outside [1, {full_dim}] (the model's embedding size)")
    return tuple(sorted({int(d) for d in dims}, reverse=True))
