"""A model trained with prompts is evaluated, encoded and exported with those prompts.

One tiny run with Gecko-style prompts on (`ModelSpec.prompts`), evaluated during
training; then every consumer of its checkpoint: `embedder eval`, `Embedder`, and
each export read back by its own consumer (sentence-transformers, the bundle, the
TF SavedModel). Each must embed exactly as `Embedder.from_checkpoint` does, and
that embedding must differ from the unprompted one, so the comparisons can fail.
"""

import json

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


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = tmp_path_factory.mktemp("data") / "train.jsonl"
    jsonl.write_jsonl(str(data), stdlib_pairs.build_pairs("train")[:64])
    model_dir = tmp_path_factory.mktemp("prompted_run")
    model = spec.ModelSpec(
        dual_encoder.DualEncoder(TINY, projection_dim=24),
        vocab_dir=pretrained.minilm_l6_v2_path(),
        prompts=PROMPTS,
    )
    result = train_loop.train(
        model_dir=str(model_dir),
        model=model,
        data=pipeline.DataConfig(train_files=[str(data)], batch_size=16, query_len=LENGTH, doc_len=LENGTH),
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


def test_the_checkpoint_carries_the_prompts(run, embedder):
    model_dir, _ = run
    meta = checkpointing.read_meta(checkpointing.resolve_step_dir(model_dir))
    assert meta.prompts == PROMPTS and embedder.prompts == PROMPTS
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


def test_every_export_encodes_with_the_training_prompts(exports, embedder):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the tokenizer's ops)
    from sentence_transformers import SentenceTransformer

    query, document = embedder.encode(TEXTS, "query"), embedder.encode(TEXTS, "document")

    model = SentenceTransformer(exports["sentence-transformers"], device="cpu")
    _assert_close(model.encode_query(TEXTS), query, "sentence-transformers query")
    _assert_close(model.encode_document(TEXTS), document, "sentence-transformers document")

    bundled = inference.Embedder.load(exports["bundle"])
    assert bundled.prompts == PROMPTS
    _assert_close(bundled.encode(TEXTS, "query"), query, "bundle query")
    _assert_close(bundled.encode(TEXTS, "document"), document, "bundle document")

    loaded = tf.saved_model.load(exports["saved_model"])
    texts = tf.constant(TEXTS)
    _assert_close(loaded.signatures["query"](texts=texts)["embeddings"].numpy(), query, "SavedModel query")
    _assert_close(
        loaded.signatures["document"](texts=texts)["embeddings"].numpy(), document, "SavedModel document"
    )
