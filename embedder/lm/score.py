"""Log-probabilities under the LM: of a continuation given a prompt, and of chosen next tokens.

Each text is right-padded to a bucket (a power of two, as `decode.bucket`) and
the batch to `decode.rows_per_call` rows, so one shape compiles per bucket.
Only the needed numbers leave the device: per token, log p(token | earlier
tokens), never the [batch, length, vocab] logits.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from embedder.errors import ConfigError
from embedder.lm import decode
from embedder.lm import model as model_lib


@functools.lru_cache(maxsize=8)
def _token_logprobs_fn(module: model_lib.CausalLM):
    def token_logprobs(params, tokens, mask):
        positions = model_lib.positions_of(mask)
        logits, _ = module.apply({"params": params}, tokens, positions, mask, positions)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)  # [batch, length - 1, vocab]
        return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [batch, length - 1]

    return jax.jit(token_logprobs)


@functools.lru_cache(maxsize=8)
def _next_logprobs_fn(module: model_lib.CausalLM):
    def next_logprobs(params, tokens, mask, candidates):
        positions = model_lib.positions_of(mask)
        last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)
        logits, _ = module.apply({"params": params}, tokens, positions, mask, positions, logits_at=last)
        return jax.nn.log_softmax(logits, axis=-1)[:, candidates]  # [batch, candidates]

    return jax.jit(next_logprobs)


def _right_padded(lm, texts: Sequence[Sequence[int]], batch: decode.BatchConfig):
    """Batches (start, tokens, mask) of right-padded texts at fixed shapes."""
    size = decode.rows_per_call(lm, batch)
    for start in range(0, len(texts), size):
        chunk = texts[start : start + size]
        width = decode.bucket(max(len(t) for t in chunk), batch)
        tokens = np.zeros((size, width), np.int32)
        mask = np.zeros((size, width), bool)
        for row, ids in enumerate(chunk):
            tokens[row, : len(ids)], mask[row, : len(ids)] = ids, True
        yield start, len(chunk), decode.put_batch(lm, tokens), decode.put_batch(lm, mask)


def continuation_logprobs(
    lm: model_lib.LanguageModel,
    prompts: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch: decode.BatchConfig = decode.DEFAULT_BATCH,
) -> list[np.ndarray]:
    """log p(continuation token i | prompt, continuation tokens before i), per pair.

    Args:
      lm: the model.
      prompts: token ids of each prompt (non-empty: the first continuation token
        needs something to follow).
      continuations: token ids scored after each prompt.
      batch: batch and bucket shapes (prompt + continuation must fit max_prompt_len).

    Returns:
      Per pair, a float32 [len(continuation)] array of log-probabilities.
    """
    if len(prompts) != len(continuations):
        raise ConfigError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if any(not p for p in prompts):
        raise ConfigError("an empty prompt: give at least one token (e.g. the tokenizer's <bos>)")
    texts = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    fn = _token_logprobs_fn(lm.module)
    out: list[np.ndarray] = []
    for start, n, tokens, mask in _right_padded(lm, texts, batch):
        logp = np.asarray(fn(lm.params, tokens, mask))
        for row in range(n):
            p, c = len(prompts[start + row]), len(continuations[start + row])
            out.append(logp[row, p - 1 : p - 1 + c].astype(np.float32))
    return out


def next_token_logprobs(
    lm: model_lib.LanguageModel,
    prompts: Sequence[Sequence[int]],
    candidates: Sequence[int],
    batch: decode.BatchConfig = decode.DEFAULT_BATCH,
) -> np.ndarray:
    """log p(candidate | prompt) for each prompt and candidate token.

    Returns:
      float32 [len(prompts), len(candidates)].
    """
    if any(not p for p in prompts):
        raise ConfigError("an empty prompt: give at least one token (e.g. the tokenizer's <bos>)")
    fn = _next_logprobs_fn(lm.module)
    ids = jnp.asarray(np.asarray(candidates, np.int32))
    out = np.zeros((len(prompts), len(candidates)), np.float32)
    for start, n, tokens, mask in _right_padded(lm, [list(p) for p in prompts], batch):
        out[start : start + n] = np.asarray(fn(lm.params, tokens, mask, ids))[:n]
    return out
