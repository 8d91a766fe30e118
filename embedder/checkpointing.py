"""Checkpoints through orbax's CheckpointManager: save, resume, restore onto another mesh.

Layout: `MODEL_DIR/checkpoints/<step>/{state,meta,checksums.json}`; MODEL_DIR may
be local or gs:// (see `fileio`). `state` is the TrainState
(arrays, written by every process for its own shards); `meta` is JSON: a `CheckpointMeta`
(the model description, to refuse a checkpoint of another architecture with a
clear message; tokenizer, prompts, where the weights started, the run's data and
schedule). Orbax writes each step under a
temporary name and renames it when complete (in an object store: writes
`commit_success.txt` last), so a run killed mid-save never leaves a checkpoint
that a restart would load.

That commit marks a step complete. Orbax keeps no checksums, and a byte flipped
inside an array file afterwards restores silently wrong values; so once a step
is committed, process 0 adds `checksums.json` (`fileio.write_checksums`: the
size and sha256 of every file of the step), off the training thread, and
`step_problem` verifies it before any restore. A committed step without one
(written before checksums existed, or by a run killed between the commit and
the manifest) is still a checkpoint, checked as before: by its meta, orbax's
tree metadata and the restore itself.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from embedder import fileio, portable
from embedder.data import prompts as prompts_lib
from embedder.errors import CheckpointError, DataError


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """When to save and what to keep.

    Attributes:
      save_every: save every this many steps (and at the end of training).
      keep: keep the latest this many checkpoints ...
      keep_best: ... plus this many best by `best_metric` (0: none).
      best_metric: the eval metric that ranks checkpoints (e.g. "eval/ndcg@10").
      best_mode: "max" or "min".
      async_save: write in a background thread while training goes on.
    """

    save_every: int = 1000
    keep: int = 3
    keep_best: int = 1
    best_metric: str | None = None
    best_mode: str = "max"
    async_save: bool = True

    def __post_init__(self):
        if self.best_mode not in ("max", "min"):
            raise CheckpointError(f"CheckpointConfig.best_mode={self.best_mode!r}: expected 'max' or 'min'")


# ---------------------------------------------------------------- the checkpoint's metadata
#
# Every checkpoint step holds `meta/metadata`: one JSON object, the `CheckpointMeta`
# below. Training and soup write it; `read_meta` is the one reader (inference,
# export, soup, resume). Checkpoints written before the record had a version are
# plain dicts (model_config, vocab_dir, data, step, prompts?, soup?) and still read.

META_VERSION = 2
# The file in which orbax lists a saved pytree's leaves (written before its commit file).
ORBAX_TREE_METADATA = "_METADATA"
# Every step's manifest of its files' sizes and sha256 (written after orbax's commit).
CHECKSUMS_FILE = "checksums.json"
ORIGIN_KINDS = ("random", "pretrained", "checkpoint", "soup")


@dataclasses.dataclass(frozen=True)
class WeightsOrigin:
    """Where a checkpoint's weights started.

    Attributes:
      kind: "random" (initialised from `seed`), "pretrained" (a Hugging Face folder
        at `path`), "checkpoint" (the step folder `path` of an earlier run, at
        `step`) or "soup" (the average of the step folders `sources`).
      seed: the initialisation seed of a random start (the projection head of a
        pretrained start is random too, from this seed).
      path: the pretrained folder or the parent checkpoint's step folder.
      step: the parent checkpoint's step.
      sources: a soup's ingredients (step folders).
    """

    kind: str = "random"
    seed: int | None = None
    path: str | None = None
    step: int | None = None
    sources: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ORIGIN_KINDS:
            raise CheckpointError(f"WeightsOrigin.kind={self.kind!r}: expected one of {ORIGIN_KINDS}")
        object.__setattr__(self, "sources", tuple(self.sources))


@dataclasses.dataclass(frozen=True)
class RunFingerprint:
    """The data and schedule a training run was configured with (None: not recorded).

    Attributes:
      seed: seed of initialisation, data order and dropout.
      batch_size: the global batch, in pairs.
      files: the JSONL training files (absolute paths), or
      mixture_or_task_name: the seqio task or mixture.
      task_homogeneous: one task per global batch.
      num_negatives: hard negatives per query.
      query_len, doc_len: the token lengths.
      train_steps: the schedule's total steps.
      optimizer: `trainer.OptimizerConfig` as a dict (learning rate, warm-up, decay, ...).
      loss: `losses.ContrastiveLossConfig` as a dict (temperature, Matryoshka dims, ...).
      tokenizer: sha256 of the tokenizer's files (`tokenizer_digest`).
      allowed_changes: the fields a resume was allowed to change (--allow_changed_run),
        as "field: saved -> now", every resume's appended.
    """

    seed: int | None = None
    batch_size: int | None = None
    files: tuple[str, ...] = ()
    mixture_or_task_name: str | None = None
    task_homogeneous: bool | None = None
    num_negatives: int | None = None
    query_len: int | None = None
    doc_len: int | None = None
    train_steps: int | None = None
    optimizer: dict[str, Any] | None = None
    loss: dict[str, Any] | None = None
    tokenizer: str | None = None
    allowed_changes: tuple[str, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "files", tuple(self.files))
        object.__setattr__(self, "allowed_changes", tuple(self.allowed_changes))


# What a resume must keep: the batches of step s are a function of these, and the
# schedule and loss of the rest. `allowed_changes` is the record, not the run.
_RUN_FIELDS_COMPARED = (
    "tokenizer",
    "files",
    "mixture_or_task_name",
    "task_homogeneous",
    "batch_size",
    "seed",
    "num_negatives",
    "query_len",
    "doc_len",
    "train_steps",
    "optimizer",
    "loss",
)


def run_changes(saved: RunFingerprint | None, now: RunFingerprint) -> list[str]:
    """What differs between a checkpoint's run and this one, as "field: saved X, now Y".

    Fields the checkpoint did not record (None) are not compared.
    """
    if saved is None:
        return []
    changes = []
    for name in _RUN_FIELDS_COMPARED:
        before, after = getattr(saved, name), getattr(now, name)
        if before is None or before == after:
            continue
        if isinstance(before, dict) and isinstance(after, dict):
            changes += [
                f"{name}.{key}: saved {before.get(key)!r}, now {after.get(key)!r}"
                for key in sorted(set(before) | set(after))
                if before.get(key) != after.get(key)
            ]
        else:
            changes.append(f"{name}: saved {before!r}, now {after!r}")
    return changes


TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def tokenizer_digest(vocab_dir: str | None) -> str | None:
    """sha256 over the tokenizer files of a folder (names and contents), or None without one."""
    if vocab_dir is None:
        return None
    digest = hashlib.sha256()
    found = False
    for name in TOKENIZER_FILES:
        path = os.path.join(vocab_dir, name)
        if not fileio.exists(path):
            continue
        found = True
        digest.update(name.encode() + b"\0")
        with fileio.open_file(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest() if found else None


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint is, beside its arrays: written by training and soup, read by every consumer.

    Attributes:
      model_config: the module's description (`models.spec.describe_module`).
      vocab_dir: the tokenizer's folder (vocab.txt), or None.
      prompts: the prompt templates the model was trained with (disabled: raw text).
      origin: where the weights started.
      run: the data and schedule of the training run (None: not a training
        checkpoint, or written before it was recorded).
      step: the checkpoint's step.
      soup: a soup's record (method, metric, ingredients), or None.
    """

    model_config: dict[str, Any]
    vocab_dir: str | None = None
    prompts: prompts_lib.PromptConfig = prompts_lib.PromptConfig()
    origin: WeightsOrigin = WeightsOrigin()
    run: RunFingerprint | None = None
    step: int | None = None
    soup: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-able dict (what `meta/metadata` holds)."""
        record = dataclasses.asdict(self)
        record["version"] = META_VERSION
        # Tuples become lists, as they read back.
        return json.loads(json.dumps(record))

    @classmethod
    def from_json(cls, record: Mapping[str, Any], source: str = "checkpoint meta") -> CheckpointMeta:
        """The record of a `to_json` dict, or of an unversioned (older) checkpoint's dict.

        Args:
          record: the parsed JSON.
          source: the file it came from, for error messages.

        Raises:
          CheckpointError: an unknown or missing key, or a value that does not
            fit its field; the message names `source` and the key.
        """
        if not isinstance(record, Mapping):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(record).__name__}")
        if "version" not in record:
            return _from_legacy(record, source)
        record = dict(record)
        version = record.pop("version")
        if version != META_VERSION:
            raise CheckpointError(f"{source}: meta version {version!r}; this embedder reads {META_VERSION}")
        fields = _fields(cls, record, source, required=True)
        # Fields added later (tasks) are absent from older records.
        fields["prompts"] = _typed(
            prompts_lib.PromptConfig, fields["prompts"], f"{source}: prompts", required=False
        )
        fields["origin"] = _typed(WeightsOrigin, fields["origin"], f"{source}: origin", required=True)
        if fields["run"] is not None:
            # Fields added later (tokenizer, allowed_changes) are absent from older records.
            fields["run"] = _typed(RunFingerprint, fields["run"], f"{source}: run", required=False)
        return _build(cls, fields, source)


def _fields(cls: type, record: Mapping[str, Any], where: str, required: bool) -> dict[str, Any]:
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(record) - set(names))
    if unknown:
        raise CheckpointError(f"{where}: unknown key {unknown[0]!r} (known: {names})")
    missing = [n for n in names if n not in record]
    if required and missing:
        raise CheckpointError(f"{where}: missing key {missing[0]!r}")
    return dict(record)


def _build(cls: type, fields: dict[str, Any], where: str) -> Any:
    try:
        return cls(**fields)
    except (TypeError, ValueError, CheckpointError) as e:
        raise CheckpointError(f"{where}: {e}") from e


def _typed(cls: type, record: Any, where: str, required: bool) -> Any:
    if not isinstance(record, Mapping):
        raise CheckpointError(f"{where}: expected a JSON object, got {record!r}")
    return _build(cls, _fields(cls, record, where, required), where)


def _prompts(record: Any, source: str, required: bool) -> prompts_lib.PromptConfig:
    if record is None and not required:
        return prompts_lib.PromptConfig()
    return _typed(prompts_lib.PromptConfig, record, f"{source}: prompts", required)


_LEGACY_KEYS = ("model_config", "vocab_dir", "data", "step", "prompts", "soup")
_LEGACY_DATA_KEYS = ("seed", "batch_size", "files", "mixture_or_task_name")


def _from_legacy(record: Mapping[str, Any], source: str) -> CheckpointMeta:
    """An unversioned meta dict: {model_config, vocab_dir?, data?, step?, prompts?, soup?}."""
    unknown = sorted(set(record) - set(_LEGACY_KEYS))
    if unknown:
        raise CheckpointError(f"{source}: unknown key {unknown[0]!r} (known: {list(_LEGACY_KEYS)})")
    if "model_config" not in record:
        raise CheckpointError(f"{source}: missing key 'model_config'")
    run = None
    data = record.get("data")
    if data is not None:
        run = _typed(RunFingerprint, data, f"{source}: data", required=False)
    seed = run.seed if run else None
    return _build(
        CheckpointMeta,
        dict(
            model_config=record["model_config"],
            vocab_dir=record.get("vocab_dir"),
            prompts=_prompts(record.get("prompts"), source, required=False),
            origin=_legacy_origin(record.get("soup"), seed),
            run=run,
            step=record.get("step"),
            soup=record.get("soup"),
        ),
        source,
    )


def _legacy_origin(soup: Any, seed: int | None) -> WeightsOrigin:
    if not soup:
        return WeightsOrigin("random", seed=seed)
    ingredients = soup.get("ingredients") or [] if isinstance(soup, Mapping) else []
    return WeightsOrigin(
        "soup", sources=tuple(i.get("checkpoint") for i in ingredients if isinstance(i, Mapping))
    )


def best_metric_rank(metrics: Mapping[str, Any] | None, config: CheckpointConfig) -> float:
    """The value by which a saved step ranks for `config.best_metric` (orbax's BestN sorts by it).

    A step whose metric is missing or not finite (NaN, +-inf: an undefined
    evaluation, not a score) ranks as the worst possible, so it is never kept as
    the best; `Checkpointer.save` refuses to record one, and this covers steps
    recorded before that check.

    Args:
      metrics: the metrics saved with the step.
      config: `best_metric` names the metric; `best_mode` says whether higher ("max") is better.

    Returns:
      The metric, or -inf ("max") / +inf ("min") for a missing or non-finite one.
    """
    worst = -math.inf if config.best_mode == "max" else math.inf
    try:
        value = float((metrics or {})[config.best_metric])
    except (KeyError, TypeError, ValueError):
        return worst
    return value if math.isfinite(value) else worst


class Checkpointer:
    """Saves and restores (TrainState, meta) under `model_dir/checkpoints`.

    Every step saved gets its `checksums.json` once orbax has committed it: a
    background thread (process 0's) waits for the commit and hashes the step
    while training goes on; the next `save`, `wait` or `close` waits for it, so
    no step is hashed while orbax deletes it and the last step has its manifest
    before the run ends.
    """

    def __init__(self, model_dir: str, config: CheckpointConfig = CheckpointConfig()):
        self.directory = fileio.absolute(os.path.join(model_dir, "checkpoints"))
        self.config = config
        policies = [checkpoint_managers.LatestN(config.keep)]
        if config.best_metric and config.keep_best:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: best_metric_rank(metrics, config),
                    reverse=config.best_mode == "min",
                    n=config.keep_best,
                    # Steps saved without an evaluation are LatestN's to keep or drop;
                    # True would keep every one of them forever.
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=config.async_save,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            create=True,
            # A run killed mid-save leaves a temporary folder; remove it on restart.
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))
        # One step's checksums at a time, on process 0 only (after every host's commit).
        self._hasher = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checksums")
            if jax.process_index() == 0
            else None
        )
        self._hashing: concurrent.futures.Future | None = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: CheckpointMeta, metrics: dict | None = None) -> None:
        """Starts saving `state` at `step` (returns before an async write finishes).

        Raises:
          DataError: `metrics` lacks the `best_metric` or it is not finite (it
            cannot rank checkpoints); nothing is saved.
          CheckpointError: this or an earlier asynchronous write failed (disk
            full, folder gone read-only), or the checksums of the previous step
            could not be written; the message lists the complete checkpoints,
            which stay intact.
        """
        best = self.config.best_metric
        if best and metrics and not math.isfinite(best_metric_rank(metrics, self.config)):
            raise DataError(
                f"BEST_METRIC {best} is {metrics.get(best, 'missing')} at step {step}: it cannot rank "
                "checkpoints; choose a metric the eval tasks define"
            )
        # Orbax may delete an older step while it commits this one: never while it is hashed.
        self._wait_for_checksums()
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta.to_json())
                ),
                metrics=metrics,
                force=True,
            )
        except Exception as e:  # orbax re-raises background write errors in several types
            raise self._write_error(e) from e
        if self._hasher is not None:
            self._hashing = self._hasher.submit(self._write_checksums, step)

    def _write_checksums(self, step: int) -> None:
        """In the background: waits for orbax to commit `step`, then writes its checksums.json."""
        try:
            self.manager.wait_until_finished()
        except Exception:  # the save failed: the next save or wait reports it on the training thread
            return
        step_dir = os.path.join(self.directory, str(step))
        if not (fileio.isdir(step_dir) and fileio.checkpoint_finalized(step_dir)):
            return
        fileio.write_checksums(step_dir, CHECKSUMS_FILE)

    def _wait_for_checksums(self) -> None:
        if self._hashing is None:
            return
        hashing, self._hashing = self._hashing, None
        try:
            hashing.result()
        except Exception as e:
            raise self._write_error(e) from e

    def _write_error(self, error: Exception) -> CheckpointError:
        try:
            complete = self.all_steps()
        except Exception:  # the folder itself may be unreadable now
            complete = "unknown"
        return CheckpointError(
            f"writing a checkpoint under {self.directory} failed (complete checkpoints, intact: {complete}): {error}"
        )

    def read_meta(self, step: int) -> CheckpointMeta:
        """The metadata of one step (see `read_meta`)."""
        return read_meta(os.path.join(self.directory, str(step)))

    def restore(
        self, step: int, abstract_state: Any, meta: CheckpointMeta | None = None
    ) -> tuple[Any, CheckpointMeta]:
        """Restores onto the shardings of `abstract_state` (any mesh, any device count).

        Args:
          step: the checkpoint step.
          abstract_state: a tree of jax.ShapeDtypeStruct with `.sharding` set: the
            state as this run lays it out.
          meta: if given, the saved meta must agree on `model_config`.

        Raises:
          CheckpointError: the checkpoint is of another architecture.
        """
        saved_meta = self.read_meta(step)
        if meta is not None and saved_meta.model_config != meta.model_config:
            diff = _config_diff(saved_meta.model_config, meta.model_config)
            raise CheckpointError(
                f"{self.directory}/{step} holds a checkpoint of another architecture ({diff}); "
                "use a new --model_dir or the gin files that trained it"
            )
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            )
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{self.directory}/{step} does not fit this run's state: {e}") from e
        return restored["state"], saved_meta

    def restore_latest_intact(
        self, abstract_state: Any, meta: CheckpointMeta | None = None, report: Any = None
    ) -> tuple[int, Any, CheckpointMeta, list[str]] | None:
        """Restores the newest step that reads back whole; damaged ones are moved aside.

        A step that `step_problem` finds damaged (a meta that does not parse, a
        file that differs from its checksums.json) or whose arrays orbax cannot
        read (a truncated or missing file) is named, moved to `MODEL_DIR/damaged_checkpoints/<step>`
        (kept for inspection, never deleted; a later save may need its step number)
        and the next older step is tried.

        Args:
          abstract_state: as for `restore`.
          meta: as for `restore` (an architecture mismatch is an error, not damage).
          report: called with one line per damaged step (default: stderr).

        Returns:
          (step, state, saved meta, lines about damaged steps), or None without an intact step.
        """
        report = report or (lambda line: print(line, file=sys.stderr))
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            problem = step_problem(os.path.join(self.directory, str(step)))
            try:
                if problem is not None:
                    raise CheckpointError(problem)
                state, saved = self.restore(step, abstract_state, meta)
            except CheckpointError as e:
                if "another architecture" in str(e):
                    raise
                reason = e
            except Exception as e:  # orbax and TensorStore report a damaged file in many types
                reason = e
            else:
                return step, state, saved, damaged
            line = self._set_aside(step, reason)
            damaged.append(line)
            report(line)
        return None

    def _set_aside(self, step: int, reason: Exception) -> str:
        source = os.path.join(self.directory, str(step))
        folder = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
        target = os.path.join(folder, f"{step}-{int(time.time())}")
        first = str(reason).strip().splitlines()[0][:300] if str(reason).strip() else type(reason).__name__
        if jax.process_index() == 0:
            fileio.makedirs(folder)
            fileio.replace(source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        return f"checkpoint {source} is damaged ({first}); skipped, moved to {target}"

    def wait(self) -> None:
        """Blocks until any asynchronous save and its checksums are written (CheckpointError if one failed)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(e) from e
        self._wait_for_checksums()

    def close(self) -> None:
        """Waits for outstanding writes (the last step's checksums too) and closes the manager."""
        try:
            self._wait_for_checksums()
        finally:
            if self._hasher is not None:
                self._hasher.shutdown(wait=True)
            self.manager.close()


def check_writable(model_dir: str) -> None:
    """Fails fast, before any compile or step, when `model_dir` cannot be written.

    Raises:
      CheckpointError: naming the folder and the operating system's reason.
    """
    probe = os.path.join(model_dir, f".write-test-{os.getpid()}")
    try:
        fileio.makedirs(model_dir)
        with fileio.open_file(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            if not fileio.is_url(probe):
                os.fsync(f.fileno())
        fileio.remove(probe)
    except OSError as e:
        raise CheckpointError(f"model dir {model_dir} is not writable: {e.strerror or e}") from e


def _config_diff(saved: dict, current: dict) -> str:
    keys = sorted(set(saved) | set(current))
    diffs = [
        f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
    ]
    return "; ".join(diffs[:4]) or "configs differ"


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


# ---------------------------------------------------------------- model parameters only
#
# Eval, soup and export need the model's parameters and what architecture they
# belong to, not the optimizer state. These read them from a training checkpoint
# (partial restore of state/params/model) or from a params-only checkpoint that
# `save_model_params` writes (a soup), which has the same layout minus the rest.


def resolve_step_dir(path: str, step: int | None = None) -> str:
    """The folder of one checkpoint step.

    Args:
      path: a model dir (holding checkpoints/), its checkpoints/ folder, or a
        step folder (checkpoints/<step>).
      step: which step; None = the latest (ignored when `path` is a step folder).

    Raises:
      CheckpointError: no checkpoint there, or not that step (the message lists
        the steps that exist). A step that orbax has not finished writing is not
        a checkpoint.
    """
    path = fileio.absolute(path).rstrip("/")
    if fileio.isdir(os.path.join(path, "state")) and fileio.isdir(os.path.join(path, "meta")):
        if step is not None and os.path.basename(path) != str(step):
            raise CheckpointError(
                f"{path} is the checkpoint of step {os.path.basename(path)}, not step {step}"
            )
        if not fileio.checkpoint_finalized(path):
            raise CheckpointError(
                f"{path} is incomplete (no {fileio.COMMIT_SUCCESS_FILE}): a save was cut short"
            )
        return _intact(path)
    folder = os.path.join(path, "checkpoints") if fileio.isdir(os.path.join(path, "checkpoints")) else path
    steps = sorted(
        int(name)
        for name in fileio.listdir(folder)
        if name.isdigit()
        and fileio.isdir(os.path.join(folder, name, "state"))
        and fileio.checkpoint_finalized(os.path.join(folder, name))
    )
    if not steps:
        raise CheckpointError(f"{path}: no checkpoints found (expected {path}/checkpoints/<step>/)")
    if step is None:
        for candidate in reversed(steps):
            problem = step_problem(os.path.join(folder, str(candidate)))
            if problem is None:
                return os.path.join(folder, str(candidate))
            print(
                f"warning: checkpoint {folder}/{candidate} is damaged ({problem}); skipped", file=sys.stderr
            )
        raise CheckpointError(f"{path}: every checkpoint is damaged (steps {steps}); see the warnings above")
    if step not in steps:
        raise CheckpointError(f"{path}: there is no checkpoint of step {step}; steps saved: {steps}")
    return _intact(os.path.join(folder, str(step)))


def _intact(step_dir: str) -> str:
    """`step_dir` if `step_problem` finds nothing wrong with it (an explicitly chosen step is not skipped)."""
    problem = step_problem(step_dir)
    if problem is not None:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {problem}")
    return step_dir


def step_problem(step_dir: str) -> str | None:
    """Why a finalised step folder cannot be read, or None if it can: the check every consumer makes.

    Checked in order: its meta parses, orbax's tree metadata parses, and every
    file matches the step's checksums.json (size and sha256; a missing, cut
    short or changed file is named). A step without checksums.json (saved
    before checksums existed, or a run killed between orbax's commit, which
    marks the step complete, and the manifest) is accepted on the first two
    checks; a file missing or cut short there is still caught when the restore
    reads it (`load_model_params`, `Checkpointer.restore_latest_intact`), a
    flipped byte is not. Everything is read through `fileio`, so a step in an
    object store (gs://, any fsspec URL) is checked the same way as a local one;
    the checksums read the whole step.
    """
    try:
        read_meta(step_dir)
    except CheckpointError as e:
        return str(e)
    path = os.path.join(step_dir, "state", ORBAX_TREE_METADATA)
    try:
        with fileio.open_file(path, "rb") as f:
            tree = json.loads(f.read().decode("utf-8")).get("tree_metadata")
    except FileNotFoundError:
        return f"{path} is missing"
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        return f"{path} does not parse: {e}"
    if not tree:
        return f"{path} lists no arrays"
    return fileio.checksum_problem(step_dir, CHECKSUMS_FILE)


def read_meta(step_dir: str) -> CheckpointMeta:
    """The metadata saved beside a checkpoint's state: the one reader for every consumer.

    Args:
      step_dir: a checkpoint's step folder (see `resolve_step_dir`).

    Returns:
      Its CheckpointMeta (an older checkpoint's unversioned dict is read too).

    Raises:
      CheckpointError: no meta file, one that does not parse, or an unknown or
        missing key; the message names the file (and the key).
    """
    path = os.path.join(step_dir, "meta", "metadata")
    try:
        with fileio.open_file(path, "rb") as f:
            text = f.read()
    except FileNotFoundError as e:
        raise CheckpointError(f"{step_dir}: no meta/metadata; not a checkpoint written by embedder") from e
    try:
        record = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON (a damaged checkpoint?): {e}") from e
    return portable.resolve_vocab_dir(step_dir, CheckpointMeta.from_json(record, path))


def load_model_params(path: str, step: int | None = None, sharding: Any = None) -> tuple[Any, CheckpointMeta]:
    """The model's parameters of one checkpoint (no optimizer state is read).

    Args:
      path: model dir, checkpoints folder or step folder (see resolve_step_dir).
      step: the step; None = the latest.
      sharding: a Sharding (or tree of them) to place the arrays on; default the
        first local device.

    Returns:
      (params, meta): the DualEncoder's params tree and the checkpoint's CheckpointMeta.
    """
    step_dir = resolve_step_dir(path, step)
    explicit = step is not None or os.path.basename(step_dir) == os.path.basename(
        fileio.absolute(path).rstrip("/")
    )
    while True:
        try:
            return _load_model_params(step_dir, sharding)
        except Exception as e:  # orbax and TensorStore report a damaged array file in many types
            if explicit:
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(
                    f"checkpoint {step_dir} is damaged: {str(e).splitlines()[0][:300]}"
                ) from e
            print(
                f"warning: checkpoint {step_dir} is damaged ({str(e).splitlines()[0][:300]}); skipped",
                file=sys.stderr,
            )
            step_dir = _older_step(step_dir)


def _older_step(step_dir: str) -> str:
    """The newest finalised step folder older than `step_dir` (CheckpointError if none)."""
    folder, current = os.path.dirname(step_dir), int(os.path.basename(step_dir))
    older = [
        int(n)
        for n in fileio.listdir(folder)
        if n.isdigit() and int(n) < current and fileio.checkpoint_finalized(os.path.join(folder, n))
    ]
    for step in sorted(older, reverse=True):
        if step_problem(os.path.join(folder, str(step))) is None:
            return os.path.join(folder, str(step))
    raise CheckpointError(f"{folder}: no intact checkpoint older than the damaged step {current}")


def _load_model_params(step_dir: str, sharding: Any) -> tuple[Any, CheckpointMeta]:
    meta = read_meta(step_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    state_dir = os.path.join(step_dir, "state")
    try:
        model_tree = checkpointer.metadata(state_dir).item_metadata.tree["params"]["model"]
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{state_dir}: holds no params/model") from e
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = (
        jax.tree.map(lambda _: sharding or default, model_tree) if not _is_tree(sharding) else sharding
    )
    abstract = {
        "params": {
            "model": jax.tree.map(
                lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), model_tree, shardings
            )
        }
    }
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
    restored = checkpointer.restore(
        state_dir, args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    )
    return restored["params"]["model"], meta


def _is_tree(x: Any) -> bool:
    return isinstance(x, dict)


def save_model_params(
    model_dir: str, step: int, params: Any, meta: CheckpointMeta | Mapping[str, Any]
) -> str:
    """Writes a params-only checkpoint (e.g. a soup) that eval, export and soup read.

    Args:
      model_dir: the folder to hold `checkpoints/<step>`.
      step: the step.
      params: the DualEncoder's params tree.
      meta: its CheckpointMeta (a dict is read as `CheckpointMeta.from_json` reads one).

    Returns:
      The step folder. The write is atomic: orbax finalises it under its final
      name only when complete; its checksums.json is added then.
    """
    if not isinstance(meta, CheckpointMeta):
        meta = CheckpointMeta.from_json(meta, f"meta for {model_dir}")
    meta = portable.bundle_tokenizer(model_dir, meta)
    manager = ocp.CheckpointManager(
        fileio.absolute(os.path.join(model_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
        item_names=("state", "meta"),
    )
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": {"model": params}}), meta=ocp.args.JsonSave(meta.to_json())
        ),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
    step_dir = os.path.join(fileio.absolute(model_dir), "checkpoints", str(step))
    if jax.process_index() == 0:
        fileio.write_checksums(step_dir, CHECKSUMS_FILE)
    return step_dir


# ---------------------------------------------------------------- one writer per model dir

LOCK_FILE = "train.lock"


class ModelDirLock:
    """One training writes a model dir at a time: `MODEL_DIR/train.lock` names its holder.

    Taken at start (before anything else is written) and released at exit. A lock
    whose holder was a process of this host that is gone (killed, crashed) is
    taken over; any other holder is a refusal naming its host and pid. In a
    multi-host run process 0 takes it for all processes of the run.
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(fileio.absolute(model_dir), LOCK_FILE)
        self.held = False

    def acquire(self) -> ModelDirLock:
        """Takes the lock.

        Raises:
          CheckpointError: another live process holds it (its host, pid and start named).
        """
        if jax.process_index() != 0:
            return self
        fileio.makedirs(os.path.dirname(self.path))
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        for _ in range(3):
            if self._create(json.dumps(record)):
                self.held = True
                return self
            holder = self._holder()
            if holder is None or self._stale(holder):
                fileio.remove(self.path)  # a dead holder's (or unreadable) lock: take it over
                continue
            raise CheckpointError(
                f"model dir {os.path.dirname(self.path)} is being trained by another process "
                f"(host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}); "
                f"wait for it to end, or use another --model_dir (lock: {self.path})"
            )
        raise CheckpointError(f"could not take the lock {self.path}")

    def _create(self, text: str) -> bool:
        if fileio.is_url(self.path):
            if fileio.exists(self.path):
                return False
            with fileio.open_file(self.path, "w") as f:
                f.write(text)
            return True
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def _holder(self) -> dict | None:
        try:
            with fileio.open_file(self.path) as f:
                holder = json.loads(f.read())
        except FileNotFoundError:
            return {}
        except (ValueError, OSError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _stale(holder: dict) -> bool:
        if not holder:
            return False  # released between our two looks: try again
        if holder.get("host") != socket.gethostname():
            return False  # cannot see another host's processes
        try:
            os.kill(int(holder.get("pid")), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, TypeError, ValueError):
            return False
        return False

    def release(self) -> None:
        if self.held:
            try:
                fileio.remove(self.path)
            except OSError:
                pass
            self.held = False

    def __enter__(self) -> ModelDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
