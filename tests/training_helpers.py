"""Shared pieces of the training and fault tests: gin flags, command-line runs, metrics."""

import json
import os
import subprocess
import sys
import time

from embedder import gin_utils, summaries, train_loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Flags shared by the command-line runs; the in-process reference uses the same gin files.
GIN_FLAGS = [
    "--gin_file=runs/finetune.gin",
    "--gin_file=models/tiny.gin",
    "--gin_file=mesh/cpu.gin",
    "--gin.BATCH_SIZE=16",
    "--gin.QUERY_LEN=16",
    "--gin.DOC_LEN=32",
    "--gin.NUM_NEGATIVES=1",
    "--gin.LEARNING_RATE=1e-3",
    "--gin.WARMUP_STEPS=2",
    "--gin.train_loop.train.log_every=1",
    "--gin.checkpointing.CheckpointConfig.keep=10",
]


def cli_train(model_dir, *extra, env=None, **popen):
    cmd = [sys.executable, "-m", "embedder", "train", *GIN_FLAGS, f"--model_dir={model_dir}", *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **popen
    )


def losses_by_step(model_dir):
    """The last logged loss of every step (a resumed run logs some steps twice)."""
    return {m["step"]: m["loss"] for m in summaries.read_metrics(str(model_dir))}


def wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()[1][-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def reference_train(model_dir, train_file, steps, extra=()):
    gin_utils.parse(
        [f.split("=", 1)[1] for f in GIN_FLAGS if f.startswith("--gin_file")],
        [f[len("--gin.") :].replace("=", " = ", 1) for f in GIN_FLAGS if f.startswith("--gin.")]
        + [f"TRAIN_FILES = ['{train_file}']", f"TRAIN_STEPS = {steps}", "SAVE_EVERY = 4", *extra],
    )
    return gin_utils.configured(train_loop.train)(model_dir=str(model_dir))


def safe_losses(model_dir):
    try:
        return losses_by_step(model_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
