"""Training metrics: TensorBoard events, a JSONL log, a console progress bar, MFU.

Only process 0 writes. The JSONL log (`MODEL_DIR/metrics.jsonl`, one object per
logged step) is what tests and plots read, through `read_metrics`; TensorBoard
gets the same scalars.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from embedder import fileio, hardware
from embedder.errors import DataError
from embedder.models import transformer


def peak_flops_per_device(measure_cpu: bool = True) -> float | None:
    """The device's peak FLOP/s (see `peak_and_source`), or None where it is unknown."""
    peak = peak_and_source(measure_cpu)
    return peak[0] if peak else None


def peak_and_source(measure_cpu: bool = True) -> tuple[float, str] | None:
    """The peak FLOP/s of one device and where it comes from.

    A chip of `hardware.CHIPS`: its dense bf16 spec. A CPU: its vector units'
    fp32 peak from /proc/cpuinfo (`hardware.host_cpu_peak`), which load cannot
    undercut; without one, the best of several timed matmuls.

    Args:
      measure_cpu: on a CPU without a readable /proc/cpuinfo, time matmuls (a
        second or so); False: None.

    Returns:
      (FLOP/s, source), or None for a chip the table lacks (MFU is then not reported).
    """
    device = jax.devices()[0]
    chip = hardware.chip_of_device_kind(device.device_kind)
    if chip is not None:
        return chip.peak_bf16_flops, f"spec sheet: {chip.name} dense bf16"
    if device.platform == "cpu":
        cpu = hardware.host_cpu_peak()
        if cpu is not None:
            return cpu.flops, cpu.source
        if measure_cpu:
            return measure_matmul_flops(), "measured: best of 5 fp32 1024x1024 matmuls"
    return None


# An MFU above this is a wrong peak or a wrong FLOP count, never a fact.
MAX_PLAUSIBLE_MFU = 1.0


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of one device (all its host threads), measured now."""
    x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), jax.devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def encoder_flops_per_token(config: transformer.TransformerConfig, length: int) -> float:
    """Forward FLOPs per token of one encoder pass (Kaplan et al. 2020's 2N + attention).

    Matmul parameters only (the embedding lookup is not a matmul); attention
    scores and the weighted sum add 4 * length * heads * head_dim per layer.
    """
    d, h, hd, kvh = config.hidden_size, config.num_heads, config.head_size, config.kv_heads
    attn_params = d * h * hd * 2 + d * kvh * hd * 2
    mlp_params = d * config.mlp_dim * (3 if config.family == "llm" else 2)
    per_layer = 2 * (attn_params + mlp_params) + 4 * length * h * hd
    return config.num_layers * per_layer


def train_flops_per_step(
    config: transformer.TransformerConfig,
    batch_size: int,
    query_len: int,
    doc_len: int,
    num_negatives: int,
    grad_cache: bool,
) -> float:
    """FLOPs of one training step: forward x 3 (forward + backward), x 4/3 with the gradient cache."""
    tokens_q = batch_size * query_len
    tokens_d = batch_size * (1 + num_negatives) * doc_len
    forward = tokens_q * encoder_flops_per_token(config, query_len) + tokens_d * encoder_flops_per_token(
        config, doc_len
    )
    return forward * (4 if grad_cache else 3)


def train_flops(
    config: transformer.TransformerConfig,
    query_tokens: int,
    query_len: int,
    doc_tokens: int,
    doc_len: int,
    grad_cache: bool,
) -> float:
    """`train_flops_per_step` from the tokens a step computes (rows x row length, packed or not).

    Args:
      config: the tower.
      query_tokens: query tokens computed (padding included), over all processes.
      query_len: the query rows' length (attention spans a row).
      doc_tokens: positive and negative tokens computed.
      doc_len: the document rows' length.
      grad_cache: the step runs the gradient cache's second forward pass.
    """
    forward = query_tokens * encoder_flops_per_token(config, query_len)
    forward += doc_tokens * encoder_flops_per_token(config, doc_len)
    return forward * (4 if grad_cache else 3)


METRICS_FILE = "metrics.jsonl"


def read_metrics(model_dir: str) -> list[dict[str, Any]]:
    """The logged metrics of a run (MODEL_DIR/metrics.jsonl), one dict per logged line, in order.

    Args:
      model_dir: the run's model dir (local or gs://).

    Returns:
      [{"step": N, name: value, ...}, ...] as `MetricsWriter.write` wrote them; a
      resumed run drops the rows past its restored step first, so steps only go up.

    Raises:
      OSError: the file is missing or unreadable.
      DataError: a line is not JSON (names the file and line).
    """
    path = os.path.join(model_dir, METRICS_FILE)
    with fileio.open_file(path) as f:
        lines = f.read().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not a JSON line ({e.msg} at column {e.colno})") from None
    return rows


def drop_metrics_after(model_dir: str, step: int) -> int:
    """Removes the rows of metrics.jsonl logged past `step` (a resume redoes those steps).

    The file is rewritten atomically; a missing file is nothing to do.

    Args:
      model_dir: the run's model dir.
      step: the restored step; rows with a larger step go.

    Returns:
      How many rows were dropped.
    """
    path = os.path.join(model_dir, METRICS_FILE)
    if not fileio.exists(path):
        return 0
    with fileio.open_file(path) as f:
        lines = f.read().split("\n")
    kept, dropped = [], 0
    for line in lines:
        if not line.strip():
            continue
        try:
            row_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            row_step = None  # a line cut short by a kill mid-write: it goes too
        if isinstance(row_step, int) and row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        fileio.write_text_atomically(path, "".join(line + "\n" for line in kept))
    return dropped


def purge_tensorboard_after(log_dir: str, step: int) -> None:
    """Writes TensorBoard's purge marker (a SessionLog START at `step`) into `log_dir`.

    TensorBoard drops the events of earlier files whose step is >= `step` when it
    reads this marker, as it does for a restarted TensorFlow session.
    """
    try:  # tensorboardX's copy of the event writer, without TensorFlow
        from tensorboardX.event_file_writer import EventFileWriter
        from tensorboardX.proto import event_pb2
    except ImportError:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

    fileio.makedirs(log_dir)
    writer = EventFileWriter(log_dir, filename_suffix=".purge")
    writer.add_event(
        event_pb2.Event(
            step=step,
            wall_time=time.time(),
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
        )
    )
    writer.close()


class _TensorboardX:
    """tensorboardX's writer behind flax's `scalar(name, value, step)` interface (no TensorFlow)."""

    def __init__(self, log_dir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(log_dir)

    def scalar(self, name: str, value: float, step: int) -> None:
        # add_scalar would rewrite the tag ("ndcg@10" -> "ndcg_10"): the names stay as metrics.jsonl has them.
        from tensorboardX.proto.summary_pb2 import Summary

        summary = Summary(value=[Summary.Value(tag=name, simple_value=float(value))])
        self._writer._get_file_writer().add_summary(summary, step)

    def text(self, name: str, text: str, step: int) -> None:
        self._writer.add_text(name, text, step)

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def _tensorboard_writer(log_dir: str):
    """TensorBoard events through tensorboardX; flax's TensorFlow writer where it is missing, and
    for URLs (`gs://`), which tensorboardX would write to a local folder named like the URL."""
    try:
        if not fileio.is_url(log_dir):
            return _TensorboardX(log_dir)
    except ImportError:
        pass
    from flax.metrics import tensorboard

    return tensorboard.SummaryWriter(log_dir)


class MetricsWriter:
    """Writes scalars to TensorBoard and metrics.jsonl, and draws a progress bar."""

    def __init__(self, model_dir: str, total_steps: int, start_step: int, enabled: bool, purge: bool = False):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.start_time = time.time()
        self._bar = None
        self._tb = None
        self._jsonl = None
        if not enabled:
            return
        from tqdm import tqdm

        if purge:
            # A resume: the events past start_step belong to steps being redone.
            purge_tensorboard_after(os.path.join(model_dir, "tensorboard"), start_step + 1)
        self._tb = _tensorboard_writer(os.path.join(model_dir, "tensorboard"))
        self._jsonl = fileio.open_file(os.path.join(model_dir, METRICS_FILE), "a")
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=1.0,
        )

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        try:
            for name, value in scalars.items():
                self._tb.scalar(name, value, step)
            self._tb.flush()
        except Exception as e:  # TensorFlow reports a full disk as its own error type
            raise OSError(f"cannot write TensorBoard events: {e}") from e
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        shown = {k: f"{scalars[k]:.4g}" for k in ("loss", "accuracy", "pairs_per_sec", "mfu") if k in scalars}
        # Token utilisation (real / computed tokens) of queries and documents, e.g. "util 0.93/0.88".
        if "token_utilisation/query" in scalars and "token_utilisation/document" in scalars:
            shown["util"] = (
                f"{scalars['token_utilisation/query']:.2f}/{scalars['token_utilisation/document']:.2f}"
            )
        self._bar.set_postfix(shown, refresh=False)

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def note(self, name: str, text: str) -> None:
        """`text` on the console and, as the text summary `name`, in TensorBoard (at the start step)."""
        self.message(text)
        if self._tb is None:
            return
        try:
            self._tb.text(name, text, self.start_step)
            self._tb.flush()
        except Exception as e:  # as in `write`
            raise OSError(f"cannot write TensorBoard events: {e}") from e

    def message(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        elif self.enabled:
            print(text, file=sys.stderr)

    def close(self) -> None:
        """Closes the bar and the files; a failure here (e.g. a full disk) is reported, not raised,
        so it never hides the error that ended the run."""
        if self._bar is not None:
            self._bar.close()
        for handle in (self._tb, self._jsonl):
            if handle is None:
                continue
            try:
                handle.close()
            except Exception as e:
                print(f"warning: could not close a metrics file: {e}", file=sys.stderr)
