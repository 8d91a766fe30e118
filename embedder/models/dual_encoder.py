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
        if tower not in TOWERS:
            raise ConfigError(f"tower={tower!r}: expected one of {TOWERS}")
        if self.shared_tower:
            encoder = self.encoder
        else:
            encoder = self.query_encoder if tower == "query" else self.document_encoder
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
