"""A model dir in an object store: everything beside orbax's own writes goes through `fileio`.

GCS cannot be reached from the test machine, so these run on TensorFlow's
in-memory filesystem (`ram://`), which `tf.io.gfile` serves through the same
code path as `gs://`: a URL that `os.path` must not touch, no atomic folder
rename, objects written in place. Each test would fail if a path went through
`os.path.abspath` / `open()` (it would name a local folder "ram:").
"""

import json
import os
import uuid

import numpy as np
import pytest
import tensorflow as tf

from embedder import checkpointing, fileio, plots, summaries, train_loop
from embedder.data import jsonl


@pytest.fixture
def bucket():
    """A fresh ram:// folder; removed afterwards."""
    root = f"ram://bucket-{uuid.uuid4().hex[:8]}"
    tf.io.gfile.makedirs(root)
    yield root
    tf.io.gfile.rmtree(root)


def test_urls_are_left_alone_and_local_paths_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert fileio.absolute("gs://bucket/run") == "gs://bucket/run"
    assert fileio.absolute("run") == str(tmp_path / "run")
    assert not os.path.exists(tmp_path / "gs:")


def test_file_operations_round_trip(bucket):
    folder = f"{bucket}/a/b"
    fileio.makedirs(folder)
    assert fileio.isdir(folder) and not fileio.isdir(f"{folder}/x.txt")
    with fileio.open_file(f"{folder}/x.txt", "a") as f:
        f.write("one\n")
    with fileio.open_file(f"{folder}/x.txt", "a") as f:
        f.write("two\n")
    with fileio.open_file(f"{folder}/x.txt") as f:
        assert f.read() == "one\ntwo\n"
    fileio.write_text_atomically(f"{folder}/y.txt", "new")
    fileio.write_text_atomically(f"{folder}/y.txt", "newer")
    assert sorted(fileio.listdir(folder)) == ["x.txt", "y.txt"]  # no temporary left
    with fileio.open_file(f"{folder}/y.txt", "rb") as f:
        assert f.read() == b"newer"
    fileio.remove(f"{folder}/x.txt")
    assert not fileio.exists(f"{folder}/x.txt")
    assert fileio.listdir(f"{bucket}/missing") == []


def test_errors_are_oserrors_naming_the_path(bucket):
    with pytest.raises(FileNotFoundError, match=f"{bucket}/nope.txt"):
        fileio.open_file(f"{bucket}/nope.txt").read()


def test_failed_atomic_write_leaves_nothing(bucket):
    def write(f):
        f.write("partial")
        raise RuntimeError("cut short")

    with pytest.raises(RuntimeError):
        fileio.write_atomically(f"{bucket}/out/results.json", write)
    assert fileio.listdir(f"{bucket}/out") == []


def test_check_writable_probes_and_cleans_up(bucket):
    checkpointing.check_writable(f"{bucket}/run")
    assert fileio.listdir(f"{bucket}/run") == []


def test_metrics_config_and_curves_in_the_bucket(bucket):
    import gin

    run = f"{bucket}/run"
    fileio.makedirs(run)
    writer = summaries.MetricsWriter(run, total_steps=4, start_step=0, enabled=True)
    writer.write(2, {"loss": 1.5})
    writer.write(4, {"loss": 0.5})
    writer.close()
    assert summaries.read_metrics(run) == [{"step": 2, "loss": 1.5}, {"step": 4, "loss": 0.5}]
    assert plots.read_run_curves(run)["loss"] == [(2, 1.5), (4, 0.5)]
    assert fileio.listdir(f"{run}/tensorboard")  # event files written through tf.summary
    with gin.unlock_config():
        gin.parse_config(
            "from __gin__ import dynamic_registration\nfrom embedder import train_loop\ntrain_loop.train.seed = 7"
        )
    try:
        train_loop._write_gin_config(run)
    finally:
        gin.clear_config()
    with fileio.open_file(f"{run}/config.gin") as f:
        assert "train_loop.train.seed = 7" in f.read()
    fileio.write_json(f"{run}/eval/2/results.json", {"ndcg@10": 0.5})
    with fileio.open_file(f"{run}/eval/2/results.json") as f:
        assert json.load(f) == {"ndcg@10": 0.5}


def _fake_step(folder: str, step: int, committed: bool, meta: dict) -> None:
    """The layout orbax leaves in an object store: state/, meta/metadata, and the commit file last."""
    step_dir = f"{folder}/{step}"
    fileio.makedirs(f"{step_dir}/meta")
    leaf = {"key_metadata": [{"key": "step", "key_type": 2}], "value_metadata": {"value_type": "jax.Array"}}
    fileio.write_json(
        f"{step_dir}/state/{checkpointing.ORBAX_TREE_METADATA}", {"tree_metadata": {"('step',)": leaf}}
    )
    with fileio.open_file(f"{step_dir}/meta/metadata", "w") as f:
        json.dump(meta, f)
    if committed:
        with fileio.open_file(f"{step_dir}/{fileio.COMMIT_SUCCESS_FILE}", "w") as f:
            f.write("done")


def test_resolve_step_dir_skips_uncommitted_steps(bucket):
    folder = f"{bucket}/run/checkpoints"
    _fake_step(folder, 2, True, {"model_config": {}, "step": 2})
    _fake_step(folder, 4, False, {"model_config": {}, "step": 4})  # a save cut short by a preemption
    assert checkpointing.resolve_step_dir(f"{bucket}/run") == f"{folder}/2"
    assert checkpointing.resolve_step_dir(f"{bucket}/run/") == f"{folder}/2"
    assert checkpointing.read_meta(f"{folder}/2").step == 2
    with pytest.raises(checkpointing.CheckpointError, match=r"no checkpoint of step 4; steps saved: \[2\]"):
        checkpointing.resolve_step_dir(f"{bucket}/run", step=4)
    with pytest.raises(checkpointing.CheckpointError, match="incomplete"):
        checkpointing.resolve_step_dir(f"{folder}/4")


def test_jsonl_training_file_in_the_bucket(bucket):
    rows = [{"query": "q\u00e9", "positive": "p"}, {"query": "x", "positive": "y", "negatives": ["n"]}]
    path = f"{bucket}/data/train.jsonl"
    fileio.write_text_atomically(path, "".join(json.dumps(r) + "\n" for r in rows))
    examples = jsonl.read_jsonl(path)
    assert [e.query for e in examples] == ["q\u00e9", "x"]
    assert examples[1].negatives == ("n",)
    fileio.write_text_atomically(path, '{"query": 1}\n')
    with pytest.raises(jsonl.DataError, match=f"{path}:1"):
        jsonl.read_jsonl(path)


def test_npy_output_in_the_bucket(bucket):
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    fileio.save_npy_atomically(f"{bucket}/emb/out.npy", array)
    with fileio.open_file(f"{bucket}/emb/out.npy", "rb") as f:
        np.testing.assert_array_equal(np.load(f), array)


def test_loading_a_model_from_the_bucket(bucket):
    from embedder import inference
    from embedder.formats import bundle

    with pytest.raises(FileNotFoundError, match="no such model folder"):
        inference.Embedder.load(f"{bucket}/nothing")
    fileio.write_text_atomically(f"{bucket}/bundle/{bundle.CONFIG}", "{}")
    with pytest.raises(ValueError, match="read from local disk"):
        inference.Embedder.load(f"{bucket}/bundle")
    _fake_step(f"{bucket}/run/checkpoints", 6, False, {"step": 6})  # only an uncommitted step
    with pytest.raises(FileNotFoundError, match=r"not a model: .* no checkpoints found"):
        inference.Embedder.load(f"{bucket}/run")
