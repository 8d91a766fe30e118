"""The shapes of an encoding pass: which texts go into which batch, padded to what.

`inference.Embedder.encode` is the one encoding loop (on one device or on a
mesh); this module is its plan. Texts are sorted by token count and cut into
batches of `batch_size` rows; each batch is padded to the smallest power-of-two
bucket (at least MIN_BUCKET, at most the length limit) that holds its longest
text, so a corpus of any size compiles a handful of shapes, once for the whole
process. How batches are shaped lives in `plan` alone, so packing or tighter
buckets change this one function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from embedder.errors import ConfigError

MIN_BUCKET = 16


def bucket_length(length: int, max_length: int) -> int:
    """The smallest power of two >= length (at least MIN_BUCKET), capped at max_length."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_length)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One forward pass.

    Attributes:
      rows: indices of its texts into the encoded list, shortest first.
      size: rows of the padded batch (>= len(rows); the rest are empty rows).
      length: tokens per row (the bucket).
    """

    rows: np.ndarray
    size: int
    length: int


def plan(lengths: Sequence[int], batch_size: int, max_length: int, multiple: int = 1) -> list[Batch]:
    """The batches that encode texts of these token counts.

    Args:
      lengths: token count of each text (already truncated to max_length).
      batch_size: texts per forward pass.
      max_length: the longest bucket.
      multiple: the padded batch size is a multiple of this (the data-parallel
        size, so a batch splits evenly over the devices).

    Returns:
      The batches, shortest texts first; together their rows are every index once.

    Raises:
      ValueError: batch_size or multiple below 1.
    """
    if batch_size < 1 or multiple < 1:
        raise ConfigError(f"batch_size={batch_size} and multiple={multiple} must be positive")
    size = -(-batch_size // multiple) * multiple
    order = np.argsort(np.asarray(lengths, np.int64), kind="stable")
    batches = []
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        batches.append(Batch(rows, size, bucket_length(max(int(lengths[r]) for r in rows), max_length)))
    return batches


def pad(ids: Sequence[Sequence[int]], batch: Batch, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The batch's token rows, right-padded, and their mask.

    The mask comes from the lengths, not from pad_id: a text may hold a literal [PAD].

    Args:
      ids: token ids of every text (indexed by batch.rows).
      batch: from `plan`.
      pad_id: the id of padding positions.

    Returns:
      (tokens int32 [size, length], mask bool [size, length]).
    """
    tokens = np.full((batch.size, batch.length), pad_id, np.int32)
    mask = np.zeros((batch.size, batch.length), bool)
    for j, r in enumerate(batch.rows):
        tokens[j, : len(ids[r])] = ids[r]
        mask[j, : len(ids[r])] = True
    return tokens, mask
