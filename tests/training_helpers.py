"""Shared pieces of the training tests: the tiny model, a train helper, gin flags, command-line runs.

`conftest.py` hands the same helper to tests as the `train_tiny` fixture; the
stdlib training files are session fixtures there too.
"""

import dataclasses
import json
import os
import subprocess
import sys
import time

from embedder import checkpointing, gin_utils, losses, partitioning, summaries, train_loop, trainer
from embedder.data import pipeline
from embedder.models import dual_encoder, pretrained, spec, transformer

# The tiny BERT the training, soup, export and error tests share: MiniLM's vocabulary
# (the real WordPiece tokenizer), 2 layers of width 32.
TINY = transformer.TransformerConfig(
    vocab_size=30522, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=128
)
# The same model with MiniLM's 512 positions (the training and eval-during-training tests).
TINY_512 = dataclasses.replace(TINY, max_len=512)
ONE_DEVICE = partitioning.MeshConfig(data=1, num_devices=1)
TINY_LOSS = losses.ContrastiveLossConfig(matryoshka_dims=(32, 16))
TINY_OPTIMIZER = trainer.OptimizerConfig(learning_rate=1e-3, warmup_steps=2)
NO_SAVES = checkpointing.CheckpointConfig(save_every=1000)


def tiny_spec(config: transformer.TransformerConfig = TINY) -> spec.ModelSpec:
    """A ModelSpec of `config` with the real MiniLM WordPiece vocabulary.

    Args:
      config: the transformer (TINY by default).

    Returns:
      The spec that `train_loop.train` and `trainer.Trainer` take.
    """
    return spec.ModelSpec(dual_encoder.DualEncoder(config), vocab_dir=pretrained.minilm_l6_v2_path())


def train_tiny(
    model_dir,
    train_file: str,
    *,
    steps: int,
    model: spec.ModelSpec | None = None,
    data: pipeline.DataConfig | None = None,
    mesh: partitioning.MeshConfig = ONE_DEVICE,
    loss: losses.ContrastiveLossConfig = TINY_LOSS,
    optimizer: trainer.OptimizerConfig = TINY_OPTIMIZER,
    checkpoint: checkpointing.CheckpointConfig = NO_SAVES,
    **kwargs,
) -> train_loop.TrainResult:
    """Trains the tiny model in this process, with the settings the tests share.

    Args:
      model_dir: where the run writes.
      train_file: a JSONL training file (used unless `data` is given).
      steps: optimizer steps.
      model: the ModelSpec (default: `tiny_spec()`).
      data: the data config (default: batches of 16 pairs, queries of 16 and documents of 32 tokens).
      mesh, loss, optimizer, checkpoint: as `train_loop.train` takes them.
      **kwargs: any other `train_loop.train` argument (log_every, evaluate, stop_at_step, ...).

    Returns:
      The run's `TrainResult`.
    """
    return train_loop.train(
        model_dir=str(model_dir),
        model=model if model is not None else tiny_spec(),
        data=data
        if data is not None
        else pipeline.DataConfig(train_files=[train_file], batch_size=16, query_len=16, doc_len=32),
        train_steps=steps,
        loss=loss,
        optimizer=optimizer,
        mesh=mesh,
        checkpoint=checkpoint,
        peak_flops_per_device=1e12,
        **kwargs,
    )


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
