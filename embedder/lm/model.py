"""A causal language model on the LLM-family blocks: the encoder's stack plus an LM head.

`CausalLM` has exactly the encoder's parameter tree (``token_embed``,
``layer_i``, ``final_norm``, as `embedder.formats.hf_llm` loads a Gemma 3 /
Qwen3 checkpoint) and, where the checkpoint does not tie the head to the
embedding, ``lm_head`` [embed, vocab]. Gemma's final logit soft-capping
(``c * tanh(logits / c)``) applies when the checkpoint sets one.

Every call takes the tokens' own positions and the keys' validity, so any
padding (left, right, or holes left in a decode cache) is exact: a token's
position is the count of real tokens before it in its row, RoPE uses it, and
the sliding window compares positions, not slots.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedder.errors import ConfigError
from embedder.models import transformer

Array = jax.Array
# One (keys, values) pair per layer, each [batch, cache_len, kv_heads, head_dim].
Cache = tuple[tuple[Array, Array], ...]


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """A decoder LM: its blocks and its head.

    Attributes:
      transformer: the llm-family block config (causal).
      tied: the LM head is the token embedding (Gemma 3; Qwen3 where
        ``tie_word_embeddings``); False: a separate ``lm_head`` kernel.
      final_logit_softcap: Gemma's ``final_logit_softcapping``, or None.
    """

    transformer: transformer.TransformerConfig
    tied: bool = True
    final_logit_softcap: float | None = None

    def __post_init__(self):
        cfg = self.transformer
        if cfg.family != "llm" or not cfg.causal:
            raise ConfigError(
                f"a causal LM needs an llm-family causal block; got family={cfg.family!r}, causal={cfg.causal}"
            )


def decoder_masks(
    config: transformer.TransformerConfig,
    query_slots: Array,
    query_positions: Array,
    key_valid: Array,
    key_positions: Array,
) -> dict[str, Array]:
    """Which keys each query attends to, per attention type.

    Args:
      config: the block config (its sliding window).
      query_slots: [length] the queries' slots (their index among the keys).
      query_positions: [batch, length] the queries' token positions.
      key_valid: [batch, keys] True for real tokens.
      key_positions: [batch, keys] the keys' token positions.

    Returns:
      {FULL_ATTENTION, SLIDING_ATTENTION: [batch, length, keys] bool}: keys at or
      before the query's slot that are real; the sliding ones also closer than
      the window in position (``q - k < window``, as transformers).
    """
    key_slots = jnp.arange(key_valid.shape[1])
    causal = key_slots[None, None, :] <= query_slots[None, :, None]
    full = causal & key_valid[:, None, :]
    masks = {transformer.FULL_ATTENTION: full}
    if config.sliding_window is not None:
        near = (query_positions[:, :, None] - key_positions[:, None, :]) < config.sliding_window
        masks[transformer.SLIDING_ATTENTION] = full & near
    return masks


class CausalLM(nn.Module):
    """Token ids -> next-token logits, optionally through a fixed-size KV cache.

    Attributes:
      config: the LM (blocks, head tying, soft-capping).
    """

    config: LMConfig

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array,
        key_valid: Array,
        key_positions: Array,
        cache: Cache | None = None,
        cache_index: Array | int = 0,
        logits_at: Array | None = None,
    ) -> tuple[Array, Cache | None]:
        """Logits of the next token after each given one.

        Args:
          tokens: [batch, length] int32.
          positions: [batch, length] each token's position in its text.
          key_valid: [batch, keys] which keys are real: keys = length without a
            cache; the whole cache (this call's slots included) with one.
          key_positions: [batch, keys] the keys' positions.
          cache: per layer (keys, values) [batch, cache_len, kv_heads, head_dim];
            this call's tokens are written at slots cache_index...
          cache_index: the slot of tokens[:, 0] (a scalar).
          logits_at: optional [batch] index into `length`: only that token's
            logits are computed ([batch, vocab]), e.g. each row's last prompt token.

        Returns:
          (float32 logits [batch, length, vocab] or [batch, vocab], updated cache or None).
        """
        cfg = self.config.transformer
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.params_dtype,
            param_dtype=cfg.params_dtype,
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
            name="token_embed",
        )
        x = embed(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(cfg.hidden_size**0.5, x.dtype)  # as `transformer.Encoder`
        x = x.astype(cfg.compute_dtype)
        query_slots = cache_index + jnp.arange(tokens.shape[1])
        masks = decoder_masks(cfg, query_slots, positions, key_valid, key_positions)
        thetas = {
            transformer.FULL_ATTENTION: cfg.rope_theta,
            transformer.SLIDING_ATTENTION: cfg.rope_local_theta or cfg.rope_theta,
        }
        new_cache = []
        for i, kind in enumerate(cfg.attention_types):
            block = transformer.Block(cfg, thetas[kind], name=f"layer_{i}")
            if cache is None:
                x = block(x, masks[kind], positions, True)
            else:
                x, layer_cache = block(
                    x, masks[kind], positions, True, cache=cache[i], cache_index=cache_index
                )
                new_cache.append(layer_cache)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]  # [batch, embed]
        x = transformer.RMSNorm(cfg.norm_eps, cfg.params_dtype, cfg.norm_offset, name="final_norm")(x)
        if self.config.tied:
            head = embed.embedding.T  # [embed, vocab]
        else:
            head = self.param(
                "lm_head",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                (cfg.hidden_size, cfg.vocab_size),
                cfg.params_dtype,
            )
        logits = jnp.einsum(
            "...d,dv->...v",
            x.astype(cfg.compute_dtype),
            head.astype(cfg.compute_dtype),
            preferred_element_type=jnp.float32,
        )
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = jnp.tanh(logits / cap) * cap
        return logits, (tuple(new_cache) if cache is not None else None)


def positions_of(mask: Array) -> Array:
    """[batch, length] position of each token: the number of real tokens before it (0 on padding)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def forward(module: CausalLM, params: Any, tokens: Array, mask: Array) -> Array:
    """Logits [batch, length, vocab] of a padded batch (any padding side), no cache (jitted)."""
    return _forward_fn(module)(params, tokens, mask)


@functools.lru_cache(maxsize=8)
def _forward_fn(module: CausalLM):
    def run(params, tokens, mask):
        positions = positions_of(mask)
        logits, _ = module.apply({"params": params}, tokens, positions, mask, positions)
        return logits

    return jax.jit(run)


@dataclasses.dataclass
class LanguageModel:
    """A loaded causal LM: module, parameters, tokenizer and where it runs.

    Attributes:
      module: the `CausalLM`.
      params: its parameters (placed on the mesh, or host arrays).
      tokenizer: a `tokenizers.Tokenizer` (the folder's tokenizer.json), or None
        for token-id-only use.
      eos_ids: token ids that end a generation.
      mesh: the device mesh the batch is split over (its data axes); None: the
        default device.
    """

    module: CausalLM
    params: Any
    tokenizer: Any = None
    eos_ids: tuple[int, ...] = ()
    mesh: Any = None

    @property
    def config(self) -> LMConfig:
        return self.module.config

    def encode(self, text: str, specials: bool = True) -> list[int]:
        """Token ids of `text`, with the tokenizer's specials (e.g. Gemma's <bos>) when `specials`."""
        if self.tokenizer is None:
            raise ConfigError("this LM has no tokenizer (tokenizer.json)")
        return list(self.tokenizer.encode(text, add_special_tokens=specials).ids)

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            raise ConfigError("this LM has no tokenizer (tokenizer.json)")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @functools.cached_property
    def line_break_ids(self) -> tuple[int, ...]:
        """The token ids whose text holds a line break (read once from the whole vocabulary)."""
        if self.tokenizer is None:
            raise ConfigError("this LM has no tokenizer (tokenizer.json)")
        vocab = self.tokenizer.get_vocab_size()
        return tuple(i for i in range(vocab) if "\n" in self.tokenizer.decode([i]))


def _eos_ids(model_dir: str, tokenizer: Any = None) -> tuple[int, ...]:
    """config.json's and generation_config.json's eos_token_id (an id or a list), and
    tokenizer_config.json's eos_token (with `tokenizer` to map it to its id)."""
    import json
    import os

    ids: list[int] = []
    path = os.path.join(model_dir, "tokenizer_config.json")
    if tokenizer is not None and os.path.exists(path):
        with open(path) as f:
            token = json.load(f).get("eos_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and tokenizer.token_to_id(token) is not None:
            ids.append(tokenizer.token_to_id(token))
    for name in ("config.json", "generation_config.json"):
        path = os.path.join(model_dir, name)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            value = json.load(f).get("eos_token_id")
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


def load(model_dir: str, mesh: Any = None, **overrides: Any) -> LanguageModel:
    """A Gemma 3 / Qwen3 causal-LM folder (config.json, safetensors, tokenizer.json), or an
    LLM-family checkpoint (see `_load_checkpoint`).

    Args:
      model_dir: the Hugging Face folder.
      mesh: optional mesh: the weights are placed with their logical shardings
        (`partitioning.variable_shardings`) as they are read, and batches are
        split over its data axes.
      **overrides: TransformerConfig fields (e.g. dtype="bfloat16").

    Returns:
      The LanguageModel.

    Raises:
      ConfigError, WeightsError: as `embedder.formats.hf_llm` reads the folder.
    """
    import os

    from embedder import partitioning
    from embedder.formats import hf_llm

    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        return _load_checkpoint(model_dir, mesh, **overrides)
    block = hf_llm.config_from_hf(model_dir, **{"causal": True, **overrides})
    tied, softcap = hf_llm.lm_head_config(model_dir)
    module = CausalLM(LMConfig(block, tied, softcap))
    shardings = None
    if mesh is not None:
        length = jnp.zeros((1, 8), jnp.int32)
        abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), length, length, length > 0, length))
        shardings = partitioning.variable_shardings(abstract, mesh)["params"]
    encoder_shardings = None if shardings is None else {k: v for k, v in shardings.items() if k != "lm_head"}
    params = hf_llm.load_llm_params(model_dir, block, shardings=encoder_shardings)
    if not tied:
        params["lm_head"] = hf_llm.load_lm_head(
            model_dir, block, None if shardings is None else shardings["lm_head"]
        )
    tokenizer = None
    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.exists(path):
        import tokenizers

        tokenizer = tokenizers.Tokenizer.from_file(path)
    eos = _eos_ids(model_dir, tokenizer)
    return LanguageModel(module, params, tokenizer, eos, mesh)


def _load_checkpoint(path: str, mesh: Any = None, **overrides: Any) -> LanguageModel:
    """An LLM-family embedder checkpoint as a causal LM: its encoder, run causally, with the
    head tied to its token embedding (a checkpoint stores no LM head) and its tokenizer.

    Raises:
      ConfigError: `path` is neither a Hugging Face folder nor a checkpoint, or the
        checkpoint's encoder is not llm-family.
    """
    import os

    from embedder import checkpointing, partitioning
    from embedder.models import spec

    try:
        params, meta = checkpointing.load_model_params(path)
    except (checkpointing.CheckpointError, FileNotFoundError) as e:
        raise ConfigError(
            f"{path}: neither a Hugging Face causal-LM folder (no config.json) nor a checkpoint ({e})"
        ) from e
    encoder = spec.module_from_description(meta.model_config).config
    if encoder.family != "llm":
        raise ConfigError(
            f"{path}: a {encoder.family!r}-family checkpoint; a causal LM needs an llm-family one"
        )
    module = CausalLM(LMConfig(dataclasses.replace(encoder, causal=True, **overrides)))
    params = params["encoder"]
    if mesh is not None:
        length = jnp.zeros((1, 8), jnp.int32)
        abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), length, length, length > 0, length))
        params = jax.device_put(params, partitioning.variable_shardings(abstract, mesh)["params"])
    tokenizer, eos = None, ()
    if meta.vocab_dir and os.path.exists(os.path.join(meta.vocab_dir, "tokenizer.json")):
        import tokenizers

        tokenizer = tokenizers.Tokenizer.from_file(os.path.join(meta.vocab_dir, "tokenizer.json"))
        eos = _eos_ids(meta.vocab_dir, tokenizer)
    return LanguageModel(module, params, tokenizer, eos, mesh)
