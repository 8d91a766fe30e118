"""Checkpoints through orbax's CheckpointManager: save, resume, restore onto another mesh.

Layout: `MODEL_DIR/checkpoints/<step>/{state,meta}`. `state` is the TrainState
(arrays, written by every process for its own shards); `meta` is JSON: the model
config (to refuse a checkpoint of another architecture with a clear message) and
anything else the loop needs to continue. Orbax writes each step under a
temporary name and renames it when complete, so a run killed mid-save never
leaves a checkpoint that a restart would load.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers


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


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and where."""


class Checkpointer:
    """Saves and restores (TrainState, meta) under `model_dir/checkpoints`."""

    def __init__(self, model_dir: str, config: CheckpointConfig = CheckpointConfig()):
        self.directory = os.path.abspath(os.path.join(model_dir, "checkpoints"))
        self.config = config
        policies = [checkpoint_managers.LatestN(config.keep)]
        if config.best_metric and config.keep_best:
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics: metrics[config.best_metric],
                    reverse=config.best_mode == "min",
                    n=config.keep_best,
                    keep_checkpoints_without_metrics=True,
                )
            )
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=config.async_save,
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Starts saving `state` at `step` (returns before an async write finishes)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
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
        """Blocks until any asynchronous save has been written."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _config_diff(saved: dict, current: dict) -> str:
    keys = sorted(set(saved) | set(current))
    diffs = [
        f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
    ]
    return "; ".join(diffs[:4]) or "configs differ"


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
