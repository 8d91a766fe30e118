"""Training end to end: loss goes down, meshes agree, crash/resume, SIGTERM, multi-host, restore."""

import dataclasses
import json
import os
import signal
import socket

import jax
import numpy as np
import pytest

from embedder import checkpointing, losses, partitioning, summaries, train_loop, trainer
from embedder.data import jsonl, pipeline, prompts
from embedder.models import dual_encoder, pretrained, spec
from tests.training_helpers import (
    TINY_512,
    cli_train,
    losses_by_step,
    reference_train,
    safe_losses,
    tiny_spec,
    train_tiny,
    wait_for,
)


def _runner(mesh: partitioning.MeshConfig, steps: int = 20) -> trainer.Trainer:
    """A Trainer of the tiny model, for restoring checkpoints onto `mesh`."""
    return trainer.Trainer(
        tiny_spec(TINY_512),
        losses.ContrastiveLossConfig(),
        trainer.OptimizerConfig(),
        partitioning.make_mesh(mesh),
        steps,
    )


def _data(train_file, num_negatives=1):
    return pipeline.DataConfig(
        train_files=[train_file], batch_size=16, query_len=16, doc_len=32, num_negatives=num_negatives
    )


def _train(model_dir, train_file, mesh, steps=30, **kwargs):
    return train_tiny(
        model_dir,
        train_file,
        steps=steps,
        model=tiny_spec(TINY_512),
        data=_data(train_file),
        mesh=mesh,
        **kwargs,
    )


@pytest.fixture(scope="module")
def one_device_run(train_file, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("one"), train_file, partitioning.MeshConfig(data=1, num_devices=1))


@pytest.mark.slow
def test_thirty_steps_lower_the_loss(one_device_run, train_file, tmp_path):
    history = one_device_run.losses
    assert len(history) == 30
    assert np.mean(history[-5:]) < 0.7 * np.mean(history[:5]), history
    # metrics.jsonl holds the documented metrics.
    logged = summaries.read_metrics(os.path.dirname(os.path.dirname(one_device_run.checkpoint_dir)))
    for key in (
        "loss",
        "loss/dim_32",
        "loss/dim_16",
        "accuracy",
        "learning_rate",
        "temperature",
        "grad_norm",
    ):
        assert key in logged[-1], key
    for key in ("pairs_per_sec", "tokens_per_sec", "mfu"):
        assert logged[-1][key] > 0


@pytest.mark.slow
def test_metrics_are_read_back_only_when_needed(one_device_run, train_file, tmp_path, monkeypatch):
    """Between log / save / eval steps the host only dispatches: no step waits on the device."""
    reads = []
    read_back = train_loop._read_back

    def spy(pending, *args):
        reads.append([step for step, _ in pending])
        return read_back(pending, *args)

    monkeypatch.setattr(train_loop, "_read_back", spy)
    mesh = partitioning.MeshConfig(data=1, num_devices=1)
    result = _train(tmp_path, train_file, mesh, log_every=5, stop_at_step=10)
    assert reads == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    # Every step's loss still arrives, equal to the run that read each one back.
    np.testing.assert_allclose(result.losses, one_device_run.losses[:10], rtol=1e-6)


# Sums over devices run in another order; over 30 AdamW steps fp32 round-off grows
# to ~1e-6 relative in the loss, far below this bound.
@pytest.mark.parametrize(
    "mesh",
    [
        partitioning.MeshConfig(data=8),
        partitioning.MeshConfig(data=2, fsdp=4),
        partitioning.MeshConfig(data=4, model=2),
    ],
    ids=["data", "fsdp", "tensor"],
)
@pytest.mark.slow
def test_sharded_runs_match_one_device(mesh, one_device_run, train_file, tmp_path):
    result = _train(tmp_path, train_file, mesh)
    np.testing.assert_allclose(result.losses, one_device_run.losses, rtol=1e-4)


@pytest.mark.slow
def test_non_finite_loss_stops_or_skips(train_file, tmp_path):
    # A temperature so small that the logits overflow to inf: the loss is NaN.
    bad = losses.ContrastiveLossConfig(temperature=1e-38)
    mesh = partitioning.MeshConfig(data=8)
    kwargs = dict(
        model_dir=str(tmp_path / "raise"),
        model=tiny_spec(TINY_512),
        data=_data(train_file, num_negatives=0),
        train_steps=3,
        loss=bad,
        mesh=mesh,
        peak_flops_per_device=1e12,
    )
    with pytest.raises(train_loop.NonFiniteLossError, match=r"at step 0; last good checkpoint: none"):
        train_loop.train(**kwargs)
    kwargs["model_dir"] = str(tmp_path / "skip")
    result = train_loop.train(**kwargs, nonfinite="skip")
    assert result.step == 3 and all(np.isnan(result.losses))
    # Skipped updates leave the parameters exactly at their initial values.
    runner = trainer.Trainer(
        tiny_spec(TINY_512), bad, trainer.OptimizerConfig(), partitioning.make_mesh(mesh), 3
    )
    initial = runner.init_state(0)
    restored, _ = checkpointing.Checkpointer(str(tmp_path / "skip")).restore(3, runner.abstract_state())
    jax.tree.map(np.testing.assert_array_equal, restored.params, initial.params)


# ---------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def reference_run(train_file, tmp_path_factory):
    """An uninterrupted 20-step run through the same gin files, in this process (8 devices)."""
    model_dir = tmp_path_factory.mktemp("reference")
    reference_train(model_dir, train_file, 20)
    return model_dir


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigkill_and_resume_continue_exactly(reference_run, train_file, tmp_path):
    flags = [f"--gin.TRAIN_FILES=['{train_file}']", "--gin.TRAIN_STEPS=20", "--gin.SAVE_EVERY=4"]
    proc = cli_train(tmp_path, *flags)
    ckpt_dir = tmp_path / "checkpoints"
    # Kill once a checkpoint exists and the run has gone past it.
    wait_for(
        lambda: os.path.isdir(ckpt_dir / "8") and len(safe_losses(tmp_path)) >= 10,
        proc,
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(safe_losses(tmp_path))
    assert killed_at < 20
    proc = cli_train(tmp_path, *flags)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "trained to step 20" in out
    got, want = losses_by_step(tmp_path), losses_by_step(reference_run)
    assert sorted(got) == list(range(1, 21))
    np.testing.assert_allclose([got[s] for s in range(1, 21)], [want[s] for s in range(1, 21)], rtol=1e-6)


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(train_file, tmp_path):
    flags = [f"--gin.TRAIN_FILES=['{train_file}']", "--gin.TRAIN_STEPS=1000", "--gin.SAVE_EVERY=1000"]
    proc = cli_train(tmp_path, *flags)
    wait_for(lambda: len(safe_losses(tmp_path)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by SIGTERM at step" in out
    step = int(out.split("stopped by SIGTERM at step ")[1].split(";")[0])
    assert 3 <= step < 1000
    assert checkpointing.Checkpointer(str(tmp_path)).all_steps() == [step]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.subprocess
@pytest.mark.slow
def test_two_processes_match_one_process(reference_run, train_file, tmp_path):
    """2 processes x 4 CPU devices (gloo) train exactly like 1 process x 8 devices."""
    xla_flags = [f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f]
    env = dict(os.environ, XLA_FLAGS=" ".join([*xla_flags, "--xla_force_host_platform_device_count=4"]))
    address = f"127.0.0.1:{_free_port()}"
    flags = [f"--gin.TRAIN_FILES=['{train_file}']", "--gin.TRAIN_STEPS=20", "--gin.SAVE_EVERY=4"]
    procs = [
        cli_train(
            tmp_path,
            *flags,
            f"--coordinator_address={address}",
            "--num_processes=2",
            f"--process_id={i}",
            env=env,
        )
        for i in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=400)
        assert p.returncode == 0, err[-3000:]
    got, want = losses_by_step(tmp_path), losses_by_step(reference_run)
    np.testing.assert_allclose([got[s] for s in range(1, 21)], [want[s] for s in range(1, 21)], rtol=1e-5)
    runner = _runner(partitioning.MeshConfig(data=8))
    two, _ = checkpointing.Checkpointer(str(tmp_path)).restore(20, runner.abstract_state())
    one, _ = checkpointing.Checkpointer(str(reference_run)).restore(20, runner.abstract_state())
    # gloo sums gradients in another order than one process does; Adam divides by
    # sqrt(v), so a near-zero gradient coordinate can move by a visible fraction of
    # a step. Allow 1% of one step (learning rate 1e-3) per parameter.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), two.params, one.params)


@pytest.mark.parametrize("num_devices", [1, 4])
@pytest.mark.slow
def test_checkpoint_from_8_devices_restores_on_fewer(reference_run, num_devices):
    eight = _runner(partitioning.MeshConfig(data=8))
    few = _runner(partitioning.MeshConfig(data=-1, num_devices=num_devices))
    ckpt = checkpointing.Checkpointer(str(reference_run))
    saved, _ = ckpt.restore(20, eight.abstract_state())
    restored, _ = ckpt.restore(20, few.abstract_state())
    leaf = jax.tree.leaves(restored.params)[0]
    assert len(leaf.sharding.device_set) == num_devices
    jax.tree.map(np.testing.assert_array_equal, restored.params, saved.params)
    jax.tree.map(np.testing.assert_array_equal, restored.opt_state, saved.opt_state)


# ---------------------------------------------------------------- errors


@pytest.mark.subprocess
def test_checkpoint_of_another_architecture_is_a_clear_error(reference_run, train_file, tmp_path):
    proc = cli_train(
        reference_run,
        f"--gin.TRAIN_FILES=['{train_file}']",
        "--gin.TRAIN_STEPS=30",
        "--gin.transformer.TransformerConfig.hidden_size=64",
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "holds a checkpoint of another architecture" in err and "hidden_size: saved 32, now 64" in err


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--gin.trainer.OptimizerConfig.learning_rat=1e-3", "learning_rat"),
        ("--gin.transformer.TransformerConfig.hidden_size=%UNDEFINED_SIZE", "UNDEFINED_SIZE"),
    ],
    ids=["wrong-binding", "unknown-macro"],
)
@pytest.mark.subprocess
def test_gin_mistakes_are_clear_errors(flag, message, train_file, tmp_path):
    proc = cli_train(tmp_path, f"--gin.TRAIN_FILES=['{train_file}']", flag)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert message in err and "Traceback" not in err


@pytest.mark.slow
def test_model_params_load_from_a_training_checkpoint(reference_run, tmp_path):
    from embedder import inference

    ckpt = checkpointing.Checkpointer(str(reference_run))
    runner = _runner(partitioning.MeshConfig(data=8))
    state, _ = ckpt.restore(16, runner.abstract_state())
    params, meta = checkpointing.load_model_params(str(reference_run), step=16)
    jax.tree.map(np.testing.assert_array_equal, params, state.params["model"])
    assert meta.step == 16 and meta.model_config["hidden_size"] == 32
    # A params-only copy (what a soup writes) reads back the same, and encodes.
    checkpointing.save_model_params(str(tmp_path), 7, params, meta)
    again, _ = checkpointing.load_model_params(str(tmp_path))
    jax.tree.map(np.testing.assert_array_equal, again, params)
    embedder = inference.Embedder.from_checkpoint(str(tmp_path))
    assert embedder.encode(["def f(): pass", "a docstring"]).shape == (2, 32)
    with pytest.raises(
        checkpointing.CheckpointError, match=r"no checkpoint of step 99; steps saved: \[4, 8, 12, 16, 20\]"
    ):
        checkpointing.load_model_params(str(reference_run), step=99)


def test_keeps_the_last_k_plus_the_best(tmp_path):
    """keep=2, keep_best=1 by a max metric: the best step survives beside the last two."""
    ckpt = checkpointing.Checkpointer(
        str(tmp_path),
        checkpointing.CheckpointConfig(keep=2, keep_best=1, best_metric="eval/ndcg@10", async_save=False),
    )
    scores = {1: 0.2, 2: 0.9, 3: 0.4, 4: 0.3, 5: 0.5}
    for step, score in scores.items():
        meta = checkpointing.CheckpointMeta(model_config={}, step=step)
        ckpt.save(step, {"w": np.full(3, step, np.float32)}, meta, metrics={"eval/ndcg@10": score})
    ckpt.wait()
    assert ckpt.all_steps() == [2, 4, 5]
    ckpt.close()


@pytest.mark.slow
def test_trains_from_a_registered_seqio_task(tmp_path, capsys):
    """MIXTURE_OR_TASK_NAME instead of TRAIN_FILES: the built-in stdlib task, built by TFDS offline."""
    from embedder import cli

    code = cli.main(
        [
            "train",
            "--gin_file=runs/finetune.gin",
            "--gin_file=models/tiny.gin",
            "--gin.MIXTURE_OR_TASK_NAME='stdlib_code_search'",
            f"--gin.pipeline.DataConfig.tfds_data_dir='{tmp_path / 'tfds'}'",
            "--gin.TRAIN_STEPS=2",
            "--gin.BATCH_SIZE=16",
            "--gin.QUERY_LEN=16",
            "--gin.DOC_LEN=32",
            "--gin.NUM_NEGATIVES=1",
            f"--model_dir={tmp_path / 'run'}",
        ]
    )
    assert code == 0, capsys.readouterr().err[-2000:]
    logged = summaries.read_metrics(str(tmp_path / "run"))
    assert [m["step"] for m in logged] == [2] and np.isfinite(logged[-1]["loss"])
    _, meta = checkpointing.load_model_params(str(tmp_path / "run"))
    assert meta.run.mixture_or_task_name == "stdlib_code_search"


# ---------------------------------------------------------------- metadata and prompts


def test_checkpoint_meta_round_trips_and_names_what_is_wrong(tmp_path):
    meta = checkpointing.CheckpointMeta(
        model_config=spec.describe_module(dual_encoder.DualEncoder(TINY_512)),
        vocab_dir="/vocab",
        prompts=prompts.PromptConfig(enabled=True, task_dropout=0.25),
        origin=checkpointing.WeightsOrigin("checkpoint", path="/runs/a/checkpoints/8", step=8),
        run=checkpointing.RunFingerprint(seed=3, batch_size=16, files=("/data/a.jsonl",), train_steps=20),
        step=12,
    )
    record = json.loads(json.dumps(meta.to_json()))
    assert record["version"] == 2 and record["prompts"]["task_dropout"] == 0.25
    assert record["origin"] == {
        "kind": "checkpoint",
        "seed": None,
        "path": "/runs/a/checkpoints/8",
        "step": 8,
        "sources": [],
    }
    assert checkpointing.CheckpointMeta.from_json(record) == meta
    for broken, message in [
        ({**record, "vocab": "/v"}, r"meta.json: unknown key 'vocab'"),
        ({k: v for k, v in record.items() if k != "prompts"}, r"meta.json: missing key 'prompts'"),
        ({**record, "run": {**record["run"], "shuffle": True}}, r"meta.json: run: unknown key 'shuffle'"),
        ({**record, "origin": {**record["origin"], "kind": "magic"}}, r"meta.json: origin: .*'magic'"),
    ]:
        with pytest.raises(checkpointing.CheckpointError, match=message):
            checkpointing.CheckpointMeta.from_json(broken, "meta.json")
    # An older checkpoint's plain dict still reads.
    legacy = checkpointing.CheckpointMeta.from_json(
        {
            "model_config": record["model_config"],
            "vocab_dir": "/vocab",
            "data": {"seed": 5, "batch_size": 8, "files": ["/x.jsonl"], "mixture_or_task_name": None},
            "step": 4,
        }
    )
    assert legacy.step == 4 and legacy.run.batch_size == 8 and legacy.run.files == ("/x.jsonl",)
    assert legacy.prompts == prompts.PromptConfig() and legacy.origin == checkpointing.WeightsOrigin(
        "random", seed=5
    )
    with pytest.raises(checkpointing.CheckpointError, match=r"missing key 'model_config'"):
        checkpointing.CheckpointMeta.from_json({"step": 2})
    # A meta file that does not parse names its path.
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "metadata").write_text('{"model_config": ')
    with pytest.raises(checkpointing.CheckpointError, match=rf"{tmp_path}/meta/metadata is not valid JSON"):
        checkpointing.read_meta(str(tmp_path))


@pytest.mark.slow
def test_prompts_on_the_spec_reach_the_batches_and_the_checkpoint(tmp_path):
    from embedder import inference
    from embedder.data import wordpiece

    examples = [
        jsonl.Example(
            f"sort list number {i}",
            f"def sort_{i}(x): return sorted(x)",
            task="code retrieval" if i % 2 else None,
        )
        for i in range(32)
    ]
    path = str(tmp_path / "tasks.jsonl")
    jsonl.write_jsonl(path, examples)
    prompt = prompts.PromptConfig(enabled=True)
    data = pipeline.DataConfig(train_files=[path], batch_size=16, query_len=24, doc_len=32)
    vocab = pretrained.minilm_l6_v2_path()
    source = data.make_source(vocab, prompt)
    tokenizer = wordpiece.WordPieceTokenizer.from_pretrained_dir(vocab)
    batch = source.batch(0)
    for row, index in enumerate(source.global_indices(0)):
        example = examples[index]
        # The Gecko / EmbeddingGemma formats, written out independently of data.prompts.
        query = tokenizer.encode(
            f"task: {example.task or 'search result'} | query: {example.query}", max_length=24
        )
        document = tokenizer.encode(f"title: none | text: {example.positive}", max_length=32)
        np.testing.assert_array_equal(batch["query_tokens"][row, : len(query)], query)
        np.testing.assert_array_equal(batch["positive_tokens"][row, : len(document)], document)
    # Training writes the spec's prompts (and where its weights started) into every checkpoint.
    model = dataclasses.replace(tiny_spec(TINY_512), prompts=prompt)
    result = train_loop.train(
        model_dir=str(tmp_path / "run"),
        model=model,
        data=data,
        train_steps=2,
        mesh=partitioning.MeshConfig(data=1, num_devices=1),
        checkpoint=checkpointing.CheckpointConfig(async_save=False),
        seed=4,
        peak_flops_per_device=1e12,
    )
    meta = checkpointing.read_meta(result.checkpoint_dir)
    # ... and the tasks of its examples.
    assert meta.prompts == prompts.with_tasks(prompt, ["code retrieval"]) and meta.step == 2
    assert meta.prompts.tasks == ("code retrieval",)
    assert meta.origin == checkpointing.WeightsOrigin("random", seed=4)
    assert meta.run.files == (path,) and meta.run.train_steps == 2 and meta.run.query_len == 24
    assert inference.Embedder.from_checkpoint(str(tmp_path / "run")).prompts == meta.prompts
