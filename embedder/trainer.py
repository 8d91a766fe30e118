"""Train state, optimizer and the jitted contrastive `train_step`.

One step: encode queries, positives and hard negatives with the dual encoder
(whole batch, or in chunks with the gradient cache), the Matryoshka NCE loss over
the *global* batch (XLA inserts the all-gather), AdamW. Shardings are explicit
on the way in and out, and the old state's buffers are donated.

Distillation: a frozen teacher (another DualEncoder) encodes the same texts in
the same step; its parameters are a separate argument of the step, sharded by
the same logical rules, never part of the state (no gradient, no optimizer
moments, not checkpointed), and the teacher terms of `losses.teacher_loss` are
added to the contrastive loss.

Packed batches (`data.packing`): each side's texts come packed into rows of
groups ([groups, rows, length] with segment ids, one group per data-parallel
device and gradient-cache chunk); each group is encoded by
`DualEncoder.encode_packed` and its texts gathered back into the same [batch,
dim] embeddings the loss sees without packing. With dropout, the masks depend on
the group (and the side), never on the chunk.

Quantisation-aware training (`QuantizationAwareConfig`): the forward pass runs on
the per-channel fake-quantised kernels (`quantization.fake_quantize_params`, a
straight-through gradient), in the plain step and in both passes of the
gradient cache; the state keeps the float weights.
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

from embedder import checkpointing, gradcache, losses, partitioning, quantization
from embedder.errors import CheckpointError, ConfigError, WeightsError
from embedder.models import dual_encoder
from embedder.models import spec as spec_lib

TOKEN_KEYS = ("query_tokens", "positive_tokens", "negative_tokens")
# A packed batch's model inputs besides the tokens (see `data.packing`).
PACKED_KEYS = tuple(
    f"{side}_{what}" for side in ("query", "positive", "negative") for what in ("segment_ids", "slots")
)
# (side, tower, the embeddings' name the loss reads).
_PACKED_SIDES = (
    ("query", "query", "query"),
    ("positive", "document", "positive"),
    ("negative", "document", "negatives"),
)
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


@dataclasses.dataclass(frozen=True)
class QuantizationAwareConfig:
    """Packed batches (`data.packing`): each side's texts come packed into rows of
    groups ([groups, rows, length] with segment ids, one group per data-parallel
    device and gradient-cache chunk); each group is encoded by
    `DualEncoder.encode_packed` and its texts gathered back into the same [batch,
    dim] embeddings the loss sees without packing. With dropout, the masks depend on
    the group (and the side), never on the chunk.

    Quantisation-aware training: the forward pass sees the weights as an int export stores them.

        Attributes:
          bits: 0 (off), 8 or 4: per-output-channel symmetric integers of every kernel
            (`quantization.fake_quantize_params`).
          include_embeddings: also the token / position / type embedding tables.
    """

    bits: int = 0
    include_embeddings: bool = False

    def __post_init__(self):
        if self.bits not in (0, 4, 8):
            raise ConfigError(f"QuantizationAwareConfig.bits={self.bits!r}: expected 0 (off), 8 or 4")


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


def _restore_loss_params(step_dir: str, wanted: dict, shardings: dict) -> dict:
    """The loss's learned parameters named in `wanted` (arrays of their shapes), placed on `shardings`."""
    import orbax.checkpoint as ocp

    abstract = {
        "params": {
            "loss": {
                name: jax.ShapeDtypeStruct(value.shape, jnp.float32, sharding=shardings[name])
                for name, value in wanted.items()
            }
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
      teacher: the frozen teacher's module when distilling (its parameters go to
        `train_step`, placed by `place_teacher_params`); it reads the student's
        token ids, so it must share the student's vocabulary.
      teacher_loss: the teacher terms and their weights (None or all weights 0: off).
        The given-scores term reads the batch's `scores` and needs no teacher.
      quantization_aware: fake-quantised kernels in the forward pass (None: off).
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
        teacher: dual_encoder.DualEncoder | None = None,
        teacher_loss: losses.TeacherLossConfig | None = None,
        quantization_aware: QuantizationAwareConfig | None = None,
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
        self.teacher, self.teacher_loss = _check_teacher(model.module, teacher, teacher_loss)
        self.quantization_aware = (
            quantization_aware if quantization_aware and quantization_aware.bits else None
        )

    # ------------------------------------------------------------------ state

    @property
    def learns_teacher_projection(self) -> bool:
        """Embedding matching with a teacher of another width: the loss owns a learned map."""
        return (
            self.teacher_loss is not None
            and self.teacher_loss.embedding_matching_weight > 0
            and self.teacher.embedding_dim != self.module.embedding_dim
        )

    def _loss_params(self, rng: jax.Array) -> dict:
        """The loss's learned parameters: the log-scale, the map to the teacher's width."""
        params = {}
        if self.loss_config.learn_temperature:
            params["logit_scale"] = jnp.asarray(
                losses.initial_logit_scale(self.loss_config.temperature), jnp.float32
            )
        if self.learns_teacher_projection:
            shape = (self.module.embedding_dim, self.teacher.embedding_dim)  # [student_dim, teacher_dim]
            params["teacher_projection"] = nn.initializers.lecun_normal()(rng, shape, jnp.float32)
        return params

    def _make_state(self, model_params: Any, rng: jax.Array) -> TrainState:
        # The map's key is split off only when there is a map: other runs keep their dropout stream.
        loss_rng = rng
        if self.learns_teacher_projection:
            rng, loss_rng = jax.random.split(rng)
        params = {"model": model_params, "loss": self._loss_params(loss_rng)}
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
        _, state_rng = jax.random.split(jax.random.key(seed))
        loss_rng = state_rng
        if self.learns_teacher_projection:
            state_rng, loss_rng = jax.random.split(state_rng)
        loss_params = self._loss_params(loss_rng)
        saved_loss = saved.get("loss") or {}
        kept = {name: value for name, value in loss_params.items() if name in saved_loss}
        if kept:
            _check_param_shapes({n: saved_loss[n] for n in kept}, kept, step_dir)
            loss_params = {**loss_params, **_restore_loss_params(step_dir, kept, shardings.params["loss"])}
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
        model_params = params["model"]
        if self.quantization_aware:
            model_params = quantization.fake_quantize_params(
                model_params,
                bits=self.quantization_aware.bits,
                include_embeddings=self.quantization_aware.include_embeddings,
            )
        variables = {"params": model_params}
        if "query_segment_ids" in inputs:
            return self._embed_packed(self.module, variables, inputs, rng if train else None)
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

    def _embed_packed(
        self, module: dual_encoder.DualEncoder, variables: Any, inputs: dict, rng: jax.Array | None
    ) -> dict:
        """The [batch, dim] embeddings of a packed batch (or chunk), group by group.

        Args:
          module: the dual encoder (the student or the teacher).
          variables: its variables.
          inputs: `<side>_tokens` / `<side>_segment_ids` [groups, rows, length],
            `<side>_slots` [batch] or [batch, k], `example_index` [batch].
          rng: the step's dropout key; None: deterministic.

        Returns:
          {"query": [batch, dim], "positive": [batch, dim], "negatives"?: [batch, k, dim]}.
        """
        groups = inputs["query_tokens"].shape[0]
        batch = inputs["query_slots"].shape[0]
        per = batch // groups

        def by_group(x: jax.Array) -> jax.Array:  # [batch, ...] -> [groups, per, ...]
            return x.reshape(groups, per, *x.shape[1:])

        group_inputs = {}
        for side, _, _ in _PACKED_SIDES:
            if f"{side}_tokens" in inputs:
                group_inputs[f"{side}_tokens"] = inputs[f"{side}_tokens"]
                group_inputs[f"{side}_segment_ids"] = inputs[f"{side}_segment_ids"]
                group_inputs[f"{side}_slots"] = by_group(inputs[f"{side}_slots"])
        # A group's key: its first example's row in the global batch, the same in every chunking.
        group_index = by_group(inputs["example_index"])[:, 0]
        batch_axes = self._batch_axes() or ()
        rules = tuple((name, _without_axes(axes, batch_axes)) for name, axes in self.rules)

        def one_group(group: dict, index: jax.Array) -> dict:
            out = {}
            for number, (side, tower, name) in enumerate(_PACKED_SIDES):
                if f"{side}_tokens" not in group:
                    continue
                slots = group[f"{side}_slots"]
                rngs = None
                if rng is not None:
                    rngs = {"dropout": jax.random.fold_in(jax.random.fold_in(rng, index), number)}
                with nn.logical_axis_rules(rules):
                    embeddings, _ = module.apply(
                        variables,
                        group[f"{side}_tokens"],
                        group[f"{side}_segment_ids"],
                        tower,
                        rng is None,
                        slots.reshape(-1),
                        method="encode_packed",
                        rngs=rngs,
                    )
                out[name] = embeddings.reshape(*slots.shape, -1)
            return out

        embedded = jax.vmap(one_group, spmd_axis_name=batch_axes or None)(group_inputs, group_index)
        return jax.tree.map(lambda x: x.reshape(batch, *x.shape[2:]), embedded)

    def _batch_axes(self) -> tuple[str, ...] | None:
        """The mesh axes the batch is split over (for vmap over examples), or None."""
        axes = nn.logical_to_mesh_axes(("batch",), self.rules)[0]
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a in self.mesh.shape)
        return axes or None

    def _loss(
        self, params: Any, embeddings: dict, batch: dict, teacher_embeddings: dict | None = None
    ) -> tuple[jax.Array, dict]:
        """The contrastive loss, plus the weighted teacher terms when distilling."""
        temperature = None
        if self.loss_config.learn_temperature:
            temperature = losses.learned_temperature(params["loss"]["logit_scale"], self.loss_config)
        loss, metrics = losses.matryoshka_contrastive_loss(
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
        if self.teacher_loss is None:
            return loss, metrics
        negative_mask = batch.get("negative_valid")
        score_mask = None
        if "scores" in batch and negative_mask is not None:
            # The positive's score is always there; a missing negative's is masked, never filled.
            present = jnp.ones_like(negative_mask[:, :1]) != 0
            score_mask = jnp.concatenate([present, negative_mask != 0], axis=1)  # [batch, 1 + k]
        teacher_term, teacher_metrics = losses.teacher_loss(
            embeddings,
            teacher_embeddings,
            config=self.teacher_loss,
            temperature=self.loss_config.temperature if temperature is None else temperature,
            projection=params["loss"].get("teacher_projection"),
            negative_mask=None if negative_mask is None else negative_mask != 0,
            scores=batch.get("scores"),
            score_mask=score_mask,
            weights=batch.get("weights"),
            matryoshka_dims=self.loss_config.matryoshka_dims,
            matryoshka_weights=self.loss_config.matryoshka_weights,
        )
        metrics = {**metrics, **teacher_metrics, "loss/contrastive": loss}
        return loss + teacher_term, metrics

    def _teacher_embed(self, teacher_params: Any, inputs: dict) -> dict:
        """The frozen teacher's embeddings of the step's texts, computed once per step.

        With the gradient cache the teacher encodes chunk by chunk (the same chunks,
        spread over the same devices), so its activations never exceed one chunk's.
        Nothing here is differentiated: the result is outside every gradient.
        """
        tokens = {k: inputs[k] for k in (*TOKEN_KEYS, *PACKED_KEYS, "example_index") if k in inputs}
        teacher_params = jax.lax.stop_gradient(teacher_params)

        def encode(chunk: dict) -> dict:
            if "query_segment_ids" in chunk:
                return self._embed_packed(self.teacher, {"params": teacher_params}, chunk, None)
            return self.teacher.apply(
                {"params": teacher_params},
                chunk["query_tokens"],
                chunk["positive_tokens"],
                chunk.get("negative_tokens"),
                deterministic=True,
            )

        if not self.grad_cache_chunk:
            return jax.lax.stop_gradient(encode(tokens))
        shards = partitioning.data_parallel_size(self.mesh)
        num_chunks = gradcache.check_chunking(tokens["example_index"].shape[0], self.grad_cache_chunk, shards)
        chunks = jax.tree.map(lambda x: gradcache.split_chunks(x, num_chunks, shards), tokens)
        embedded = jax.lax.map(encode, chunks)
        return jax.lax.stop_gradient(jax.tree.map(lambda y: gradcache.merge_chunks(y, shards), embedded))

    def _step(self, state: TrainState, batch: dict, teacher_params: Any = None) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        train = self.module.config.dropout_rate > 0 or self.module.config.attention_dropout_rate > 0
        packed = "query_segment_ids" in batch
        batch_size = batch["query_slots" if packed else "query_tokens"].shape[0]
        inputs = {k: batch[k] for k in (*TOKEN_KEYS, *PACKED_KEYS) if k in batch}
        inputs["example_index"] = jnp.arange(batch_size, dtype=jnp.int32)
        if "negative_tokens" in inputs and "negative_valid" in batch and not packed:
            # A missing negative's padding row has no token to attend to (its
            # embedding would be NaN, and so every gradient); it encodes its own
            # row's positive instead, which the loss leaves out by negative_valid.
            present = batch["negative_valid"][..., None] != 0  # [batch, k, 1]
            inputs["negative_tokens"] = jnp.where(
                present, inputs["negative_tokens"], batch["positive_tokens"][:, None, :]
            )
        teacher_embeddings = None
        if self.teacher is not None:
            teacher_embeddings = self._teacher_embed(teacher_params, inputs)
        if self.grad_cache_chunk:
            (loss, metrics), grads = gradcache.cached_value_and_grad(
                lambda p, x: self._embed(p, x, rng, train),
                lambda p, e: self._loss(p, e, batch, teacher_embeddings),
                state.params,
                inputs,
                chunk_size=self.grad_cache_chunk,
                num_shards=partitioning.data_parallel_size(self.mesh),
            )
        else:

            def loss_fn(params):
                embeddings = self._embed(params, inputs, rng, train)
                return self._loss(params, embeddings, batch, teacher_embeddings)

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

    # ------------------------------------------------------------------ teacher

    def teacher_shardings(self) -> Any:
        """NamedShardings of the teacher's parameters: its logical names under this run's rules."""
        if self.teacher is None:
            raise ConfigError("this Trainer has no teacher")
        tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
        boxed = jax.eval_shape(lambda t: self.teacher.init(jax.random.key(0), t, t), tokens)["params"]
        return partitioning.logical_to_sharding(nn.get_partition_spec(boxed), self.mesh, self.rules)

    def place_teacher_params(self, params: Any) -> Any:
        """The teacher's parameters (host or device arrays) on this mesh, sharded as the student's are.

        Raises:
          WeightsError: the parameters do not fit the teacher module (naming the
            first parameter whose path or shape differs).
        """
        shardings = self.teacher_shardings()
        expected = jax.eval_shape(
            lambda: nn.unbox(
                self.teacher.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))
            )["params"]
        )
        try:
            _check_param_shapes(params, expected, "the teacher")
        except CheckpointError as e:
            raise WeightsError(str(e)) from e
        # Host copies first: device_put of host arrays to a global sharding works on every process.
        return jax.device_put(jax.device_get(params), shardings)

    def train_step(
        self, state: TrainState, batch: dict, teacher_params: Any = None
    ) -> tuple[TrainState, dict]:
        """One optimizer step on a global batch (jitted once; the state is donated).

        Args:
          state: the TrainState (donated).
          batch: the global batch.
          teacher_params: when distilling, the teacher's parameters from
            `place_teacher_params` (read only: never donated, never updated).
        """
        if (self.teacher is not None) != (teacher_params is not None):
            raise ConfigError(
                "train_step: teacher_params must be given exactly when the Trainer distils from a teacher "
                f"model ({'it does' if self.teacher is not None else 'it does not'})"
            )
        if self._step_fn is None:
            shardings = self.state_shardings()
            batch_shardings = {
                k: partitioning.batch_sharding(self.mesh, v.ndim, self.rules) for k, v in batch.items()
            }
            out_shardings = (shardings, NamedSharding(self.mesh, PartitionSpec()))
            if self.teacher is None:

                def _step(state, batch, _):  # named as the method: compile logs say jit(_step)
                    return self._step(state, batch)

                self._step_fn = jax.jit(
                    _step,
                    in_shardings=(shardings, batch_shardings, None),
                    out_shardings=out_shardings,
                    donate_argnums=(0,),
                )
            else:
                self._step_fn = jax.jit(
                    self._step,
                    in_shardings=(shardings, batch_shardings, self.teacher_shardings()),
                    out_shardings=out_shardings,
                    donate_argnums=(0,),
                )
        with self._context():
            return self._step_fn(state, batch, teacher_params)


def _check_teacher(
    student: dual_encoder.DualEncoder,
    teacher: dual_encoder.DualEncoder | None,
    teacher_loss: losses.TeacherLossConfig | None,
) -> tuple[dual_encoder.DualEncoder | None, losses.TeacherLossConfig | None]:
    """The teacher and its terms as the step uses them (None, None when nothing is on).

    The given-scores term needs no teacher model (its teacher is in the data):
    with only that term on, the teacher is None and the terms are kept.

    Raises:
      ConfigError: a term that reads a teacher model's embeddings is on without a
        teacher, a teacher is given without such a term, or the teacher cannot
        read the student's token ids.
    """
    on = teacher_loss is not None and (teacher_loss.needs_teacher_embeddings or teacher_loss.needs_scores)
    if on and not teacher_loss.needs_teacher_embeddings:
        if teacher is not None:
            raise ConfigError(
                "a teacher is given but only the given-scores term is on (it reads the data's 'scores', "
                "not a teacher model): set TeacherLossConfig.embedding_matching_weight or "
                "score_distillation_weight, or drop TEACHER"
            )
        return None, teacher_loss
    if on and teacher is None:
        raise ConfigError(
            "a teacher term is on (TeacherLossConfig embedding_matching_weight / score_distillation_weight) "
            "but no teacher is given: set TEACHER (gin: train_loop.train.teacher)"
        )
    if not on:
        if teacher is not None:
            raise ConfigError(
                "a teacher is given but every teacher term's weight is 0: set "
                "TeacherLossConfig.embedding_matching_weight or score_distillation_weight, or drop TEACHER"
            )
        return None, None
    s, t = student.config, teacher.config
    if (s.vocab_size, s.pad_id) != (t.vocab_size, t.pad_id):
        raise ConfigError(
            f"the teacher reads the student's token ids, but its vocabulary has {t.vocab_size} ids "
            f"(pad {t.pad_id}) and the student's {s.vocab_size} (pad {s.pad_id}); distil from a teacher "
            "with the student's tokenizer"
        )
    return teacher, teacher_loss
