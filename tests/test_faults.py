"""Faults: random SIGKILLs (also mid-save), an unwritable model dir, a disk filling up."""

import contextlib
import json
import os
import re
import signal
import subprocess
import tempfile

import jax
import numpy as np
import pytest

from embedder import checkpointing
from tests.training_helpers import cli_train, reference_train, safe_losses, wait_for

# Every test here runs `embedder train` in other processes, for a minute or more.
pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

STEPS = 24


@pytest.fixture(scope="module")
def uninterrupted(train_file, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("uninterrupted")
    reference_train(model_dir, train_file, STEPS)
    params, _ = checkpointing.load_model_params(str(model_dir), STEPS)
    return params


def _complete_steps(model_dir):
    folder = os.path.join(model_dir, "checkpoints")
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit()) if os.path.isdir(folder) else []


def test_random_sigkills_end_where_an_uninterrupted_run_ends(train_file, uninterrupted, tmp_path):
    """Killed three times at random moments (saves every 2 steps, so some kills land
    mid-write), restarted each time: the final parameters equal the uninterrupted run's."""
    rng = np.random.default_rng(7)
    flags = [f"--gin.TRAIN_FILES=['{train_file}']", f"--gin.TRAIN_STEPS={STEPS}", "--gin.SAVE_EVERY=2"]
    kills = 0
    for _ in range(3):
        proc = cli_train(tmp_path, *flags)
        seen = max(safe_losses(tmp_path), default=0)
        target = seen + int(rng.integers(1, 5))
        if target >= STEPS:
            proc.kill()
            break
        wait_for(lambda target=target: max(safe_losses(tmp_path), default=0) >= target, proc)
        # A random extra delay moves the kill around the step and its asynchronous save.
        try:
            proc.wait(timeout=float(rng.uniform(0.0, 0.3)))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # Whatever the kill interrupted, every step folder left is complete.
        for step in _complete_steps(tmp_path):
            assert os.path.exists(tmp_path / "checkpoints" / str(step) / "commit_success.txt"), step
    assert kills >= 2
    proc = cli_train(tmp_path, *flags)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    params, _ = checkpointing.load_model_params(str(tmp_path), STEPS)
    jax.tree.map(np.testing.assert_array_equal, params, uninterrupted)
    leftovers = [n for n in os.listdir(tmp_path / "checkpoints") if not n.isdigit()]
    assert not leftovers, leftovers


@contextlib.contextmanager
def _tmpfs(size: str, read_only: bool = False):
    folder = tempfile.mkdtemp()
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", folder], capture_output=True)
    if mounted.returncode:
        os.rmdir(folder)
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", folder], check=False)
        os.rmdir(folder)


def test_read_only_model_dir_fails_before_the_first_step(train_file):
    with _tmpfs("1m", read_only=True) as folder:
        proc = cli_train(os.path.join(folder, "run"), f"--gin.TRAIN_FILES=['{train_file}']")
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-2000:]
    assert "is not writable: Read-only file system" in err and "Traceback" not in err
    assert "step/s" not in err  # the progress bar never started


def test_disk_full_mid_run_keeps_earlier_checkpoints(train_file):
    # A checkpoint of the tiny model takes ~4 MiB on disk (params and the Adam
    # moments, whose untouched embedding rows are zeros that compress away):
    # 10 MiB holds one or two of them and a later one runs out of space.
    with _tmpfs("10m") as folder:
        model_dir = os.path.join(folder, "run")
        flags = [f"--gin.TRAIN_FILES=['{train_file}']", "--gin.TRAIN_STEPS=12", "--gin.SAVE_EVERY=2"]
        proc = cli_train(model_dir, *flags)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, err[-2000:]
        # orbax's writer thread logs its own traceback too (in any order); ours is one
        # message. The checkpoint, the events file or the metrics log may be what hits
        # the limit; how many checkpoints fit depends on compression.
        found = re.findall(r"embedder train: error: .*?complete checkpoints, intact: (\[[\d, ]*\])", err)
        assert len(found) == 1, err[-3000:]
        assert "No space left on device" in err.split("embedder train: error: ")[1]
        complete = json.loads(found[0])
        assert complete and complete == list(range(2, 2 * len(complete) + 1, 2)), complete
        for step in complete:
            params, meta = checkpointing.load_model_params(model_dir, step)
            assert meta.step == step and jax.tree.leaves(params)
