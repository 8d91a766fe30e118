"""`train()`: the gin-configured training loop behind `embedder train`.

Start (or resume from the latest checkpoint in `model_dir`), then per step: this
process's share of the global batch -> a global jax.Array -> `train_step`. What
happens beside the steps is a list of periodic actions (`PeriodicAction`, as
T5X's actions and levanter's hooks): evaluate, log, save and stop on SIGTERM, each
with its period. The host reads the step metrics back from the device only at a
step where an action is due, so it never waits on the steps in between.

* log: metrics (with throughput and MFU) to TensorBoard, metrics.jsonl and a
  progress bar, every `log_every` steps and at the end.
* evaluate (`TrainEvalConfig`): the current parameters on the eval tasks, encoded
  with the model's prompts as `inference.Embedder` encodes (on every process, over
  the whole mesh); the scalars go to the same metrics files.
* save: every `CheckpointConfig.save_every` steps, at the end, at an evaluated
  step when `CheckpointConfig.best_metric` ranks checkpoints (the manager keeps
  the best), and when any process got SIGTERM (a TPU preemption), after which the
  loop exits cleanly. Each checkpoint holds a `checkpointing.CheckpointMeta`.

The batch of step s is a pure function of (seed, s) (see `data.batching`), so
the data position is the step itself: a resumed run continues with exactly the
examples the interrupted one would have seen next.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from embedder import checkpointing, evaluation, fileio, losses, partitioning, portable, summaries, trainer
from embedder.data import bucketing, pipeline, tokenizers
from embedder.data import packing as packing_lib
from embedder.data import prompts as prompts_lib
from embedder.errors import CheckpointError, ConfigError, NonFiniteLossError
from embedder.models import spec as spec_lib

# Frozen dataclasses, so sharing one default instance is safe.
_DEFAULT_LOSS = losses.ContrastiveLossConfig()
_DEFAULT_OPTIMIZER = trainer.OptimizerConfig()
_DEFAULT_MESH = partitioning.MeshConfig()
_DEFAULT_CHECKPOINT = checkpointing.CheckpointConfig()
_DEFAULT_EVAL = evaluation.EvalConfig()


@dataclasses.dataclass(frozen=True)
class TrainEvalConfig:
    """Evaluation during training.

    Attributes:
      every: evaluate every this many steps and at the end (0 = never).
      tasks: built-in task names (e.g. "stdlib_code_search_validation"), BEIR
        folders or JSONL files (see `data.eval_tasks`).
      config: batch size, metric cut-offs and Matryoshka sizes of the evaluation
        (sizes default to the loss's Matryoshka dims).
    """

    every: int = 0
    tasks: Sequence[str] = ()
    config: evaluation.EvalConfig = _DEFAULT_EVAL

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks or ()))
        if self.every < 0:
            raise ConfigError(f"TrainEvalConfig.every={self.every} must be >= 0")


_NO_EVAL = TrainEvalConfig()


@dataclasses.dataclass
class TrainResult:
    """What `train()` returns: where the run ended and what it saw."""

    step: int
    checkpoint_dir: str | None
    losses: list[float]
    preempted: str | None = None  # the signal that stopped the run ("SIGTERM", "SIGINT")
    eval_metrics: dict[str, float] | None = None  # the last evaluation's scalars
    already_complete: bool = False  # the model dir held the last step already
    resumed_from: int | None = None  # the step restored at start


class _PreemptionFlag:
    """Set by SIGTERM (a preemption) or SIGINT (Ctrl-C); the loop checks it between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.raised = False
        self.name: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. some test runners): no handler
                pass
        return self

    def _handle(self, signum, frame):
        self.raised = True
        self.name = self.name or signal.Signals(signum).name

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


@dataclasses.dataclass
class _Loop:
    """What the periodic actions see and change at a step where one is due."""

    step: int
    end: int
    state: Any
    metrics: dict | None = None  # the step's metrics, read back
    evaluated: dict[str, float] | None = None  # this step's eval scalars
    eval_scalars: dict[str, float] | None = None  # the last evaluation's
    preempted: bool = False
    signal: str = "SIGTERM"  # what stopped it, when preempted
    due: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class PeriodicAction:
    """Something the loop does every `every` steps and at the last step.

    Attributes:
      name: what it is ("eval", "log", "save", "preemption").
      every: its period in steps (0: only when `also` says so).
      run: does it, given the loop's state.
      also: other steps it is due at (e.g. a save on SIGTERM), given the loop's
        state and the names of the actions due by their period.
      at_end: also due at the last step.
    """

    name: str
    every: int
    run: Callable[[_Loop], None]
    also: Callable[[_Loop, set[str]], bool] = lambda loop, due: False
    at_end: bool = True

    def periodic(self, step: int, end: int) -> bool:
        return bool(self.every) and (step % self.every == 0 or (self.at_end and step == end))


def _due(actions: Sequence[PeriodicAction], loop: _Loop) -> frozenset[str]:
    """The names of the actions due at the loop's step, in their order."""
    due = {a.name for a in actions if a.periodic(loop.step, loop.end)}
    return frozenset(due | {a.name for a in actions if a.also(loop, due)})


class _Throughput:
    """Pairs, tokens and FLOPs per second since the last log, evaluation time excluded.

    Tokens and FLOPs count what the step computes (padding included, at the
    lengths and rows the batch was cut or packed to); token utilisation is the
    share of those tokens that are real, for queries and for documents.
    """

    def __init__(
        self, model: spec_lib.ModelSpec, data: pipeline.DataConfig, cached: bool, peak: float | None
    ):
        self.model, self.data, self.cached, self.peak = model, data, cached, peak
        self.pad_id = model.module.config.pad_id
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.flops, self.tokens = time.time(), 0, 0.0, 0
        self.real = {"query": 0, "document": 0}
        self.computed = {"query": 0, "document": 0}

    def add(self, batch: dict) -> None:
        """Counts a step at the shapes its (local) batch has, times the processes."""
        processes = jax.process_count()
        q, d = batch["query_tokens"].shape[-1], batch["positive_tokens"].shape[-1]
        query_tokens = batch["query_tokens"].size * processes
        doc_tokens = (
            sum(batch[k].size for k in ("positive_tokens", "negative_tokens") if k in batch) * processes
        )
        self.flops += summaries.train_flops(
            self.model.module.config, query_tokens, q, doc_tokens, d, self.cached
        )
        self.tokens += query_tokens + doc_tokens
        self.steps += 1
        utilisation = packing_lib.token_utilisation(batch, self.pad_id)
        for side, computed in (("query", query_tokens), ("document", doc_tokens)):
            self.computed[side] += computed
            self.real[side] += utilisation[f"token_utilisation/{side}"] * computed

    def scalars(self) -> dict[str, float]:
        elapsed = time.time() - self.start
        out = {
            "pairs_per_sec": self.data.batch_size * self.steps / elapsed,
            "tokens_per_sec": self.tokens / elapsed,
        }
        for side in ("query", "document"):
            if self.computed[side]:
                out[f"token_utilisation/{side}"] = self.real[side] / self.computed[side]
        if self.peak:
            mfu = self.flops / elapsed / (self.peak * jax.device_count())
            # Above 1 the peak (or the FLOP count) is wrong: flagged under its own name.
            out["mfu" if mfu <= summaries.MAX_PLAUSIBLE_MFU else "mfu_implausible"] = mfu
        return out


def _make_packer(
    packing_on: bool,
    model: spec_lib.ModelSpec,
    mesh: jax.sharding.Mesh,
    batch_size: int,
    grad_cache_chunk: int,
) -> packing_lib.Packer | None:
    """This process's packer: one group a data-parallel device and gradient-cache chunk (None: off)."""
    if not packing_on:
        return None
    groups = partitioning.data_parallel_size(mesh)
    if grad_cache_chunk:
        groups *= batch_size // grad_cache_chunk
    if groups % jax.process_count():
        raise ConfigError(
            f"{groups} packing groups (data-parallel devices x gradient cache chunks) cannot be split over "
            f"{jax.process_count()} processes"
        )
    return packing_lib.Packer(model.module.config.pad_id, groups // jax.process_count())


def train(
    *,
    model_dir: str,
    model: spec_lib.ModelSpec,
    data: pipeline.DataConfig,
    train_steps: int,
    loss: losses.ContrastiveLossConfig = _DEFAULT_LOSS,
    optimizer: trainer.OptimizerConfig = _DEFAULT_OPTIMIZER,
    mesh: partitioning.MeshConfig = _DEFAULT_MESH,
    checkpoint: checkpointing.CheckpointConfig = _DEFAULT_CHECKPOINT,
    evaluate: TrainEvalConfig = _NO_EVAL,
    grad_cache_chunk: int = 0,
    nonfinite: str = "raise",
    seed: int = 0,
    log_every: int = 10,
    peak_flops_per_device: float | None = None,
    stop_at_step: int | None = None,
    allow_changed_run: bool = False,
    init_from_checkpoint: str | None = None,
    teacher: str | None = None,
    teacher_loss: losses.TeacherLossConfig | None = None,
    quantization_aware: trainer.QuantizationAwareConfig | None = None,
    packing: bool = False,
) -> TrainResult:
    """Trains a dual encoder on pairs.

    Args:
      model_dir: where checkpoints, metrics, TensorBoard events and the gin config go.
      model: the ModelSpec (gin: %MODEL from a gin/models file), prompts included.
      data: what to read and how to batch it.
      train_steps: total optimizer steps.
      loss: the contrastive loss (temperature, Matryoshka dims, masks, ...).
      optimizer: AdamW and its schedule.
      mesh: mesh axis sizes.
      checkpoint: save interval, retention and the best-checkpoint metric.
      evaluate: evaluation during training (period, tasks, settings).
      grad_cache_chunk: global examples per gradient-cache chunk (0 = off).
      nonfinite: "raise" stops at a NaN/inf loss; "skip" drops that update.
      seed: seeds initialisation and dropout (the data order: `data.seed`).
      log_every: write metrics every this many steps.
      peak_flops_per_device: for the MFU estimate; by default looked up (TPU,
        GPU) or measured (CPU).
      stop_at_step: stop early at this step (the schedule still spans
        train_steps), e.g. to train in stages.
      allow_changed_run: resume a checkpoint whose run fingerprint (data, batch,
        seed, schedule, loss, tokenizer) differs from this run's; the changes are
        recorded in the metadata. Without it such a resume is refused.
      init_from_checkpoint: a model dir, checkpoints folder or step folder of an
        earlier run (gin: %INIT_FROM_CHECKPOINT): its whole dual encoder starts
        this run, with a fresh optimizer, schedule and step. Read only when
        `model_dir` has no checkpoint of its own (a resume restores its latest).
      teacher: the frozen teacher to distil from (gin: %TEACHER): anything
        `inference.Embedder.from_pretrained` loads (a checkpoint, a bundle, a
        sentence-transformers folder, "all-MiniLM-L6-v2"). It encodes the batch's
        token ids, so it must use the student's tokenizer and prompts.
      teacher_loss: the teacher terms and their weights, added to the contrastive
        loss (needs `teacher`, except the given-scores term alone: it reads the
        JSONL lines' `scores`, which every training line must then have).
      quantization_aware: quantisation-aware training, e.g. in a last fine-tuning
        stage (gin: `train_loop.train.quantization_aware =
        @trainer.QuantizationAwareConfig()` with `trainer.QuantizationAwareConfig.bits = 8`):
        the forward pass runs on fake-quantised kernels; checkpoints keep the
        float weights (evaluation during training reads those).
      packing: pack each side's texts into fixed-length rows with segment ids
        (gin: %PACKING, on in the run files): no padding is computed, the loss
        sees the same embeddings (`data.packing`). With LENGTH_BUCKETS the rows
        are also cut to the bucket holding the batch's longest text.

    Returns:
      A TrainResult (`already_complete` when the model dir holds the last step).

    Raises:
      CheckpointError: another process trains this model dir; the checkpoint is
        of another architecture or (without allow_changed_run) another run.
    """
    _check_int("train_steps", train_steps, 1)
    _check_int("log_every", log_every, 1)
    if stop_at_step is not None:
        _check_int("stop_at_step", stop_at_step, 1)
    checkpointing.check_writable(model_dir)
    lock = checkpointing.ModelDirLock(model_dir).acquire()
    try:
        return _train(
            model_dir=model_dir,
            model=model,
            data=data,
            train_steps=train_steps,
            loss=loss,
            optimizer=optimizer,
            mesh=mesh,
            checkpoint=checkpoint,
            evaluate=evaluate,
            grad_cache_chunk=grad_cache_chunk,
            nonfinite=nonfinite,
            seed=seed,
            log_every=log_every,
            peak_flops_per_device=peak_flops_per_device,
            stop_at_step=stop_at_step,
            allow_changed_run=allow_changed_run,
            init_from_checkpoint=init_from_checkpoint,
            teacher=teacher,
            teacher_loss=teacher_loss,
            quantization_aware=quantization_aware,
            packing=packing,
        )
    finally:
        lock.release()


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name}={value!r} must be an integer")
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")


def _train(
    *,
    model_dir: str,
    model: spec_lib.ModelSpec,
    data: pipeline.DataConfig,
    train_steps: int,
    loss: losses.ContrastiveLossConfig,
    optimizer: trainer.OptimizerConfig,
    mesh: partitioning.MeshConfig,
    checkpoint: checkpointing.CheckpointConfig,
    evaluate: TrainEvalConfig,
    grad_cache_chunk: int,
    nonfinite: str,
    seed: int,
    log_every: int,
    peak_flops_per_device: float | None,
    stop_at_step: int | None,
    allow_changed_run: bool,
    init_from_checkpoint: str | None,
    teacher: str | None,
    teacher_loss: losses.TeacherLossConfig | None,
    quantization_aware: trainer.QuantizationAwareConfig | None,
    packing: bool,
) -> TrainResult:
    """`train` with the model dir's lock held."""
    _check_int("CheckpointConfig.save_every (SAVE_EVERY)", checkpoint.save_every, 1)
    device_mesh = partitioning.make_mesh(mesh)
    frozen = _load_teacher(teacher, model, data) if teacher else None
    runner = trainer.Trainer(
        model,
        loss,
        optimizer,
        device_mesh,
        train_steps,
        grad_cache_chunk=grad_cache_chunk,
        nonfinite=nonfinite,
        teacher=frozen.module if frozen else None,
        teacher_loss=teacher_loss,
        quantization_aware=quantization_aware,
    )
    runner.check_batch(data.batch_size)
    teacher_params = runner.place_teacher_params(frozen.params) if runner.teacher is not None else None
    source = _make_source(model, data)
    if runner.teacher_loss is not None and runner.teacher_loss.needs_scores:
        source = _with_given_scores(source, data)
    buckets = bucketing.LengthBuckets(
        data.length_buckets, data.query_len, data.doc_len, model.module.config.pad_id
    )
    packer = _make_packer(packing, model, device_mesh, data.batch_size, grad_cache_chunk)
    combine = None
    if jax.process_count() > 1:
        combine = lambda needed: multihost_utils.process_allgather(needed).max(axis=0)  # noqa: E731

    def prepare(local: dict) -> dict:
        """A source's batch cut to its buckets, then packed."""
        local = buckets(local, combine)
        return packer(local, combine) if packer is not None else local

    # With one process the batch is prepared in the prefetch thread; with several,
    # the shape all-gathers run in the main thread, in the same order on every process.
    produce = source.batch if combine is not None else (lambda step: prepare(source.batch(step)))
    finish = prepare if combine is not None else (lambda local: local)
    evaluator = _make_evaluator(evaluate, checkpoint, model, device_mesh, loss, data)
    meta = portable.bundle_tokenizer(model_dir, run_meta(model, data, train_steps, loss, optimizer, seed))
    # The prompts know the JSONL examples' tasks (a seqio task's texts live in its preprocessors).
    meta = dataclasses.replace(
        meta, prompts=prompts_lib.with_tasks(meta.prompts, getattr(source, "tasks", ()))
    )
    ckpt = checkpointing.Checkpointer(model_dir, checkpoint)
    say = (lambda line: print(line, file=sys.stderr)) if jax.process_index() == 0 else (lambda line: None)
    restored = ckpt.restore_latest_intact(runner.abstract_state(), meta, report=say)
    end = min(train_steps, stop_at_step or train_steps)
    if restored is None:
        start = 0
        if init_from_checkpoint:
            state, origin = runner.init_state_from_checkpoint(init_from_checkpoint, seed)
            meta = dataclasses.replace(meta, origin=origin)
        else:
            state = runner.init_state(seed)
    else:
        start, state, saved_meta, _ = restored
        meta = _resumed_meta(meta, saved_meta, allow_changed_run, _step_path(ckpt)(start))
        if start >= end:
            ckpt.close()
            say(
                f"the run in {model_dir} is complete: step {start} of {train_steps} ({_step_path(ckpt)(start)})"
            )
            return TrainResult(start, _step_path(ckpt)(start), [], already_complete=True, resumed_from=start)
        say(f"resuming from step {start} ({_step_path(ckpt)(start)})")
    if jax.process_index() == 0:
        _write_gin_config(model_dir)
        # Rows logged past the restored step were written by steps that are now redone.
        summaries.drop_metrics_after(model_dir, start)
    loop = _Loop(step=start, end=end, state=state)
    writer = summaries.MetricsWriter(
        model_dir, loop.end, start, enabled=jax.process_index() == 0, purge=restored is not None
    )
    if peak_flops_per_device:
        peak = (peak_flops_per_device, "train_loop.train.peak_flops_per_device")
    else:
        peak = summaries.peak_and_source()
    if peak:
        writer.note("mfu_peak", f"MFU peak: {peak[0] / 1e12:.3g} TFLOP/s a device ({peak[1]})")
    throughput = _Throughput(model, data, bool(grad_cache_chunk), peak[0] if peak else None)
    history: list[float] = []
    saved = [start] if start else []
    actions = _actions(evaluate, evaluator, checkpoint, log_every, writer, throughput, ckpt, meta, saved)
    # (step, metrics still on the device), read back only when an action is due.
    pending: list[tuple[int, Any]] = []
    # The next step's batch is built in a background thread while this step runs
    # (sources are pure functions of the step, so the order of calls is all that matters).
    prefetch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    upcoming = prefetch.submit(produce, loop.step) if loop.step < loop.end else None
    try:
        with _PreemptionFlag() as preemption:
            while loop.step < loop.end:
                local = finish(upcoming.result())
                if loop.step + 1 < loop.end:
                    upcoming = prefetch.submit(produce, loop.step + 1)
                loop.state, metrics = runner.train_step(
                    loop.state, partitioning.global_batch(device_mesh, local), teacher_params
                )
                pending.append((loop.step, metrics))
                loop.step += 1
                throughput.add(local)
                writer.advance(loop.step)
                loop.preempted = _any_process(preemption.raised)
                if loop.preempted:
                    loop.signal = preemption.name or "SIGTERM"
                loop.due = _due(actions, loop)
                if not loop.due:
                    continue  # nothing needs the device's results yet: dispatch the next step
                # Every pending step's metrics in one transfer; a non-finite one stops
                # the run before anything of it is saved.
                loop.metrics = _read_back(pending, nonfinite, history, ckpt, saved, _step_path(ckpt))
                pending, loop.evaluated = [], None
                for action in actions:
                    if action.name in loop.due:
                        action.run(loop)
                if loop.preempted:
                    break
        ckpt.wait()
    except OSError as e:
        # Metrics or events could not be written (disk full, read-only): every
        # checkpoint that completed is intact and the run resumes from it.
        raise CheckpointError(
            f"cannot write under model dir {model_dir} (complete checkpoints, intact: {ckpt.all_steps()}): {e}"
        ) from e
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        writer.close()
    ckpt.close()
    last = _step_path(ckpt)(saved[-1]) if saved else None
    return TrainResult(
        loop.step,
        last,
        history,
        loop.signal if loop.preempted else None,
        loop.eval_scalars,
        resumed_from=start or None,
    )


def _resumed_meta(
    meta: checkpointing.CheckpointMeta,
    saved: checkpointing.CheckpointMeta,
    allow_changed_run: bool,
    step_dir: str,
) -> checkpointing.CheckpointMeta:
    """This run's meta for a resume of `saved`: refused if the run changed, unless allowed (then recorded).

    Raises:
      CheckpointError: naming every difference and the flag that allows it.
    """
    meta = dataclasses.replace(meta, origin=saved.origin)  # the weights started where the run started
    if meta.run is None:
        return meta
    changes = checkpointing.run_changes(saved.run, meta.run)
    recorded = tuple(saved.run.allowed_changes) if saved.run else ()
    if changes and not allow_changed_run:
        raise CheckpointError(
            f"{step_dir} was trained by another run: {'; '.join(changes)}. A resumed run must see the "
            "data, batch, seed and schedule it started with; use a new --model_dir, or pass "
            "--allow_changed_run (gin: train_loop.train.allow_changed_run = True) to continue anyway"
        )
    return dataclasses.replace(
        meta, run=dataclasses.replace(meta.run, allowed_changes=recorded + tuple(changes))
    )


def _step_path(ckpt: checkpointing.Checkpointer) -> Callable[[int], str]:
    return lambda step: os.path.join(ckpt.directory, str(step))


def _make_source(model: spec_lib.ModelSpec, data: pipeline.DataConfig) -> Any:
    """This process's training data, its texts written in the model's prompts."""
    if data.batch_size % jax.process_count():
        raise ConfigError(
            f"global batch {data.batch_size} is not divisible by the {jax.process_count()} processes"
        )
    if model.vocab_dir is None:
        raise ConfigError(
            "the model spec has no vocab_dir: set the TOKENIZER_DIR macro (--gin.TOKENIZER_DIR=...) "
            "to the tokenizer's folder"
        )
    pad_id = tokenizers.load_tokenizer(model.vocab_dir).pad_id
    if pad_id != model.module.config.pad_id:
        raise ConfigError(
            f"{model.vocab_dir}: the tokenizer pads with id {pad_id} but TransformerConfig.pad_id is "
            f"{model.module.config.pad_id}; set transformer.TransformerConfig.pad_id = {pad_id}"
        )
    return data.make_source(model.vocab_dir, model.prompts, jax.process_index(), jax.process_count())


def _with_given_scores(source: Any, data: pipeline.DataConfig) -> Any:
    """The JSONL source emitting each example's `scores` (the given-scores term is on).

    Raises:
      ConfigError: the data is a seqio task or mixture (its examples have no
        `scores` feature), or NUM_NEGATIVES is 0.
      DataError: a training line has no `scores`, naming the file and line.
    """
    from embedder.data import batching, jsonl

    if not isinstance(source, batching.PairBatcher):
        raise ConfigError(
            "TeacherLossConfig.given_scores_weight > 0 trains on the 'scores' of JSONL lines, but the data is "
            f"the seqio task or mixture {data.mixture_or_task_name!r}, which has no scores: give TRAIN_FILES "
            "with a 'scores' list on every line, or set GIVEN_SCORES_WEIGHT = 0"
        )
    jsonl.require_scores(data.train_files)
    return source.with_given_scores()


# Texts that tell two tokenizers apart when their vocabularies differ (code, accents, CJK, emoji).
_VOCABULARY_PROBES = (
    "Return the number of items in a container.",
    "def __init__(self, *args, **kwargs): return {'key': [1, 2.5e-3]}",
    'Ünïcödé façade — naïve café, 東京, 🙂 <tag attr="x">',
)


def _load_teacher(name: str, model: spec_lib.ModelSpec, data: pipeline.DataConfig) -> Any:
    """The frozen teacher `name` (an `inference.Embedder`), checked against the student.

    The teacher encodes the student's token ids and prompted texts, so its
    tokenizer (the same ids for the same text) and prompts must be the student's,
    and its positions must cover the batch's lengths.

    Raises:
      ConfigError: naming both tokenizers' folders, both prompt settings or the lengths.
    """
    from embedder import inference

    try:
        loaded = inference.Embedder.from_pretrained(name)
    except FileNotFoundError as e:
        raise ConfigError(f"TEACHER={name!r}: {e}") from e
    student = tokenizers.load_tokenizer(model.vocab_dir)
    teacher_vocab = getattr(loaded.tokenizer, "source", None) or name

    def signature(tokenizer: Any) -> tuple:
        return (
            tokenizer.vocab_size,
            tokenizer.pad_id,
            *(tuple(tokenizer.encode(t)) for t in _VOCABULARY_PROBES),
        )

    if signature(student) != signature(loaded.tokenizer):
        raise ConfigError(
            f"TEACHER={name!r}: its tokenizer ({teacher_vocab}, {loaded.tokenizer.vocab_size} ids) differs from "
            f"the student's ({model.vocab_dir}, {student.vocab_size} ids); the teacher encodes the student's "
            "token ids, so distil from a teacher with the student's vocabulary"
        )
    if loaded.prompts != model.prompts:
        raise ConfigError(
            f"TEACHER={name!r}: its prompts {loaded.prompts} differ from the student's {model.prompts}; "
            "the teacher encodes the student's prompted texts"
        )
    config = loaded.module.config
    if config.family == "bert" and max(data.query_len, data.doc_len) > config.max_len:
        raise ConfigError(
            f"TEACHER={name!r} has {config.max_len} positions, fewer than the batch's QUERY_LEN="
            f"{data.query_len} / DOC_LEN={data.doc_len}"
        )
    return loaded


def run_meta(
    model: spec_lib.ModelSpec,
    data: pipeline.DataConfig,
    train_steps: int,
    loss: losses.ContrastiveLossConfig,
    optimizer: trainer.OptimizerConfig,
    seed: int,
) -> checkpointing.CheckpointMeta:
    """The metadata of a training run's checkpoints (without the step).

    Args:
      model: the model spec (description, tokenizer, prompts, initial weights).
      data: the data config.
      train_steps: the schedule's length.
      loss: the loss settings.
      optimizer: the optimizer and schedule settings.
      seed: the initialisation seed.

    Returns:
      A CheckpointMeta with `step` None.
    """
    if model.init_from:
        origin = checkpointing.WeightsOrigin("pretrained", seed=seed, path=fileio.absolute(model.init_from))
    else:
        origin = checkpointing.WeightsOrigin("random", seed=seed)
    fingerprint = checkpointing.RunFingerprint(
        seed=data.seed,
        batch_size=data.batch_size,
        files=tuple(fileio.absolute(f) for f in data.train_files),
        mixture_or_task_name=data.mixture_or_task_name,
        task_homogeneous=data.task_homogeneous,
        num_negatives=data.num_negatives,
        query_len=data.query_len,
        doc_len=data.doc_len,
        train_steps=train_steps,
        optimizer=dataclasses.asdict(optimizer),
        loss=dataclasses.asdict(loss),
        tokenizer=checkpointing.tokenizer_digest(model.vocab_dir),
    )
    meta = checkpointing.CheckpointMeta(
        model_config=spec_lib.describe_module(model.module),
        vocab_dir=model.vocab_dir,
        prompts=model.prompts,
        origin=origin,
        run=fingerprint,
    )
    # As it reads back (tuples as lists), so a saved record compares equal to this one.
    return checkpointing.CheckpointMeta.from_json(meta.to_json(), "this run's meta")


def _actions(
    evaluate: TrainEvalConfig,
    evaluator: evaluation.TrainingEvaluator | None,
    checkpoint: checkpointing.CheckpointConfig,
    log_every: int,
    writer: summaries.MetricsWriter,
    throughput: _Throughput,
    ckpt: checkpointing.Checkpointer,
    meta: checkpointing.CheckpointMeta,
    saved: list[int],
) -> list[PeriodicAction]:
    """Evaluate, log, save and stop on SIGTERM, in the order they run at a step."""

    def run_eval(loop: _Loop) -> None:
        eval_start = time.time()
        loop.evaluated = loop.eval_scalars = _evaluate(evaluator, loop.state, loop.step, writer)
        throughput.start += time.time() - eval_start  # evaluation is not training throughput
        if "log" not in loop.due:
            writer.write(loop.step, loop.evaluated)

    def run_log(loop: _Loop) -> None:
        scalars = {k: float(v) for k, v in loop.metrics.items()}
        writer.write(loop.step, {**scalars, **throughput.scalars(), **(loop.evaluated or {})})
        throughput.reset()

    def run_save(loop: _Loop) -> None:
        # A NaN BEST_METRIC is refused there (DataError), before anything is saved.
        ckpt.save(loop.step, loop.state, dataclasses.replace(meta, step=loop.step), metrics=loop.evaluated)
        saved.append(loop.step)

    def run_preemption(loop: _Loop) -> None:
        writer.message(
            f"{loop.signal}: saved step {loop.step} to {_step_path(ckpt)(loop.step)}; exiting. "
            "Run the same command again to resume from it"
        )

    actions = [
        PeriodicAction("eval", evaluate.every if evaluator else 0, run_eval),
        PeriodicAction("log", log_every, run_log),
        # An evaluated step is saved when a metric picks the best checkpoint.
        PeriodicAction(
            "save",
            checkpoint.save_every,
            run_save,
            also=lambda loop, due: loop.preempted or ("eval" in due and bool(checkpoint.best_metric)),
        ),
        PeriodicAction("preemption", 0, run_preemption, also=lambda loop, due: loop.preempted),
    ]
    return actions


def _read_back(
    pending: list[tuple[int, Any]],
    nonfinite: str,
    history: list[float],
    ckpt: checkpointing.Checkpointer,
    saved: list[int],
    checkpoint_path: Any,
) -> dict:
    """Fetches the pending steps' metrics, appends their losses to `history`, returns the last.

    Raises:
      NonFiniteLossError: naming the first step whose loss or gradient norm is
        not finite (with nonfinite="raise") and the last checkpoint saved before it.
    """
    fetched = jax.device_get([metrics for _, metrics in pending])
    for (step, _), metrics in zip(pending, fetched, strict=True):
        if not bool(metrics["finite"]) and nonfinite == "raise":
            ckpt.wait()
            last_good = checkpoint_path(saved[-1]) if saved else "none (no checkpoint saved yet)"
            raise NonFiniteLossError(
                f"non-finite loss ({float(metrics['loss'])}) or gradient norm "
                f"({float(metrics['grad_norm'])}) at step {step}; last good checkpoint: {last_good}"
            )
        history.append(float(metrics["loss"]))
    return fetched[-1]


def _make_evaluator(
    evaluate: TrainEvalConfig,
    checkpoint: checkpointing.CheckpointConfig,
    model: spec_lib.ModelSpec,
    mesh: jax.sharding.Mesh,
    loss: losses.ContrastiveLossConfig,
    data: pipeline.DataConfig,
) -> evaluation.TrainingEvaluator | None:
    """The evaluator of a run that evaluates, checked before the first step; None otherwise."""
    if not evaluate.every:
        if checkpoint.best_metric:
            raise ConfigError(
                f"CheckpointConfig.best_metric={checkpoint.best_metric!r} needs an evaluation: "
                "set train_loop.TrainEvalConfig.every and tasks (EVAL_EVERY, EVAL_TASKS)"
            )
        return None
    evaluator = evaluation.TrainingEvaluator(
        evaluate.tasks,
        model.module,
        tokenizers.load_tokenizer(model.vocab_dir),
        mesh,
        evaluate.config,
        default_dims=loss.matryoshka_dims,
        max_length={"query": data.query_len, "document": data.doc_len},
        prompts=model.prompts,
    )
    names = evaluator.scalar_names()
    if checkpoint.best_metric and checkpoint.best_metric not in names:
        near = [n for n in names if n.count("/") <= 2]
        raise ConfigError(
            f"CheckpointConfig.best_metric={checkpoint.best_metric!r} is not an eval metric; one of {near}"
        )
    return evaluator


def _evaluate(
    evaluator: evaluation.TrainingEvaluator, state: Any, step: int, writer: Any
) -> dict[str, float]:
    """Evaluates the current parameters; one summary line on the console."""
    start = time.time()
    results, scalars = evaluator(state.params["model"])
    scalars["eval/seconds"] = time.time() - start
    shown = []
    for name, result in results.items():
        headline = evaluation.headline_metrics(result)[0]
        shown.append(f"{name} {headline}={result['metrics'][max(result['metrics'])][headline]:.4f}")
    writer.message(f"eval at step {step} ({scalars['eval/seconds']:.1f}s): " + ", ".join(shown))
    return scalars


def _write_gin_config(model_dir: str) -> None:
    """The full gin config of this run, next to its checkpoints (T5X writes the same)."""
    import gin

    text = gin.config_str()
    if text.strip():
        fileio.write_text_atomically(os.path.join(model_dir, "config.gin"), text)
