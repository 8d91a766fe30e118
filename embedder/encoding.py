"""Encoding text with parameters that live on a device mesh (e.g. during training).

`inference.Embedder` encodes with parameters on one device. Here the parameters
are the training state's global, sharded arrays and each batch is split over
the mesh's data-parallel axes, so evaluation during training runs on every
device at once and on every process (each process calls with the same texts
and gets every embedding back). Batching is the Embedder's: texts sorted by
length, padded to power-of-two bucket lengths, a fixed batch size, so a whole
evaluation compiles a handful of shapes once and reuses them at every eval.
Texts are encoded as given, without prompts, as the training loop feeds them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from embedder import inference, partitioning
from embedder.data import wordpiece
from embedder.models import dual_encoder


class MeshEncoder:
    """Embeds texts with a DualEncoder whose parameters are sharded over `mesh`.

    Args:
      module: the DualEncoder.
      tokenizer: its tokenizer.
      mesh: the mesh the parameters live on.
      batch_size: texts per forward pass (rounded up to a multiple of the
        data-parallel size).
      max_length: tokens per text (specials included): one number, or one per
        kind ({"query": 64, "document": 256}).
      rules: logical axis rules (the batch axis's mesh axes).
    """

    def __init__(
        self,
        module: dual_encoder.DualEncoder,
        tokenizer: wordpiece.WordPieceTokenizer,
        mesh: Mesh,
        batch_size: int = 64,
        max_length: int | Mapping[str, int] = 512,
        rules: Sequence[tuple[str, Any]] = partitioning.DEFAULT_RULES,
    ):
        self.module = module
        self.tokenizer = tokenizer
        self.mesh = mesh
        ways = partitioning.data_parallel_size(mesh)
        self.batch_size = -(-batch_size // ways) * ways
        if isinstance(max_length, int):
            max_length = {kind: max_length for kind in dual_encoder.TOWERS}
        self.max_length = dict(max_length)
        self._batch_sharding = partitioning.batch_sharding(mesh, 2, rules)
        self._replicated = NamedSharding(mesh, PartitionSpec())

    @functools.cached_property
    def _encode_fn(self):
        def encode(params, tokens, mask, tower):
            return self.module.apply({"params": params}, tokens, tower, mask=mask, method=self.module.encode)

        # Replicated output: every process can read every embedding.
        return jax.jit(encode, static_argnums=3, out_shardings=self._replicated)

    def _global(self, array: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(array.shape, self._batch_sharding, lambda index: array[index])

    def __call__(self, params: Any, texts: Sequence[str], kind: str = "query") -> np.ndarray:
        """Embeds texts.

        Args:
          params: the module's parameters (global arrays, any sharding on the mesh).
          texts: the strings (the same on every process).
          kind: "query" or "document".

        Returns:
          [len(texts), embedding_dim] float32, in input order.
        """
        if kind not in dual_encoder.TOWERS:
            raise ValueError(f"kind={kind!r}: expected one of {dual_encoder.TOWERS}")
        limit = self.max_length[kind]
        ids = [self.tokenizer.encode(t, max_length=limit) for t in texts]
        out = np.zeros((len(ids), self.module.embedding_dim), np.float32)
        order = np.argsort([len(x) for x in ids], kind="stable")
        pad_id = self.module.config.pad_id
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            length = inference.bucket_length(max(len(ids[r]) for r in rows), limit)
            tokens = np.full((self.batch_size, length), pad_id, np.int32)
            mask = np.zeros((self.batch_size, length), bool)
            for j, r in enumerate(rows):
                tokens[j, : len(ids[r])] = ids[r]
                mask[j, : len(ids[r])] = True
            embeddings = self._encode_fn(params, self._global(tokens), self._global(mask), kind)
            out[rows] = np.asarray(embeddings)[: len(rows)]
        return out
