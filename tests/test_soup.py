"""Model soups: the math against numpy, greedy's rule, sharding, checkpoints, the command."""

import dataclasses
import json
import os
import random
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from embedder import checkpointing, cli, inference, soup
from embedder.data import eval_tasks, jsonl
from embedder.models import dual_encoder, pretrained, spec
from tests.training_helpers import TINY, train_tiny


def _tree(rng, scale=1.0):
    return {
        "encoder": {
            "layer_0": {"mlp": {"wi": {"kernel": scale * rng.standard_normal((4, 6)).astype(np.float32)}}},
            "embed": rng.standard_normal((10, 4)).astype(np.float32),
        },
        "projection": {"kernel": rng.standard_normal((4, 3)).astype(np.float32)},
    }


def _leaves(tree):
    return [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]


def test_uniform_soup_is_the_numpy_mean_and_streams():
    rng = np.random.default_rng(0)
    trees = [_tree(rng) for _ in range(4)]
    alive = []

    def ingredients():
        for tree in trees:
            # One ingredient at a time: the previous one is no longer referenced.
            assert all(ref() is None for ref in alive)
            copy = jax.tree.map(np.copy, tree)
            alive.append(weakref.ref(copy["encoder"]["embed"]))
            yield copy
            del copy

    got = soup.uniform_soup(ingredients())
    for leaf, *inputs in zip(_leaves(got), *[_leaves(t) for t in trees], strict=True):
        np.testing.assert_allclose(leaf, np.mean(np.stack(inputs), axis=0), rtol=1e-6, atol=1e-7)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))


def test_bfloat16_ingredients_average_in_float32():
    # 1 + 2**-8 is not a bfloat16; the float32 mean of 1 and 1 + 2**-7 is.
    a = {"w": jnp.full((3,), 1.0, jnp.bfloat16)}
    b = {"w": jnp.full((3,), 1.0 + 2**-7, jnp.bfloat16)}
    mean = soup.uniform_soup([a, b])
    assert mean["w"].dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(mean["w"]), np.full(3, 1.0 + 2**-8, np.float32))
    assert soup.cast_like(mean, a)["w"].dtype == jnp.bfloat16


def test_weighted_soup_is_the_numpy_weighted_mean():
    rng = np.random.default_rng(1)
    trees = [_tree(rng) for _ in range(3)]
    weights = [0.5, 2.0, 1.5]
    got = soup.weighted_average(trees, weights)
    for leaf, *inputs in zip(_leaves(got), *[_leaves(t) for t in trees], strict=True):
        expected = np.average(np.stack(inputs), axis=0, weights=weights)
        np.testing.assert_allclose(leaf, expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(soup.SoupError, match="non-negative"):
        soup.weighted_average(trees, [1.0, -1.0, 1.0])
    with pytest.raises(soup.SoupError, match="3 ingredients for 2 weights"):
        soup.weighted_average(trees, [1.0, 1.0])


def test_greedy_soup_rejects_the_ingredient_that_hurts():
    """Wortsman et al. 2022, Algorithm 1, on a case worked out by hand.

    metric = -||w||^2. Individually: a = (1, 0) scores -1, b = (-1, 0.2) -1.04,
    c = (0, 5) -25, so the order is a, b, c. Soup {a}: -1. With b: mean (0, 0.1),
    -0.01 >= -1: accepted. With c: mean (0, 5.2/3), -3.004 < -0.01: rejected.
    """
    points = {"c": [0.0, 5.0], "a": [1.0, 0.0], "b": [-1.0, 0.2]}  # given out of order
    names = list(points)
    loads = []

    def load(index):
        loads.append(names[index])
        return {"w": np.asarray(points[names[index]], np.float32)}

    def metric(params):
        return -float(np.sum(np.square(np.asarray(params["w"]))))

    result = soup.greedy_soup(load, 3, metric, names=names)
    assert [names[i] for i in result.order] == ["a", "b", "c"]
    assert dict(zip(names, result.accepted, strict=True)) == {"c": False, "a": True, "b": True}
    np.testing.assert_allclose(result.params["w"], [0.0, 0.1], atol=1e-7)
    np.testing.assert_allclose(result.scores, [-25.0, -1.0, -1.04], rtol=1e-6)
    tried = [(names[i], round(s, 4)) for i, s in result.trials]
    assert tried == [("a", -1.0), ("b", -0.01), ("c", -3.0044)]
    assert result.soup_score == pytest.approx(-0.01)
    # Streaming: each ingredient is loaded once to score it and once to try it.
    assert sorted(loads) == ["a", "a", "b", "b", "c", "c"]


def test_greedy_soup_keeps_a_tie():
    """The paper's rule is >=: an ingredient that leaves the metric unchanged goes in."""
    result = soup.greedy_soup(lambda i: {"w": np.full(2, float(i), np.float32)}, 2, lambda p: 0.0)
    assert result.accepted == [True, True]
    np.testing.assert_allclose(result.params["w"], [0.5, 0.5])


def test_soup_of_sharded_parameters_stays_sharded():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, PartitionSpec("x", None))
    rng = np.random.default_rng(2)
    hosts = [{"w": rng.standard_normal((16, 4)).astype(np.float32)} for _ in range(3)]
    trees = [jax.device_put(t, sharding) for t in hosts]
    got = soup.uniform_soup(trees)
    assert got["w"].sharding == sharding
    np.testing.assert_allclose(np.asarray(got["w"]), np.mean([t["w"] for t in hosts], axis=0), rtol=1e-6)
    greedy = soup.greedy_soup(lambda i: trees[i], 3, lambda p: 0.0)
    assert greedy.params["w"].sharding == sharding


def test_different_shapes_name_the_parameter_and_both_shapes():
    rng = np.random.default_rng(3)
    a, b = _tree(rng), _tree(rng)
    b["encoder"]["layer_0"]["mlp"]["wi"]["kernel"] = np.zeros((4, 8), np.float32)
    with pytest.raises(soup.SoupError, match=r"encoder/layer_0/mlp/wi/kernel has shape \(4, 8\).*\(4, 6\)"):
        soup.uniform_soup([a, b])
    b = _tree(rng)
    del b["projection"]
    with pytest.raises(soup.SoupError, match="has no parameter projection/kernel"):
        soup.weighted_average([a, b], [1, 1])


def test_task_score_by_hand():
    queries = np.eye(3, dtype=np.float32)
    # Query 0 finds its document first, query 1 second (document 2 ranks above it), query 2 third.
    documents = np.array([[1, 0, 0.3], [0, 0.5, 0.9], [0.2, 0.8, 0.1]], np.float32)
    # Ranks (cosine; the query's component over the document's norm): 1; 2 (doc 2: 0.96 > 0.49);
    # 3 (0.12 < 0.29 < 0.87).
    task = eval_tasks.retrieval_task_from_pairs("by_hand", [("q0", "d0"), ("q1", "d1"), ("q2", "d2")])

    def encoder(texts, kind, task=None):
        return queries if kind == "query" else documents

    assert soup.task_score(task, encoder, "mrr@10") == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert soup.task_score(task, encoder, "recall@1") == pytest.approx(1 / 3)
    assert soup.task_score(task, encoder, "mrr@2") == pytest.approx((1 + 1 / 2) / 3)
    expected_ndcg = (1 + 1 / np.log2(3) + 1 / np.log2(4)) / 3
    assert soup.task_score(task, encoder, "ndcg@10") == pytest.approx(expected_ndcg)
    with pytest.raises(ValueError, match="precision@10"):
        soup.task_score(task, encoder, "precision@10")


def test_held_out_task_names_its_split_and_keeps_the_limit(stdlib_splits):
    """Soup's held-out stdlib pairs are the validation split, named so; --eval_limit takes the first pairs."""
    task = eval_tasks.load_task("stdlib_code_search_validation", limit=40)
    pairs = stdlib_splits["validation"][:40]
    assert task.name == "stdlib_code_search_validation"
    assert set(task.queries) == {p.query for p in pairs} and set(task.documents) == {
        p.positive for p in pairs
    }
    assert eval_tasks.load_task("stdlib_code_search", limit=5).queries[0] == stdlib_splits["test"][0].query


# ---------------------------------------------------------------- checkpoints and the command


def _train(model_dir, train_file, steps):
    return train_tiny(
        model_dir,
        train_file,
        steps=steps,
        checkpoint=checkpointing.CheckpointConfig(save_every=1000, async_save=False),
        log_every=1000,
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, stdlib_splits, stdlib_jsonl):
    """Two fine-tuning runs from the same initialisation (same seed) on the same pairs in other orders."""
    root = tmp_path_factory.mktemp("runs")
    pairs = stdlib_splits["train"][:600]
    runs = []
    for order_seed in (0, 1):
        shuffled = list(pairs)
        random.Random(order_seed).shuffle(shuffled)
        train_file = str(root / f"train_{order_seed}.jsonl")
        jsonl.write_jsonl(train_file, shuffled)
        runs.append(_train(root / f"run_{order_seed}", train_file, steps=25).checkpoint_dir)
    held_out = stdlib_jsonl("validation", 300)
    return runs, held_out


@pytest.mark.slow
def test_soup_of_two_runs_scores_at_least_the_worse_run(two_runs, tmp_path, capsys):
    runs, held_out = two_runs
    output = tmp_path / "soup"
    argv = ["soup", "--checkpoints", *runs, "--method=uniform", f"--eval_task={held_out}", "--metric=mrr@10"]
    assert cli.main([*argv, f"--output={output}"]) == 0
    record = json.loads((output / "soup.json").read_text())
    scores = [item["metric"] for item in record["ingredients"]]
    print(f"held-out mrr@10: runs {scores}, uniform soup {record['soup_metric']}")
    assert record["soup_metric"] >= min(scores), record
    assert [item["checkpoint"] for item in record["ingredients"]] == runs
    # A normal checkpoint: its parameters are the mean of the runs', and eval/export load it.
    souped, meta = checkpointing.load_model_params(str(output))
    first, _ = checkpointing.load_model_params(runs[0])
    second, _ = checkpointing.load_model_params(runs[1])
    for got, a, b in zip(
        jax.tree.leaves(souped), jax.tree.leaves(first), jax.tree.leaves(second), strict=True
    ):
        np.testing.assert_allclose(got, (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-6, atol=1e-7)
    assert meta.step == 25 and meta.soup["method"] == "uniform"
    assert inference.Embedder.from_checkpoint(str(output)).encode(["x"]).shape == (1, 32)
    assert "uniform soup of 2 checkpoints" in capsys.readouterr().out


@pytest.mark.slow
def test_greedy_soup_of_checkpoints_records_each_metric(two_runs, tmp_path):
    runs, held_out = two_runs
    output = tmp_path / "greedy"
    argv = ["soup", "--checkpoints", *runs, "--method=greedy", f"--eval_task={held_out}", "--metric=recall@5"]
    assert cli.main([*argv, f"--output={output}"]) == 0
    record = json.loads((output / "soup.json").read_text())
    scores = [item["metric"] for item in record["ingredients"]]
    assert record["soup_metric"] >= max(scores)  # greedy never ends below its best ingredient
    assert sum(item["accepted"] for item in record["ingredients"]) >= 1
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


@pytest.mark.slow
def test_weighted_soup_command_and_its_errors(two_runs, tmp_path, capsys):
    runs, _ = two_runs
    output = tmp_path / "weighted"
    # --fsdp: each checkpoint is loaded spread over the 8 (fake) devices.
    argv = ["soup", "--checkpoints", *runs, "--method=weighted", "--weights", "3", "1", "--fsdp"]
    assert cli.main([*argv, f"--output={output}"]) == 0
    souped, _ = checkpointing.load_model_params(str(output))
    first, _ = checkpointing.load_model_params(runs[0])
    second, _ = checkpointing.load_model_params(runs[1])
    for got, a, b in zip(
        jax.tree.leaves(souped), jax.tree.leaves(first), jax.tree.leaves(second), strict=True
    ):
        np.testing.assert_allclose(got, 0.75 * np.asarray(a) + 0.25 * np.asarray(b), rtol=1e-5, atol=1e-7)
    capsys.readouterr()
    # The output is never overwritten; greedy needs a metric; weights must match.
    assert cli.main(["soup", "--checkpoints", *runs, f"--output={output}"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["soup", "--checkpoints", *runs, "--method=greedy", f"--output={tmp_path / 'g'}"]) == 2
    assert "needs a held-out metric" in capsys.readouterr().err
    assert (
        cli.main(
            [
                "soup",
                "--checkpoints",
                *runs,
                "--method=weighted",
                "--weights",
                "1",
                f"--output={tmp_path / 'w'}",
            ]
        )
        == 2
    )
    assert "1 weights for 2 checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not (tmp_path / "w").exists()


@pytest.mark.slow
def test_souping_different_architectures_names_the_parameter_and_shapes(two_runs, tmp_path, capsys):
    runs, _ = two_runs
    wider = dual_encoder.DualEncoder(dataclasses.replace(TINY, mlp_dim=128))
    params = spec.ModelSpec(wider).init_params(jax.random.key(0))
    meta = {
        "model_config": spec.describe_module(wider),
        "vocab_dir": pretrained.minilm_l6_v2_path(),
        "step": 3,
    }
    other = checkpointing.save_model_params(str(tmp_path / "wider"), 3, params, meta)
    assert cli.main(["soup", "--checkpoints", runs[0], other, f"--output={tmp_path / 'bad'}"]) == 2
    err = capsys.readouterr().err
    assert "encoder/layer_0/mlp/wi/bias has shape (128,)" in err and "(64,)" in err, err
    assert other in err and not (tmp_path / "bad").exists()
    # Same shapes, another function: the config field is named.
    gelu_tanh = dual_encoder.DualEncoder(dataclasses.replace(TINY, activation="gelu_tanh"))
    meta = {**meta, "model_config": spec.describe_module(gelu_tanh)}
    params, _ = checkpointing.load_model_params(runs[0])
    other = checkpointing.save_model_params(str(tmp_path / "tanh"), 3, params, meta)
    assert cli.main(["soup", "--checkpoints", runs[0], other, f"--output={tmp_path / 'bad'}"]) == 2
    assert "activation: 'gelu' in" in capsys.readouterr().err
    assert cli.main(["soup", "--checkpoints", str(tmp_path / "nothing"), f"--output={tmp_path / 'bad'}"]) == 2
    assert "no checkpoints found" in capsys.readouterr().err
