"""Batched generation with a fixed-size KV cache: jitted prefill, then one jitted step per token.

Shapes never grow with the text, so nothing recompiles while a batch decodes:

* the batch is padded to `batch_size` rows (a multiple of the mesh's
  data-parallel size; extra rows are empty and dropped);
* the prompts are padded to a bucket (a power of two, at least `min_bucket`,
  at most `max_prompt_len`): prefill compiles once per bucket;
* the cache holds `max_prompt_len + max_new_tokens` slots whatever the bucket:
  the decode step compiles once.

The prompts may come padded on either side (`generate_padded`) or as lists of
ids (`generate`, which pads left). Each row's keys carry their own validity
and positions (`model.decoder_masks`), so a generated token's position is its
row's length plus its step, whatever the padding.

Sampling: greedy (temperature 0; the first of equal logits, as torch's argmax)
or temperature with top-p (nucleus) filtering; the random key of row r at step
t is ``fold_in(fold_in(key(seed), r), t)`` with r the row's id in the whole job,
so a row's text depends on the seed and its id only, not on the batch it shares.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from embedder import partitioning
from embedder.errors import ConfigError
from embedder.lm import model as model_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen.

    Attributes:
      max_new_tokens: tokens generated per prompt (fewer where a stop token comes).
      temperature: 0 is greedy; otherwise logits are divided by it and sampled.
      top_p: sample only from the smallest set of tokens whose probability
        reaches top_p (1.0: all of them).
      seed: the sampling seed.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens}: expected >= 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}: expected >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p}: expected in (0, 1]")


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """The fixed shapes a batch runs at.

    Attributes:
      batch_size: rows per call (rounded up to a multiple of the data-parallel size).
      max_prompt_len: the longest prompt (tokens); longer is an error.
      min_bucket: the smallest prompt bucket.
    """

    batch_size: int = 8
    max_prompt_len: int = 512
    min_bucket: int = 16


DEFAULT_BATCH = BatchConfig()


def bucket(length: int, batch: BatchConfig) -> int:
    """The padded prompt length: the next power of two >= length (>= min_bucket, <= max_prompt_len)."""
    if length > batch.max_prompt_len:
        raise ConfigError(
            f"a prompt of {length} tokens is longer than max_prompt_len={batch.max_prompt_len} (raise "
            "--max_prompt_len, or cut the passages shorter: max_passage_tokens)"
        )
    size = batch.min_bucket
    while size < length:
        size *= 2
    return min(size, batch.max_prompt_len)


def rows_per_call(lm: model_lib.LanguageModel, batch: BatchConfig) -> int:
    """batch.batch_size rounded up to a multiple of the mesh's data-parallel size."""
    dp = 1 if lm.mesh is None else partitioning.data_parallel_size(lm.mesh)
    return -(-batch.batch_size // dp) * dp


def sample(logits: Array, key: Array, row_ids: Array, step: Array, temperature: float, top_p: float) -> Array:
    """Next tokens [batch] from logits [batch, vocab] (see the module docstring)."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        keep_sorted = before < top_p  # the first token is always kept
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(row_ids)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _compiled(module: model_lib.CausalLM, cache_len: int, temperature: float, top_p: float, mesh):
    """The jitted prefill and decode step of one module at one cache length."""
    cfg = module.config.transformer
    batch_axes = None
    if mesh is not None:
        batch_axes = partitioning.batch_sharding(mesh, 1).spec[0]

    def constrain(x):
        if mesh is None:
            return x
        spec = PartitionSpec(batch_axes, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))

    def prefill(params, tokens, mask, key, row_ids):
        batch, length = tokens.shape
        positions = model_lib.positions_of(mask)
        pad = cache_len - length
        key_valid = constrain(jnp.pad(mask, ((0, 0), (0, pad))))
        key_positions = constrain(jnp.pad(positions, ((0, 0), (0, pad))))
        shape = (batch, cache_len, cfg.kv_heads, cfg.head_size)
        cache = tuple(
            (constrain(jnp.zeros(shape, cfg.compute_dtype)), constrain(jnp.zeros(shape, cfg.compute_dtype)))
            for _ in range(cfg.num_layers)
        )
        lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
        last = jnp.where(
            lengths > 0, length - 1 - jnp.argmax(mask[:, ::-1], axis=1), 0
        )  # each row's last real token
        logits, cache = module.apply(
            {"params": params}, tokens, positions, key_valid, key_positions, cache, 0, logits_at=last
        )
        token = sample(logits, key, row_ids, jnp.int32(0), temperature, top_p)
        return token, cache, key_valid, key_positions, lengths

    def step(params, cache, key_valid, key_positions, token, position, slot, key, row_ids, t):
        key_valid = key_valid.at[:, slot].set(True)
        key_positions = key_positions.at[:, slot].set(position)
        logits, cache = module.apply(
            {"params": params},
            token[:, None],
            position[:, None],
            key_valid,
            key_positions,
            cache,
            slot,
            logits_at=jnp.zeros_like(token),
        )
        return sample(logits, key, row_ids, t, temperature, top_p), cache, key_valid, key_positions

    return jax.jit(prefill), jax.jit(step, donate_argnums=(1, 2, 3))


def put_batch(lm: model_lib.LanguageModel, array: np.ndarray) -> Array:
    """A host batch on the mesh, split over its data axes (or on the default device)."""
    if lm.mesh is None:
        return jnp.asarray(array)
    return jax.device_put(array, partitioning.batch_sharding(lm.mesh, array.ndim))


def generate_padded(
    lm: model_lib.LanguageModel,
    tokens: np.ndarray,
    mask: np.ndarray,
    sampling: SamplingConfig,
    row_ids: np.ndarray | None = None,
    stop_ids: Sequence[int] = (),
    cache_len: int | None = None,
) -> np.ndarray:
    """Generates after one padded batch of prompts (any padding side).

    Args:
      lm: the model.
      tokens: [batch, length] prompt ids; `mask` [batch, length] True on real tokens.
      sampling: greedy or sampled, how many tokens, the seed.
      row_ids: [batch] each row's id for its random key (default 0..batch-1).
      stop_ids: tokens after which a row stops (with the model's EOS ids); the
        stop token is kept, the rest of the row is -1.
      cache_len: the cache's slots (default length + max_new_tokens); a fixed
        value keeps one decode-step compile across prompt buckets.

    Returns:
      [batch, max_new_tokens] int32 new tokens, -1 after a row stopped.
    """
    batch, length = tokens.shape
    if row_ids is None:
        row_ids = np.arange(batch)
    if cache_len is None:
        cache_len = length + sampling.max_new_tokens
    if cache_len < length + sampling.max_new_tokens:
        raise ConfigError(
            f"cache_len={cache_len} < prompt {length} + max_new_tokens {sampling.max_new_tokens}"
        )
    prefill, step = _compiled(lm.module, cache_len, sampling.temperature, sampling.top_p, lm.mesh)
    key = jax.random.key(sampling.seed)
    rows = put_batch(lm, np.asarray(row_ids, np.int32))
    token, cache, key_valid, key_positions, lengths = prefill(
        lm.params,
        put_batch(lm, np.asarray(tokens, np.int32)),
        put_batch(lm, np.asarray(mask, bool)),
        key,
        rows,
    )
    stops = np.asarray(sorted(set(stop_ids) | set(lm.eos_ids)), np.int32)
    out = np.full((batch, sampling.max_new_tokens), -1, np.int32)
    lengths = np.asarray(lengths)
    done = lengths == 0  # empty rows (batch padding) never run
    for t in range(sampling.max_new_tokens):
        current = np.asarray(token)
        out[:, t] = np.where(done, -1, current)
        done |= np.isin(current, stops)
        if done.all() or t + 1 == sampling.max_new_tokens:
            break
        position = put_batch(lm, (lengths + t).astype(np.int32))
        token, cache, key_valid, key_positions = step(
            lm.params, cache, key_valid, key_positions, token, position, length + t, key, rows, t + 1
        )
    return out


def generate(
    lm: model_lib.LanguageModel,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig,
    batch: BatchConfig = DEFAULT_BATCH,
    row_ids: Sequence[int] | None = None,
    stop_ids: Sequence[int] = (),
) -> list[list[int]]:
    """New tokens after each prompt, in batches of fixed shapes (see the module docstring).

    Args:
      lm: the model.
      prompts: token ids of each prompt (non-empty).
      sampling: greedy or sampled, how many tokens, the seed.
      batch: the batch and bucket shapes.
      row_ids: each prompt's id for its random key (default its index).
      stop_ids: as `generate_padded`.

    Returns:
      Per prompt, its new tokens up to and including the first stop token.
    """
    if row_ids is None:
        row_ids = range(len(prompts))
    row_ids = list(row_ids)
    size = rows_per_call(lm, batch)
    # One cache length for every bucket: one decode-step compile.
    cache_len = batch.max_prompt_len + sampling.max_new_tokens
    results: list[list[int]] = []
    for start in range(0, len(prompts), size):
        chunk = [list(p) for p in prompts[start : start + size]]
        if any(not p for p in chunk):
            raise ConfigError("an empty prompt: give at least one token (e.g. the tokenizer's <bos>)")
        width = bucket(max(len(p) for p in chunk), batch)
        tokens = np.zeros((size, width), np.int32)
        mask = np.zeros((size, width), bool)
        for row, ids in enumerate(chunk):
            tokens[row, width - len(ids) : width] = ids  # left padding inside the bucket
            mask[row, width - len(ids) : width] = True
        ids = np.zeros(size, np.int32)
        ids[: len(chunk)] = row_ids[start : start + len(chunk)]
        out = generate_padded(lm, tokens, mask, sampling, ids, stop_ids, cache_len)
        for row in range(len(chunk)):
            new = out[row]
            results.append([int(x) for x in new[new >= 0]])
    return results
