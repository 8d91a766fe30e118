"""Evaluation during training and `embedder eval` on the checkpoint it leaves: the
metrics files, the best-checkpoint choice, the table, results.json and the PNGs."""

import json
import os

import jax
import numpy as np
import pytest
import scipy.stats
from jax.sharding import NamedSharding, PartitionSpec

from embedder import (
    checkpointing,
    cli,
    evaluation,
    inference,
    partitioning,
    plots,
    summaries,
    train_loop,
    trainer,
)
from embedder.data import eval_tasks, pipeline
from embedder.data import prompts as prompts_lib
from embedder.models import pretrained
from tests.training_helpers import TINY_512, tiny_spec, train_tiny

# A six-step training run with evaluations.
SLOW_FIXTURES = ("run",)


LENGTH = 32  # query and document tokens, in training and in `embedder eval --max_length`
TASK = "stdlib_code_search"


def _train(model_dir, train_file, **overrides):
    kwargs = dict(
        model=tiny_spec(TINY_512),
        data=pipeline.DataConfig(train_files=[train_file], batch_size=16, query_len=LENGTH, doc_len=LENGTH),
        steps=6,
        optimizer=trainer.OptimizerConfig(learning_rate=1e-3, warmup_steps=1),
        mesh=partitioning.MeshConfig(),  # all 8 devices
        checkpoint=checkpointing.CheckpointConfig(
            save_every=1, keep=1, keep_best=1, best_metric=f"eval/{TASK}/ndcg@10", async_save=False
        ),
        log_every=1,
        evaluate=train_loop.TrainEvalConfig(
            every=2, tasks=[TASK], config=evaluation.EvalConfig(batch_size=64, k_values=(1, 10, 100))
        ),
    )
    kwargs.update(overrides)
    return train_tiny(model_dir, train_file, **kwargs)


@pytest.fixture(scope="module")
def train_file(stdlib_jsonl):
    return stdlib_jsonl("train", 200)


@pytest.fixture(scope="module")
def run(train_file, tmp_path_factory):
    """A quickstart-like run: tiny model, 6 steps, eval every 2 steps, best kept by nDCG@10."""
    model_dir = tmp_path_factory.mktemp("run")
    return model_dir, _train(model_dir, train_file)


def test_training_evaluates_and_keeps_the_best(run):
    model_dir, result = run
    logged = summaries.read_metrics(str(model_dir))
    ndcg = {m["step"]: m[f"eval/{TASK}/ndcg@10"] for m in logged if f"eval/{TASK}/ndcg@10" in m}
    assert sorted(ndcg) == [2, 4, 6]
    at_six = next(m for m in logged if m["step"] == 6 and "loss" in m)
    # Matryoshka sizes default to the loss's; eval scalars share the step's line with the loss.
    for key in (
        "eval/ndcg@10",
        f"eval/{TASK}/recall@100/dim_16",
        f"eval/{TASK}/mrr@1/dim_32",
        "eval/seconds",
    ):
        assert key in at_six
    assert result.eval_metrics[f"eval/{TASK}/ndcg@10"] == ndcg[6]
    # Saved every step; the steps without an evaluation go, the latest and the best stay.
    best = max(ndcg, key=lambda s: (ndcg[s], s))
    kept = checkpointing.Checkpointer(str(model_dir), checkpointing.CheckpointConfig()).all_steps()
    assert set(kept) == {best, 6}


def test_best_metric_must_be_an_eval_metric(train_file, tmp_path):
    bad = checkpointing.CheckpointConfig(best_metric="eval/ndcg@11")
    with pytest.raises(ValueError, match=r"best_metric='eval/ndcg@11' is not an eval metric; one of \["):
        _train(tmp_path / "a", train_file, checkpoint=bad)
    with pytest.raises(ValueError, match=r"needs an evaluation: set train_loop.TrainEvalConfig.every"):
        _train(tmp_path / "b", train_file, checkpoint=bad, evaluate=train_loop.TrainEvalConfig())
    assert not os.path.exists(tmp_path / "a" / "metrics.jsonl")


def test_embedder_on_a_mesh_equals_embedder_on_one_device(run, stdlib_splits):
    model_dir, _ = run
    embedder = inference.Embedder.load(str(model_dir))
    embedder.max_length = LENGTH
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, fsdp=2))
    params = jax.device_put(embedder.params, NamedSharding(mesh, PartitionSpec()))
    on_mesh = inference.Embedder(
        embedder.module, params, embedder.tokenizer, {"query": LENGTH, "document": LENGTH}, mesh=mesh
    )
    texts = [e.positive for e in stdlib_splits["test"][:21]] + ["", "short"]
    np.testing.assert_allclose(
        on_mesh.encode(texts, "document", batch_size=12), embedder.encode(texts, kind="document"), atol=1e-5
    )
    # Another Embedder of the same architecture on the mesh (new parameters, as at
    # every evaluation during training) reuses the compiled shapes.
    compiled = inference._mesh_encode_fn(mesh)._cache_size()
    other = jax.tree.map(lambda x: x * 1.0, params)
    again = inference.Embedder(embedder.module, other, embedder.tokenizer, LENGTH, mesh=mesh)
    again.encode(texts, "document", batch_size=12)
    assert inference._mesh_encode_fn(mesh)._cache_size() == compiled


def test_training_evaluator_encodes_with_the_prompts_and_task_as_embedder_does(run):
    """Evaluation during training (8 devices, sharded parameters) embeds each text as
    `Embedder.encode` with the model's prompts and the task's prompt task does."""
    model_dir, _ = run
    prompts = prompts_lib.PromptConfig(enabled=True)
    embedder = inference.Embedder.load(str(model_dir))
    embedder.max_length = LENGTH
    embedder.prompts = prompts
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, fsdp=2))
    config = evaluation.EvalConfig(batch_size=12, k_values=(1, 10), dims=(32, 16))
    lengths = {"query": LENGTH, "document": LENGTH}
    evaluator = evaluation.TrainingEvaluator(
        [TASK], embedder.module, embedder.tokenizer, mesh, config, None, lengths, prompts=prompts
    )
    calls = []
    encode = evaluator.embedder.encode

    def recording_encode(texts, kind="query", task=None, **kwargs):
        out = encode(texts, kind, task, **kwargs)
        calls.append((list(texts), kind, task, out))
        return out

    evaluator.embedder.encode = recording_encode
    results, _ = evaluator(jax.device_put(embedder.params, NamedSharding(mesh, PartitionSpec())))
    task = evaluator.tasks[0]
    assert task.prompt_task and [(kind, t) for _, kind, t, _ in calls] == [
        ("query", task.prompt_task),
        ("document", None),
    ]
    for texts, kind, task_name, out in calls:
        np.testing.assert_allclose(out, embedder.encode(texts, kind, task_name), atol=1e-5)
    # The prompts change the query embeddings, so the comparison above can fail.
    queries = list(task.queries[:4])
    plain = inference.Embedder(embedder.module, embedder.params, embedder.tokenizer, LENGTH)
    assert not np.allclose(
        plain.encode(queries), embedder.encode(queries, "query", task.prompt_task), atol=1e-3
    )
    assert set(results[TASK]["metrics"]) == {32, 16}


def test_embedder_eval_writes_table_json_and_plots(run, tmp_path, capsys):
    model_dir, result = run
    out = tmp_path / "eval"
    argv = ["eval", f"--checkpoint={model_dir}", f"--output_dir={out}", "--dims", "32", "16"]
    argv += ["--k", "1", "10", "100", f"--max_length={LENGTH}"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert f"{TASK} (" in printed and "ndcg@10" in printed and "recall@100" in printed
    for name in ("results.json", "matryoshka.png", "training_curves.png"):
        with open(out / name, "rb") as f:
            head = f.read(8)
        assert head.startswith(b"\x89PNG") or name.endswith(".json")
    report = json.loads((out / "results.json").read_text())
    assert report["step"] == 6 and report["dims"] == [32, 16]

    # The evaluator itself, on the same checkpoint.
    embedder = inference.Embedder.load(str(model_dir))
    embedder.max_length = LENGTH
    expected = evaluation.evaluate(
        [eval_tasks.load_task(TASK)],
        lambda texts, kind, task=None: embedder.encode(texts, kind=kind, task=task),
        dims=(32, 16),
        k_values=(1, 10, 100),
    )
    for dim in (32, 16):
        assert report["tasks"][TASK]["metrics"][str(dim)] == expected[TASK]["metrics"][dim]
    # Training's own evaluation of step 6 (8 devices, sharded) agrees with the single-device one.
    for name, value in report["scalars"].items():
        if name.startswith("eval/"):
            assert result.eval_metrics[name] == pytest.approx(value, abs=1e-3), name


def test_curves_from_event_files_equal_metrics_jsonl(run):
    model_dir, _ = run
    from_jsonl = plots.read_metrics_jsonl(str(model_dir))
    from_events = plots.read_event_files(str(model_dir))
    assert set(from_jsonl) == set(from_events)
    for name, points in from_jsonl.items():
        steps, values = zip(*points, strict=True)
        event_steps, event_values = zip(*from_events[name], strict=True)
        assert steps == event_steps
        np.testing.assert_allclose(values, event_values, rtol=1e-6, err_msg=name)
    # The peak MFU divides by is named in TensorBoard too, as text beside the curves.
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(model_dir / "tensorboard"))
    events.Reload()
    (text,) = [e.tensor_proto.string_val[0].decode() for e in events.Tensors("mfu_peak/text_summary")]
    assert text.startswith("MFU peak: ") and "TFLOP/s a device (" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval"], "give --model"),
        (["eval", "--model=all-MiniLM-L6-v2", "--task=no_such_task"], "not a built-in task"),
        (["eval", "--model=all-MiniLM-L6-v2"], "give --output"),
    ],
)
def test_embedder_eval_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_embedder_eval_of_an_exported_model_on_beir_and_sts_files(tmp_path, capsys):
    """The packaged all-MiniLM-L6-v2 on a small BEIR folder and a scored-pairs file: no run, no curves."""
    beir = tmp_path / "toy"
    (beir / "qrels").mkdir(parents=True)
    docs = {
        "d1": "The cat sat on the mat.",
        "d2": "Stock markets fell sharply today.",
        "d3": "A kitten naps.",
    }
    (beir / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in docs.items())
    )
    queries = {"q1": "where is the cat?", "q2": "financial news"}
    (beir / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items())
    )
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t1\nq2\td2\t1\n")
    sts = tmp_path / "sts.jsonl"
    pairs = [("A man plays guitar.", "Someone plays a guitar.", 4.8), ("A dog runs.", "The stock fell.", 0.1)]
    pairs += [("Kids play outside.", "Children are playing.", 4.0), ("It rains.", "A cat sleeps.", 0.5)]
    sts.write_text(
        "".join(json.dumps({"sentence1": a, "sentence2": b, "score": s}) + "\n" for a, b, s in pairs)
    )
    out = tmp_path / "out"
    argv = ["eval", "--model=all-MiniLM-L6-v2", f"--task={beir}", f"--task={sts}", f"--output_dir={out}"]
    assert cli.main([*argv, "--dims", "384", "64", "--k", "1", "3"]) == 0
    assert "toy (2 queries, 3 documents" in capsys.readouterr().out
    report = json.loads((out / "results.json").read_text())
    assert report["step"] is None and sorted(report["tasks"]) == ["sts", "toy"]
    # The right answer first for both queries; Spearman as scipy computes it from the cosines.
    assert report["tasks"]["toy"]["metrics"]["384"]["mrr@1"] == 1.0
    embedder = inference.Embedder.load(pretrained.minilm_l6_v2_path())
    first, second = (embedder.encode([p[i] for p in pairs])[:, :64] for i in (0, 1))
    cosine = np.sum(first * second, axis=1) / np.linalg.norm(first, axis=1) / np.linalg.norm(second, axis=1)
    expected = scipy.stats.spearmanr(cosine, [p[2] for p in pairs]).statistic
    assert report["tasks"]["sts"]["metrics"]["64"]["spearman"] == pytest.approx(expected, abs=1e-9)
    assert (out / "matryoshka.png").exists() and not (out / "training_curves.png").exists()
