"""Checkpoints through orbax's CheckpointManager: save, resume, restore onto another mesh.

Layout: `MODEL_DIR/checkpoints/<step>/{state,meta}`; MODEL_DIR may be local or
gs:// (see `fileio`). `state` is the TrainState
(arrays, written by every process for its own shards); `meta` is JSON: the model
config (to refuse a checkpoint of another architecture with a clear message) and
anything else the loop needs to continue. Orbax writes each step under a
temporary name and renames it when complete, so a run killed mid-save never
leaves a checkpoint that a restart would load.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from embedder import fileio
from embedder.errors import CheckpointError


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


class Checkpointer:
    """Saves and restores (TrainState, meta) under `model_dir/checkpoints`."""

    def __init__(self, model_dir: str, config: CheckpointConfig = CheckpointConfig()):
        self.directory = fileio.absolute(os.path.join(model_dir, "checkpoints"))
        self.config = config
        policies = [checkpoint_managers.LatestN(config.keep)]
        if config.best_metric and config.keep_best:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[config.best_metric],
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

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Starts saving `state` at `step` (returns before an async write finishes).

        Raises:
          CheckpointError: this or an earlier asynchronous write failed (disk
            full, folder gone read-only); the message lists the complete
            checkpoints, which stay intact.
        """
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=metrics,
                force=True,
            )
        except Exception as e:  # orbax re-raises background write errors in several types
            raise self._write_error(e) from e

    def _write_error(self, error: Exception) -> CheckpointError:
        try:
            complete = self.all_steps()
        except Exception:  # the folder itself may be unreadable now
            complete = "unknown"
        return CheckpointError(
            f"writing a checkpoint under {self.directory} failed (complete checkpoints, intact: {complete}): {error}"
        )

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any, meta: dict | None = None) -> tuple[Any, dict]:
        """Restores onto the shardings of `abstract_state` (any mesh, any device count).

        Args:
          step: the checkpoint step.
          abstract_state: a tree of jax.ShapeDtypeStruct with `.sharding` set: the
            state as this run lays it out.
          meta: if given, the saved meta must agree on "model_config".

        Raises:
          CheckpointError: the checkpoint is of another architecture.
        """
        saved_meta = self.read_meta(step)
        if meta is not None and saved_meta.get("model_config") != meta.get("model_config"):
            diff = _config_diff(saved_meta.get("model_config") or {}, meta.get("model_config") or {})
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

    def wait(self) -> None:
        """Blocks until any asynchronous save has been written (CheckpointError if it failed)."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._write_error(e) from e

    def close(self) -> None:
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
        return path
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
        step = steps[-1]
    if step not in steps:
        raise CheckpointError(f"{path}: there is no checkpoint of step {step}; steps saved: {steps}")
    return os.path.join(folder, str(step))


def read_meta(step_dir: str) -> dict:
    """The JSON meta saved beside a checkpoint's state (model config, data, step)."""
    path = os.path.join(step_dir, "meta", "metadata")
    try:
        with fileio.open_file(path) as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{step_dir}: no meta/metadata; not a checkpoint written by embedder") from e


def load_model_params(path: str, step: int | None = None, sharding: Any = None) -> tuple[Any, dict]:
    """The model's parameters of one checkpoint (no optimizer state is read).

    Args:
      path: model dir, checkpoints folder or step folder (see resolve_step_dir).
      step: the step; None = the latest.
      sharding: a Sharding (or tree of them) to place the arrays on; default the
        first local device.

    Returns:
      (params, meta): the DualEncoder's params tree and the checkpoint's meta.
    """
    step_dir = resolve_step_dir(path, step)
    meta = read_meta(step_dir)
    checkpointer = ocp.PyTreeCheckpointer()
    state_dir = os.path.join(step_dir, "state")
    tree = checkpointer.metadata(state_dir).item_metadata.tree
    try:
        model_tree = tree["params"]["model"]
    except (KeyError, TypeError) as e:
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


def save_model_params(model_dir: str, step: int, params: Any, meta: dict) -> str:
    """Writes a params-only checkpoint (e.g. a soup) that eval, export and soup read.

    Returns:
      The step folder. The write is atomic: orbax finalises it under its final
      name only when complete.
    """
    manager = ocp.CheckpointManager(
        fileio.absolute(os.path.join(model_dir, "checkpoints")),
        options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False, create=True),
        item_names=("state", "meta"),
    )
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": {"model": params}}), meta=ocp.args.JsonSave(meta)
        ),
        force=True,
    )
    manager.wait_until_finished()
    manager.close()
    return os.path.join(fileio.absolute(model_dir), "checkpoints", str(step))
