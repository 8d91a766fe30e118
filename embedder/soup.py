"""Model soups: averages of fine-tuned checkpoints (Wortsman et al. 2022, "Model soups").

Gecko and Gemini Embedding end training by averaging checkpoints: of one run
(several steps) or of several runs from the same initialisation (other data
orders, mixtures or hyper-parameters). Three recipes:

* uniform: the mean of all ingredients;
* weighted: sum_i w_i θ_i / sum_i w_i;
* greedy (Wortsman et al. 2022, Algorithm 1): sort the ingredients by a held-out
  metric, best first; start the soup with the best; add each next one if the
  metric of the soup with it is at least the metric without it (the paper's
  `>=`), otherwise leave it out for good.

The math is pure functions of parameter trees. Ingredients come from an
iterable or a loader, one at a time, so at most one ingredient is in memory
beside the float32 running sum (uniform, weighted) or running mean (greedy,
which also holds the candidate soup while it is scored). Sums are float32
whatever the stored dtype, and jitted element-wise, so sharded parameters stay
sharded: no host ever gathers a whole ingredient.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from embedder import evaluation
from embedder.data import eval_tasks
from embedder.errors import ConfigError, SoupError

Params = Any  # a pytree of arrays (jax.Array, sharded or not, or numpy)
Metric = Callable[[Params], float]  # higher is better

METHODS = ("uniform", "greedy", "weighted")


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_shapes(params: Params) -> dict[str, tuple[int, ...]]:
    """Parameter path ("encoder/layer_0/mlp/wi/kernel") -> shape, for any tree of arrays or shapes."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves}


def check_compatible(
    reference: dict[str, tuple[int, ...]],
    other: dict[str, tuple[int, ...]],
    reference_name: str,
    other_name: str,
) -> None:
    """Raises SoupError unless both have the same parameter paths and shapes.

    Args:
      reference, other: `param_shapes` of two ingredients.
      reference_name, other_name: how to call them in the message (e.g. their paths).
    """
    for path in sorted(set(reference) | set(other)):
        if path not in other:
            raise SoupError(
                f"{other_name} has no parameter {path} (shape {reference[path]} in {reference_name}): "
                "ingredients of a soup must share one architecture"
            )
        if path not in reference:
            raise SoupError(
                f"{other_name} has a parameter {path} (shape {other[path]}) that {reference_name} lacks: "
                "ingredients of a soup must share one architecture"
            )
        if reference[path] != other[path]:
            raise SoupError(
                f"parameter {path} has shape {other[path]} in {other_name} but {reference[path]} in "
                f"{reference_name}: ingredients of a soup must share one architecture"
            )


@jax.jit
def _scaled(params: Params, weight: jax.Array) -> Params:
    return jax.tree.map(lambda x: weight * jnp.asarray(x, jnp.float32), params)


def _add_scaled_fn(total: Params, params: Params, weight: jax.Array) -> Params:
    return jax.tree.map(lambda t, x: t + weight * jnp.asarray(x, jnp.float32), total, params)


# The running sum is donated: the new sum reuses its buffers.
_add_scaled = jax.jit(_add_scaled_fn, donate_argnums=0)


@jax.jit
def _divide(total: Params, denominator: jax.Array) -> Params:
    return jax.tree.map(lambda t: t / denominator, total)


@jax.jit
def _mean_with(mean: Params, params: Params, count: jax.Array) -> Params:
    """The mean of `count` - 1 trees (`mean`) and one more, `params`."""
    return jax.tree.map(lambda m, x: m + (jnp.asarray(x, jnp.float32) - m) / count, mean, params)


def cast_like(params: Params, like: Params) -> Params:
    """`params` with each leaf cast to the dtype of the same leaf of `like` (e.g. back to bfloat16)."""
    return jax.tree.map(lambda x, ref: jnp.asarray(x, ref.dtype), params, like)


def weighted_average(
    ingredients: Iterable[Params], weights: Sequence[float] | None = None, names: Sequence[str] | None = None
) -> Params:
    """sum_i w_i θ_i / sum_i w_i in float32, streaming over the ingredients.

    Args:
      ingredients: parameter trees, consumed one at a time (a generator that loads
        each checkpoint when asked keeps one in memory).
      weights: one non-negative weight per ingredient, not all zero; None: all 1
        (the uniform soup).
      names: how to call the ingredients in errors (default "ingredient i").

    Returns:
      The float32 average, on the ingredients' shardings.

    Raises:
      SoupError: no ingredient, a count mismatch, a negative or all-zero weight,
        or ingredients of different architectures (naming the parameter and
        both shapes).
    """
    if weights is not None:
        weights = [float(w) for w in weights]
        if any(w < 0 or not np.isfinite(w) for w in weights):
            raise SoupError(f"soup weights must be finite and non-negative, got {weights}")
        if not sum(weights) > 0:
            raise SoupError(f"soup weights must not all be zero, got {weights}")
        if hasattr(ingredients, "__len__") and len(ingredients) != len(weights):
            raise SoupError(f"{len(ingredients)} ingredients for {len(weights)} weights")
    total, reference, weight_sum, count = None, None, 0.0, 0
    # Not enumerate(): its reused result tuple would keep the previous ingredient
    # alive while the next one loads.
    for params in ingredients:
        index = count
        if weights is not None and index >= len(weights):
            raise SoupError(f"more ingredients than the {len(weights)} weights")
        weight = 1.0 if weights is None else weights[index]
        shapes = param_shapes(params)
        if reference is None:
            reference = shapes
            total = _scaled(params, jnp.float32(weight))
        else:
            check_compatible(reference, shapes, _name(names, 0), _name(names, index))
            total = _add_scaled(total, params, jnp.float32(weight))
        # Dispatch is asynchronous: wait, so this ingredient is freed before the next loads.
        total = jax.block_until_ready(total)
        weight_sum += weight
        count += 1
        del params
    if count == 0:
        raise SoupError("a soup needs at least one ingredient")
    if weights is not None and count != len(weights):
        raise SoupError(f"{count} ingredients for {len(weights)} weights")
    return _divide(total, jnp.float32(weight_sum))


def uniform_soup(ingredients: Iterable[Params], names: Sequence[str] | None = None) -> Params:
    """The float32 mean of the ingredients, streaming (see `weighted_average`)."""
    return weighted_average(ingredients, None, names)


def _name(names: Sequence[str] | None, index: int) -> str:
    return names[index] if names is not None and index < len(names) else f"ingredient {index}"


@dataclasses.dataclass
class GreedyResult:
    """What `greedy_soup` did.

    Attributes:
      params: the soup, float32 mean of the accepted ingredients.
      scores: each ingredient's own metric, in input order.
      order: the ingredients' indices sorted by score, best first.
      accepted: for each ingredient (input order), whether it is in the soup.
      trials: (index, metric of the soup with it) in the order they were tried;
        the first is the best ingredient alone.
      soup_score: the metric of the final soup.
    """

    params: Params
    scores: list[float]
    order: list[int]
    accepted: list[bool]
    trials: list[tuple[int, float]]
    soup_score: float


def greedy_soup(
    load: Callable[[int], Params],
    num_ingredients: int,
    metric: Metric,
    scores: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> GreedyResult:
    """Greedy soup (Wortsman et al. 2022, Algorithm 1), streaming over the ingredients.

    Args:
      load: index -> parameter tree; called once per ingredient to score it (unless
        `scores` is given) and once more when it is tried in the soup.
      num_ingredients: how many there are.
      metric: held-out metric of a parameter tree (higher is better), given the
        candidate soup cast to the first ingredient's dtypes.
      scores: the ingredients' own metrics, if already known.
      names: how to call the ingredients in errors (default "ingredient i").

    Returns:
      A GreedyResult.
    """
    if num_ingredients < 1:
        raise SoupError("a soup needs at least one ingredient")
    if scores is None:
        scores = []
        for index in range(num_ingredients):
            params = load(index)
            scores.append(float(metric(params)))
            del params
    scores = [float(s) for s in scores]
    if len(scores) != num_ingredients:
        raise SoupError(f"{len(scores)} scores for {num_ingredients} ingredients")
    # Best first; ties keep the input order.
    order = sorted(range(num_ingredients), key=lambda i: -scores[i])
    first = load(order[0])
    reference_shapes = param_shapes(first)
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), first)
    soup = jax.block_until_ready(_scaled(first, jnp.float32(1.0)))
    del first
    best, count = scores[order[0]], 1
    accepted = [False] * num_ingredients
    accepted[order[0]] = True
    trials = [(order[0], best)]
    for index in order[1:]:
        params = load(index)
        check_compatible(reference_shapes, param_shapes(params), _name(names, order[0]), _name(names, index))
        candidate = jax.block_until_ready(_mean_with(soup, params, jnp.float32(count + 1)))
        del params
        score = float(metric(cast_like(candidate, like)))
        trials.append((index, score))
        if score >= best:
            soup, best, count = candidate, score, count + 1
            accepted[index] = True
        del candidate
    return GreedyResult(
        params=soup, scores=scores, order=order, accepted=accepted, trials=trials, soup_score=best
    )


# ---------------------------------------------------------------- checkpoints as ingredients


def checkpoint_param_shapes(step_dir: str) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape of a checkpoint's model parameters, read from its metadata only.

    Args:
      step_dir: a checkpoint step folder (see checkpointing.resolve_step_dir).
    """
    import orbax.checkpoint as ocp

    from embedder import checkpointing

    state_dir = os.path.join(step_dir, "state")
    try:
        tree = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
        model_tree = tree["params"]["model"]
    except (KeyError, TypeError, FileNotFoundError, ValueError) as e:
        raise checkpointing.CheckpointError(f"{state_dir}: holds no params/model ({e})") from e
    return param_shapes(model_tree)


# Fields of a model description that change the function, not only the numerics.
_NUMERICS_FIELDS = ("dtype", "param_dtype", "remat", "dropout_rate", "attention_dropout_rate")


def check_same_model(descriptions: Sequence[dict], names: Sequence[str]) -> None:
    """Raises SoupError unless the model configs agree on everything but numerics.

    Dropout, remat and dtypes may differ between runs that are souped; the
    architecture (family, sizes, pooling, activation, ...) may not.
    """
    reference = {k: v for k, v in descriptions[0].items() if k not in _NUMERICS_FIELDS}
    for name, description in zip(names[1:], descriptions[1:], strict=True):
        other = {k: v for k, v in description.items() if k not in _NUMERICS_FIELDS}
        diffs = [
            f"{k}: {reference.get(k)!r} in {names[0]}, {other.get(k)!r} in {name}"
            for k in sorted(set(reference) | set(other))
            if reference.get(k) != other.get(k)
        ]
        if diffs:
            raise SoupError("checkpoints of different architectures: " + "; ".join(diffs))


# ---------------------------------------------------------------- the held-out metric of a soup
#
# Greedy soups need one number per candidate on a held-out split: one metric of
# `evaluation` (the same definitions `embedder eval` reports) on an eval task of
# `data.eval_tasks`, at the full embedding size. Choose on a validation split
# (e.g. stdlib_code_search_validation) and report the test split.


def _k_values(metric: str) -> tuple[int, ...]:
    """The cut-off a metric name asks for ("mrr@10" -> (10,)); none for an STS metric."""
    _, at, k = metric.partition("@")
    if not at:
        return evaluation.DEFAULT_K_VALUES
    if not k.isdigit() or int(k) < 1:
        raise ConfigError(f"metric {metric!r}: the cut-off after @ must be a positive integer, e.g. mrr@10")
    return (int(k),)


def check_metric(task: eval_tasks.Task, metric: str) -> None:
    """Raises ConfigError unless `task` reports `metric` (e.g. mrr@10, ndcg@5, spearman)."""
    known = evaluation.metric_names(task, _k_values(metric))
    if metric not in known:
        kinds = [f"{m}@K" for m in evaluation.RETRIEVAL_METRICS]
        choices = kinds if isinstance(task, eval_tasks.RetrievalTask) else list(evaluation.STS_METRICS)
        raise ConfigError(f"metric {metric!r}: task {task.name!r} reports {choices}, e.g. {known[0]}")


def task_score(task: eval_tasks.Task, encoder: evaluation.Encoder, metric: str) -> float:
    """One metric of `evaluation.evaluate` on one task, at the full embedding size.

    Args:
      task: the held-out task.
      encoder: embeds texts (see `evaluation.Encoder`).
      metric: a name the task reports (`check_metric`).

    Returns:
      The metric (higher is better).
    """
    check_metric(task, metric)
    result = evaluation.evaluate([task], encoder, None, _k_values(metric))[task.name]
    return float(result["metrics"][max(result["metrics"])][metric])


def held_out_metric(
    meta: Any, eval_task: str, metric: str, limit: int | None = None, batch_size: int = 64
) -> Metric:
    """The held-out `metric` of a parameter tree of the model that `meta` describes.

    Args:
      meta: a checkpoint's `checkpointing.CheckpointMeta` (model config, vocab_dir, prompts).
      eval_task: an eval task name, folder or file (see `data.eval_tasks.load_task`),
        its split named explicitly (stdlib_code_search_validation).
      metric: e.g. mrr@10, recall@5, ndcg@10, map@10 (retrieval) or spearman (STS).
      limit: use at most this many of the task's examples (`eval_tasks.load_task`).
      batch_size: texts per forward pass at the length limit (shorter texts go more per pass; see `encoding.plan`).

    Returns:
      params -> score; one Embedder is reused, so candidates do not recompile. Each
      query is encoded with its task's prompt, as `embedder eval` does.
    """
    from embedder import inference
    from embedder.data import tokenizers
    from embedder.models import spec

    task = eval_tasks.load_task(eval_task, limit)
    check_metric(task, metric)
    if isinstance(task, eval_tasks.RetrievalTask) and len(task.doc_ids) < 2:
        raise SoupError(
            f"held-out task {task.name!r} has {len(task.doc_ids)} document: it cannot rank anything"
        )
    module = spec.module_from_description(meta.model_config)
    tokenizer = tokenizers.load_tokenizer(meta.vocab_dir)
    embedder = inference.Embedder(
        module,
        None,
        tokenizer,
        inference.default_max_length(module, meta.vocab_dir),
        meta.prompts,
    )
    encoder = evaluation.embedder_encoder(embedder, batch_size)

    def score(params: Params) -> float:
        embedder.params = params
        try:
            return task_score(task, encoder, metric)
        finally:
            embedder.params = None  # the candidate is freed once it is scored

    return score


@dataclasses.dataclass(frozen=True)
class Ingredient:
    """One checkpoint going into a soup.

    Attributes:
      checkpoint: its step folder.
      step: its step.
      meta: its `checkpointing.CheckpointMeta`.
    """

    checkpoint: str
    step: int
    meta: Any


def read_ingredients(paths: Sequence[str]) -> list[Ingredient]:
    """Resolves checkpoints and checks, from metadata alone, that they can be souped.

    Args:
      paths: model dirs (their latest step), checkpoints/ folders or step folders.

    Raises:
      CheckpointError: a path holds no checkpoint.
      SoupError: different architectures (the config field, or the parameter path
        and both shapes), different initialisations (see `check_same_origin`) or
        different vocabularies.
    """
    from embedder import checkpointing

    if not paths:
        raise SoupError("a soup needs at least one checkpoint")
    ingredients = []
    for path in paths:
        step_dir = checkpointing.resolve_step_dir(path)
        meta = checkpointing.read_meta(step_dir)
        ingredients.append(Ingredient(step_dir, int(os.path.basename(step_dir)), meta))
    names = [i.checkpoint for i in ingredients]
    if len(set(names)) != len(names):
        raise SoupError(f"a checkpoint is listed twice: {names}")
    reference = checkpoint_param_shapes(names[0])
    for name in names[1:]:
        check_compatible(reference, checkpoint_param_shapes(name), names[0], name)
    # Same shapes, yet another function (activation, pooling, ...)?
    check_same_model([i.meta.model_config for i in ingredients], names)
    check_same_origin(ingredients)
    vocabularies = {_vocab_text(i.meta.vocab_dir) for i in ingredients}
    if len(vocabularies) > 1:
        raise SoupError(
            "the checkpoints use different vocabularies: "
            + ", ".join(f"{i.checkpoint}: {i.meta.vocab_dir}" for i in ingredients)
        )
    return ingredients


def origin_key(meta: Any, depth: int = 0) -> tuple | None:
    """What must agree for two checkpoints to share an initialisation; None when unknown.

    A random start is its seed; a pretrained start its folder, and its seed when
    a randomly initialised projection head sits on top; a fine-tune from an
    earlier checkpoint (INIT_FROM_CHECKPOINT) that checkpoint; a soup the origin
    of its ingredients (read from their metadata while they exist).

    Args:
      meta: a `checkpointing.CheckpointMeta`.
    """
    from embedder import checkpointing

    origin = meta.origin
    if origin.kind == "random":
        return None if origin.seed is None else ("random", origin.seed)
    if origin.kind == "pretrained":
        head = meta.model_config.get("projection_dim") is not None
        return ("pretrained", origin.path, origin.seed if head else None)
    if origin.kind == "checkpoint":
        return ("checkpoint", origin.path)
    if depth < 8 and origin.sources:
        try:
            return origin_key(checkpointing.read_meta(origin.sources[0]), depth + 1)
        except checkpointing.CheckpointError:
            pass
    return ("soup", tuple(sorted(origin.sources)))


def _describe_origin(meta: Any) -> str:
    origin = meta.origin
    fields = [
        f"{k}={v!r}"
        for k, v in (("seed", origin.seed), ("path", origin.path), ("step", origin.step))
        if v is not None
    ]
    return f"{origin.kind}({', '.join(fields)})"


def check_same_origin(ingredients: Sequence[Ingredient]) -> None:
    """Raises SoupError unless the ingredients started from the same weights.

    Averaging runs from different initialisations (different seeds give
    different random projection heads) averages unrelated weights. Runs agree
    when they share a seed from scratch, a pretrained folder (and the head's
    seed), or the checkpoint they were fine-tuned from (INIT_FROM_CHECKPOINT);
    a checkpoint that does not record its start is not checked.

    Raises:
      SoupError: naming each checkpoint whose start differs from the first's, and both starts.
    """
    keys = [origin_key(i.meta) for i in ingredients]
    known = [(i, k) for i, k in zip(ingredients, keys, strict=True) if k is not None]
    if not known:
        return
    first, reference = known[0]
    odd = [i for i, k in known if k != reference]
    if odd:
        raise SoupError(
            "the checkpoints start from different initialisations, so their weights are unrelated: "
            f"{first.checkpoint} from {_describe_origin(first.meta)}, "
            + ", ".join(f"{i.checkpoint} from {_describe_origin(i.meta)}" for i in odd)
            + "; soup fine-tunes of one run (the same INIT_FROM_CHECKPOINT, or the same pretrained "
            "folder and SEED)"
        )


def _vocab_text(vocab_dir: str | None) -> str | None:
    if not vocab_dir:
        return None
    try:
        with open(os.path.join(vocab_dir, "vocab.txt"), encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return vocab_dir


def soup_checkpoints(
    ingredients: Sequence[Ingredient],
    method: str,
    output: str,
    weights: Sequence[float] | None = None,
    metric: Metric | None = None,
    metric_name: str | None = None,
    sharding: Any = None,
) -> dict[str, Any]:
    """Soups checkpoints into a params-only checkpoint that eval, export and soup read.

    Args:
      ingredients: from `read_ingredients`.
      method: "uniform", "greedy" (needs `metric`) or "weighted" (needs `weights`).
      output: the model dir to create; the soup goes to output/checkpoints/<step>
        (step: the largest ingredient step) and the record to output/soup.json.
      weights: per-ingredient weights (weighted soups).
      metric: held-out metric of a parameter tree (higher is better); with it,
        every ingredient and the soup are scored and recorded.
      metric_name: how the record names the metric.
      sharding: where to load each ingredient (a Sharding or a tree of them), e.g.
        spread over the devices so no host holds a whole model.

    Returns:
      The record written to soup.json.
    """
    from embedder import checkpointing, fileio

    if method not in METHODS:
        raise SoupError(f"method={method!r}: expected one of {METHODS}")
    if method == "greedy" and metric is None:
        raise SoupError("a greedy soup needs a held-out metric (--eval_task and --metric)")
    if method == "weighted" and weights is None:
        raise SoupError("a weighted soup needs one weight per checkpoint (--weights)")
    if method != "weighted" and weights is not None:
        raise SoupError(f"--weights is for weighted soups, not {method}")
    if weights is not None and len(weights) != len(ingredients):
        raise SoupError(f"{len(weights)} weights for {len(ingredients)} checkpoints")
    fileio.check_new_output(output)  # before the first checkpoint loads
    names = [i.checkpoint for i in ingredients]
    like: dict[str, Any] = {}

    def load(index: int) -> Params:
        params, _ = checkpointing.load_model_params(names[index], sharding=sharding)
        like.setdefault("tree", jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params))
        return params

    scores: list[float | None] = [None] * len(ingredients)
    accepted = [True] * len(ingredients)
    if method == "greedy":
        result = greedy_soup(load, len(ingredients), metric, names=names)
        soup, scores, accepted, soup_score = result.params, result.scores, result.accepted, result.soup_score
    else:

        def stream():
            for index in range(len(ingredients)):
                params = load(index)
                if metric is not None:
                    scores[index] = float(metric(params))
                yield params
                del params  # before the next load

        soup = cast_like(weighted_average(stream(), weights, names), like["tree"])
        soup_score = float(metric(soup)) if metric is not None else None
    soup = cast_like(soup, like["tree"])
    step = max(i.step for i in ingredients)
    record = {
        "method": method,
        "metric": metric_name if metric is not None else None,
        "soup_metric": soup_score,
        "ingredients": [
            {
                "checkpoint": i.checkpoint,
                "step": i.step,
                "weight": None if weights is None else float(weights[n]),
                "metric": scores[n],
                "accepted": accepted[n],
            }
            for n, i in enumerate(ingredients)
        ],
    }
    origin = checkpointing.WeightsOrigin("soup", sources=tuple(i.checkpoint for i in ingredients))
    meta = dataclasses.replace(ingredients[0].meta, step=step, soup=record, origin=origin)
    with fileio.atomic_directory(output) as tmp:
        checkpointing.save_model_params(tmp, step, soup, meta)
        fileio.write_json(os.path.join(tmp, "soup.json"), record)
    record["output"] = os.path.join(os.path.abspath(output), "checkpoints", str(step))
    return record


def fsdp_shardings(meta: Any) -> Any:
    """Shardings that spread a checkpoint's parameters over every device (the fsdp axis).

    With them each ingredient is loaded in pieces, one per device, and no device
    (or host, on a pod) ever holds a whole model.
    """
    from embedder import partitioning
    from embedder.models import spec

    module = spec.module_from_description(meta.model_config)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, fsdp=-1))
    return partitioning.variable_shardings(spec.ModelSpec(module).abstract_variables(), mesh)["params"]
