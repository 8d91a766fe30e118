"""`ModelSpec`: what a gin model file describes, and how to initialise it.

A spec is the dual encoder module plus where its vocabulary and (optionally) its
initial weights come from, and the prompt templates its texts are written in. It
names folders only; tokenizers are built by the callers (data and inference), so
models import nothing of data but the pure `data.prompts` config.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from embedder.data import prompts as prompts_lib
from embedder.errors import ConfigError, WeightsError
from embedder.models import dual_encoder, pretrained, transformer


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model as gin files describe it.

    Attributes:
      module: the DualEncoder.
      vocab_dir: the tokenizer's folder: a WordPiece vocab.txt, a tokenizer.json or a
        SentencePiece .model, with tokenizer_config.json (`tokenizers.load_tokenizer`).
      init_from: a Hugging Face / sentence-transformers BERT folder, or a Gemma 3 /
        Qwen3 folder for the llm family, whose weights initialise every tower;
        None for random initialisation. A projection head, if any, comes from
        the folder's Dense modules when it is a sentence-transformers folder
        (EmbeddingGemma's two), else stays randomly initialised (as Gemini
        Embedding's).
      prompts: how queries and documents are written before tokenisation, in
        training, evaluation, inference and every export (default: no prompts,
        raw text). Training saves it in the checkpoint's metadata.
      init_layers: which of `init_from`'s layers start this model's, in order
        (e.g. (0, 2, 4) of MiniLM-L6 for a 3-layer student); None: all, layer i
        from layer i.
    """

    module: dual_encoder.DualEncoder
    vocab_dir: str | None = None
    init_from: str | None = None
    prompts: prompts_lib.PromptConfig = prompts_lib.PromptConfig()
    init_layers: tuple[int, ...] | None = None

    def abstract_variables(self, length: int = 8) -> Any:
        """The boxed variable tree as shapes only (no allocation), for shardings and checks."""
        tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
        return jax.eval_shape(lambda t: self.module.init(jax.random.key(0), t, t), tokens)

    def init_params(self, rng: jax.Array, shardings: Any = None) -> Any:
        """Initial parameters (unboxed): random, then the pretrained weights if any.

        Args:
          rng: the random initialisation's key.
          shardings: optional tree of the params' target shardings (the
            trainer's): the parameters are made on the mesh, the pretrained
            towers read straight onto it tensor by tensor, never whole on the host.

        Raises:
          pretrained.WeightsError: the weights do not fit the module's config;
            the message names the tensor and both shapes.
        """
        if self.init_from is None:
            tokens = jnp.ones((1, 8), jnp.int32)
            params = nn.unbox(self.module.init(rng, tokens, tokens))["params"]
            return params if shardings is None else jax.device_put(params, shardings)
        towers = ["encoder"] if self.module.shared_tower else ["query_encoder", "document_encoder"]

        def init_rest(rng: jax.Array) -> dict[str, Any]:
            # Only what the folder does not hold: XLA drops the towers' random init.
            tokens = jnp.ones((1, 8), jnp.int32)
            params = nn.unbox(self.module.init(rng, tokens, tokens))["params"]
            return {name: value for name, value in params.items() if name not in towers}

        expected = nn.unbox(self.abstract_variables()["params"])
        params: dict[str, Any] = {}
        if any(name not in towers for name in expected):  # e.g. a projection head
            rest_shardings = (
                None if shardings is None else {k: v for k, v in shardings.items() if k not in towers}
            )
            params = dict(jax.jit(init_rest, out_shardings=rest_shardings)(rng))
        for tower in towers:
            tower_shardings = None if shardings is None else shardings[tower]
            if self.module.config.family == "llm":
                from embedder.formats import hf_llm

                load = hf_llm.load_llm_params
            else:
                load = pretrained.load_bert_params
            loaded = load(
                self.init_from,
                self.module.config,
                expected=expected[tower],
                shardings=tower_shardings,
                layers=None if self.init_layers is None else tuple(self.init_layers),
            )
            if shardings is None:
                loaded = jax.tree.map(lambda x, ref: jnp.asarray(x, dtype=ref.dtype), loaded, expected[tower])
            params[tower] = loaded
        if self.module.projection_dim and os.path.exists(os.path.join(self.init_from, "modules.json")):
            head = self._pretrained_head(params)
            if shardings is not None:
                head = jax.device_put(head, {name: shardings[name] for name in head})
            params.update(head)
        return params

    def _pretrained_head(self, params: dict[str, Any]) -> dict[str, Any]:
        """The projection head of a sentence-transformers `init_from` (its Dense modules), if it has one.

        Raises:
          WeightsError: the folder's Dense modules do not form this module's head
            (naming the field and both values).
        """
        from embedder.formats import huggingface

        info = huggingface.read_sentence_transformer_info(self.init_from)
        if not info.dense_dirs:
            return {}
        loaded, fields = huggingface.head_from_dense(
            info.dense_dirs, self.module.config.hidden_size, self.init_from
        )
        for name in ("projection_dim", "projection_hidden_dim", "projection_bias"):
            ours = getattr(self.module, name) or None
            theirs = fields.get(name) or None
            if ours != theirs:
                raise WeightsError(
                    f"{self.init_from}: its Dense modules give {name}={theirs}, the model's DualEncoder has {ours}"
                )
        return {
            name: jax.tree.map(
                lambda x, ref: jnp.asarray(np.asarray(x), dtype=ref.dtype), loaded[name], params[name]
            )
            for name in loaded
        }


_HEAD_FIELDS = (
    "pooling",
    "projection_dim",
    "shared_tower",
    "normalize",
    "projection_hidden_dim",
    "projection_bias",
)


def describe_module(module: dual_encoder.DualEncoder) -> dict[str, Any]:
    """The module as JSON-able fields: stored with every checkpoint and export."""
    return {
        **dataclasses.asdict(module.config),
        "pooling": module.pooling,
        "projection_dim": module.projection_dim,
        "shared_tower": module.shared_tower,
        "normalize": module.normalize,
        "projection_hidden_dim": module.projection_hidden_dim,
        "projection_bias": module.projection_bias,
    }


def module_from_description(description: dict[str, Any]) -> dual_encoder.DualEncoder:
    """Rebuilds the DualEncoder that `describe_module` described."""
    fields = dict(description)
    head = {k: fields.pop(k) for k in _HEAD_FIELDS if k in fields}
    known = {f.name for f in dataclasses.fields(transformer.TransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"model description has unknown fields {unknown}")
    return dual_encoder.DualEncoder(transformer.TransformerConfig(**fields), **head)
