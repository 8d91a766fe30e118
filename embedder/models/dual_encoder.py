"""The dual encoder: tower(s) + pooling + optional projection + L2 normalisation.

Gecko and Gemini Embedding share one tower between queries and documents (the
task prompt tells them apart); two towers are available for asymmetric setups.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from embedder.errors import ConfigError
from embedder.models import transformer

Array = jax.Array

POOLINGS = ("mean", "first", "last")
TOWERS = ("query", "document")


def pool(hidden: Array, mask: Array, method: str) -> Array:
    """Pools per-token states into one vector per sequence, ignoring padding.

    Args:
      hidden: [batch, length, dim] token states.
      mask: [batch, length] True for real tokens (left or right padding).
      method: "mean" (average of real tokens, as sentence-transformers' mean
        pooling), "first" (the first token, e.g. BERT's [CLS]) or "last" (the last
        real token, as decoder-LM embedders use).

    Returns:
      [batch, dim] float32.
    """
    hidden = hidden.astype(jnp.float32)
    if method == "mean":
        m = mask.astype(jnp.float32)[..., None]
        # Clamp as sentence-transformers does, so an all-padding row gives zeros, not NaN.
        return jnp.sum(hidden * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1e-9)
    if method == "first":
        return hidden[:, 0]
    if method == "last":
        # The last real token wherever the padding sits (Qwen3-Embedding pads on
        # the left, so its last token is the row's last position).
        length = mask.shape[1]
        last = jnp.max(jnp.where(mask, jnp.arange(length), 0), axis=1)  # [batch]
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    raise ConfigError(f"unknown pooling {method!r}: expected one of {POOLINGS}")


def pool_segments(
    hidden: Array, mask: Array, segment_ids: Array, method: str, max_segments: int | None = None
) -> tuple[Array, Array]:
    """Pools the per-token states of packed rows into one vector per text.

    Text s (1..max_segments) of row r lands in slot ``r * max_segments + s - 1``;
    each text is pooled as `pool` pools a row holding it alone.

    Args:
      hidden: [batch, length, dim] token states of packed rows.
      mask: [batch, length] True for real tokens.
      segment_ids: [batch, length] 0 for padding, 1..max_segments for the texts.
      method: "mean", "first" or "last" (see `pool`).
      max_segments: slots a row; by default its length (a row cannot hold more
        texts than tokens). Texts with a larger id are dropped.

    Returns:
      (pooled [batch * max_segments, dim] float32, valid [batch * max_segments]
      bool: the slot holds a text with at least one real token).
    """
    batch, length, dim = hidden.shape
    slots = max_segments or length
    hidden = hidden.astype(jnp.float32).reshape(batch * length, dim)
    segment_ids = segment_ids.astype(jnp.int32)
    rows = jnp.arange(batch, dtype=jnp.int32)[:, None]
    in_range = (segment_ids > 0) & (segment_ids <= slots)
    # Padding (and out-of-range ids) go to one extra slot that is dropped.
    slot_of_token = jnp.where(in_range, rows * slots + segment_ids - 1, batch * slots).reshape(-1)
    count = batch * slots + 1
    real = (mask & in_range).reshape(-1)
    counts = jax.ops.segment_sum(real.astype(jnp.float32), slot_of_token, count)[:-1]
    valid = counts > 0
    if method == "mean":
        sums = jax.ops.segment_sum(hidden * real[:, None], slot_of_token, count)[:-1]
        return sums / jnp.maximum(counts, 1e-9)[:, None], valid
    if method not in ("first", "last"):
        raise ConfigError(f"unknown pooling {method!r}: expected one of {POOLINGS}")
    index = jnp.arange(batch * length, dtype=jnp.int32)
    if method == "first":
        # The text's first token (BERT's [CLS]), as `pool` takes position 0 of a row.
        chosen = jax.ops.segment_min(
            jnp.where(in_range.reshape(-1), index, batch * length), slot_of_token, count
        )
    else:
        # The text's last real token.
        chosen = jax.ops.segment_max(jnp.where(real, index, -1), slot_of_token, count)
    chosen = jnp.clip(chosen[:-1], 0, batch * length - 1)
    return hidden[chosen], valid


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """x / max(||x||, eps) along the last axis (torch.nn.functional.normalize's rule)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


class DualEncoder(nn.Module):
    """Encodes token ids to embeddings; one shared tower by default.

    Attributes:
      config: the tower's TransformerConfig.
      pooling: one of POOLINGS.
      projection_dim: if set, a linear projection from the pooled vector to
        this size, randomly initialised (Gemini Embedding's projection).
      projection_hidden_dim: with projection_dim, a two-layer head: the pooled
        vector goes to this width, then to projection_dim, with no activation
        between (EmbeddingGemma's Dense 768 -> 3072 and Dense 3072 -> 768).
      projection_bias: the projection layer(s) add a bias (sentence-transformers'
        Dense default); EmbeddingGemma's have none.
      shared_tower: one tower for queries and documents (Gecko, Gemini) or two.
      normalize: L2-normalise the output.
    """

    config: transformer.TransformerConfig
    pooling: str = "mean"
    projection_dim: int | None = None
    shared_tower: bool = True
    normalize: bool = True
    projection_hidden_dim: int | None = None
    projection_bias: bool = False

    def setup(self):
        if self.pooling not in POOLINGS:
            raise ConfigError(f"DualEncoder.pooling={self.pooling!r}: expected one of {POOLINGS}")
        if self.shared_tower:
            self.encoder = transformer.Encoder(self.config)
        else:
            self.query_encoder = transformer.Encoder(self.config)
            self.document_encoder = transformer.Encoder(self.config)
        if self.projection_hidden_dim and not self.projection_dim:
            raise ConfigError(
                f"DualEncoder.projection_hidden_dim={self.projection_hidden_dim} needs projection_dim "
                "(the head's output width)"
            )
        if self.projection_hidden_dim:
            # The hidden layer is as wide as an MLP's: its axis shards like one.
            self.projection_hidden = self._dense(self.projection_hidden_dim, ("embed", "mlp"))
        if self.projection_dim:
            inputs = "mlp" if self.projection_hidden_dim else "embed"
            self.projection = self._dense(self.projection_dim, (inputs, "projection"))

    def _dense(self, features: int, axes: tuple[str, str]) -> nn.Dense:
        return nn.Dense(
            features,
            use_bias=self.projection_bias,
            dtype=jnp.float32,
            param_dtype=self.config.params_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        )

    @property
    def embedding_dim(self) -> int:
        return self.projection_dim or self.config.hidden_size

    def _tower(self, tower: str) -> nn.Module:
        """The encoder of `tower` ("query" or "document"; the same one when shared)."""
        if tower not in TOWERS:
            raise ConfigError(f"tower={tower!r}: expected one of {TOWERS}")
        if self.shared_tower:
            return self.encoder
        return self.query_encoder if tower == "query" else self.document_encoder

    def encode(
        self, tokens: Array, tower: str = "query", deterministic: bool = True, mask: Array | None = None
    ) -> Array:
        """Embeds token ids.

        Args:
          tokens: [batch, length] int32, right-padded with config.pad_id.
          tower: "query" or "document"; only matters with two towers.
          deterministic: False enables dropout (needs a "dropout" rng).
          mask: [batch, length] True for real tokens; by default every token that
            is not config.pad_id.

        Returns:
          [batch, embedding_dim] float32 embeddings (unit length if normalize).
        """
        encoder = self._tower(tower)
        if mask is None:
            mask = tokens != self.config.pad_id
        hidden = encoder(tokens, deterministic=deterministic, mask=mask)  # [batch, length, hidden]
        pooled = pool(hidden, mask, self.pooling)  # [batch, hidden]
        if self.projection_hidden_dim:
            pooled = self.projection_hidden(pooled)
        if self.projection_dim:
            pooled = self.projection(pooled)
        pooled = nn.with_logical_constraint(pooled, ("batch", "projection"))
        return l2_normalize(pooled) if self.normalize else pooled

    def encode_packed(
        self,
        tokens: Array,
        segment_ids: Array,
        tower: str = "query",
        deterministic: bool = True,
        slots: Array | None = None,
        max_segments: int | None = None,
    ) -> tuple[Array, Array]:
        """Embeds the texts of packed rows (several texts a row, see `transformer.Encoder`).

        Each text's embedding equals `encode` of the text alone in a row of its own
        (float round-off apart): attention is block-diagonal by text, positions
        restart per text and pooling is per text.

        Args:
          tokens: [rows, length] int32.
          segment_ids: [rows, length] int32: 0 for padding, 1..S for the row's texts,
            each a contiguous run.
          tower: "query" or "document"; only matters with two towers.
          deterministic: False enables dropout (needs a "dropout" rng).
          slots: [n] int32 indices of the texts wanted, ``row * max_segments +
            segment_id - 1``; None: every slot.
          max_segments: slots a row (`pool_segments`); by default the row length.

        Returns:
          (embeddings, valid): [n or rows * max_segments, embedding_dim] float32 and
          the bool mask of the slots that hold a text. An empty slot gets a finite
          placeholder (never NaN, so no gradient is poisoned by it).
        """
        encoder = self._tower(tower)
        mask = (tokens != self.config.pad_id) & (segment_ids != 0)
        hidden = encoder(tokens, deterministic=deterministic, mask=mask, segment_ids=segment_ids)
        pooled, valid = pool_segments(hidden, mask, segment_ids, self.pooling, max_segments)
        if slots is not None:
            pooled, valid = pooled[slots], valid[slots]
        pooled = jnp.where(valid[:, None], pooled, 1.0)
        if self.projection_hidden_dim:
            pooled = self.projection_hidden(pooled)
        if self.projection_dim:
            pooled = self.projection(pooled)
        return (l2_normalize(pooled) if self.normalize else pooled), valid

    def __call__(
        self,
        query_tokens: Array,
        positive_tokens: Array,
        negative_tokens: Array | None = None,
        deterministic: bool = True,
    ) -> dict[str, Array]:
        """Embeds a batch of training examples.

        Args:
          query_tokens: [batch, query_len].
          positive_tokens: [batch, doc_len].
          negative_tokens: [batch, num_negatives, doc_len] or None.
          deterministic: False enables dropout.

        Returns:
          {"query": [batch, dim], "positive": [batch, dim]} and, with negatives,
          "negatives": [batch, num_negatives, dim].
        """
        out = {
            "query": self.encode(query_tokens, "query", deterministic),
            "positive": self.encode(positive_tokens, "document", deterministic),
        }
        if negative_tokens is not None:
            # Flattening [batch, k] keeps each example's negatives on the device that
            # holds the example, so a batch-sharded input needs no data movement.
            batch, num, length = negative_tokens.shape
            flat = self.encode(negative_tokens.reshape(batch * num, length), "document", deterministic)
            out["negatives"] = flat.reshape(batch, num, -1)
        return out
