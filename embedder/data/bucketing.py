"""Length bucketing: pad each global batch to the shortest of a few lengths that holds it.

Sources pad every row to the configured `query_len` / `doc_len`. Short texts
then cost as much as long ones: a batch of 20-token queries padded to 64 does
three times the work it needs. `LengthBuckets` cuts the trailing padding of a
batch down to the smallest bucket that holds its longest text, separately for
queries and documents (positives and negatives share one length, since the loss
compares them). The buckets are static, so the step compiles once per
(query bucket, document bucket) pair that occurs and never again.

The longest text is taken over the *global* batch: every process must give the
step the same shapes. With one process that is its own batch; with several, the
lengths are combined by a `combine` function (an all-gather of two integers).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from embedder.errors import ConfigError

DOC_KEYS = ("positive_tokens", "negative_tokens")


def used_length(tokens: np.ndarray, pad_id: int) -> int:
    """1 + the last position holding a non-pad token in any row (0 for all padding).

    Args:
      tokens: int [..., length], right-padded with `pad_id`.
    """
    tokens = np.asarray(tokens)
    if tokens.size == 0:
        return 0
    used = (tokens != pad_id).reshape(-1, tokens.shape[-1]).any(axis=0)
    positions = np.flatnonzero(used)
    return int(positions[-1]) + 1 if len(positions) else 0


def bucket_ladder(buckets: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The buckets below `max_length`, then `max_length` itself: the lengths a batch can get."""
    return (*sorted({b for b in buckets if 0 < b < max_length}), max_length)


class LengthBuckets:
    """Trims a padded batch to the smallest bucket holding its longest query and document.

    Args:
      buckets: candidate lengths (e.g. (16, 32, 64, 128)); each side uses those
        below its own maximum, plus the maximum. Empty: no trimming.
      query_len: the length the source pads queries to.
      doc_len: the length the source pads positives and negatives to.
      pad_id: the padding token id.

    Raises:
      ValueError: a bucket that is not a positive integer.
    """

    def __init__(self, buckets: Sequence[int], query_len: int, doc_len: int, pad_id: int):
        for b in buckets:
            if not isinstance(b, int | np.integer) or b < 2:
                raise ConfigError(f"length bucket {b!r} must be an integer >= 2 ([CLS] and [SEP])")
        self.enabled = bool(buckets)
        self.query_lengths = bucket_ladder(buckets, query_len)
        self.doc_lengths = bucket_ladder(buckets, doc_len)
        self.pad_id = pad_id

    @property
    def num_shapes(self) -> int:
        """How many (query, document) shapes the step can be compiled for."""
        return len(self.query_lengths) * len(self.doc_lengths) if self.enabled else 1

    @staticmethod
    def _pick(lengths: tuple[int, ...], needed: int) -> int:
        return next((b for b in lengths if b >= needed), lengths[-1])

    def needed(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """[query length used, document length used] of this (local) batch."""
        doc = max(used_length(features[k], self.pad_id) for k in DOC_KEYS if k in features)
        return np.array([used_length(features["query_tokens"], self.pad_id), doc], dtype=np.int64)

    def __call__(
        self,
        features: Mapping[str, np.ndarray],
        combine: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The batch with its token arrays cut to their buckets (other features unchanged).

        Args:
          features: a source's batch (query_tokens [B, query_len], positive_tokens
            [B, doc_len], negative_tokens [B, K, doc_len] if any, ...).
          combine: maps this process's needed lengths to the maximum over all
            processes; None with one process.
        """
        features = dict(features)
        if not self.enabled:
            return features
        needed = self.needed(features)
        if combine is not None:
            needed = np.asarray(combine(needed))
        query = self._pick(self.query_lengths, int(needed[0]))
        doc = self._pick(self.doc_lengths, int(needed[1]))
        features["query_tokens"] = features["query_tokens"][..., :query]
        for key in DOC_KEYS:
            if key in features:
                features[key] = features[key][..., :doc]
        return features
