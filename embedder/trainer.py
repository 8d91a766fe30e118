"""Train state, optimizer and the jitted contrastive `train_step`.

One step: encode queries, positives and hard negatives with the dual encoder
(whole batch, or in chunks with the gradient cache), the Matryoshka NCE loss over
the *global* batch (XLA inserts the all-gather), AdamW. Shardings are explicit
on the way in and out, and the old state's buffers are donated.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from embedder import checkpointing, gradcache, losses, partitioning
from embedder.errors import CheckpointError, ConfigError
from embedder.models import spec as spec_lib

TOKEN_KEYS = ("query_tokens", "positive_tokens", "negative_tokens")
NONFINITE_ACTIONS = ("raise", "skip")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up, then linear or cosine decay; clipping by global norm.

    Attributes:
      learning_rate: peak learning rate.
      warmup_steps: linear warm-up from 0 to the peak.
      decay: "linear", "cosine" or "constant" after warm-up.
      end_fraction: the final learning rate as a fraction of the peak.
      weight_decay: decoupled weight decay; never applied to norms and biases.
      b1, b2, eps: Adam's moments and epsilon.
      max_grad_norm: clip gradients to this global norm (0 = off).
    """

    learning_rate: float = 2e-5
    warmup_steps: int = 100
    decay: str = "linear"
    end_fraction: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-6
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.decay not in ("linear", "cosine", "constant"):
            raise ConfigError(f"OptimizerConfig.decay={self.decay!r}: expected linear, cosine or constant")
        if self.learning_rate <= 0:
            raise ConfigError(f"OptimizerConfig.learning_rate={self.learning_rate} must be positive")
        if self.warmup_steps < 0:
            raise ConfigError(f"OptimizerConfig.warmup_steps={self.warmup_steps} must be >= 0")


def make_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the step."""
    warmup = min(config.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    end = config.learning_rate * config.end_fraction
    if config.decay == "linear":
        after = optax.linear_schedule(config.learning_rate, end, decay_steps)
    elif config.decay == "cosine":
        after = optax.cosine_decay_schedule(config.learning_rate, decay_steps, alpha=config.end_fraction)
    else:
        after = optax.constant_schedule(config.learning_rate)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, warmup), after], [warmup])


def decay_mask(params: Any) -> Any:
    """True for parameters that get weight decay: not norms, not biases (BERT's convention)."""

    def decays(path, _):
        names = [getattr(k, "key", str(k)) for k in path]
        return not (names[-1] in ("bias", "scale") or any("norm" in n for n in names) or names[0] == "loss")

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    parts = []
    if config.max_grad_norm:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            make_schedule(config, total_steps),
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


@flax.struct.dataclass
class TrainState:
    """Everything a step changes: `params` = {"model": ..., "loss": {...}}."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def _saved_params(step_dir: str) -> dict:
    """The shapes tree of a checkpoint's `params` ({"model": ..., "loss"?: ...})."""
    import orbax.checkpoint as ocp

    state_dir = os.path.join(step_dir, "state")
    tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
    params = tree.get("params") if isinstance(tree, dict) else None
    if not isinstance(params, dict) or "model" not in params:
        raise CheckpointError(f"{state_dir}: holds no params/model")
    return params


def _restore_loss_params(step_dir: str, shardings: Any) -> dict:
    """The loss's learned parameters of a training checkpoint, placed on `shardings`."""
    import orbax.checkpoint as ocp

    abstract = {
        "params": {
            "loss": jax.tree.map(lambda s: jax.ShapeDtypeStruct((), jnp.float32, sharding=s), shardings)
        }
    }
    restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
    restored = ocp.PyTreeCheckpointer().restore(
        os.path.join(step_dir, "state"),
        args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True),
    )
    return restored["params"]["loss"]


def _check_param_shapes(saved: Any, expected: Any, step_dir: str) -> None:
    """CheckpointError naming the first parameter whose path or shape differs."""
    flat_saved = {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]
    }
    flat_expected = {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]
    }
    for name in sorted(set(flat_saved) | set(flat_expected)):
        if flat_saved.get(name) != flat_expected.get(name):
            raise CheckpointError(
                f"{step_dir}: parameter {name} has shape {flat_saved.get(name)} there, "
                f"{flat_expected.get(name)} in this model (None: absent); another architecture"
            )


# Fields of a model description that a fine-tune may change (numerics, regularisation).
_NUMERICS_FIELDS = ("dtype", "param_dtype", "remat", "dropout_rate", "attention_dropout_rate")


def _architecture(description: dict) -> dict:
    """A model description without the fields a fine-tune may change."""
    return {k: v for k, v in description.items() if k not in _NUMERICS_FIELDS}


def _without_axes(axes: Any, removed: tuple[str, ...]) -> Any:
    """A logical rule's mesh axes less `removed` (None when nothing is left)."""
    if axes is None:
        return None
    kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a not in removed)
    return kept[0] if len(kept) == 1 else (kept or None)


def _config_diff(saved: dict, current: dict) -> str:
    keys = sorted(set(saved) | set(current))
    diffs = [
        f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)
    ]
    return "; ".join(diffs[:4]) or "configs differ"


class Trainer:
    """Builds the state and the jitted step for one model, loss, optimizer and mesh.

    Args:
      model: the ModelSpec (module, vocabulary, initial weights).
      loss_config: the contrastive loss.
      optimizer: the optimizer config.
      mesh: the device mesh.
      total_steps: for the learning-rate schedule.
      grad_cache_chunk: global examples per gradient-cache chunk (0 = off).
      nonfinite: "raise" (the host stops the run) or "skip" (drop the update).
      rules: logical axis rules.
    """

    def __init__(
        self,
        model: spec_lib.ModelSpec,
        loss_config: losses.ContrastiveLossConfig,
        optimizer: OptimizerConfig,
        mesh: Mesh,
        total_steps: int,
        grad_cache_chunk: int = 0,
        nonfinite: str = "raise",
        rules: Sequence[tuple[str, Any]] = partitioning.DEFAULT_RULES,
    ):
        if nonfinite not in NONFINITE_ACTIONS:
            raise ConfigError(f"nonfinite={nonfinite!r}: expected one of {NONFINITE_ACTIONS}")
        self.model = model
        self.module = model.module
        self.loss_config = loss_config
        self.optimizer_config = optimizer
        self.optimizer = make_optimizer(optimizer, total_steps)
        self.schedule = make_schedule(optimizer, total_steps)
        self.mesh = mesh
        self.rules = tuple(rules)
        self.grad_cache_chunk = grad_cache_chunk
        self.nonfinite = nonfinite
        self._step_fn = None
        embed_dim = self.module.embedding_dim
        for d in loss_config.matryoshka_dims:
            if d > embed_dim:
                raise ConfigError(
                    f"Matryoshka dimension {d} is larger than the model's embedding size {embed_dim} "
                    f"(matryoshka_dims={loss_config.matryoshka_dims})"
                )

    # ------------------------------------------------------------------ state

    def _loss_params(self) -> dict:
        if not self.loss_config.learn_temperature:
            return {}
        return {
            "logit_scale": jnp.asarray(losses.initial_logit_scale(self.loss_config.temperature), jnp.float32)
        }

    def _make_state(self, model_params: Any, rng: jax.Array) -> TrainState:
        params = {"model": model_params, "loss": self._loss_params()}
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params), rng=rng
        )

    def state_shardings(self) -> Any:
        """NamedShardings of the TrainState: parameters and optimizer moments by logical names."""
        boxed = self.model.abstract_variables()["params"]
        logical = nn.get_partition_spec(boxed)
        model_shardings = partitioning.logical_to_sharding(logical, self.mesh, self.rules)
        abstract = jax.eval_shape(lambda: self._make_state(nn.unbox(boxed), jax.random.key(0)))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        param_shardings = {
            "model": model_shardings,
            "loss": jax.tree.map(lambda _: replicated, abstract.params["loss"]),
        }

        # Optimizer moments mirror the parameter tree; everything else is replicated.
        def opt_sharding(path, leaf):
            names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
            if "model" in names:
                sub = names[names.index("model") + 1 :]
                node = model_shardings
                try:
                    for n in sub:
                        node = node[n]
                    if isinstance(node, NamedSharding):
                        return node
                except (KeyError, TypeError):
                    pass
            return replicated

        opt_shardings = jax.tree_util.tree_map_with_path(opt_sharding, abstract.opt_state)
        return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated)

    def abstract_state(self) -> Any:
        """The TrainState as ShapeDtypeStructs carrying this mesh's shardings (for restore)."""
        boxed = self.model.abstract_variables()["params"]
        abstract = jax.eval_shape(lambda: self._make_state(nn.unbox(boxed), jax.random.key(0)))
        return jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, self.state_shardings()
        )

    def init_state(self, seed: int) -> TrainState:
        """A fresh state: the spec's initial parameters (pretrained if it says so), sharded."""
        rng = jax.random.key(seed)
        init_rng, state_rng = jax.random.split(rng)
        shardings = self.state_shardings()
        # Parameters go onto the mesh first (pretrained ones tensor by tensor);
        # the optimizer state is then built there.
        model_params = self.model.init_params(init_rng, shardings=shardings.params["model"])
        make = jax.jit(self._make_state, out_shardings=shardings)
        with self._context():
            return make(model_params, state_rng)

    def init_state_from_checkpoint(
        self, path: str, seed: int
    ) -> tuple[TrainState, checkpointing.WeightsOrigin]:
        """A fresh state whose parameters are those of an earlier run's checkpoint.

        The whole dual encoder (towers, pooling, projection) is read, and the
        loss's learned log-scale when this run learns one and the checkpoint has
        it; both are restored straight onto this run's mesh. The optimizer
        moments, the schedule and the step start fresh (step 0, zero moments),
        so warm-up runs again. Soups (params-only checkpoints) qualify.

        Args:
          path: a model dir, its checkpoints/ folder or a step folder.
          seed: the seed of this run's dropout stream (its initialisation is the checkpoint).

        Returns:
          (state, origin): the state and `WeightsOrigin("checkpoint", path=<step
          folder>, step=<its step>)` for this run's checkpoints.

        Raises:
          CheckpointError: no checkpoint there, or one of another architecture
            (the message names the differing fields) or parameter shapes.
        """
        step_dir = checkpointing.resolve_step_dir(path)
        parent = checkpointing.read_meta(step_dir)
        current = _architecture(spec_lib.describe_module(self.module))
        if _architecture(parent.model_config) != current:
            raise CheckpointError(
                f"INIT_FROM_CHECKPOINT={path}: {step_dir} is a model of another architecture "
                f"({_config_diff(_architecture(parent.model_config), current)}); "
                "use the model gin file that trained it"
            )
        shardings = self.state_shardings()
        expected = jax.eval_shape(lambda: nn.unbox(self.model.abstract_variables()["params"]))
        saved = _saved_params(step_dir)
        _check_param_shapes(saved.get("model"), expected, step_dir)
        model_params, _ = checkpointing.load_model_params(step_dir, sharding=shardings.params["model"])
        loss_params = self._loss_params()
        if loss_params and "logit_scale" in (saved.get("loss") or {}):
            loss_params = _restore_loss_params(step_dir, shardings.params["loss"])
        _, state_rng = jax.random.split(jax.random.key(seed))
        make = jax.jit(
            lambda model, loss, rng: TrainState(
                step=jnp.zeros((), jnp.int32),
                params={"model": model, "loss": loss},
                opt_state=self.optimizer.init({"model": model, "loss": loss}),
                rng=rng,
            ),
            out_shardings=shardings,
        )
        origin = checkpointing.WeightsOrigin("checkpoint", path=step_dir, step=parent.step)
        with self._context():
            return make(model_params, loss_params, state_rng), origin

    def _context(self):
        import contextlib

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(self.rules))
        return stack

    # ------------------------------------------------------------------ step

    def _embed(self, params: Any, inputs: dict, rng: jax.Array, train: bool) -> dict:
        variables = {"params": params["model"]}
        tokens = {k: inputs[k] for k in TOKEN_KEYS if k in inputs}
        if not train:
            return self.module.apply(
                variables,
                tokens["query_tokens"],
                tokens["positive_tokens"],
                tokens.get("negative_tokens"),
                deterministic=True,
            )

        # Dropout masks are drawn per example, from the step's key and the example's
        # row in the global batch: however the batch is cut (the gradient cache's
        # chunks, its two passes), every example gets the masks of the plain step.
        # vmap lays the examples over the batch's mesh axes (spmd_axis_name); inside,
        # no activation axis may use those mesh axes again (an example's batch of one
        # is not split).
        batch_axes = self._batch_axes() or ()
        rules = tuple((name, _without_axes(axes, batch_axes)) for name, axes in self.rules)

        def one_example(example: dict, index: jax.Array) -> dict:
            with nn.logical_axis_rules(rules):
                out = self.module.apply(
                    variables,
                    example["query_tokens"][None],
                    example["positive_tokens"][None],
                    example["negative_tokens"][None] if "negative_tokens" in example else None,
                    deterministic=False,
                    rngs={"dropout": jax.random.fold_in(rng, index)},
                )
            return jax.tree.map(lambda x: x[0], out)

        return jax.vmap(one_example, spmd_axis_name=batch_axes or None)(tokens, inputs["example_index"])

    def _batch_axes(self) -> tuple[str, ...] | None:
        """The mesh axes the batch is split over (for vmap over examples), or None."""
        axes = nn.logical_to_mesh_axes(("batch",), self.rules)[0]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a in self.mesh.shape)
        return axes or None

    def _loss(self, params: Any, embeddings: dict, batch: dict) -> tuple[jax.Array, dict]:
        temperature = None
        if self.loss_config.learn_temperature:
            temperature = losses.learned_temperature(params["loss"]["logit_scale"], self.loss_config)
        return losses.matryoshka_contrastive_loss(
            embeddings["query"],
            embeddings["positive"],
            embeddings.get("negatives"),
            config=self.loss_config,
            temperature=temperature,
            query_ids=batch.get("query_ids"),
            positive_ids=batch.get("positive_ids"),
            weights=batch.get("weights"),
            negative_mask=batch.get("negative_valid"),
            negative_ids=batch.get("negative_ids"),
        )

    def _step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        train = self.module.config.dropout_rate > 0 or self.module.config.attention_dropout_rate > 0
        batch_size = batch["query_tokens"].shape[0]
        inputs = {k: batch[k] for k in TOKEN_KEYS if k in batch}
        if "negative_tokens" in inputs and "negative_valid" in batch:
            # A missing negative's padding row has no token to attend to (its
            # embedding would be NaN, and so every gradient); it encodes its own
            # row's positive instead, which the loss leaves out by negative_valid.
            present = batch["negative_valid"][..., None] != 0  # [batch, k, 1]
            inputs["negative_tokens"] = jnp.where(
                present, inputs["negative_tokens"], batch["positive_tokens"][:, None, :]
            )
        inputs["example_index"] = jnp.arange(batch_size, dtype=jnp.int32)
        if self.grad_cache_chunk:
            (loss, metrics), grads = gradcache.cached_value_and_grad(
                lambda p, x: self._embed(p, x, rng, train),
                lambda p, e: self._loss(p, e, batch),
                state.params,
                inputs,
                chunk_size=self.grad_cache_chunk,
                num_shards=partitioning.data_parallel_size(self.mesh),
            )
        else:

            def loss_fn(params):
                return self._loss(params, self._embed(params, inputs, rng, train), batch)

            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if self.nonfinite == "skip":
            # Keep the old parameters and moments; the step counter still advances.
            keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
            params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        metrics = dict(metrics)
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=self.schedule(state.step),
            finite=finite,
        )
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    def check_batch(self, batch_size: int) -> None:
        """Errors (before anything is compiled) for a batch the mesh or the cache can't split."""
        shards = partitioning.data_parallel_size(self.mesh)
        if batch_size % shards:
            raise ConfigError(
                f"global batch {batch_size} is not divisible by the data-parallel size {shards} "
                f"(mesh {dict(self.mesh.shape)})"
            )
        if self.grad_cache_chunk:
            gradcache.check_chunking(batch_size, self.grad_cache_chunk, shards)

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer step on a global batch (jitted once; the state is donated)."""
        if self._step_fn is None:
            shardings = self.state_shardings()
            batch_shardings = {
                k: partitioning.batch_sharding(self.mesh, v.ndim, self.rules) for k, v in batch.items()
            }
            self._step_fn = jax.jit(
                self._step,
                in_shardings=(shardings, batch_shardings),
                out_shardings=(shardings, NamedSharding(self.mesh, PartitionSpec())),
                donate_argnums=(0,),
            )
        with self._context():
            return self._step_fn(state, batch)
