"""The gradient cache: contrastive steps on batches far larger than memory.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup" (arXiv:2101.06983). The loss of a contrastive batch couples all
examples, but the encoder is applied to each example independently, so

    dL/dtheta = sum_i (dL/de_i) . (de_i/dtheta)

can be computed in three passes:

1. encode the batch chunk by chunk *without* keeping activations (embeddings only);
2. compute the loss and its gradient with respect to the embeddings on the whole
   global batch (every example is still every other example's negative);
3. re-encode chunk by chunk and back-propagate the cached embedding gradients
   into the parameters (one `jax.vjp` per chunk), summing.

Peak activation memory is one chunk's instead of the whole batch's; the cost is a
second forward pass. Gradient *accumulation* by microbatches is not this: it
shrinks the pool of negatives to the microbatch.

Chunks stay spread over the data-parallel devices: with the batch laid out as
`num_shards` contiguous shards, chunk k holds the k-th slice of *every* shard, so
each device encodes its own share of every chunk and no example moves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedder.errors import ConfigError

PyTree = Any


def check_chunking(batch_size: int, chunk_size: int, num_shards: int) -> int:
    """Validates a chunking and returns the number of chunks.

    Args:
      batch_size: global examples in the batch.
      chunk_size: global examples per chunk.
      num_shards: data-parallel devices the batch is split over.

    Raises:
      ConfigError: the batch cannot be cut into equal chunks spread over all shards.
    """
    if chunk_size <= 0:
        raise ConfigError(f"gradient cache chunk size must be positive, got {chunk_size}")
    if chunk_size % num_shards:
        raise ConfigError(
            f"gradient cache chunk size {chunk_size} is not divisible by the {num_shards} "
            "data-parallel devices; every chunk must be spread over all of them"
        )
    if batch_size % chunk_size:
        raise ConfigError(
            f"global batch {batch_size} is not divisible by the gradient cache chunk size "
            f"{chunk_size} (chunk count x {num_shards} devices must divide the batch)"
        )
    return batch_size // chunk_size


def split_chunks(x: jax.Array, num_chunks: int, num_shards: int) -> jax.Array:
    """[batch, ...] -> [num_chunks, batch // num_chunks, ...], each chunk across all shards.

    Row r of shard s (global row s * per_shard + r) goes to chunk r // per_chunk,
    where per_chunk = per_shard // num_chunks, so a device's rows stay on it.
    """
    batch = x.shape[0]
    per = batch // (num_shards * num_chunks)
    y = x.reshape(num_shards, num_chunks, per, *x.shape[1:]).swapaxes(0, 1)
    y = y.reshape(num_chunks, num_shards * per, *x.shape[1:])
    return nn.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))


def merge_chunks(y: jax.Array, num_shards: int) -> jax.Array:
    """The inverse of `split_chunks`: [num_chunks, chunk, ...] -> [batch, ...]."""
    num_chunks, chunk = y.shape[:2]
    per = chunk // num_shards
    x = y.reshape(num_chunks, num_shards, per, *y.shape[2:]).swapaxes(0, 1)
    x = x.reshape(num_chunks * chunk, *y.shape[2:])
    return nn.with_logical_constraint(x, ("batch",) + (None,) * (y.ndim - 2))


def cached_value_and_grad(
    embed_fn: Callable[[PyTree, PyTree], PyTree],
    loss_fn: Callable[[PyTree, PyTree], tuple[jax.Array, Any]],
    params: PyTree,
    inputs: PyTree,
    *,
    chunk_size: int,
    num_shards: int,
) -> tuple[tuple[jax.Array, Any], PyTree]:
    """Loss and parameter gradients of `loss_fn(params, embed_fn(params, inputs))`, chunked.

    Equal (up to float round-off) to
    `jax.value_and_grad(lambda p: loss_fn(p, embed_fn(p, inputs)), has_aux=True)(params)`,
    with the activation memory of one chunk.

    Args:
      embed_fn: `(params, inputs_chunk) -> embeddings`; must treat examples
        independently (no batch statistics). Every leaf of `inputs` and of the
        embeddings has the batch as its leading axis.
      loss_fn: `(params, embeddings) -> (loss, aux)` on the whole global batch;
        `params` lets it use learned parameters such as a temperature.
      params: the parameters.
      inputs: the model inputs, leaves [batch, ...].
      chunk_size: global examples per chunk.
      num_shards: how many data-parallel devices the batch is split over.

    Returns:
      ((loss, aux), grads) with grads shaped like params.
    """
    batch_size = jax.tree.leaves(inputs)[0].shape[0]
    num_chunks = check_chunking(batch_size, chunk_size, num_shards)
    chunks = jax.tree.map(lambda x: split_chunks(x, num_chunks, num_shards), inputs)

    # Pass 1: embeddings only; nothing here is differentiated, so no activations live on.
    def embed_chunk(_, chunk):
        return None, embed_fn(params, chunk)

    _, embedded = jax.lax.scan(embed_chunk, None, chunks)
    embeddings = jax.lax.stop_gradient(jax.tree.map(lambda y: merge_chunks(y, num_shards), embedded))

    # Pass 2: the loss on the full global batch, and its gradient w.r.t. the embeddings.
    (loss, aux), (loss_param_grads, embedding_grads) = jax.value_and_grad(
        loss_fn, argnums=(0, 1), has_aux=True
    )(params, embeddings)
    grad_chunks = jax.tree.map(lambda g: split_chunks(g, num_chunks, num_shards), embedding_grads)

    # Pass 3: re-encode each chunk and pull its cached embedding gradient back to the parameters.
    def backprop_chunk(acc, chunk_and_grad):
        chunk, cotangent = chunk_and_grad
        _, vjp = jax.vjp(lambda p: embed_fn(p, chunk), params)
        (chunk_grads,) = vjp(cotangent)
        return jax.tree.map(jnp.add, acc, chunk_grads), None

    zeros = jax.tree.map(jnp.zeros_like, loss_param_grads)
    encoder_grads, _ = jax.lax.scan(backprop_chunk, zeros, (chunks, grad_chunks))
    grads = jax.tree.map(jnp.add, loss_param_grads, encoder_grads)
    return (loss, aux), grads
