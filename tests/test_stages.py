"""The recipe's stages: a fine-tune starts from a pre-finetune's checkpoint; the stage gin files."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from embedder import checkpointing, losses, partitioning, train_loop, trainer
from embedder.data import jsonl, pipeline
from embedder.errors import CheckpointError
from embedder.models import dual_encoder, pretrained, spec, transformer

# A pre-finetuning run the fine-tuning tests start from.
SLOW_FIXTURES = ("pretrained_run",)


TINY = transformer.TransformerConfig(
    vocab_size=30522, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64, max_len=64
)
WORDS = "alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega river stone cloud".split()
ONE_DEVICE = partitioning.MeshConfig(data=1, num_devices=1)


def _pairs(count: int, seed: int = 0) -> list[jsonl.Example]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        words = list(rng.choice(WORDS, size=6))
        out.append(
            jsonl.Example(
                query=f"{' '.join(words[:3])} {i}",
                positive=f"{' '.join(words)} number {i}",
                negatives=(f"{' '.join(reversed(words))} other {i}",),
            )
        )
    return out


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    jsonl.write_jsonl(str(path), _pairs(64))
    return str(path)


def _spec(config=TINY):
    return spec.ModelSpec(dual_encoder.DualEncoder(config), vocab_dir=pretrained.minilm_l6_v2_path())


LOSS = losses.ContrastiveLossConfig(learn_temperature=True, temperature=0.1)
OPTIMIZER = trainer.OptimizerConfig(learning_rate=1e-3, warmup_steps=2)
NO_WARMUP = trainer.OptimizerConfig(learning_rate=1e-3, warmup_steps=0)


def _train(model_dir, train_file, steps, **kwargs):
    return train_loop.train(
        model_dir=str(model_dir),
        model=kwargs.pop("model", _spec()),
        data=pipeline.DataConfig(train_files=[train_file], batch_size=8, query_len=12, doc_len=16),
        train_steps=steps,
        loss=LOSS,
        optimizer=OPTIMIZER,
        mesh=ONE_DEVICE,
        checkpoint=checkpointing.CheckpointConfig(save_every=1000),
        peak_flops_per_device=1e12,
        log_every=1,
        **kwargs,
    )


@pytest.fixture(scope="module")
def pretrained_run(train_file, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("pretrain")
    result = _train(model_dir, train_file, 4, seed=3)
    return str(model_dir), result


def _restore_state(model_dir: str, steps: int):
    runner = trainer.Trainer(_spec(), LOSS, OPTIMIZER, partitioning.make_mesh(ONE_DEVICE), steps)
    ckpt = checkpointing.Checkpointer(model_dir)
    state = ckpt.restore(ckpt.latest_step(), runner.abstract_state())[0]
    ckpt.close()
    return state


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.mark.parametrize("where", ["model_dir", "checkpoints", "step"])
def test_init_state_is_the_parent_checkpoint_with_a_fresh_optimizer(pretrained_run, where):
    model_dir, result = pretrained_run
    path = {
        "model_dir": model_dir,
        "checkpoints": os.path.join(model_dir, "checkpoints"),
        "step": result.checkpoint_dir,
    }[where]
    parent = _restore_state(model_dir, 4)
    runner = trainer.Trainer(_spec(), LOSS, OPTIMIZER, partitioning.make_mesh(ONE_DEVICE), 10)
    state, origin = runner.init_state_from_checkpoint(path, seed=7)
    # The whole dual encoder and the learned temperature, as the parent left them.
    _assert_trees_equal(state.params, parent.params)
    assert float(parent.params["loss"]["logit_scale"]) != pytest.approx(losses.initial_logit_scale(0.1))
    assert int(state.step) == 0
    # Adam's moments are zero and its count is 0: nothing of the parent's optimizer.
    for leaf in jax.tree.leaves(state.opt_state):
        np.testing.assert_array_equal(np.asarray(leaf), np.zeros_like(np.asarray(leaf)))
    assert origin == checkpointing.WeightsOrigin("checkpoint", path=result.checkpoint_dir, step=4)


@pytest.mark.slow
def test_fine_tune_starts_at_step_zero_from_the_parent_and_warms_up_again(
    pretrained_run, train_file, tmp_path
):
    model_dir, result = pretrained_run
    parent = _restore_state(model_dir, 4)
    child = tmp_path / "finetune"
    # One step: warm-up starts the learning rate at 0, so the step leaves the
    # parameters as the parent left them (a restored schedule would be past warm-up).
    first = _train(child, train_file, 6, seed=1, stop_at_step=1, init_from_checkpoint=model_dir)
    assert first.step == 1
    logged = [json.loads(line) for line in open(child / "metrics.jsonl")]
    assert logged[0]["step"] == 1 and logged[0]["learning_rate"] == 0.0
    state = _restore_state(str(child), 6)
    assert int(state.step) == 1
    _assert_trees_equal(state.params, parent.params)
    meta = checkpointing.read_meta(first.checkpoint_dir)
    assert meta.origin == checkpointing.WeightsOrigin("checkpoint", path=result.checkpoint_dir, step=4)
    # A restart resumes its own checkpoint (and keeps the origin), not the parent's.
    second = _train(child, train_file, 6, seed=1, stop_at_step=3, init_from_checkpoint=model_dir)
    assert second.step == 3 and len(second.losses) == 2
    assert checkpointing.read_meta(second.checkpoint_dir).origin == meta.origin
    moved = _restore_state(str(child), 6)
    assert not np.array_equal(
        np.asarray(jax.tree.leaves(moved.params["model"])[0]),
        np.asarray(jax.tree.leaves(parent.params["model"])[0]),
    )


def test_init_from_a_checkpoint_of_another_architecture_names_the_field(pretrained_run, tmp_path):
    model_dir, _ = pretrained_run
    wider = transformer.TransformerConfig(
        vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=64
    )
    runner = trainer.Trainer(_spec(wider), LOSS, OPTIMIZER, partitioning.make_mesh(ONE_DEVICE), 10)
    with pytest.raises(CheckpointError, match="num_layers"):
        runner.init_state_from_checkpoint(model_dir, seed=0)
    # Dropout (numerics and regularisation) may differ between the stages.
    with_dropout = dataclasses.replace(TINY, dropout_rate=0.1)
    runner = trainer.Trainer(_spec(with_dropout), LOSS, OPTIMIZER, partitioning.make_mesh(ONE_DEVICE), 10)
    state, _ = runner.init_state_from_checkpoint(model_dir, seed=0)
    _assert_trees_equal(state.params, _restore_state(model_dir, 4).params)


def _operative(files, bindings=()):
    """The train() arguments the gin files configure (built, as `embedder train` builds them)."""
    import gin
    from embedder import gin_utils

    gin_utils.parse([*files, "models/tiny.gin"], ["TRAIN_FILES=['x.jsonl']", *bindings])
    try:
        return dict(
            loss=gin.query_parameter("train_loop.train.loss").scoped_configurable_fn(),
            data=gin.query_parameter("train_loop.train.data").scoped_configurable_fn(),
            init=gin_utils.macro("INIT_FROM_CHECKPOINT"),
            model=gin_utils.macro("MODEL"),
        )
    finally:
        gin.clear_config()


def test_pretrain_gin_binds_in_batch_negatives_only_with_matryoshka_dims():
    built = _operative(["runs/pretrain.gin"])
    loss, data = built["loss"], built["data"]
    assert not loss.same_tower_negatives and not loss.share_hard_negatives
    assert data.num_negatives == 0 and not data.task_homogeneous
    assert data.batch_size >= 1024
    full = built["model"].module.embedding_dim
    assert loss.matryoshka_dims[0] == full and len(loss.matryoshka_dims) >= 2
    assert built["init"] is None


@pytest.mark.parametrize("recipe, same_tower, homogeneous", [("gecko", True, False), ("gemini", False, True)])
def test_finetune_gin_binds_the_recipe_terms(recipe, same_tower, homogeneous, tmp_path):
    built = _operative(["runs/finetune.gin"], [f"RECIPE='{recipe}'", f"INIT_FROM_CHECKPOINT='{tmp_path}'"])
    loss, data = built["loss"], built["data"]
    assert loss.same_tower_negatives is same_tower
    # Both: the duplicate mask keeps a query's own positive text out of its negatives.
    assert loss.mask_duplicates
    assert data.task_homogeneous is homogeneous
    assert data.num_negatives == 1
    assert built["init"] == str(tmp_path)
    assert len(loss.matryoshka_dims) >= 2


def test_an_unknown_recipe_is_a_config_error():
    from embedder.errors import ConfigError

    with pytest.raises(ConfigError, match="RECIPE='geko'"):
        _operative(["runs/finetune.gin"], ["RECIPE='geko'"])


def test_default_matryoshka_dims_halve_the_embedding_size():
    from embedder import recipes

    assert recipes.matryoshka_dims(_spec()) == (32, 16)
    wide = transformer.TransformerConfig(
        vocab_size=100, hidden_size=768, num_layers=1, num_heads=4, mlp_dim=8
    )
    assert recipes.matryoshka_dims(_spec(wide)) == (768, 384, 192, 96)


def _dropout_batch(batch: int, negatives: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)

    def tokens(shape, length):
        lengths = rng.integers(2, length + 1, size=shape)
        out = rng.integers(1, 128, size=(*shape, length)).astype(np.int32)
        out[np.arange(length) >= lengths[..., None]] = 0
        return out

    return {
        "query_tokens": tokens((batch,), 8),
        "positive_tokens": tokens((batch,), 12),
        "negative_tokens": tokens((batch, negatives), 12),
        "query_ids": np.arange(batch, dtype=np.int32),
        "positive_ids": np.arange(batch, dtype=np.int32) + 1000,
        "weights": np.ones(batch, np.float32),
    }


@pytest.mark.slow
def test_gradient_cache_step_equals_the_plain_step_with_dropout():
    data = 2  # the batch split over two devices, each chunk over both
    config = transformer.TransformerConfig(
        vocab_size=128,
        hidden_size=32,
        num_layers=1,
        num_heads=4,
        mlp_dim=64,
        max_len=64,
        dropout_rate=0.1,
        attention_dropout_rate=0.1,
    )
    model = spec.ModelSpec(dual_encoder.DualEncoder(config, projection_dim=16))
    loss = losses.ContrastiveLossConfig(same_tower_negatives=True, matryoshka_dims=(16, 8))
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=data, num_devices=data))
    batch = _dropout_batch(16, 2)
    results = {}
    for chunk in (0, 4):  # 4 chunks, each split over both devices
        # No warm-up: the first step's learning rate is not 0, so the parameters move.
        runner = trainer.Trainer(model, loss, NO_WARMUP, mesh, 10, grad_cache_chunk=chunk)
        state = runner.init_state(seed=0)
        state, metrics = runner.train_step(state, partitioning.global_batch(mesh, batch))
        results[chunk] = (jax.device_get(state.params), jax.device_get(metrics))
    plain_params, plain_metrics = results[0]
    for chunk in (4,):
        params, metrics = results[chunk]
        np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-5)
        np.testing.assert_allclose(metrics["grad_norm"], plain_metrics["grad_norm"], rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, plain_params
        )
    start = jax.device_get(trainer.Trainer(model, loss, NO_WARMUP, mesh, 10).init_state(seed=0).params)
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(plain_params), jax.tree.leaves(start), strict=True)
    ]
    assert all(moved[:3]), moved
    # Dropout is on: the training loss differs from the deterministic one.
    eval_runner = trainer.Trainer(model, loss, OPTIMIZER, mesh, 10)
    state = eval_runner.init_state(seed=0)
    embeddings = eval_runner._embed(state.params, batch, jax.random.key(0), train=False)
    deterministic, _ = eval_runner._loss(state.params, embeddings, batch)
    assert abs(float(deterministic) - float(plain_metrics["loss"])) > 1e-4


# ------------------------------------------------------------------ missing and equal negatives

TAU = 0.05


def _vector(text: str, dim: int = 8) -> np.ndarray:
    seed = int.from_bytes(text.encode()[:16].ljust(16, b"\0"), "little") % (2**32)
    return np.random.default_rng([seed, len(text)]).normal(size=dim)


def _reference_loss(batch: list[jsonl.Example], k: int, same_tower: bool, shared: bool) -> float:
    """Per-query NCE built from the texts: a candidate whose text is the query's positive never counts."""
    unit = lambda t: _vector(t) / np.linalg.norm(_vector(t))  # noqa: E731
    total = 0.0
    for i, example in enumerate(batch):
        q = unit(example.query)
        logits = [q @ unit(example.positive) / TAU]
        for j, other in enumerate(batch):
            if j == i or other.query == example.query or other.positive == example.positive:
                continue  # Gemini Embedding's duplicate mask
            logits.append(q @ unit(other.positive) / TAU)
            if same_tower:
                logits.append(q @ unit(other.query) / TAU)
        owners = batch if shared else [example]
        for owner in owners:
            for negative in owner.negatives[:k]:
                if negative != example.positive:
                    logits.append(q @ unit(negative) / TAU)
        logits = np.array(logits)
        top = logits.max()
        total += top + np.log(np.exp(logits - top).sum()) - logits[0]
    return total / len(batch)


def _loss_of_batcher(examples, k, same_tower, shared):
    from embedder.data import batching, wordpiece

    tokenizer = wordpiece.WordPieceTokenizer.from_pretrained_dir(pretrained.minilm_l6_v2_path())
    batcher = batching.PairBatcher(
        examples, tokenizer, global_batch_size=len(examples), query_len=24, doc_len=24, num_negatives=k
    )
    features = batcher.batch(0)
    order = [examples[i] for i in batcher.global_indices(0)]
    assert "negative_valid" in features
    assert features["negative_valid"].tolist() == [
        [1] * min(len(e.negatives), k) + [0] * (k - min(len(e.negatives), k)) for e in order
    ]
    negatives = np.stack(
        [[_vector(t) for t in e.negatives[:k]] + [np.zeros(8)] * (k - len(e.negatives[:k])) for e in order]
    )
    config = losses.ContrastiveLossConfig(
        temperature=TAU, same_tower_negatives=same_tower, share_hard_negatives=shared, mask_duplicates=True
    )
    loss, _ = losses.matryoshka_contrastive_loss(
        np.stack([_vector(e.query) for e in order]),
        np.stack([_vector(e.positive) for e in order]),
        negatives,
        config=config,
        query_ids=features["query_ids"],
        positive_ids=features["positive_ids"],
        weights=features["weights"],
        negative_mask=features["negative_valid"],
        negative_ids=features["negative_ids"],
    )
    return float(loss), order


@pytest.mark.parametrize("shared", [False, True])
def test_missing_negatives_are_left_out_of_the_loss(shared):
    # Examples with 0, 1 and 3 negatives, asked for 3 each.
    examples = [
        jsonl.Example("where is the river", "the river runs north", ()),
        jsonl.Example("what is a stone", "a stone is hard", ("a cloud is soft",)),
        jsonl.Example("who sings", "birds sing at dawn", ("fish swim", "dogs bark", "cats sleep")),
        jsonl.Example("when does it rain", "rain falls in spring", ()),
    ]
    loss, order = _loss_of_batcher(examples, 3, same_tower=False, shared=shared)
    np.testing.assert_allclose(loss, _reference_loss(order, 3, False, shared), rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
def test_no_query_ever_sees_its_own_positive_among_its_negatives(seed):
    """Random batches of shared / own negatives, partial lists and duplicate texts (property test)."""
    rng = np.random.default_rng(seed)
    texts = [f"text {w}" for w in WORDS]
    queries = [f"ask {w}" for w in WORDS[:5]]
    examples = []
    for _ in range(8):
        positive = str(rng.choice(texts[:6]))  # few positives: equal texts across rows
        pool = [positive, *rng.choice(texts, size=3)]  # a negative may be the positive itself
        examples.append(
            jsonl.Example(
                str(rng.choice(queries)), positive, tuple(str(t) for t in pool[: rng.integers(0, 4)])
            )
        )
    if len({e.positive for e in examples}) < 2:
        pytest.skip("a batch with one positive text has no negative at all")
    k = int(rng.integers(1, 4))
    for shared in (False, True):
        for same_tower in (False, True):
            loss, order = _loss_of_batcher(examples, k, same_tower, shared)
            np.testing.assert_allclose(loss, _reference_loss(order, k, same_tower, shared), rtol=1e-5)


# ------------------------------------------------------------------ soups check their ingredients' start


def _copy_with_origin(source_step: str, folder, origin) -> str:
    params, meta = checkpointing.load_model_params(source_step)
    return checkpointing.save_model_params(str(folder), 5, params, dataclasses.replace(meta, origin=origin))


def test_soup_refuses_ingredients_from_different_initialisations(pretrained_run, tmp_path):
    from embedder import soup
    from embedder.errors import SoupError

    _, result = pretrained_run
    assert checkpointing.read_meta(result.checkpoint_dir).origin == checkpointing.WeightsOrigin(
        "random", seed=3
    )
    other = _copy_with_origin(
        result.checkpoint_dir, tmp_path / "seed4", checkpointing.WeightsOrigin("random", seed=4)
    )
    with pytest.raises(SoupError, match="different initialisations") as error:
        soup.read_ingredients([result.checkpoint_dir, other])
    assert other in str(error.value) and "seed=4" in str(error.value) and "seed=3" in str(error.value)
    # Two fine-tunes of one parent (any seeds) share their start; a soup of them too.
    parent = checkpointing.WeightsOrigin("checkpoint", path=result.checkpoint_dir, step=4)
    a = _copy_with_origin(result.checkpoint_dir, tmp_path / "a", parent)
    b = _copy_with_origin(result.checkpoint_dir, tmp_path / "b", parent)
    assert len(soup.read_ingredients([a, b])) == 2
    souped = _copy_with_origin(
        result.checkpoint_dir, tmp_path / "soup", checkpointing.WeightsOrigin("soup", sources=(a, b))
    )
    assert len(soup.read_ingredients([souped, a])) == 2
    with pytest.raises(SoupError, match="different initialisations"):
        soup.read_ingredients([a, other])


# ------------------------------------------------------------------ prompts and one task per batch on JSONL


def test_jsonl_tasks_and_titles_get_the_prompts_and_one_task_per_batch(tmp_path):
    from embedder.data import prompts, wordpiece

    records = [
        {"query": f"find {i}", "positive": f"body {i}", "task": "code search", "title": f"t{i}"}
        for i in range(48)
    ] + [{"query": f"ask {i}", "positive": f"answer {i}", "task": "question answering"} for i in range(16)]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert jsonl.read_jsonl(str(path))[0].title == "t0"
    config = prompts.PromptConfig(enabled=True)
    source = pipeline.make_train_source(
        global_batch_size=8,
        query_len=16,
        doc_len=16,
        vocab_dir=pretrained.minilm_l6_v2_path(),
        train_files=[str(path)],
        task_homogeneous=True,
        prompts=config,
        seed=5,
    )
    tokenizer = wordpiece.WordPieceTokenizer.from_pretrained_dir(pretrained.minilm_l6_v2_path())
    by_query = {}
    for r in records:
        text = prompts.format_query(r["query"], r["task"], config)
        by_query[tuple(tokenizer.encode(text, max_length=16))] = r
    seen = {"code search": 0, "question answering": 0}
    for step in range(12):
        batch = source.batch(step)
        rows = [by_query[tuple(t[t != tokenizer.pad_id])] for t in batch["query_tokens"]]
        assert len({r["task"] for r in rows}) == 1, step  # one task per batch
        seen[rows[0]["task"]] += 1
        for r, positive in zip(rows, batch["positive_tokens"], strict=True):
            expected = tokenizer.encode(
                prompts.format_document(r["positive"], r.get("title"), config), max_length=16
            )
            assert positive[: len(expected)].tolist() == expected
    assert all(seen.values())
    # The task of a step is drawn with probability proportional to the task's size (48 : 16).
    steps = 4000
    share = np.mean([source.step_task(s) == source.task_names.index("code search") for s in range(steps)])
    assert abs(share - 0.75) < 5 * np.sqrt(0.75 * 0.25 / steps)
    # Every example of a task is visited once per epoch of that task.
    code_steps = [s for s in range(40) if source.task_names[source.step_task(s)] == "code search"][:6]
    visited = np.concatenate([source.global_indices(s) for s in code_steps])
    assert sorted(visited.tolist()) == list(range(48))


def test_a_task_smaller_than_a_batch_is_a_config_error(tmp_path):
    from embedder.data import batching, wordpiece
    from embedder.errors import ConfigError

    examples = [jsonl.Example(f"q{i}", f"p{i}", task="big") for i in range(16)]
    examples += [jsonl.Example(f"s{i}", f"p{i}", task="small") for i in range(3)]
    tokenizer = wordpiece.WordPieceTokenizer.from_pretrained_dir(pretrained.minilm_l6_v2_path())
    with pytest.raises(ConfigError, match="task 'small' has 3 examples"):
        batching.PairBatcher(
            examples, tokenizer, global_batch_size=8, query_len=8, doc_len=8, task_homogeneous=True
        )


@pytest.mark.slow
def test_a_step_with_missing_negatives_is_finite_and_ignores_their_rows():
    config = transformer.TransformerConfig(
        vocab_size=128, hidden_size=32, num_layers=1, num_heads=4, mlp_dim=64, max_len=64
    )
    model = spec.ModelSpec(dual_encoder.DualEncoder(config))
    mesh = partitioning.make_mesh(ONE_DEVICE)
    batch = _dropout_batch(8, 2)
    batch["negative_valid"] = np.array([[1, 1], [1, 0], [0, 0], [1, 1]] * 2, np.int32)
    batch["negative_ids"] = np.where(batch["negative_valid"] == 1, np.arange(16).reshape(8, 2) + 2000, -1)
    padded = dict(
        batch, negative_tokens=np.where(batch["negative_valid"][..., None] == 1, batch["negative_tokens"], 0)
    )
    results = []
    for features in (batch, padded):
        runner = trainer.Trainer(model, losses.ContrastiveLossConfig(), NO_WARMUP, mesh, 10)
        _, metrics = runner.train_step(runner.init_state(seed=0), partitioning.global_batch(mesh, features))
        results.append(jax.device_get(metrics))
    assert np.isfinite(results[1]["grad_norm"]) and np.isfinite(results[1]["loss"])
    # What a missing row holds does not matter: it is out of the loss.
    np.testing.assert_allclose(results[0]["loss"], results[1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(results[0]["grad_norm"], results[1]["grad_norm"], rtol=1e-5)
