"""Per-process numpy batches from a registered seqio task or mixture, resumable by step.

`SeqioPairSource` looks like `batching.PairBatcher` to the training loop:
`batch(step)` is this process's share of global batch `step`, and the batches are
a pure function of (seed, step), so the data position is the step.

How a global batch is made:

* Which task each row comes from is drawn from the mixture rates with numpy
  generators seeded by (seed, step): per row (mixed batches), or once per step
  for the whole global batch (`task_homogeneous`, as Gemini Embedding fine-tunes:
  every process agrees on the step's task without talking to the others, and the
  rates hold across batches).
* Each process reads only its own shard of each task (`seqio.ShardInfo(index,
  count)`) and takes its rows in order from an endless stream of that shard:
  epoch e is `task.get_dataset(shuffle=True, seed=f(seed, task, e))`, run through
  `PairFeatureConverter`. How far each stream has advanced at step s is a count
  of the rows drawn for that task on this process before s, so `batch(s)` for any
  s rebuilds the streams at that point (opening the epoch and skipping into it)
  and continues exactly where an uninterrupted run would be.
* Rows with fewer hard negatives than `num_negatives` keep padding rows that
  `negative_valid` marks missing; the loss leaves them out (never filled with
  other rows' positives, which can be the query's own positive).

Resuming costs one pass over the skipped part of each task's current epoch on
each process (tokenisation included); a first `batch(s)` with s > 0 also counts
each shard once.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from embedder.data import batching
from embedder.data import prompts as prompts_lib
from embedder.errors import ConfigError, DataError

if TYPE_CHECKING:  # seqio and TensorFlow load only for a seqio task: a JSONL run never imports them.
    import seqio
    import tensorflow as tf

    from embedder.data import feature_converters

# Streams of the numpy generators, so their draws are unrelated to each other.
_TASK_STREAM = 0x7461736B
_EPOCH_STREAM = 0x65706F
_DROP_STREAM = 0x64726F70
# Homogeneous task choices are drawn for this many steps at once.
_CHOICE_BLOCK = 1024
# Converted examples pulled from tf.data per read: iteration overhead is per element.
_READ_CHUNK = 64
# Chunks each task's stream prepares ahead, so a task that is not being read (one
# task a batch) keeps tokenising in the background.
_PREFETCH_CHUNKS = 8

# Keys of the per-example features and how they are stacked into a batch.
_TOKEN_KEYS = ("query_tokens", "positive_tokens", "negative_tokens")


@dataclasses.dataclass(frozen=True)
class _TaskInfo:
    task: seqio.Task
    rate: float


def _tasks_and_rates(name: str) -> list[_TaskInfo]:
    """The tasks of a registered task or mixture and their normalised rates (rate > 0 only)."""
    import seqio

    provider = seqio.get_mixture_or_task(name)
    if isinstance(provider, seqio.Mixture):
        pairs = [(task, float(provider.get_rate(task))) for task in provider.tasks]
    else:
        pairs = [(provider, 1.0)]
    pairs = [(task, rate) for task, rate in pairs if rate > 0]
    if not pairs:
        raise ConfigError(f"{name!r} has no task with a positive rate")
    total = sum(rate for _, rate in pairs)
    return [_TaskInfo(task, rate / total) for task, rate in sorted(pairs, key=lambda p: p[0].name)]


def _stable_hash(text: str) -> int:
    """A hash of a name that is the same in every process and run (str hash() is salted)."""
    return zlib.crc32(text.encode("utf-8"))


class _TaskStream:
    """One task's examples on this process, epoch after epoch, converted to fixed shapes."""

    def __init__(
        self,
        task: seqio.Task,
        *,
        split: str,
        sequence_length: Mapping[str, int],
        converter: feature_converters.PairFeatureConverter,
        converter_lengths: Mapping[str, int],
        seed: int,
        shard_info: seqio.ShardInfo | None,
    ):
        self.task = task
        self._split = split
        self._sequence_length = dict(sequence_length)
        self._converter = converter
        self._converter_lengths = dict(converter_lengths)
        self._seed = seed
        self._shard_info = shard_info
        self._epoch_size: int | None = None
        self.epoch = 0
        self._iterator = None
        self._buffer: dict[str, np.ndarray] | None = None
        self._buffer_rows = 0
        self._buffer_used = 0
        self._read_in_epoch = 0

    def _epoch_seed(self, epoch: int) -> int:
        rng = np.random.default_rng([self._seed, _stable_hash(self.task.name), epoch, _EPOCH_STREAM])
        return int(rng.integers(2**31 - 1))

    def _dataset(self, epoch: int, shuffle: bool = True) -> tf.data.Dataset:
        ds = self.task.get_dataset(
            sequence_length=self._sequence_length,
            split=self._split,
            shuffle=shuffle,
            seed=self._epoch_seed(epoch),
            shard_info=self._shard_info,
            num_epochs=1,
            trim_output_features=False,
            try_in_mem_cache=False,
        )
        return self._converter(ds, self._converter_lengths)

    @property
    def epoch_size(self) -> int:
        """Examples in one epoch of this process's shard (counted once, without tokenising)."""
        if self._epoch_size is None:
            source = self.task.source
            shard = self._shard_info
            if (
                shard is None
                or source.supports_arbitrary_sharding
                or len(source.list_shards(self._split)) >= shard.num_shards
            ):
                ds = source.get_dataset(split=self._split, shuffle=False, shard_info=shard)
            else:
                ds = source.get_dataset(split=self._split, shuffle=False).shard(shard.num_shards, shard.index)
            self._epoch_size = int(ds.reduce(np.int64(0), lambda count, _: count + 1))
            if not self._epoch_size:
                raise DataError(self._empty_message())
        return self._epoch_size

    def _empty_message(self) -> str:
        shard = self._shard_info
        where = f" shard {shard.index} of {shard.num_shards}" if shard else ""
        return (
            f"task {self.task.name!r} split {self._split!r}{where} has no examples; "
            "use fewer processes or give the task more data"
        )

    def seek(self, consumed: int) -> None:
        """Positions the stream after `consumed` examples (counted from the first epoch)."""
        if consumed == 0:
            epoch, offset = 0, 0
        else:
            epoch, offset = divmod(consumed, self.epoch_size)
        self._open(epoch, offset)

    def _open(self, epoch: int, offset: int) -> None:
        import tensorflow as tf

        self.epoch = epoch
        ds = self._dataset(epoch)
        if offset:
            ds = ds.skip(offset)
        options = tf.data.Options()
        # The default graph rewrites cost more per new iterator (one an epoch) than they save here.
        options.experimental_optimization.apply_default_optimizations = False
        self._iterator = (
            ds.batch(_READ_CHUNK).prefetch(_PREFETCH_CHUNKS).with_options(options).as_numpy_iterator()
        )
        self._buffer = None
        self._buffer_rows = self._buffer_used = 0
        self._read_in_epoch = offset

    def take(self, count: int) -> list[dict[str, np.ndarray]]:
        """The next `count` examples, crossing into the next epoch when one ends."""
        if self._iterator is None:
            self._open(0, 0)
        parts = []
        while count:
            if self._buffer_used == self._buffer_rows:
                try:
                    self._buffer = next(self._iterator)
                except StopIteration:
                    if self._read_in_epoch == 0:
                        raise DataError(self._empty_message()) from None
                    if self._epoch_size is not None and self._read_in_epoch != self._epoch_size:
                        raise DataError(
                            f"task {self.task.name!r}: an epoch gave {self._read_in_epoch} examples but its "
                            f"source has {self._epoch_size}; pair tasks must map one source example to one "
                            "example (no filtering), or resuming would misplace the stream"
                        ) from None
                    self._epoch_size = self._read_in_epoch
                    self._open(self.epoch + 1, 0)
                    continue
                self._buffer_rows = len(self._buffer["query_tokens"])
                self._buffer_used = 0
                self._read_in_epoch += self._buffer_rows
            rows = min(count, self._buffer_rows - self._buffer_used)
            start = self._buffer_used
            parts.append({k: v[start : start + rows] for k, v in self._buffer.items()})
            self._buffer_used += rows
            count -= rows
        return parts


class SeqioPairSource:
    """Batches of a registered pair task or mixture for contrastive training.

    Args:
        mixture_or_task_name: a registered seqio task or mixture of pair tasks
            (see `tasks`).
        global_batch_size: examples per step over all processes.
        query_len: token length of query rows (specials included).
        doc_len: token length of positive and negative rows.
        num_negatives: hard negatives per example (0: in-batch negatives only).
        seed: non-negative seed of the task draws, the epoch orders and the fill.
        split: the split to read.
        task_homogeneous: every global batch from one task (drawn by the rates);
            otherwise each row draws its task.
        process_index: this process's index, in [0, process_count).
        process_count: processes sharing each global batch; each reads its own shard.

    Raises:
        ValueError: for sizes that cannot give full batches, or an unknown name.
    """

    def __init__(
        self,
        mixture_or_task_name: str,
        *,
        global_batch_size: int,
        query_len: int,
        doc_len: int,
        num_negatives: int = 0,
        seed: int = 0,
        split: str = "train",
        task_homogeneous: bool = False,
        process_index: int = 0,
        process_count: int = 1,
    ):
        import seqio

        from embedder.data import feature_converters

        batching.check_batch_split(global_batch_size, num_negatives, seed, process_index, process_count)
        self.name = mixture_or_task_name
        self._tasks = _tasks_and_rates(mixture_or_task_name)
        self.task_names = [info.task.name for info in self._tasks]
        self.rates = np.array([info.rate for info in self._tasks])
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // process_count
        self.query_len = query_len
        self.doc_len = doc_len
        self.num_negatives = num_negatives
        self.seed = seed
        self.split = split
        self.task_homogeneous = task_homogeneous
        self.process_index = process_index
        self.process_count = process_count

        vocabulary = self._tasks[0].task.output_features["positive"].vocabulary
        for info in self._tasks[1:]:
            other = info.task.output_features["positive"].vocabulary
            if other != vocabulary:
                raise ConfigError(
                    f"{mixture_or_task_name!r}: task {info.task.name!r} uses {other}, but "
                    f"{self._tasks[0].task.name!r} uses {vocabulary}; a batch needs one vocabulary"
                )
        self.vocabulary = vocabulary
        self.pad_id = int(vocabulary.pad_id)
        converter = feature_converters.PairFeatureConverter(num_negatives, self.pad_id)
        sequence_length = {"query": query_len, "positive": doc_len, "negatives": doc_len}
        converter_lengths = {"query": query_len, "positive": doc_len}
        if num_negatives:
            converter_lengths["negatives"] = doc_len
        shard_info = seqio.ShardInfo(process_index, process_count) if process_count > 1 else None
        self._streams = [
            _TaskStream(
                info.task,
                split=split,
                sequence_length=sequence_length,
                converter=converter,
                converter_lengths=converter_lengths,
                seed=seed,
                shard_info=shard_info,
            )
            for info in self._tasks
        ]
        self._next_step = 0
        self._choice_cache: dict[int, np.ndarray] = {}

    # ------------------------------------------------------------ task draws

    def _homogeneous_block(self, block: int) -> np.ndarray:
        choices = self._choice_cache.get(block)
        if choices is None:
            rng = np.random.default_rng([self.seed, block, _TASK_STREAM])
            choices = rng.choice(len(self.rates), size=_CHOICE_BLOCK, p=self.rates)
            self._choice_cache = {block: choices}
        return choices

    def step_tasks(self, step: int) -> np.ndarray:
        """The task index (into `task_names`) of every row of the global batch of `step`.

        Args:
            step: the training step, >= 0.

        Returns:
            int array [global_batch_size]; all equal when `task_homogeneous`.
        """
        if self.task_homogeneous:
            task = self._homogeneous_block(step // _CHOICE_BLOCK)[step % _CHOICE_BLOCK]
            return np.full(self.global_batch_size, task)
        rng = np.random.default_rng([self.seed, step, _TASK_STREAM])
        return rng.choice(len(self.rates), size=self.global_batch_size, p=self.rates)

    def _local_rows(self) -> slice:
        start = self.process_index * self.local_batch_size
        return slice(start, start + self.local_batch_size)

    def _consumed_before(self, step: int) -> np.ndarray:
        """Examples of each task this process has taken in steps [0, step)."""
        counts = np.zeros(len(self.rates), dtype=np.int64)
        if self.task_homogeneous:
            for block in range(step // _CHOICE_BLOCK + 1):
                choices = self._homogeneous_block(block)[: max(0, step - block * _CHOICE_BLOCK)]
                counts += np.bincount(choices, minlength=len(counts)) * self.local_batch_size
        else:
            rows = self._local_rows()
            for earlier in range(step):
                counts += np.bincount(self.step_tasks(earlier)[rows], minlength=len(counts))
        return counts

    # ------------------------------------------------------------ position

    def get_state(self) -> dict[str, Any]:
        """The position, JSON-serialisable: the next step to be read."""
        return {"step": self._next_step}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from a position saved by `get_state` (e.g. from checkpoint meta)."""
        self._seek(int(state["step"]))

    def _seek(self, step: int) -> None:
        for stream, consumed in zip(self._streams, self._consumed_before(step), strict=True):
            stream.seek(int(consumed))
        self._next_step = step

    # ------------------------------------------------------------ batches

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's share of global batch `step`.

        Steps in order are read straight from the streams; any other step first
        moves the streams there (see the module docstring).

        Args:
            step: the training step, >= 0.

        Returns:
            With `local = global_batch_size // process_count`: `query_tokens` int32
            [local, query_len], `positive_tokens` int32 [local, doc_len],
            `negative_tokens` int32 [local, num_negatives, doc_len] (if
            num_negatives > 0), their masks `query_mask`, `positive_mask`,
            `negative_mask` (int32, 1 on real tokens), `query_ids` and
            `positive_ids` int32 [local] (equal token rows share an id), with
            negatives `negative_valid` int32 [local, num_negatives] (0 for a
            missing negative's padding row) and `negative_ids` int32 [local,
            num_negatives] (as `positive_ids`; -1 for a missing one),
            `weights` float32 [local] (all 1) and `task_ids` int32 [local] (index
            into `task_names`).
        """
        if not isinstance(step, int | np.integer) or step < 0:
            raise ConfigError(f"step must be a non-negative integer, got {step!r}")
        step = int(step)
        if step != self._next_step:
            self._seek(step)
        tasks = self.step_tasks(step)[self._local_rows()]
        # Each task's rows come from its stream in row order.
        per_task = {t: self._streams[t].take(int(np.sum(tasks == t))) for t in np.unique(tasks)}
        stacked = {}
        for t, parts in per_task.items():
            stacked[t] = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        features: dict[str, np.ndarray] = {}
        for key in stacked[tasks[0]]:
            first = stacked[tasks[0]][key]
            out = np.empty((len(tasks), *first.shape[1:]), dtype=first.dtype)
            for t, arrays in stacked.items():
                out[tasks == t] = arrays[key]
            features[key] = out
        if self.num_negatives:
            features["negative_ids"] = _negative_ids(features)
        features["weights"] = np.ones(len(tasks), dtype=np.float32)
        features["task_ids"] = tasks.astype(np.int32)
        self._next_step = step + 1
        return features

    @property
    def tasks(self) -> Sequence[seqio.Task]:
        """The tasks, in the order of `task_names` and `rates`."""
        return [info.task for info in self._tasks]


def _negative_ids(features: Mapping[str, np.ndarray]) -> np.ndarray:
    """`batching.duplicate_id` of each present negative row (its real tokens); -1 for a missing one."""
    tokens, mask, valid = features["negative_tokens"], features["negative_mask"], features["negative_valid"]
    ids = np.full(valid.shape, -1, np.int32)
    for row, k in zip(*np.nonzero(valid), strict=True):
        ids[row, k] = batching.duplicate_id(tokens[row, k][mask[row, k].astype(bool)])
    return ids


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What a training run reads and how it batches it (as T5X's `DatasetConfig`).

    Attributes:
      train_files: JSONL files of {"query", "positive", "negatives"?, "task"?}; or
      mixture_or_task_name: a registered seqio task or mixture (e.g. the built-in
        "stdlib_code_search"); exactly one of the two.
      task_homogeneous: draw each global batch from one task of the mixture.
      tfds_data_dir: where TFDS datasets (the built-in stdlib task) are built.
      batch_size: global batch, in pairs.
      query_len, doc_len: token lengths (queries and documents are padded/truncated).
      length_buckets: shorter lengths a batch may be cut to (e.g. [32, 64, 128]):
        each step pads queries and documents only to the smallest bucket that
        holds the longest text of its global batch (see `data.bucketing`).
        Empty: always the full lengths.
      num_negatives: hard negatives per query (0 = in-batch negatives only).
      seed: the data order's seed (and task dropout's).
    """

    train_files: Sequence[str] = ()
    mixture_or_task_name: str | None = None
    task_homogeneous: bool = False
    tfds_data_dir: str | None = None
    batch_size: int = 128
    query_len: int = 64
    doc_len: int = 256
    length_buckets: Sequence[int] = ()
    num_negatives: int = 0
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "train_files", tuple(self.train_files or ()))
        object.__setattr__(self, "length_buckets", tuple(self.length_buckets or ()))

    def make_source(
        self,
        vocab_dir: str,
        prompts: prompts_lib.PromptConfig | None = None,
        process_index: int = 0,
        process_count: int = 1,
    ):
        """This process's training data (see `make_train_source`)."""
        return make_train_source(
            global_batch_size=self.batch_size,
            query_len=self.query_len,
            doc_len=self.doc_len,
            vocab_dir=vocab_dir,
            train_files=list(self.train_files),
            mixture_or_task_name=self.mixture_or_task_name,
            num_negatives=self.num_negatives,
            seed=self.seed,
            task_homogeneous=self.task_homogeneous,
            process_index=process_index,
            process_count=process_count,
            tfds_data_dir=self.tfds_data_dir,
            prompts=prompts,
        )


def with_prompts(examples: Sequence[Any], config: prompts_lib.PromptConfig, seed: int = 0) -> list[Any]:
    """JSONL examples written in the prompt templates, as the seqio tasks write theirs.

    A query carries its example's `task` (else `config.default_task`); the
    positive its example's `title` (else `config.empty_title`), hard negatives
    the empty title. With `config.task_dropout`, each example's query loses its
    task with that probability, drawn once per example from (seed, index), so
    the batches stay a pure function of (seed, step).

    Args:
        examples: `jsonl.Example`s.
        config: the templates; disabled: the examples as they are.
        seed: the data seed.

    Returns:
        The examples with prompted texts.
    """
    if not config.enabled:
        return list(examples)
    drops = np.zeros(len(examples), bool)
    if config.task_dropout:
        drops = np.random.default_rng([seed, _DROP_STREAM]).random(len(examples)) < config.task_dropout
    return [
        dataclasses.replace(
            example,
            query=prompts_lib.format_query(example.query, example.task, config, drop_task=bool(drop)),
            positive=prompts_lib.format_document(example.positive, example.title, config),
            negatives=tuple(prompts_lib.format_document(n, None, config) for n in example.negatives),
        )
        for example, drop in zip(examples, drops, strict=True)
    ]


def make_train_source(
    *,
    global_batch_size: int,
    query_len: int,
    doc_len: int,
    vocab_dir: str,
    train_files: Sequence[str] | None = None,
    mixture_or_task_name: str | None = None,
    num_negatives: int = 0,
    seed: int = 0,
    task_homogeneous: bool = False,
    process_index: int = 0,
    process_count: int = 1,
    tfds_data_dir: str | None = None,
    prompts: prompts_lib.PromptConfig | None = None,
):
    """The training loop's data: JSONL files (`PairBatcher`) or a seqio task / mixture.

    Both answer `batch(step)` with this process's numpy share of the global batch,
    a pure function of (seed, step).

    Args:
        global_batch_size, query_len, doc_len, num_negatives, seed, process_index,
            process_count: as in `SeqioPairSource`.
        vocab_dir: the model's vocabulary folder; a seqio task must use the same vocabulary.
        train_files: JSONL files (exclusive with `mixture_or_task_name`).
        mixture_or_task_name: a registered task or mixture; the built-in stdlib
            tasks are registered for `vocab_dir` if the name is one of them.
        task_homogeneous: one task per global batch (the JSONL `task` field, or
            the mixture's tasks).
        tfds_data_dir: TFDS data folder for the built-in tasks.
        prompts: the model's prompt templates (None: none). They are applied to
            JSONL files (`with_prompts`) and to the built-in tasks, registered
            with them; any other registered task writes its texts with the
            preprocessors it was registered with.

    Returns:
        A `batching.PairBatcher` or a `SeqioPairSource`.

    Raises:
        ValueError: if both or neither source is given, or the vocabularies differ.
    """
    from embedder.data import batching, jsonl, tokenizers

    if bool(train_files) == bool(mixture_or_task_name):
        raise ConfigError(
            "give exactly one of TRAIN_FILES (JSONL paths) and MIXTURE_OR_TASK_NAME (a registered seqio "
            f"task or mixture); got train_files={train_files!r}, mixture_or_task_name={mixture_or_task_name!r}"
        )
    prompts = prompts or prompts_lib.PromptConfig()
    if train_files:
        return batching.PairBatcher(
            with_prompts(jsonl.read_jsonl_files(list(train_files)), prompts, seed),
            tokenizers.load_tokenizer(vocab_dir),
            global_batch_size=global_batch_size,
            query_len=query_len,
            doc_len=doc_len,
            num_negatives=num_negatives,
            seed=seed,
            task_homogeneous=task_homogeneous,
            process_index=process_index,
            process_count=process_count,
        )
    from embedder.data import tasks, vocabularies

    if mixture_or_task_name in (tasks.STDLIB_TASK, tasks.STDLIB_MASKED_TASK, tasks.STDLIB_MIXTURE):
        tasks.register_defaults(vocab_dir, tfds_data_dir, prompts)
    source = SeqioPairSource(
        mixture_or_task_name,
        global_batch_size=global_batch_size,
        query_len=query_len,
        doc_len=doc_len,
        num_negatives=num_negatives,
        seed=seed,
        task_homogeneous=task_homogeneous,
        process_index=process_index,
        process_count=process_count,
    )
    expected = vocabularies.for_folder(vocab_dir)
    if source.vocabulary != expected:
        raise ConfigError(
            f"{mixture_or_task_name!r} tokenises with {source.vocabulary}, but the model's vocabulary is "
            f"{expected}; register the task with the model's vocabulary"
        )
    return source
