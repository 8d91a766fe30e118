"""seqio data sources for pair examples: the project's own JSONL files.

`JsonlDataSource` reads each split's files with the strict reader of `jsonl`
(a bad line is a `DataError` naming file and line, raised when the dataset is
built, before any training step) and serves the examples as the string features
`query`, `positive`, `negatives` [n] and `task` ("" when unset).

Sharding: with at least as many files as shards, a process reads only its own
files (file i goes to shard i mod n); otherwise every process reads the files
and keeps example i when i mod n is its index. Shuffling permutes all examples
of the shard with the given seed (the files are in memory anyway), so an epoch
is a full permutation rather than a buffer's approximation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf

from embedder.data import jsonl
from embedder.errors import ConfigError, DataError


def examples_to_dataset(examples: Sequence[jsonl.Example]) -> tf.data.Dataset:
    """A dataset of pair examples as string features.

    Args:
        examples: the examples.

    Returns:
        Elements {"query": [], "positive": [], "negatives": [n], "task": []} (tf.string;
        `task` is "" for an example without one).
    """
    negatives = [negative for example in examples for negative in example.negatives]
    lengths = [len(example.negatives) for example in examples]
    ragged = tf.RaggedTensor.from_row_lengths(
        tf.constant(negatives, dtype=tf.string, shape=[len(negatives)]),
        tf.constant(lengths, dtype=tf.int64, shape=[len(lengths)]),
    )
    features = {
        "query": tf.constant([e.query for e in examples], dtype=tf.string, shape=[len(examples)]),
        "positive": tf.constant([e.positive for e in examples], dtype=tf.string, shape=[len(examples)]),
        "negatives": ragged,
        "task": tf.constant([e.task or "" for e in examples], dtype=tf.string, shape=[len(examples)]),
    }
    return tf.data.Dataset.from_tensor_slices(features)


class JsonlDataSource(seqio.DataSource):
    """Pair examples from JSONL files, one list of files per split.

    Args:
        split_to_files: split name -> JSONL paths (a single path is allowed).
    """

    def __init__(self, split_to_files: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]]):
        self._files = {}
        for split, files in split_to_files.items():
            if isinstance(files, str | os.PathLike):
                files = [files]
            files = [os.fspath(f) for f in files]
            if not files:
                raise ConfigError(f"JsonlDataSource: split {split!r} has no files")
            self._files[split] = tuple(files)
        self._cache: dict[tuple[str, int, int], list[jsonl.Example]] = {}
        # The source permutes every epoch itself, so a task needs no shuffle buffer.
        super().__init__(splits=tuple(self._files), caching_permitted=True, performs_internal_shuffling=True)

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def list_shards(self, split: str) -> Sequence[str]:
        return list(self._split_files(split))

    def _split_files(self, split: str) -> tuple[str, ...]:
        if split not in self._files:
            raise ConfigError(f"JsonlDataSource has no split {split!r}; it has {', '.join(self._files)}")
        return self._files[split]

    def examples(self, split: str, shard_info: seqio.ShardInfo | None = None) -> list[jsonl.Example]:
        """The examples of one split (or of one shard of it), in file and line order.

        Args:
            split: the split.
            shard_info: which shard; None for all examples.

        Returns:
            The examples.

        Raises:
            jsonl.DataError: for a bad line (naming file and line) or an empty file.
        """
        index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        key = (split, index, count)
        if key not in self._cache:
            files = self._split_files(split)
            if len(files) >= count:
                examples = jsonl.read_jsonl_files(files[index::count])
            else:
                examples = jsonl.read_jsonl_files(files)[index::count]
            self._cache[key] = examples
        return self._cache[key]

    def num_input_examples(self, split: str) -> int:
        return len(self.examples(split))

    def get_dataset(
        self,
        split: str = "train",
        shuffle: bool = True,
        seed: int | None = None,
        shard_info: seqio.ShardInfo | None = None,
        *,
        sequence_length: Mapping[str, int] | None = None,
        use_cached: bool = False,
        num_epochs: int | None = 1,
    ) -> tf.data.Dataset:
        """The split's examples (of this shard) as a dataset; see the module docstring."""
        del sequence_length, use_cached, num_epochs  # part of seqio's interface only
        examples = self.examples(split, shard_info)
        if not examples:
            shard = f" shard {shard_info.index} of {shard_info.num_shards}" if shard_info else ""
            raise DataError(
                f"JsonlDataSource: split {split!r}{shard} has no examples "
                f"({len(self.examples(split))} in {len(self._split_files(split))} file(s)); "
                "use fewer processes or more data"
            )
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(examples))
            examples = [examples[i] for i in order]
        return examples_to_dataset(examples)

    def __repr__(self) -> str:
        return f"JsonlDataSource({self._files!r})"
