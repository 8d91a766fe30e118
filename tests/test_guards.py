"""Nothing silent: what a user gets for settings, restarts, interrupts and damage that
used to end silently wrong (issue "Nothing silent"); README, "Faults", lists each.

| input | what the user gets |
| --- | --- |
| a misspelled macro `--gin.LEARNING_RAT=5` | `gin macro LEARNING_RAT is set but nothing in this run reads it; did you mean LEARNING_RATE?` |
| `TRAIN_STEPS=2.5`, `BATCH_SIZE=4.0`, `QUERY_LEN=16.0`, `TRAIN_STEPS='3'` | `gin macro TRAIN_STEPS=2.5: must be an integer, got float 2.5` (a string: write numbers without quotes) |
| `SAVE_EVERY=0`, `DOC_LEN=-1` | `gin macro SAVE_EVERY=0: must be >= 1` |
| `TRAIN_FILES='x.jsonl'` | `gin macro TRAIN_FILES='x.jsonl': must be a list (e.g. ['a', 'b'])` |
| no model gin file | `no model: add --gin_file=models/NAME.gin (e.g. models/tiny.gin ...)` |
| `--num_processes=2` alone | `--num_processes needs --coordinator_address and --process_id too` |
| a restart with another batch size / seed / data / schedule | `DIR/STEP was trained by another run: batch_size: saved 16, now 8; ...`; `--allow_changed_run` continues and records it |
| a restart of a finished run | `the run in DIR is complete (step N)`, exit 0 |
| two trainings on one model dir | `model dir DIR is being trained by another process (host H, pid P, since T)` before anything is written |
| a damaged latest checkpoint | `checkpoint DIR/N is damaged (...); skipped, moved to DIR/damaged_checkpoints/N-T`; the newest intact step is used |
| a flipped byte in a checkpoint's array file | `checkpoint DIR/N is damaged (FILE does not match its sha256 in DIR/N/checksums.json ...)`; skipped as above |
| a NaN `BEST_METRIC` | `BEST_METRIC NAME is nan at step N: it cannot rank checkpoints`, nothing saved |
| Ctrl-C | `SIGINT: saved step N to ...; Run the same command again to resume`, exit 130, no traceback |
| `encode` of a file with a bare `\\r` | one row per `\\n` / `\\r\\n` line; the `\\r` stays in its text |
| `soup --eval_limit -38` | `--eval_limit=-38 must be >= 1` |
| a mining window past the corpus | `the rank window [50, 60) starts past the corpus of 3 documents` |
| STS with constant gold scores / all-zero qrels | `eval task NAME: the gold scores are all equal ...` / `every qrels relevance is 0` |
| an undefined metric in a report | `null` in results.json (valid JSON) and a warning |
"""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from orbax.checkpoint import checkpoint_managers

from embedder import checkpointing, cli, eval_report, evaluation, fileio, hardware, mining, summaries
from embedder.data import eval_tasks, jsonl, stdlib_pairs
from embedder.errors import CheckpointError, ConfigError, DataError
from tests.training_helpers import cli_train, reference_train, wait_for

BASE = [
    "train",
    "--gin_file=runs/finetune.gin",
    "--gin_file=models/tiny.gin",
    "--gin_file=mesh/cpu.gin",
    "--gin.BATCH_SIZE=8",
    "--gin.QUERY_LEN=16",
    "--gin.DOC_LEN=32",
    "--gin.NUM_NEGATIVES=0",
    "--gin.TRAIN_STEPS=2",
]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    jsonl.write_jsonl(str(path), stdlib_pairs.build_pairs("train")[:200])
    return str(path)


def _cli(argv, capsys):
    code = cli.main(argv)
    return code, capsys.readouterr()


# ---------------------------------------------------------------- run settings, before anything starts


@pytest.mark.parametrize(
    "flag,message",
    [
        (
            "--gin.LEARNING_RAT=5",
            r"gin macro LEARNING_RAT is set but nothing in this run reads it; did you mean LEARNING_RATE\?",
        ),
        ("--gin.TRAIN_STEPS=2.5", r"gin macro TRAIN_STEPS=2.5: must be an integer, got float 2.5"),
        ("--gin.BATCH_SIZE=4.0", r"gin macro BATCH_SIZE=4.0: must be an integer"),
        ("--gin.QUERY_LEN=16.0", r"gin macro QUERY_LEN=16.0: must be an integer"),
        (
            "--gin.TRAIN_STEPS='3'",
            r"gin macro TRAIN_STEPS='3': must be an integer, got the string '3' \(write numbers without quotes\)",
        ),
        ("--gin.SAVE_EVERY=0", r"gin macro SAVE_EVERY=0: must be >= 1"),
        ("--gin.DOC_LEN=-1", r"gin macro DOC_LEN=-1: must be >= 1"),
        ("--gin.TEMPERATURE=0", r"gin macro TEMPERATURE=0: must be a positive number"),
        ("--gin.TRAIN_FILES='x.jsonl'", r"gin macro TRAIN_FILES='x.jsonl': must be a list"),
        ("--gin.MRL_DIMS=[16, 0]", r"gin macro MRL_DIMS=\[16, 0\]: items must be >= 1"),
    ],
    ids=[
        "typo",
        "float-steps",
        "float-batch",
        "float-length",
        "quoted",
        "save-every-0",
        "negative-length",
        "zero-temperature",
        "files-string",
        "dims-zero",
    ],
)
def test_run_settings_are_checked_before_anything_starts(flag, message, tmp_path, capsys):
    code, out = _cli([*BASE, flag, f"--model_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert re.search(message, out.err), out.err
    assert "Traceback" not in out.err and len(out.err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "run")  # refused before the model dir is made


def test_a_run_without_a_model_file_names_the_flag(tmp_path, capsys):
    argv = [a for a in BASE if "models/" not in a]
    code, out = _cli([*argv, f"--model_dir={tmp_path / 'run'}"], capsys)
    assert code == 2
    assert out.err.strip() == (
        "embedder train: error: no model: add --gin_file=models/NAME.gin "
        "(e.g. models/tiny.gin; the files are in gin/models/)"
    )


@pytest.mark.parametrize(
    "flags,missing",
    [
        (["--num_processes=2"], "--coordinator_address and --process_id"),
        (["--coordinator_address=localhost:1234", "--process_id=0"], "--num_processes"),
    ],
)
def test_multi_host_flags_are_all_given_or_none(flags, missing, tmp_path, capsys):
    code, out = _cli([*BASE, *flags, f"--model_dir={tmp_path / 'run'}"], capsys)
    assert code == 2 and f"needs {missing} too" in out.err, out.err


# ---------------------------------------------------------------- line-oriented input, numeric flags


def test_encode_input_splits_on_newlines_only(tmp_path):
    path = tmp_path / "in.txt"
    raw = b"first\rstill first\r\nsecond\nthird"
    path.write_bytes(raw)
    # The reference: the JSONL reader's rule, written out by hand.
    expected = ["first\rstill first", "second", "third"]
    assert cli._read_lines(str(path)) == expected
    path.write_bytes(raw + b"\n")
    assert cli._read_lines(str(path)) == expected


def test_soup_eval_limit_must_be_positive(tmp_path, capsys):
    code, out = _cli(
        ["soup", "--checkpoints", str(tmp_path / "a"), "--eval_limit", "-38", f"--output={tmp_path / 'o'}"],
        capsys,
    )
    assert code == 2 and "--eval_limit=-38 must be >= 1" in out.err, out.err


def test_a_mining_window_past_the_corpus_is_an_error():
    examples = [jsonl.Example(query=f"q{i}", positive=f"p{i}") for i in range(3)]

    def encode(texts, kind):  # a deterministic encoder: the window is checked before it matters
        return np.eye(8, dtype=np.float32)[[hash(t) % 8 for t in texts]]

    config = mining.MiningConfig(num_negatives=2, rank_start=50, rank_end=60)
    with pytest.raises(
        ConfigError, match=r"the rank window \[50, 60\) starts past the corpus of 3 documents"
    ):
        mining.mine_hard_negatives(examples, encode, config)


# ---------------------------------------------------------------- evaluation: undefined metrics


def _encoder(texts, kind, task=None):
    rng = np.random.default_rng(abs(hash(tuple(texts))) % 2**32)
    return rng.standard_normal((len(texts), 16)).astype(np.float32)


def test_sts_with_constant_gold_scores_is_an_error():
    task = eval_tasks.STSTask(
        name="flat-sts", sentences1=["a", "b", "c"], sentences2=["d", "e", "f"], scores=np.ones(3)
    )
    with pytest.raises(DataError, match=r"eval task flat-sts: the gold scores are all equal"):
        evaluation.evaluate_sts(task, _encoder)


def test_all_zero_qrels_are_an_error():
    task = eval_tasks.RetrievalTask(
        name="zero-qrels",
        query_ids=["q1"],
        queries=["a query"],
        doc_ids=["d1", "d2"],
        documents=["doc one", "doc two"],
        qrels={"q1": {"d1": 0}},
    )
    with pytest.raises(DataError, match=r"eval task zero-qrels: every qrels relevance is 0"):
        evaluation.evaluate_retrieval(task, _encoder, k_values=(1,))


def test_an_undefined_metric_is_null_in_valid_json(tmp_path, capsys):
    value = {"task": {"metrics": {"16": {"spearman": float("nan"), "pearson": 0.5}}}, "inf": float("inf")}
    cleaned = eval_report.finite_or_null(value)
    text = json.dumps(cleaned, allow_nan=False)  # raises on any NaN left
    assert json.loads(text) == {"task": {"metrics": {"16": {"spearman": None, "pearson": 0.5}}}, "inf": None}
    err = capsys.readouterr().err
    assert "task/metrics/16/spearman is nan (undefined); written as null" in err


# ---------------------------------------------------------------- MFU's peak


def test_cpu_peak_from_cpuinfo_is_cores_times_fma_width_times_clock():
    block = (
        "processor\t: {n}\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n"
        "physical id\t: 0\ncore id\t: {core}\ncpu MHz\t\t: 3200.000\nflags\t\t: fpu sse2 avx fma avx2 avx512f amx_bf16\n"
    )
    # 4 logical processors on 2 physical cores (hyper-threads share the FMA units).
    text = "\n".join(block.format(n=n, core=n // 2) for n in range(4))
    peak = hardware.cpu_peak_from_cpuinfo(text)
    assert peak.flops == 2 * 64 * 2.0e9  # AMX is bf16 only; the model name's base clock, not cpu MHz
    assert peak.source == "cpuinfo: 2 cores x 64 FLOP/cycle (avx512f) x 2.00 GHz"
    avx2 = text.replace(" avx512f amx_bf16", "").replace(" @ 2.00GHz", "")
    assert hardware.cpu_peak_from_cpuinfo(avx2).flops == 2 * 32 * 3.2e9
    assert hardware.cpu_peak_from_cpuinfo("no processors here") is None


# ---------------------------------------------------------------- metrics past a resume


def test_rows_past_the_restored_step_are_dropped(tmp_path):
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    assert summaries.drop_metrics_after(str(tmp_path), 2) == 3
    assert summaries.read_metrics(str(tmp_path)) == rows[:2]
    assert summaries.drop_metrics_after(str(tmp_path / "nothing"), 2) == 0


# ---------------------------------------------------------------- one writer per model dir


def test_a_held_lock_is_refused_and_a_dead_holder_taken_over(tmp_path):
    lock = checkpointing.ModelDirLock(str(tmp_path)).acquire()
    with pytest.raises(CheckpointError, match=rf"host {socket.gethostname()}, pid {os.getpid()}"):
        checkpointing.ModelDirLock(str(tmp_path)).acquire()
    lock.release()
    assert not os.path.exists(tmp_path / checkpointing.LOCK_FILE)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / checkpointing.LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "since": "then"})
    )
    with checkpointing.ModelDirLock(str(tmp_path)) as taken:
        assert taken.held
        assert json.loads((tmp_path / checkpointing.LOCK_FILE).read_text())["pid"] == os.getpid()
    (tmp_path / checkpointing.LOCK_FILE).write_text(json.dumps({"host": "another-host", "pid": 1}))
    with pytest.raises(CheckpointError, match="host another-host, pid 1"):
        checkpointing.ModelDirLock(str(tmp_path)).acquire()


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_trainings_on_one_model_dir(train_file, tmp_path):
    """One runs; the other is refused before it writes anything, and the model dir is the first's."""
    flags = [f"--gin.TRAIN_FILES=['{train_file}']", "--gin.TRAIN_STEPS=6", "--gin.SAVE_EVERY=3"]
    first = cli_train(tmp_path, *flags)
    wait_for(lambda: os.path.exists(tmp_path / checkpointing.LOCK_FILE), first)
    holder = json.loads((tmp_path / checkpointing.LOCK_FILE).read_text())
    second = cli_train(tmp_path, *flags, "--gin.LEARNING_RATE=0.5")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2, err[-2000:]
    assert f"is being trained by another process (host {holder['host']}, pid {first.pid}" in err
    assert "Traceback" not in err
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    # The first run's config and curves only: the second never wrote its config.gin or a row.
    config = (tmp_path / "config.gin").read_text()
    assert "LEARNING_RATE = 0.001" in config and "LEARNING_RATE = 0.5" not in config
    assert [m["step"] for m in summaries.read_metrics(str(tmp_path))] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6"]
    assert not os.path.exists(tmp_path / checkpointing.LOCK_FILE)  # released at exit


# ---------------------------------------------------------------- resume: same run, or refused


@pytest.mark.slow
def test_a_changed_run_is_refused_a_finished_one_is_complete(train_file, tmp_path, capsys):
    first = reference_train(tmp_path, train_file, 4)
    assert first.step == 4
    changed = ["BATCH_SIZE = 8", "SEED = 3"]
    with pytest.raises(CheckpointError) as refused:
        reference_train(tmp_path, train_file, 8, extra=changed)
    message = str(refused.value)
    assert "checkpoints/4 was trained by another run" in message
    for change in ("batch_size: saved 16, now 8", "seed: saved 0, now 3", "train_steps: saved 4, now 8"):
        assert change in message, message
    assert "--allow_changed_run" in message
    # The same run again: complete, nothing trained.
    again = reference_train(tmp_path, train_file, 4)
    assert again.already_complete and again.step == 4 and again.losses == []
    assert "is complete: step 4 of 4" in capsys.readouterr().err
    # Allowed: it continues, and the checkpoint records what changed.
    allowed = reference_train(
        tmp_path, train_file, 8, extra=[*changed, "train_loop.train.allow_changed_run = True"]
    )
    assert allowed.step == 8 and allowed.resumed_from == 4
    record = checkpointing.read_meta(str(tmp_path / "checkpoints" / "8")).run
    assert "batch_size: saved 16, now 8" in record.allowed_changes
    assert record.batch_size == 8 and record.seed == 3


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_command_line_says_a_finished_run_is_complete(train_file, tmp_path):
    """The `embedder` program itself, run twice: the second run trains nothing and says so."""
    argv = [sys.executable, "-m", "embedder", *BASE, f"--gin.TRAIN_FILES=['{train_file}']"]
    argv.append(f"--model_dir={tmp_path}")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    first = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    again = subprocess.run(argv, cwd=repo, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"the run in {tmp_path} is complete (step 2)" in again.stdout


# ---------------------------------------------------------------- interrupts


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigint_saves_says_how_to_resume_and_exits_130(train_file, tmp_path):
    flags = [f"--gin.TRAIN_FILES=['{train_file}']", "--gin.TRAIN_STEPS=400", "--gin.SAVE_EVERY=100"]
    proc = cli_train(tmp_path, *flags)
    wait_for(
        lambda: os.path.exists(tmp_path / "metrics.jsonl") and summaries.read_metrics(str(tmp_path)), proc
    )
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    step = int(re.search(r"SIGINT: saved step (\d+)", err).group(1))
    assert "Run the same command again to resume" in err
    assert f"stopped by SIGINT at step {step}" in out
    assert os.path.isdir(tmp_path / "checkpoints" / str(step))
    # Resumed: it says from where, and the curve never doubles back.
    resumed = cli_train(tmp_path, *flags, f"--gin.train_loop.train.stop_at_step={step + 2}")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert f"resuming from step {step} ({tmp_path}/checkpoints/{step})" in err
    steps = [m["step"] for m in summaries.read_metrics(str(tmp_path))]
    assert steps == sorted(set(steps)), steps


# ---------------------------------------------------------------- damaged checkpoints


# Kinds of damage: a truncated array file, a deleted file the restore needs, flipped
# bytes in the meta, in orbax's tree metadata and in the largest array data file.
DAMAGE = ("truncate", "delete", "flip-meta", "flip-tree", "flip-array")


def _largest_array_file(step_dir):
    """The largest file under a `d/` folder of the step's state (orbax's OCDBT data files)."""
    state = os.path.join(step_dir, "state")
    data = [os.path.join(r, f) for r, _, fs in os.walk(state) if os.path.basename(r) == "d" for f in fs]
    return max(data, key=os.path.getsize)


def _damage(step_dir, rng, how=None):
    """Damages a step folder one way (`how`, one of DAMAGE; random if None); returns (how, path)."""
    how = how or DAMAGE[int(rng.integers(len(DAMAGE)))]
    if how == "truncate":
        path = _largest_array_file(step_dir)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    elif how == "delete":
        path = [
            os.path.join(step_dir, "state", "_METADATA"),
            os.path.join(step_dir, "meta", "metadata"),
            _largest_array_file(step_dir),
        ][int(rng.integers(3))]
        os.remove(path)
    else:
        path = {
            "flip-meta": os.path.join(step_dir, "meta", "metadata"),
            "flip-tree": os.path.join(step_dir, "state", "_METADATA"),
            "flip-array": _largest_array_file(step_dir),
        }[how]
        raw = bytearray(open(path, "rb").read())
        for at in rng.choice(len(raw), 3, replace=False):
            raw[at] ^= 0xFF  # an ASCII byte becomes a byte that is never valid UTF-8 on its own
        open(path, "wb").write(bytes(raw))
    return how, path


@pytest.mark.slow
def test_damaged_latest_checkpoints_are_skipped_and_the_run_ends_as_an_uninterrupted_one(
    train_file, tmp_path, capsys
):
    reference = tmp_path / "reference"
    reference_train(reference, train_file, 8, extra=["SAVE_EVERY = 2"])
    expected, _ = checkpointing.load_model_params(str(reference), 8)
    run = tmp_path / "run"
    rng = np.random.default_rng(21)
    reference_train(run, train_file, 8, extra=["SAVE_EVERY = 2", "train_loop.train.stop_at_step = 4"])
    # The first round flips bytes inside an array file (only the checksums see it); the second is random.
    for stop, kind in ((4, "flip-array"), (6, None)):
        latest = run / "checkpoints" / str(stop)
        assert (latest / checkpointing.CHECKSUMS_FILE).exists()
        how, path = _damage(str(latest), rng, kind)
        capsys.readouterr()
        # A consumer skips it too (and names it).
        step_dir = checkpointing.resolve_step_dir(str(run))
        params, meta = checkpointing.load_model_params(str(run))
        assert meta.step == stop - 2, (how, path)
        warned = capsys.readouterr().err
        assert f"checkpoint {latest} is damaged" in warned, (how, path)
        if how == "flip-array":  # only the checksums can see it
            assert f"{path} does not match its sha256" in warned, warned
        assert step_dir.endswith(f"/{stop - 2}") or how == "truncate"
        result = reference_train(
            run, train_file, 8, extra=["SAVE_EVERY = 2", f"train_loop.train.stop_at_step = {stop + 2}"]
        )
        err = capsys.readouterr().err
        assert result.resumed_from == stop - 2, (how, path, err[-2000:])
        assert re.search(
            rf"checkpoint {latest} is damaged \(.*\); skipped, moved to {run}/damaged_checkpoints/{stop}-\d+",
            err,
        ), err
        assert result.step == stop + 2
    kept = sorted(os.listdir(run / "damaged_checkpoints"))
    assert [name.split("-")[0] for name in kept] == ["4", "6"]  # set aside, never deleted
    params, _ = checkpointing.load_model_params(str(run), 8)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    shutil.rmtree(reference)


def test_a_meta_file_that_does_not_parse_names_its_path(tmp_path):
    meta = tmp_path / "meta" / "metadata"
    meta.parent.mkdir()
    meta.write_bytes(b'{"model_config": \xff}')
    with pytest.raises(CheckpointError, match=re.escape(f"{meta} is not valid JSON")):
        checkpointing.read_meta(str(tmp_path))


# ---------------------------------------------------------------- checksums of a checkpoint step


def _reference_manifest(step_dir):
    """Every file of a step but the manifest: its size and sha256, by hashlib over os.walk."""
    files = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, step_dir)
            if relative != checkpointing.CHECKSUMS_FILE:
                data = open(path, "rb").read()
                files[relative] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def _tiny_state(step):
    rng = np.random.default_rng(step)
    return {
        "params": {
            "model": {"embed": rng.standard_normal((512, 16), np.float32), "bias": np.ones(16, np.float32)}
        },
        "opt": {"mu": np.full((512, 16), step, np.float32)},
    }


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """A model dir with steps 2 and 3 of a tiny state (no model), saved asynchronously, keep=2."""
    model_dir = tmp_path_factory.mktemp("tiny_checkpoints")
    config = checkpointing.CheckpointConfig(keep=2, async_save=True)
    ckpt = checkpointing.Checkpointer(str(model_dir), config)
    meta = checkpointing.CheckpointMeta(model_config={"name": "tiny-state"})
    for step in (1, 2, 3):
        ckpt.save(step, jax.device_put(_tiny_state(step)), dataclasses.replace(meta, step=step))
    ckpt.close()  # the last step's checksums are written by then
    return model_dir


def test_every_kept_step_has_checksums_of_all_its_files(tiny_checkpoints):
    assert sorted(os.listdir(tiny_checkpoints / "checkpoints")) == ["2", "3"]
    for step in (2, 3):
        step_dir = tiny_checkpoints / "checkpoints" / str(step)
        manifest = json.loads((step_dir / checkpointing.CHECKSUMS_FILE).read_text())
        assert manifest["algorithm"] == "sha256"
        assert manifest["files"] == _reference_manifest(step_dir)
        assert any("/d/" in name for name in manifest["files"])  # the array data files are listed
        assert checkpointing.step_problem(str(step_dir)) is None


@pytest.mark.parametrize("how", [*DAMAGE, "delete-manifest"])
def test_a_damaged_step_is_named_and_every_consumer_takes_the_older_one(
    how, tiny_checkpoints, tmp_path, capsys
):
    model_dir = tmp_path / "run"
    shutil.copytree(tiny_checkpoints, model_dir)
    latest = model_dir / "checkpoints" / "3"
    if how == "delete-manifest":  # a step saved before checksums existed: accepted
        os.remove(latest / checkpointing.CHECKSUMS_FILE)
        assert checkpointing.resolve_step_dir(str(model_dir)) == str(latest)
        return
    _, path = _damage(str(latest), np.random.default_rng(0), how)
    problem = checkpointing.step_problem(str(latest))
    assert problem and path in problem, problem
    if how == "flip-array":
        assert problem == (
            f"{path} does not match its sha256 in {latest}/{checkpointing.CHECKSUMS_FILE} (changed since the save)"
        )
    # Consumers: the newest intact step, with a warning naming the damaged one ...
    assert checkpointing.resolve_step_dir(str(model_dir)) == str(model_dir / "checkpoints" / "2")
    params, meta = checkpointing.load_model_params(str(model_dir))
    assert meta.step == 2
    np.testing.assert_array_equal(params["embed"], _tiny_state(2)["params"]["model"]["embed"])
    assert f"checkpoint {latest} is damaged ({problem}); skipped" in capsys.readouterr().err
    # ... and asked for it by name, an error naming the file.
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint {latest} is damaged: {problem}")):
        checkpointing.load_model_params(str(model_dir), 3)
    # Training: restored from step 2, step 3 set aside.
    ckpt = checkpointing.Checkpointer(str(model_dir), checkpointing.CheckpointConfig(keep=2))
    abstract = checkpointing.abstract_like(jax.device_put(_tiny_state(0)))
    lines = []
    step, state, _, _ = ckpt.restore_latest_intact(abstract, report=lines.append)
    ckpt.close()
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, state, _tiny_state(2))
    assert len(lines) == 1 and lines[0].startswith(f"checkpoint {latest} is damaged ({problem[:60]}"), lines


@pytest.mark.parametrize("root", ["ram://checksums", "memory://checksums"])
def test_checksums_of_a_folder_in_an_object_store(root):
    """Through tf.io.gfile (ram://, as gs://) and fsspec (memory://): written, verified, a flip named."""
    folder = f"{root}-{os.getpid()}/step"
    files = {"a.bin": bytes(range(256)) * 9, "state/d/chunk": b"\x00" * 5000}
    for name, data in files.items():
        fileio.makedirs(os.path.dirname(f"{folder}/{name}"))
        with fileio.open_file(f"{folder}/{name}", "wb") as f:
            f.write(data)
    written = fileio.write_checksums(folder, "checksums.json")
    assert written["files"] == {
        name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()
    }
    assert fileio.checksum_problem(folder, "checksums.json") is None
    fileio.remove(f"{folder}/state/d/chunk")  # ram:// appends on "wb": write it anew
    with fileio.open_file(f"{folder}/state/d/chunk", "wb") as f:
        f.write(b"\x00" * 4999 + b"\x01")
    assert fileio.checksum_problem(folder, "checksums.json") == (
        f"{folder}/state/d/chunk does not match its sha256 in {folder}/checksums.json (changed since the save)"
    )
    for name in [*files, "checksums.json"]:
        fileio.remove(f"{folder}/{name}")


# ---------------------------------------------------------------- the best checkpoint


@pytest.mark.parametrize("mode", ["max", "min"])
def test_a_nan_best_metric_is_never_kept_as_best(mode):
    config = checkpointing.CheckpointConfig(best_metric="eval/ndcg@10", best_mode=mode)
    values = {1: 0.4, 2: float("nan"), 3: 0.6, 4: None, 5: float("inf"), 6: 0.5}
    infos = [  # what orbax hands a PreservationPolicy (checkpoint_managers.PolicyCheckpointInfo)
        types.SimpleNamespace(step=step, time=None, metrics=None if v is None else {"eval/ndcg@10": v})
        for step, v in values.items()
    ]
    policy = checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: checkpointing.best_metric_rank(metrics, config),
        reverse=mode == "min",
        n=1,
        keep_checkpoints_without_metrics=False,
    )
    kept = [
        i.step for i, keep in zip(infos, policy.should_preserve(infos, context=None), strict=True) if keep
    ]
    # The reference: the best finite value by hand.
    assert kept == ([3] if mode == "max" else [1])


def test_a_nan_best_metric_is_refused_before_saving(tmp_path):
    config = checkpointing.CheckpointConfig(best_metric="eval/ndcg@10", async_save=False)
    ckpt = checkpointing.Checkpointer(str(tmp_path), config)
    meta = checkpointing.CheckpointMeta(model_config={"name": "tiny-state"})
    with pytest.raises(
        DataError, match=r"BEST_METRIC eval/ndcg@10 is nan at step 4: it cannot rank checkpoints"
    ):
        ckpt.save(4, _tiny_state(4), meta, metrics={"eval/ndcg@10": float("nan")})
    ckpt.close()
    assert ckpt.all_steps() == [] and os.listdir(tmp_path / "checkpoints") == []
