"""`train()`: the gin-configured training loop behind `embedder train`.

Start (or resume from the latest checkpoint in `model_dir`), then per step: this
process's share of the global batch -> a global jax.Array -> `train_step`. Metrics
go to TensorBoard, metrics.jsonl and a progress bar; checkpoints are saved every
N steps, at the end, and when the process gets SIGTERM (a TPU preemption), in
which case the loop saves the current step and exits cleanly. With `eval_every`,
the current parameters are evaluated on the eval tasks every N steps (on every
process, over the whole mesh); the scalars go to the same metrics files and, when
`CheckpointConfig.best_metric` names one of them, that step is saved with them so
the checkpoint manager keeps the best.

The batch of step s is a pure function of (seed, s) (see `data.batching`), so
the data position is the step itself: a resumed run continues with exactly the
examples the interrupted one would have seen next.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from embedder import checkpointing, evaluation, fileio, losses, partitioning, summaries, trainer
from embedder.data import bucketing, pipeline, wordpiece
from embedder.errors import NonFiniteLossError
from embedder.models import spec as spec_lib

# Frozen dataclasses, so sharing one default instance is safe.
_DEFAULT_LOSS = losses.ContrastiveLossConfig()
_DEFAULT_OPTIMIZER = trainer.OptimizerConfig()
_DEFAULT_MESH = partitioning.MeshConfig()
_DEFAULT_CHECKPOINT = checkpointing.CheckpointConfig()
_DEFAULT_EVAL = evaluation.EvalConfig()


@dataclasses.dataclass
class TrainResult:
    """What `train()` returns: where the run ended and what it saw."""

    step: int
    checkpoint_dir: str | None
    losses: list[float]
    preempted: bool = False
    eval_metrics: dict[str, float] | None = None  # the last evaluation's scalars


class _PreemptionFlag:
    """Set by SIGTERM; the loop checks it between steps."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners): no handler
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.raised = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


def train(
    *,
    model_dir: str,
    model: spec_lib.ModelSpec,
    train_files: Sequence[str] | None = None,
    mixture_or_task_name: str | None = None,
    task_homogeneous: bool = False,
    tfds_data_dir: str | None = None,
    batch_size: int,
    train_steps: int,
    query_len: int = 64,
    doc_len: int = 256,
    length_buckets: Sequence[int] = (),
    num_negatives: int = 0,
    loss: losses.ContrastiveLossConfig = _DEFAULT_LOSS,
    optimizer: trainer.OptimizerConfig = _DEFAULT_OPTIMIZER,
    mesh: partitioning.MeshConfig = _DEFAULT_MESH,
    checkpoint: checkpointing.CheckpointConfig = _DEFAULT_CHECKPOINT,
    grad_cache_chunk: int = 0,
    nonfinite: str = "raise",
    seed: int = 0,
    log_every: int = 10,
    peak_flops_per_device: float | None = None,
    stop_at_step: int | None = None,
    eval_every: int = 0,
    eval_tasks: Sequence[str] = (),
    eval_config: evaluation.EvalConfig = _DEFAULT_EVAL,
) -> TrainResult:
    """Trains a dual encoder on JSONL pairs.

    Args:
      model_dir: where checkpoints, metrics, TensorBoard events and the gin config go.
      model: the ModelSpec (gin: %MODEL from a gin/models file).
      train_files: JSONL files of {"query", "positive", "negatives"?, "task"?}; or
      mixture_or_task_name: a registered seqio task or mixture (e.g. the built-in
        "stdlib_code_search"); exactly one of the two.
      task_homogeneous: draw each global batch from one task of the mixture.
      tfds_data_dir: where TFDS datasets (the built-in stdlib task) are built.
      batch_size: global batch, in pairs.
      train_steps: total optimizer steps.
      query_len, doc_len: token lengths (queries and documents are padded/truncated).
      length_buckets: shorter lengths a batch may be cut to (e.g. [32, 64, 128]):
        each step pads queries and documents only to the smallest bucket that
        holds the longest text of its global batch (see `data.bucketing`); the
        step compiles once per shape that occurs. Empty: always the full lengths.
      num_negatives: hard negatives per query (0 = in-batch negatives only).
      loss: the contrastive loss (temperature, Matryoshka dims, masks, ...).
      optimizer: AdamW and its schedule.
      mesh: mesh axis sizes.
      checkpoint: save interval and retention.
      grad_cache_chunk: global examples per gradient-cache chunk (0 = off).
      nonfinite: "raise" stops at a NaN/inf loss; "skip" drops that update.
      seed: seeds initialisation, data order and dropout.
      log_every: write metrics every this many steps.
      peak_flops_per_device: for the MFU estimate; by default looked up (TPU,
        GPU) or measured (CPU).
      stop_at_step: stop early at this step (the schedule still spans
        train_steps), e.g. to train in stages.
      eval_every: evaluate every this many steps and at the end (0 = never).
      eval_tasks: built-in task names (e.g. "stdlib_code_search_validation"),
        BEIR folders or JSONL files (see `data.eval_tasks`).
      eval_config: batch size, metric cut-offs and Matryoshka sizes of the
        evaluation (sizes default to the loss's Matryoshka dims).

    Returns:
      A TrainResult.
    """
    if train_steps <= 0:
        raise ValueError(f"train_steps={train_steps} must be positive")
    checkpointing.check_writable(model_dir)
    is_main = jax.process_index() == 0
    device_mesh = partitioning.make_mesh(mesh)
    step_runner = trainer.Trainer(
        model,
        loss,
        optimizer,
        device_mesh,
        train_steps,
        grad_cache_chunk=grad_cache_chunk,
        nonfinite=nonfinite,
    )
    step_runner.check_batch(batch_size)
    if batch_size % jax.process_count():
        raise ValueError(f"global batch {batch_size} is not divisible by the {jax.process_count()} processes")

    if model.vocab_dir is None:
        raise ValueError("the model spec has no vocab_dir: no tokenizer for the training text")
    data = pipeline.make_train_source(
        global_batch_size=batch_size,
        query_len=query_len,
        doc_len=doc_len,
        vocab_dir=model.vocab_dir,
        train_files=list(train_files or []),
        mixture_or_task_name=mixture_or_task_name,
        num_negatives=num_negatives,
        seed=seed,
        task_homogeneous=task_homogeneous,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        tfds_data_dir=tfds_data_dir,
    )

    buckets = bucketing.LengthBuckets(length_buckets, query_len, doc_len, model.module.config.pad_id)
    combine = None
    if jax.process_count() > 1:
        combine = lambda needed: multihost_utils.process_allgather(needed).max(axis=0)  # noqa: E731

    evaluator = _make_evaluator(
        eval_every, eval_tasks, eval_config, checkpoint, model, device_mesh, loss, query_len, doc_len
    )
    meta = {
        "model_config": spec_lib.describe_module(model.module),
        "vocab_dir": model.vocab_dir,
        "data": {
            "seed": seed,
            "batch_size": batch_size,
            "files": [fileio.absolute(f) for f in train_files or []],
            "mixture_or_task_name": mixture_or_task_name,
        },
    }
    ckpt = checkpointing.Checkpointer(model_dir, checkpoint)
    start = ckpt.latest_step()
    if start is None:
        state = step_runner.init_state(seed)
        start = 0
    else:
        state, _ = ckpt.restore(start, step_runner.abstract_state(), meta)
    if is_main:
        _write_gin_config(model_dir)

    end = min(train_steps, stop_at_step or train_steps)
    writer = summaries.MetricsWriter(model_dir, end, start, enabled=is_main)
    peak = peak_flops_per_device or summaries.peak_flops_per_device()
    history: list[float] = []
    saved = [start] if start else []
    eval_scalars = None

    def checkpoint_path(step):
        return os.path.join(ckpt.directory, str(step))

    def step_cost(batch: dict) -> tuple[float, int]:
        """FLOPs and (padded) tokens of a step at the lengths its batch was cut to."""
        q, d = batch["query_tokens"].shape[-1], batch["positive_tokens"].shape[-1]
        flops = summaries.train_flops_per_step(
            model.module.config, batch_size, q, d, num_negatives, bool(grad_cache_chunk)
        )
        return flops, batch_size * (q + (1 + num_negatives) * d)

    window_start, window_steps, window_flops, window_tokens = time.time(), 0, 0.0, 0
    step, preempted = start, False
    # (step, metrics still on the device): the host reads them back only when it
    # needs them (log, eval, save), so it never waits on a step in between.
    pending: list[tuple[int, Any]] = []
    # The next step's batch is built in a background thread while this step runs
    # (sources are pure functions of the step, so the order of calls is all that matters).
    prefetch = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    upcoming = prefetch.submit(data.batch, step) if step < end else None
    try:
        with _PreemptionFlag() as preemption:
            while step < end:
                local = upcoming.result()
                if step + 1 < end:
                    upcoming = prefetch.submit(data.batch, step + 1)
                local = buckets(local, combine)
                batch = partitioning.global_batch(device_mesh, local)
                state, metrics = step_runner.train_step(state, batch)
                pending.append((step, metrics))
                step += 1
                window_steps += 1
                flops, tokens = step_cost(local)
                window_flops += flops
                window_tokens += tokens
                writer.advance(step)
                evaluate_now = evaluator is not None and (step % eval_every == 0 or step == end)
                log_now = step % log_every == 0 or step == end
                preempted = _any_process(preemption.raised)
                save_now = preempted or step % checkpoint.save_every == 0 or step == end
                if not (evaluate_now or log_now or save_now):
                    continue  # nothing needs the device's results yet: dispatch the next step
                # Read back every step's metrics since the last read in one transfer; a
                # non-finite one stops the run before anything of it is saved.
                metrics = _read_back(pending, nonfinite, history, ckpt, saved, checkpoint_path)
                pending = []
                evaluated = None
                if evaluate_now:
                    eval_start = time.time()
                    evaluated = _evaluate(evaluator, state, step, writer)
                    eval_scalars = evaluated
                    window_start += time.time() - eval_start  # evaluation is not training throughput
                if log_now:
                    elapsed = time.time() - window_start
                    scalars = {k: float(v) for k, v in metrics.items()}
                    scalars["pairs_per_sec"] = batch_size * window_steps / elapsed
                    scalars["tokens_per_sec"] = window_tokens / elapsed
                    if peak:
                        scalars["mfu"] = window_flops / elapsed / (peak * jax.device_count())
                    writer.write(step, {**scalars, **(evaluated or {})})
                    window_start, window_steps, window_flops, window_tokens = time.time(), 0, 0.0, 0
                elif evaluated:
                    writer.write(step, evaluated)
                # An evaluated step is saved when a metric picks the best checkpoint.
                if save_now or (evaluated and checkpoint.best_metric):
                    ckpt.save(step, state, {**meta, "step": step}, metrics=evaluated)
                    saved.append(step)
                if preempted:
                    writer.message(f"SIGTERM: saved step {step} to {checkpoint_path(step)}; exiting")
                    break
        ckpt.wait()
    except OSError as e:
        # Metrics or events could not be written (disk full, read-only): every
        # checkpoint that completed is intact and the run resumes from it.
        raise checkpointing.CheckpointError(
            f"cannot write under model dir {model_dir} (complete checkpoints, intact: {ckpt.all_steps()}): {e}"
        ) from e
    finally:
        prefetch.shutdown(wait=True, cancel_futures=True)
        writer.close()
    ckpt.close()
    last = os.path.join(ckpt.directory, str(saved[-1])) if saved else None
    return TrainResult(
        step=step, checkpoint_dir=last, losses=history, preempted=preempted, eval_metrics=eval_scalars
    )


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
    eval_every: int,
    eval_tasks: Sequence[str],
    config: evaluation.EvalConfig,
    checkpoint: checkpointing.CheckpointConfig,
    model: spec_lib.ModelSpec,
    mesh: jax.sharding.Mesh,
    loss: losses.ContrastiveLossConfig,
    query_len: int,
    doc_len: int,
) -> evaluation.TrainingEvaluator | None:
    """The evaluator of a run that evaluates, checked before the first step; None otherwise."""
    if eval_every < 0:
        raise ValueError(f"eval_every={eval_every} must be >= 0")
    if not eval_every:
        if checkpoint.best_metric:
            raise ValueError(
                f"CheckpointConfig.best_metric={checkpoint.best_metric!r} needs an evaluation: "
                "set train_loop.train.eval_every and eval_tasks (EVAL_EVERY, EVAL_TASKS)"
            )
        return None
    evaluator = evaluation.TrainingEvaluator(
        eval_tasks,
        model.module,
        wordpiece.WordPieceTokenizer.from_pretrained_dir(model.vocab_dir),
        mesh,
        config,
        default_dims=loss.matryoshka_dims,
        max_length={"query": query_len, "document": doc_len},
    )
    names = evaluator.scalar_names()
    if checkpoint.best_metric and checkpoint.best_metric not in names:
        near = [n for n in names if n.count("/") <= 2]
        raise ValueError(
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


def read_metrics(model_dir: str) -> list[dict[str, Any]]:
    """The logged metrics of a run (metrics.jsonl), one dict per logged step."""
    path = os.path.join(model_dir, "metrics.jsonl")
    with fileio.open_file(path) as f:
        return [json.loads(line) for line in f.read().splitlines() if line.strip()]
