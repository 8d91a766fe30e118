"""`Embedder`: encode text with a trained or pretrained model.

Batches are sorted by length and padded to a few bucket lengths (powers of two),
so a corpus of any size compiles at most a handful of shapes.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from embedder.data import wordpiece
from embedder.models import dual_encoder, pretrained

MIN_BUCKET = 16


def bucket_length(length: int, max_length: int) -> int:
    """The smallest power of two >= length (at least MIN_BUCKET), capped at max_length."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_length)


class Embedder:
    """A model, its parameters and its tokenizer, ready to encode text.

    Args:
      module: the DualEncoder.
      params: its parameters (the "params" collection, unboxed).
      tokenizer: turns text into token ids.
      max_length: texts are truncated to this many tokens (specials included).
    """

    def __init__(
        self,
        module: dual_encoder.DualEncoder,
        params: Any,
        tokenizer: wordpiece.WordPieceTokenizer,
        max_length: int = 512,
    ):
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self.max_length = max_length

    @classmethod
    def from_sentence_transformers(cls, model_dir: str, **config_overrides: Any) -> Embedder:
        """Loads a BERT-family sentence-transformers (or bare Hugging Face) folder.

        Args:
          model_dir: local folder with config.json, model.safetensors, vocab.txt
            and, for sentence-transformers, modules.json and the pooling config.
          **config_overrides: TransformerConfig fields to override (e.g. dtype).

        Returns:
          An Embedder that encodes as sentence-transformers does.
        """
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"{model_dir}: not a model folder")
        info = pretrained.read_sentence_transformer_info(model_dir)
        if info.dense_layers:
            raise ValueError(f"{model_dir}: sentence-transformers Dense modules are not supported for import")
        config = pretrained.config_from_hf(model_dir, **config_overrides)
        module = dual_encoder.DualEncoder(config, pooling=info.pooling, normalize=info.normalize)
        params = {"encoder": pretrained.load_bert_params(model_dir, config)}
        params = jax.tree.map(jnp.asarray, params)
        tokenizer = wordpiece.WordPieceTokenizer.from_pretrained_dir(model_dir)
        return cls(module, params, tokenizer, max_length=min(info.max_seq_length, config.max_len))

    @classmethod
    def from_checkpoint(cls, path: str, step: int | None = None, max_length: int = 512) -> Embedder:
        """Loads a training (or soup) checkpoint: a model dir, its checkpoints/ or a step folder.

        Args:
          path: where the checkpoint is.
          step: which step; None = the latest.
          max_length: truncate texts to this many tokens (capped by the model's positions).

        Returns:
          An Embedder of the checkpoint's model parameters.
        """
        from embedder import checkpointing
        from embedder.models import spec

        params, meta = checkpointing.load_model_params(path, step)
        module = spec.module_from_description(meta["model_config"])
        vocab_dir = meta.get("vocab_dir")
        if not vocab_dir:
            raise ValueError(f"{path}: the checkpoint names no vocab_dir, so there is no tokenizer for it")
        tokenizer = wordpiece.WordPieceTokenizer.from_pretrained_dir(vocab_dir)
        if module.config.family == "bert":
            max_length = min(max_length, module.config.max_len)
        return cls(module, params, tokenizer, max_length=max_length)

    @functools.cached_property
    def _encode_fn(self):
        def encode(params, tokens, mask, tower):
            return self.module.apply({"params": params}, tokens, tower, mask=mask, method=self.module.encode)

        return jax.jit(encode, static_argnums=3)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, truncated to max_length."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        return [self.tokenizer.encode(t, max_length=self.max_length) for t in texts]

    def encode(self, texts: Sequence[str], kind: str = "query", batch_size: int = 32) -> np.ndarray:
        """Embeds texts.

        Args:
          texts: the strings.
          kind: "query" or "document" (which tower, when there are two).
          batch_size: texts per forward pass.

        Returns:
          [len(texts), dim] float32, in input order.
        """
        if kind not in dual_encoder.TOWERS:
            raise ValueError(f"kind={kind!r}: expected one of {dual_encoder.TOWERS}")
        ids = self.tokenize(texts)
        out = np.zeros((len(ids), self.module.embedding_dim), np.float32)
        order = np.argsort([len(x) for x in ids], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            length = bucket_length(max(len(ids[r]) for r in rows), self.max_length)
            tokens = np.full((batch_size, length), self.module.config.pad_id, np.int32)
            # The mask comes from the lengths, not from pad_id: a text may hold a literal [PAD].
            mask = np.zeros((batch_size, length), bool)
            for j, r in enumerate(rows):
                tokens[j, : len(ids[r])] = ids[r]
                mask[j, : len(ids[r])] = True
            out[rows] = np.asarray(self._encode_fn(self.params, tokens, mask, kind))[: len(rows)]
        return out
