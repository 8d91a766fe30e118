"""`ModelSpec`: what a gin model file describes, and how to initialise it.

A spec is the dual encoder module plus where its vocabulary and (optionally) its
initial weights come from. It names folders only; tokenizers are built by the
callers (data and inference), so models never import data.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from embedder.models import dual_encoder, pretrained


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model as gin files describe it.

    Attributes:
      module: the DualEncoder.
      vocab_dir: folder holding the tokenizer's vocab.txt (and tokenizer_config.json).
      init_from: a Hugging Face / sentence-transformers BERT folder whose weights
        initialise every tower; None for random initialisation. A projection, if
        any, stays randomly initialised (as Gemini Embedding's).
    """

    module: dual_encoder.DualEncoder
    vocab_dir: str | None = None
    init_from: str | None = None

    def abstract_variables(self, length: int = 8) -> Any:
        """The boxed variable tree as shapes only (no allocation), for shardings and checks."""
        tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
        return jax.eval_shape(lambda t: self.module.init(jax.random.key(0), t, t), tokens)

    def init_params(self, rng: jax.Array) -> Any:
        """Initial parameters (unboxed): random, then the pretrained weights if any.

        Raises:
          pretrained.WeightsError: the weights do not fit the module's config;
            the message names the tensor and both shapes.
        """
        tokens = jnp.ones((1, 8), jnp.int32)
        params = nn.unbox(self.module.init(rng, tokens, tokens))["params"]
        if self.init_from is None:
            return params
        towers = ["encoder"] if self.module.shared_tower else ["query_encoder", "document_encoder"]
        params = dict(params)
        for tower in towers:
            loaded = pretrained.load_bert_params(self.init_from, self.module.config, expected=params[tower])
            params[tower] = jax.tree.map(
                lambda x, ref: jnp.asarray(np.asarray(x), dtype=ref.dtype), loaded, params[tower]
            )
        return params
