"""Deterministic, resumable batches of token ids from a list of examples.

The global batch of a training step is a pure function of (seed, step): epoch
`e = step // steps_per_epoch` visits the examples in the order
`np.random.default_rng([seed, e]).permutation(len(examples))`, one global batch
after another, and the incomplete last batch of an epoch is dropped. Hence

* a resumed run needs only the step number to continue exactly where it stopped;
* process `i` of `n` takes rows `[i * local, (i + 1) * local)` of the global batch,
  so the processes together see exactly what one process would see.

Examples with fewer hard negatives than asked for get padding rows, marked
missing in `negative_valid`: the loss leaves them out (as Gemini Embedding drops
the term) rather than filling them with other examples' positives, which would
count an in-batch candidate twice and can be the query's own positive.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from embedder.data.jsonl import Example
from embedder.errors import ConfigError, DataError

# Task draws of the task-homogeneous order: a stream of their own, this many steps at a time.
_TASK_STREAM = 0x7461736B
_TASK_BLOCK = 1024


class Tokenizer(Protocol):
    """What the batcher needs from a tokenizer (every `tokenizers.Tokenizer` has it)."""

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str, max_length: int | None = None) -> list[int]: ...


def duplicate_id(tokens: Sequence[int] | np.ndarray) -> int:
    """The duplicate-example id of a text: equal inputs to the model get equal ids.

    The one definition both data paths use (this batcher and the seqio
    `PairFeatureConverter`): a hash of the token ids the model sees, truncated and
    unpadded. Texts the model cannot tell apart (equal texts, or texts equal after
    truncation) share an id, which is what the loss's duplicate mask needs; the
    id depends neither on the padding nor on the pad id. Stable in every process
    and run.

    Args:
        tokens: the text's token ids, specials included, truncated to its length limit.

    Returns:
        The first 4 bytes of the BLAKE2b digest of the ids as little-endian int32,
        read big-endian, as a non-negative int31 (fits int32). Different inputs
        collide with probability about 2**-31 a pair.
    """
    data = np.asarray(tokens, dtype="<i4").tobytes()
    digest = hashlib.blake2b(data, digest_size=4).digest()
    return int.from_bytes(digest, "big") & 0x7FFFFFFF


def check_batch_split(
    global_batch_size: int, num_negatives: int, seed: int, process_index: int, process_count: int
) -> None:
    """Settings every training data source shares; a ValueError naming the bad one."""
    if global_batch_size < 1:
        raise ConfigError(f"global_batch_size must be >= 1, got {global_batch_size}")
    if num_negatives < 0:
        raise ConfigError(f"num_negatives must be >= 0, got {num_negatives}")
    if seed < 0:
        raise ConfigError(f"seed must be >= 0 (numpy seeds are non-negative), got {seed}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch_size % process_count:
        raise ConfigError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}; every process must get the same number of rows"
        )


class PairBatcher:
    """Batches of (query, positive, negatives) token ids for contrastive training.

    Args:
        examples: the training examples; at least one global batch of them.
        tokenizer: turns text into ids with its specials ([CLS] ... [SEP], <bos> ...),
            truncating to a length; its pad_id fills the rows.
        global_batch_size: examples per step over all processes.
        query_len: token length of query rows (truncated, then right-padded).
        doc_len: token length of positive and negative rows.
        num_negatives: hard negatives per example (0 = in-batch negatives only). An
            example with more keeps its first `num_negatives`; one with fewer gets
            padding rows that `negative_valid` marks missing.
        seed: non-negative seed of the example order.
        task_homogeneous: every global batch from one task (the examples' `task`
            field; None is a task of its own), the task of a step drawn with
            probability proportional to its number of examples (Gemini
            Embedding's one-dataset-per-batch); each task is visited in its own
            epochs of its own permutations.
        process_index: this process's index, in [0, process_count).
        process_count: number of processes sharing each global batch.
        given_scores: also emit each example's `scores` (the data's teacher scores
            of the positive and its negatives, for the given-scores loss terms);
            every example must have them and num_negatives must be >= 1.

    Raises:
        ValueError: for a configuration that cannot give full batches, naming the
            offending sizes.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer: Tokenizer,
        *,
        global_batch_size: int,
        query_len: int,
        doc_len: int,
        num_negatives: int = 0,
        seed: int = 0,
        task_homogeneous: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        given_scores: bool = False,
    ):
        check_batch_split(global_batch_size, num_negatives, seed, process_index, process_count)
        for name, length in (("query_len", query_len), ("doc_len", doc_len)):
            if length < 2:
                raise ConfigError(f"{name}={length} cannot hold [CLS] and [SEP]; use at least 2")
        if len(examples) < global_batch_size:
            raise ConfigError(
                f"{len(examples)} examples are fewer than one global batch of "
                f"global_batch_size={global_batch_size}; lower the batch size or add data"
            )
        self._examples = tuple(examples)
        self._tokenizer = tokenizer
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.query_len = query_len
        self.doc_len = doc_len
        self.num_negatives = num_negatives
        self.seed = seed
        self.process_index = process_index
        self.process_count = process_count
        # Text -> ids (truncated, unpadded). Epochs revisit every text, so each is
        # tokenised once; memory grows with the distinct texts seen.
        self._query_cache: dict[str, np.ndarray] = {}
        self._doc_cache: dict[str, np.ndarray] = {}
        self._query_id_cache: dict[str, int] = {}
        self._doc_id_cache: dict[str, int] = {}
        self._permutation: tuple[int, np.ndarray] | None = None
        # The examples' task texts, which the model's prompts record (`prompts.with_tasks`).
        self.tasks = tuple(sorted({e.task for e in self._examples if e.task}))
        self.task_homogeneous = task_homogeneous
        self.task_names: list[str | None] = []
        self._task_members: list[np.ndarray] = []
        self._block_counts: dict[int, np.ndarray] = {}
        if task_homogeneous:
            names = sorted({e.task for e in self._examples}, key=lambda t: (t is not None, t or ""))
            tasks = np.array([names.index(e.task) for e in self._examples])
            self.task_names = names
            self._task_members = [np.flatnonzero(tasks == t) for t in range(len(names))]
            for name, members in zip(names, self._task_members, strict=True):
                if len(members) < global_batch_size:
                    raise ConfigError(
                        f"task {name!r} has {len(members)} examples, fewer than one global batch of "
                        f"{global_batch_size}; with task_homogeneous every batch comes from one task"
                    )
            sizes = np.array([len(m) for m in self._task_members], float)
            self.task_rates = sizes / sizes.sum()
        self.given_scores = False
        if given_scores:
            self._check_given_scores()
            self.given_scores = True

    def _check_given_scores(self) -> None:
        """ConfigError / DataError unless every example has scores and there are negatives to score."""
        if self.num_negatives < 1:
            raise ConfigError(
                "scores given in the data need hard negatives (MarginMSE and listwise KL compare the "
                "positive's score with the negatives'): set num_negatives (NUM_NEGATIVES) >= 1"
            )
        for index, example in enumerate(self._examples):
            if example.scores is None:
                raise DataError(
                    f"training example {index} (query {example.query[:60]!r}) has no 'scores', but the run "
                    "trains on scores given in the data; give every example a 'scores' list"
                )

    def with_given_scores(self) -> PairBatcher:
        """This batcher, emitting `scores` too (see `given_scores`); the examples and order are the same.

        Raises:
            ConfigError: num_negatives is 0.
            DataError: an example has no `scores`, naming its index and query.
        """
        self._check_given_scores()
        batcher = copy.copy(self)
        batcher.given_scores = True
        return batcher

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches in one pass over the examples (the remainder is dropped)."""
        return len(self._examples) // self.global_batch_size

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The example order of one epoch; the latest one is kept since steps come in order."""
        if self._permutation is None or self._permutation[0] != epoch:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self._examples))
            self._permutation = (epoch, order)
        return self._permutation[1]

    def _task_block(self, block: int) -> np.ndarray:
        """The tasks of steps [block * _TASK_BLOCK, (block + 1) * _TASK_BLOCK)."""
        rng = np.random.default_rng([self.seed, block, _TASK_STREAM])
        return rng.choice(len(self.task_names), size=_TASK_BLOCK, p=self.task_rates)

    def step_task(self, step: int) -> int:
        """The task (index into `task_names`) of the global batch of `step` (task_homogeneous)."""
        block, position = divmod(int(step), _TASK_BLOCK)
        return int(self._task_block(block)[position])

    def _task_batches_before(self, step: int, task: int) -> int:
        """How many global batches of `task` come before `step`."""
        block, position = divmod(int(step), _TASK_BLOCK)
        count = 0
        for earlier in range(block):
            if earlier not in self._block_counts:
                self._block_counts[earlier] = np.bincount(
                    self._task_block(earlier), minlength=len(self.task_names)
                )
            count += int(self._block_counts[earlier][task])
        return count + int(np.sum(self._task_block(block)[:position] == task))

    def _homogeneous_indices(self, step: int) -> np.ndarray:
        task = self.step_task(step)
        members = self._task_members[task]
        steps_per_epoch = len(members) // self.global_batch_size
        epoch, position = divmod(self._task_batches_before(step, task), steps_per_epoch)
        order = np.random.default_rng([self.seed, task, epoch, _TASK_STREAM]).permutation(len(members))
        start = position * self.global_batch_size
        return members[order[start : start + self.global_batch_size]]

    def global_indices(self, step: int) -> np.ndarray:
        """Indices into `examples` of the global batch of `step`.

        Args:
            step: the training step, >= 0.

        Returns:
            int array [global_batch_size].
        """
        if not isinstance(step, int | np.integer) or step < 0:
            raise ConfigError(f"step must be a non-negative integer, got {step!r}")
        if self.task_homogeneous:
            return self._homogeneous_indices(int(step))
        epoch, position = divmod(int(step), self.steps_per_epoch)
        start = position * self.global_batch_size
        return self._epoch_order(epoch)[start : start + self.global_batch_size]

    def _ids(self, text: str, cache: dict[str, np.ndarray], max_length: int) -> np.ndarray:
        ids = cache.get(text)
        if ids is None:
            ids = np.asarray(self._tokenizer.encode(text, max_length=max_length), dtype=np.int32)
            cache[text] = ids
        return ids

    def _fill(self, texts: Sequence[str], cache: dict[str, np.ndarray], length: int) -> np.ndarray:
        """Token ids of `texts`, right-padded to `length`: int32 [len(texts), length]."""
        rows = np.full((len(texts), length), self._tokenizer.pad_id, dtype=np.int32)
        for row, text in enumerate(texts):
            ids = self._ids(text, cache, length)
            rows[row, : len(ids)] = ids
        return rows

    def _duplicate_ids(
        self, texts: Sequence[str], cache: dict[str, np.ndarray], ids: dict[str, int], max_length: int
    ) -> np.ndarray:
        """`duplicate_id` of each text's truncated token ids: int32 [len(texts)]."""
        out = np.empty(len(texts), dtype=np.int32)
        for row, text in enumerate(texts):
            value = ids.get(text)
            if value is None:
                value = ids[text] = duplicate_id(self._ids(text, cache, max_length))
            out[row] = value
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's share of the global batch number `step`.

        Args:
            step: the training step, >= 0; any step can be asked for in any order.

        Returns:
            With `local = global_batch_size // process_count`:
            `query_tokens` int32 [local, query_len], `positive_tokens` int32
            [local, doc_len], `negative_tokens` int32 [local, num_negatives, doc_len]
            (only if num_negatives > 0), `query_ids` and `positive_ids` int32 [local]
            (`duplicate_id` of the truncated tokens: inputs the model cannot tell
            apart share an id so the loss can mask them), with negatives
            `negative_valid` int32 [local, num_negatives] (1 for a present
            negative, 0 for a padding row) and `negative_ids` int32 [local,
            num_negatives] (`duplicate_id`, as `positive_ids`; -1 for a padding row),
            `weights` float32 [local] (all 1); with `given_scores`, `scores` float32
            [local, 1 + num_negatives]: the example's scores of its positive, then of
            its first num_negatives negatives; a padding row's score is 0 and
            `negative_valid` marks it missing (the loss masks it, nothing is filled in).
        """
        indices = self.global_indices(step)
        start = self.process_index * self.local_batch_size
        local = [self._examples[i] for i in indices[start : start + self.local_batch_size]]
        queries = [example.query for example in local]
        positives = [example.positive for example in local]
        features = {
            "query_tokens": self._fill(queries, self._query_cache, self.query_len),
            "positive_tokens": self._fill(positives, self._doc_cache, self.doc_len),
        }
        if self.num_negatives:
            k = self.num_negatives
            tokens = np.full((self.local_batch_size, k, self.doc_len), self._tokenizer.pad_id, np.int32)
            valid = np.zeros((self.local_batch_size, k), np.int32)
            ids = np.full((self.local_batch_size, k), -1, np.int32)
            for row, example in enumerate(local):
                texts = example.negatives[:k]
                if texts:
                    tokens[row, : len(texts)] = self._fill(texts, self._doc_cache, self.doc_len)
                    ids[row, : len(texts)] = self._duplicate_ids(
                        texts, self._doc_cache, self._doc_id_cache, self.doc_len
                    )
                    valid[row, : len(texts)] = 1
            features["negative_tokens"] = tokens
            features["negative_valid"] = valid
            features["negative_ids"] = ids
            if self.given_scores:
                scores = np.zeros((self.local_batch_size, 1 + k), np.float32)
                for row, example in enumerate(local):
                    given = example.scores[: 1 + min(k, len(example.negatives))]
                    scores[row, : len(given)] = given
                features["scores"] = scores
        features["query_ids"] = self._duplicate_ids(
            queries, self._query_cache, self._query_id_cache, self.query_len
        )
        features["positive_ids"] = self._duplicate_ids(
            positives, self._doc_cache, self._doc_id_cache, self.doc_len
        )
        features["weights"] = np.ones(self.local_batch_size, dtype=np.float32)
        return features
