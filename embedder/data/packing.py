"""Packing: several texts into each fixed-length row, so padding is not computed.

Sources pad every text to `query_len` / `doc_len`; on long-tailed data most of
a batch is then padding. `Packer` turns such a padded batch into packed rows:
each side's texts (queries; positives; hard negatives) are placed into rows of
the side's length L by first-fit decreasing length, and every token carries the
segment id of its text (0 = padding, 1..S = the row's texts in order). The
model attends only within a text, restarts positions per text and pools per
text (`DualEncoder.encode_packed`), so each text's embedding is the one it gets
alone in a padded row; the trainer gathers them back into the [batch, dim]
embeddings the loss sees.

Groups. The examples of a batch are cut into `num_groups` contiguous groups of
equal size, and each group is packed into its own rows: the packed arrays are
[groups, rows, L] and the example `slots` index into their group's rows. One
group a data-parallel device (times the gradient cache's chunks) keeps every
text on the device that holds its example, and lets the gradient cache cut a
batch into chunks of whole groups.

Shapes. Every group gets the same number of rows: the most any group of the
global batch needs (`combine` takes the maximum over processes), rounded up to
a ladder of `row_steps` sizes between 1 / row_steps of the unpacked rows and
all of them, so the step compiles once per ladder size that occurs. The packing
is a pure function of the batch, hence of (seed, step): a resumed run packs
exactly as the interrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from embedder.errors import ConfigError, DataError

# (token key, the side's name in the packed keys).
SIDES = (("query_tokens", "query"), ("positive_tokens", "positive"), ("negative_tokens", "negative"))


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Bins texts into rows of `capacity` tokens, longest first, each into the first row it fits.

    Ties in length keep the texts' order, so the result is a pure function of `lengths`.

    Args:
      lengths: token count of each text, each in [0, capacity].
      capacity: tokens a row holds.

    Returns:
      (row [n], offset [n], num_rows): each text's row and its first position there.

    Raises:
      DataError: a text longer than a row, naming both sizes.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and lengths.max() > capacity:
        raise DataError(
            f"a text of {int(lengths.max())} tokens cannot be packed into rows of {capacity} tokens; "
            "the source must truncate to the row length (QUERY_LEN / DOC_LEN)"
        )
    order = np.argsort(-lengths, kind="stable")
    used = np.zeros(len(lengths), dtype=np.int64)  # tokens used in each row opened so far
    row = np.zeros(len(lengths), dtype=np.int64)
    offset = np.zeros(len(lengths), dtype=np.int64)
    num_rows = 0
    for text in order:
        size = lengths[text]
        fits = np.flatnonzero(used[:num_rows] + size <= capacity)
        target = int(fits[0]) if len(fits) else num_rows
        if target == num_rows:
            num_rows += 1
        row[text], offset[text] = target, used[target]
        used[target] += size
    return row, offset, num_rows


def row_ladder(unpacked_rows: int, steps: int) -> tuple[int, ...]:
    """The row counts a group may get: ceil(unpacked * k / steps) for k = 1..steps."""
    return tuple(sorted({max(1, math.ceil(unpacked_rows * k / steps)) for k in range(1, steps + 1)}))


def text_lengths(tokens: np.ndarray, pad_id: int) -> np.ndarray:
    """1 + the last non-pad position of each row (at least 1): [..., length] -> [...]."""
    real = np.asarray(tokens) != pad_id
    length = tokens.shape[-1]
    last = np.where(real.any(axis=-1), length - np.argmax(real[..., ::-1], axis=-1), 1)
    return last.astype(np.int64)


class Packer:
    """Packs a padded batch's texts into fixed-length rows with segment ids.

    Args:
      pad_id: the padding token id.
      num_groups: groups of this process's batch, packed separately (the
        data-parallel devices this process feeds, times the gradient cache's
        chunks); the local batch must divide into them.
      row_steps: the ladder of row counts has this many sizes (see the module
        docstring): more sizes waste fewer rows and compile more shapes.

    Raises:
      ConfigError: num_groups or row_steps below 1.
    """

    def __init__(self, pad_id: int, num_groups: int, row_steps: int = 8):
        if num_groups < 1 or row_steps < 1:
            raise ConfigError(f"Packer: num_groups={num_groups} and row_steps={row_steps} must be >= 1")
        self.pad_id = pad_id
        self.num_groups = num_groups
        self.row_steps = row_steps

    def _groups(self, features: Mapping[str, np.ndarray]) -> int:
        batch = features["query_tokens"].shape[0]
        if batch % self.num_groups:
            raise ConfigError(
                f"a batch of {batch} examples cannot be packed in {self.num_groups} equal groups (one a "
                "data-parallel device and gradient cache chunk); make BATCH_SIZE a multiple of it"
            )
        return batch // self.num_groups

    def _side_texts(self, features: Mapping[str, np.ndarray], key: str) -> tuple[np.ndarray, np.ndarray]:
        """(lengths [groups, texts], present [groups, texts]) of one side's texts."""
        self._groups(features)
        lengths = text_lengths(features[key], self.pad_id).reshape(self.num_groups, -1)
        present = np.ones(lengths.shape, bool)
        if key == "negative_tokens" and "negative_valid" in features:
            present = np.asarray(features["negative_valid"]).reshape(self.num_groups, -1) != 0
        return lengths, present

    def _bins(self, features: Mapping[str, np.ndarray], key: str) -> list[tuple[np.ndarray, ...]]:
        """Per group: (texts present, their rows, their offsets, rows used) of one side."""
        lengths, present = self._side_texts(features, key)
        width = features[key].shape[-1]
        bins = []
        for g in range(self.num_groups):
            members = np.flatnonzero(present[g])
            row, offset, used = first_fit_decreasing(lengths[g][members], width)
            bins.append((members, row, offset, used))
        return bins

    def rows_needed(self, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Rows the fullest group of this batch needs, per side present: int64 [sides]."""
        sides = [key for key, _ in SIDES if key in features]
        return np.asarray([max(b[3] for b in self._bins(features, key)) for key in sides], dtype=np.int64)

    def __call__(
        self,
        features: Mapping[str, np.ndarray],
        combine: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> dict[str, np.ndarray]:
        """The batch with each side's texts packed; other features unchanged.

        Args:
          features: a source's batch: query_tokens [B, Lq], positive_tokens [B, Ld],
            negative_tokens [B, K, Ld] and negative_valid [B, K] if any, ...
          combine: maps this process's rows needed to the maximum over all
            processes; None with one process.

        Returns:
          For each side present (query, positive, negative), in place of its
          tokens: `<side>_tokens` int32 [groups, rows, L], `<side>_segment_ids`
          int32 [groups, rows, L] and `<side>_slots` int32 ([B] or [B, K]): the
          index of each text in its group's pooled texts, ``row * L + segment - 1``
          (`DualEncoder.encode_packed` with slots). A missing negative points at
          slot 0; the loss leaves it out by negative_valid.
        """
        features = dict(features)
        sides = [(key, side) for key, side in SIDES if key in features]
        bins = {key: self._bins(features, key) for key, _ in sides}
        needed = np.asarray([max(b[3] for b in bins[key]) for key, _ in sides], dtype=np.int64)
        if combine is not None:
            needed = np.asarray(combine(needed))
        for (key, side), rows_needed in zip(sides, needed, strict=True):
            tokens = np.asarray(features[key])
            width = tokens.shape[-1]
            lengths, _ = self._side_texts(features, key)
            texts = tokens.reshape(self.num_groups, lengths.shape[1], width)
            rows = next(r for r in row_ladder(lengths.shape[1], self.row_steps) if r >= rows_needed)
            packed = np.full((self.num_groups, rows, width), self.pad_id, np.int32)
            segments = np.zeros((self.num_groups, rows, width), np.int32)
            slots = np.zeros(lengths.shape, np.int32)
            for g, (members, row, offset, _) in enumerate(bins[key]):
                # Segment ids number a row's texts 1, 2, ... from its start.
                segment = np.zeros(len(members), np.int64)
                filled: dict[int, int] = {}
                for i in np.argsort(offset, kind="stable"):
                    filled[int(row[i])] = segment[i] = filled.get(int(row[i]), 0) + 1
                for i, text in enumerate(members):
                    start, size = offset[i], lengths[g, text]
                    packed[g, row[i], start : start + size] = texts[g, text, :size]
                    segments[g, row[i], start : start + size] = segment[i]
                    slots[g, text] = row[i] * width + segment[i] - 1
            features[key] = packed
            features[f"{side}_segment_ids"] = segments
            features[f"{side}_slots"] = slots.reshape(tokens.shape[:-1])
        return features


def is_packed(features: Mapping[str, object]) -> bool:
    """Whether a batch holds packed rows (`Packer`'s output)."""
    return "query_segment_ids" in features


def token_utilisation(features: Mapping[str, np.ndarray], pad_id: int) -> dict[str, float]:
    """Real tokens / computed tokens of a batch, for queries and for documents.

    Computed tokens are the token arrays' sizes (padding included); real tokens
    are the non-pad tokens (inside a text, for packed rows).

    Args:
      features: a batch, padded or packed.
      pad_id: the padding token id.

    Returns:
      {"token_utilisation/query": ..., "token_utilisation/document": ...}.
    """
    packed = is_packed(features)

    def counts(key: str, side: str) -> tuple[int, int]:
        tokens = np.asarray(features[key])
        real = tokens != pad_id
        if packed:
            real &= np.asarray(features[f"{side}_segment_ids"]) != 0
        return int(real.sum()), tokens.size

    q_real, q_all = counts("query_tokens", "query")
    d_real, d_all = 0, 0
    for key, side in SIDES[1:]:
        if key in features:
            real, total = counts(key, side)
            d_real, d_all = d_real + real, d_all + total
    return {
        "token_utilisation/query": q_real / max(q_all, 1),
        "token_utilisation/document": d_real / max(d_all, 1),
    }
