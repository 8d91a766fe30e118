"""A model trained with prompts is evaluated, encoded and exported with those prompts.

One tiny run with Gecko-style prompts on (`ModelSpec.prompts`) over JSONL
examples of three tasks, evaluated during training; then every consumer of its
checkpoint: `embedder eval`, `Embedder`, and each export read back by its own
consumer (sentence-transformers, the bundle, the TF SavedModel). Each must embed
exactly as `Embedder.from_checkpoint` does, and a query of each task exactly as
the training step saw it (the data pipeline's prompted tokens through the
model); those embeddings must differ from the unprompted one and from task to
task, so the comparisons can fail.
"""

import dataclasses
import json

import jax
import numpy as np
import pytest

from embedder import (
    checkpointing,
    cli,
    evaluation,
    export,
    inference,
    losses,
    partitioning,
    train_loop,
    trainer,
)
from embedder.data import jsonl, pipeline, stdlib_pairs
from embedder.data import prompts as prompts_lib
from embedder.models import dual_encoder, pretrained, spec, transformer

pytestmark = [pytest.mark.slow]

TINY = transformer.TransformerConfig(
    vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=512
)
LENGTH = 32
TASK = "stdlib_code_search_validation"
PROMPTS = prompts_lib.PromptConfig(enabled=True)
TEXTS = ["How do I sort a list?", "def f(x):\n    return x + 1", "Ünïcödé text", "a"]
TOLERANCE = 1e-5
# The training examples' `task` fields, in turn; none is the default task.
TASKS = ("code retrieval", "fact checking", "question answering")


@pytest.fixture(scope="module")
def training_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    pairs = stdlib_pairs.build_pairs("train")[:64]
    examples = [dataclasses.replace(e, task=TASKS[i % len(TASKS)]) for i, e in enumerate(pairs)]
    jsonl.write_jsonl(str(path), examples)
    data = pipeline.DataConfig(train_files=[str(path)], batch_size=16, query_len=LENGTH, doc_len=LENGTH)
    return data, examples


@pytest.fixture(scope="module")
def run(tmp_path_factory, training_data):
    data, _ = training_data
    model_dir = tmp_path_factory.mktemp("prompted_run")
    model = spec.ModelSpec(
        dual_encoder.DualEncoder(TINY, projection_dim=24),
        vocab_dir=pretrained.minilm_l6_v2_path(),
        prompts=PROMPTS,
    )
    result = train_loop.train(
        model_dir=str(model_dir),
        model=model,
        data=data,
        train_steps=2,
        loss=losses.ContrastiveLossConfig(),
        optimizer=trainer.OptimizerConfig(learning_rate=1e-3, warmup_steps=1),
        mesh=partitioning.MeshConfig(),
        checkpoint=checkpointing.CheckpointConfig(save_every=2, async_save=False),
        peak_flops_per_device=1e12,
        evaluate=train_loop.TrainEvalConfig(
            every=2, tasks=[TASK], config=evaluation.EvalConfig(batch_size=64, k_values=(1, 10))
        ),
    )
    return str(model_dir), result


@pytest.fixture(scope="module")
def embedder(run):
    model_dir, _ = run
    return inference.Embedder.from_checkpoint(model_dir, max_length=LENGTH)


def test_the_checkpoint_carries_the_prompts_and_their_tasks(run, embedder):
    model_dir, _ = run
    meta = checkpointing.read_meta(checkpointing.resolve_step_dir(model_dir))
    assert meta.prompts.tasks == TASKS
    assert dataclasses.replace(meta.prompts, tasks=()) == PROMPTS and embedder.prompts == meta.prompts
    unprompted = inference.Embedder(embedder.module, embedder.params, embedder.tokenizer, LENGTH)
    assert not np.allclose(unprompted.encode(TEXTS), embedder.encode(TEXTS), atol=1e-3)


def test_embedder_eval_equals_evaluation_during_training(run, tmp_path, capsys):
    model_dir, result = run
    out = tmp_path / "eval"
    argv = ["eval", f"--model={model_dir}", f"--output={out}", "--tasks", TASK]
    assert cli.main([*argv, "--k", "1", "10", f"--max_length={LENGTH}"]) == 0
    capsys.readouterr()
    report = json.loads((out / "results.json").read_text())
    compared = [name for name in report["scalars"] if name.startswith(f"eval/{TASK}/")]
    assert compared
    for name in compared:
        assert result.eval_metrics[name] == pytest.approx(report["scalars"][name], abs=1e-6), name


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    model_dir, _ = run
    root = tmp_path_factory.mktemp("exports")
    return {fmt: export.export(model_dir, fmt, str(root / fmt), max_length=LENGTH) for fmt in export.FORMATS}


def _assert_close(got, expected, what):
    np.testing.assert_allclose(np.asarray(got), expected, atol=TOLERANCE, err_msg=what)


@pytest.fixture(scope="module")
def readers(exports):
    """Each export read back by its own consumer: sentence-transformers, the bundle, TensorFlow."""
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the tokenizer's ops)
    from sentence_transformers import SentenceTransformer

    return {
        "sentence-transformers": SentenceTransformer(exports["sentence-transformers"], device="cpu"),
        "bundle": inference.Embedder.load(exports["bundle"]),
        "saved_model": tf.saved_model.load(exports["saved_model"]),
    }


def test_every_export_encodes_with_the_training_prompts(readers, embedder):
    import tensorflow as tf

    query, document = embedder.encode(TEXTS, "query"), embedder.encode(TEXTS, "document")

    model = readers["sentence-transformers"]
    _assert_close(model.encode_query(TEXTS), query, "sentence-transformers query")
    _assert_close(model.encode_document(TEXTS), document, "sentence-transformers document")

    bundled = readers["bundle"]
    assert bundled.prompts == embedder.prompts
    _assert_close(bundled.encode(TEXTS, "query"), query, "bundle query")
    _assert_close(bundled.encode(TEXTS, "document"), document, "bundle document")

    loaded = readers["saved_model"]
    texts = tf.constant(TEXTS)
    _assert_close(loaded.signatures["query"](texts=texts)["embeddings"].numpy(), query, "SavedModel query")
    _assert_close(
        loaded.signatures["document"](texts=texts)["embeddings"].numpy(), document, "SavedModel document"
    )


def _training_time_queries(training_data, embedder):
    """(one query of each of TASKS, [len(TASKS), dim] their embeddings as the training step computes them).

    The rows of the run's own batches: the pipeline's prompted, tokenised and
    padded query, through the model's training forward pass (deterministic). Of
    each task the longest query, so that all of them fill the same length bucket
    (the consumers below compile one shape each).
    """
    data, examples = training_data
    source = data.make_source(pretrained.minilm_l6_v2_path(), embedder.prompts)
    pad_id = embedder.module.config.pad_id
    rows = {}  # task -> (real tokens, query text, query tokens, positive tokens)
    for step in range(len(examples) // data.batch_size):
        batch = source.batch(step)
        for row, index in enumerate(source.global_indices(step)):
            example, tokens = examples[index], batch["query_tokens"][row]
            length = int(np.sum(tokens != pad_id))
            if example.task not in rows or length > rows[example.task][0]:
                rows[example.task] = (length, example.query, tokens, batch["positive_tokens"][row])
    assert sorted(rows) == list(TASKS)
    forward = jax.jit(
        lambda params, q, p: embedder.module.apply({"params": params}, q, p, deterministic=True)
    )
    out = forward(
        embedder.params,
        np.stack([rows[task][2] for task in TASKS]),
        np.stack([rows[task][3] for task in TASKS]),
    )
    return [rows[task][1] for task in TASKS], np.asarray(out["query"])


def test_a_query_of_each_task_encodes_everywhere_as_in_training(training_data, embedder, exports, readers):
    import tensorflow as tf

    from embedder.formats import huggingface, saved_model

    queries, expected = _training_time_queries(training_data, embedder)
    # Each export knows the tasks: a sentence-transformers prompt and a SavedModel signature each.
    assert readers["bundle"].prompts.tasks == TASKS
    assert huggingface.read(exports["sentence-transformers"]).prompts.tasks == TASKS
    consumers = {
        "eval encoder": lambda task: evaluation.embedder_encoder(embedder, 32)(queries, "query", task),
        "Embedder.encode": lambda task: embedder.encode(queries, task=task),
        "sentence-transformers": lambda task: readers["sentence-transformers"].encode_query(
            queries, prompt_name=task
        ),
        "SavedModel": lambda task: (
            readers["saved_model"]
            .signatures[saved_model.task_signature(task)](texts=tf.constant(queries))["embeddings"]
            .numpy()
        ),
    }
    # All queries with each task's prompt: the query of that task is the training
    # step's embedding; the others (written with a task they were not trained
    # with) are not, nor is any query with the default task, so the task counts.
    for i, task in enumerate(TASKS):
        for name, encode in consumers.items():
            got = np.asarray(encode(task))
            _assert_close(got[i], expected[i], f"{name}, task {task!r}")
            for j in set(range(len(TASKS))) - {i}:
                assert not np.allclose(got[j], expected[j], atol=1e-3), (name, task, TASKS[j])
    default = embedder.encode(queries)
    for j in range(len(TASKS)):
        assert not np.allclose(default[j], expected[j], atol=1e-3), ("default task", TASKS[j])
