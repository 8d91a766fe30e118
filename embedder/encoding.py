"""The shapes of an encoding pass: which texts go into which batch, padded to what.

`inference.Embedder.encode` is the one encoding loop (on one device or on a
mesh); this module is its plan, a pure function of the texts' token counts.

* Lengths: a batch is padded to the smallest bucket of `length_buckets` that
  holds its longest text: 8, 12, ..., 32, then four steps per doubling (40,
  ..., 64, 80, ..., 128, 160, ...), capped at the length limit. A bucket is at
  most 25% longer than a text of 32 tokens or more that picks it (powers of two
  were up to 2x); a limit of 256 has 19 buckets, of 8192 39.
* Rows: a token budget per batch (`tokens_per_batch`, by default the batch size
  times the length limit, the size of the largest batch, so no batch needs more
  memory than before): many short queries go into one pass, few long
  documents. A full batch of a bucket always has the same rows.
* Batches: texts sorted by token count are cut from the longest down. While a
  bucket has a full batch of texts left, they go in full batches; its last
  texts go in a batch padded to a power-of-two multiple of `multiple` rows
  (never to a full batch), whose spare rows take the next shorter texts.

So a pass compiles at most two shapes per bucket it uses, and any number of
passes at most 2 + log2(rows / multiple) per bucket, once for the whole process.
`utilisation` is the fraction of computed tokens that are real.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from embedder.errors import ConfigError

MIN_BUCKET = 16  # the shortest bucket of the coarse, power-of-two `bucket_length`
# The ladder of `length_buckets`: from SHORTEST_BUCKET, steps of a quarter of the
# power of two below (at least BUCKET_STEP): at most 50% padding for the shortest
# texts, 25% from 32 tokens on, 12.5% on average.
SHORTEST_BUCKET = 8
BUCKET_STEP = 4
STEPS_PER_DOUBLING = 4


def bucket_length(length: int, max_length: int) -> int:
    """The smallest power of two >= length (at least MIN_BUCKET), capped at max_length.

    The coarse ladder (a SavedModel's signature pads to it); `plan` uses the
    tighter `length_buckets`.
    """
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_length)


def length_buckets(max_length: int) -> tuple[int, ...]:
    """Every length `plan` pads a batch to, ascending; the last is max_length.

    Args:
      max_length: the length limit (tokens, specials included).

    Returns:
      SHORTEST_BUCKET, then steps of max(BUCKET_STEP, 2**floor(log2(bucket)) /
      STEPS_PER_DOUBLING) below max_length, then max_length: 8, 12, ..., 32, 40,
      ..., 64, 80, ..., 128, 160, ... (19 buckets below 256, four per doubling above).

    Raises:
      ConfigError: max_length below 1.
    """
    if max_length < 1:
        raise ConfigError(f"max_length={max_length} must be positive")
    buckets = []
    length = SHORTEST_BUCKET
    while length < max_length:
        buckets.append(length)
        below = 1 << (length.bit_length() - 1)  # the power of two <= length
        length += max(BUCKET_STEP, below // STEPS_PER_DOUBLING)
    return (*buckets, max_length)


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

    @property
    def computed(self) -> int:
        """Tokens the forward pass computes: size * length."""
        return self.size * self.length


def rows_per_batch(length: int, tokens_per_batch: int, multiple: int = 1) -> int:
    """Rows of a full batch of this bucket: the token budget's, a multiple of `multiple` (>= it)."""
    return max(multiple, tokens_per_batch // length // multiple * multiple)


def _partial_size(count: int, full: int, multiple: int) -> int:
    """Rows a partial batch of `count` texts is padded to: multiple * 2**k >= count, at most full."""
    size = multiple
    while size < count:
        size *= 2
    return min(size, full)


def plan(
    lengths: Sequence[int],
    batch_size: int,
    max_length: int,
    multiple: int = 1,
    tokens_per_batch: int | None = None,
) -> list[Batch]:
    """The batches that encode texts of these token counts.

    Args:
      lengths: token count of each text (already truncated to max_length).
      batch_size: texts per forward pass at the length limit; it sets the token
        budget (batch_size * max_length) when tokens_per_batch is None.
      max_length: the longest bucket.
      multiple: every padded batch size is a multiple of this (the data-parallel
        size, so a batch splits evenly over the devices).
      tokens_per_batch: computed tokens (rows * bucket) of a full batch; None:
        batch_size * max_length. A bucket longer than it still gets `multiple` rows.

    Returns:
      The batches, shortest texts first; together their rows are every index once.

    Raises:
      ConfigError: batch_size, multiple or tokens_per_batch below 1.
    """
    if batch_size < 1 or multiple < 1:
        raise ConfigError(f"batch_size={batch_size} and multiple={multiple} must be positive")
    budget = batch_size * max_length if tokens_per_batch is None else tokens_per_batch
    if budget < 1:
        raise ConfigError(f"tokens_per_batch={tokens_per_batch} must be positive")
    buckets = np.asarray(length_buckets(max_length), np.int64)
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    order = np.argsort(lengths, kind="stable")
    # Each sorted text's bucket (ascending, like the texts).
    sorted_buckets = buckets[np.minimum(np.searchsorted(buckets, lengths[order]), len(buckets) - 1)]
    batches = []
    end = len(order)
    while end > 0:
        length = int(sorted_buckets[end - 1])
        full = rows_per_batch(length, budget, multiple)
        # The bucket's texts not yet taken; a partial batch's spare rows take the
        # next shorter texts (those rows are computed anyway).
        in_bucket = end - int(np.searchsorted(sorted_buckets[:end], length))
        size = full if in_bucket >= full else _partial_size(in_bucket, full, multiple)
        start = max(0, end - size)
        batches.append(Batch(order[start:end], size, length))
        end = start
    return batches[::-1]


def utilisation(lengths: Sequence[int], batches: Sequence[Batch]) -> float:
    """Real tokens / computed tokens of a plan (1.0 for no batches)."""
    computed = sum(b.computed for b in batches)
    real = sum(int(np.sum(np.asarray(lengths, np.int64)[b.rows])) for b in batches)
    return real / computed if computed else 1.0


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
