"""The largest global batch that trains under a memory cap: embedder vs sentence-transformers.

Four contenders train the real all-MiniLM-L6-v2 (fp32, in-batch NCE at scale 20 =
temperature 0.05, AdamW) on the same stdlib docstring -> code pairs (repeated as
needed), every query and document padded or truncated to `--length` tokens:

    embedder-plain   embedder's Trainer, one value_and_grad over the whole batch
    embedder-cached  embedder's Trainer with grad_cache_chunk=--chunk
    peer-plain       sentence-transformers' MultipleNegativesRankingLoss
    peer-cached      its CachedMultipleNegativesRankingLoss, mini_batch_size=--chunk

A batch "trains" when one full optimizer step completes (after the compile, for
embedder) while the process stays under `--cap_gib` of resident memory. Every
candidate runs in its own subprocess, on the same threads and environment as
bench_train.py; a watcher reads the child's /proc/<pid>/status every
`--sample_ms` and kills it as soon as its peak RSS (VmHWM, the kernel's own high
water mark, so no spike between two samples is missed) passes the cap. A child
that finishes is still a failure if the peak it reports itself on its way out
(its own VmHWM, exact to the end) passed the cap. The same rule holds for all
four. (Not ru_maxrss: Linux folds the parent's resident set into a child's
ru_maxrss when the child execs, so it would count the launcher's memory too.)

Search per contender: double the batch from `--start` until a failure or
`--max_batch` (halve instead while the start itself fails), then bisect
`--bisect` times between the last success and the first failure; cached
contenders stay on multiples of the chunk. A contender still training at
`--max_batch` is shown with ">=": its own limit lies higher.

Step seconds is the wall time of the one optimizer step: for embedder without
the time spent tracing, lowering and compiling (jax.monitoring's compile
events), for the peer after a two-pair step that takes torch's one-time set-up
(and creates AdamW's moments, which embedder's state holds from the start, so
both peaks count them).
On a shared CPU it is noisy; the batch and the peak RSS are the result. Ratios
are against peer-plain's largest batch.

    .venv/bin/python scripts/bench_batch.py [--cap_gib 2] [--length 32] [--chunk 32] [--max_batch 512]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024**3
TARGET_RATIO = 8.0  # the project's aim for embedder-cached over peer-plain
CONTENDERS = ("embedder-plain", "embedder-cached", "peer-plain", "peer-cached")


def run_embedder(batch: int, length: int, chunk: int) -> dict:
    """One optimizer step of embedder's Trainer; chunk 0 is the plain step."""
    import bench_train
    import jax
    import numpy as np

    from embedder import partitioning

    compile_seconds = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: (
            compile_seconds.append(seconds) if event.startswith("/jax/core/compile/") else None
        )
    )
    runner, state, mesh, tok = bench_train.embedder_trainer(1, "float32", grad_cache_chunk=chunk)
    runner.check_batch(batch)
    queries, docs = bench_train._texts(batch, 1)
    arrays = {
        "query_tokens": tok.encode_batch(queries, max_length=length, pad_to=length),
        "positive_tokens": tok.encode_batch(docs, max_length=length, pad_to=length),
        "weights": np.ones(batch, np.float32),
    }
    global_batch = partitioning.global_batch(mesh, arrays)
    compile_seconds.clear()
    start = time.perf_counter()
    state, metrics = runner.train_step(state, global_batch)
    loss = float(jax.block_until_ready(metrics["loss"]))
    seconds = time.perf_counter() - start - sum(compile_seconds)
    return {"seconds": seconds, "loss": loss}


def run_peer(batch: int, length: int, chunk: int) -> dict:
    """One optimizer step of sentence-transformers; chunk 0 is the plain (uncached) loss."""
    import bench_train
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses

    from embedder.models import pretrained

    torch.manual_seed(0)
    model = SentenceTransformer(pretrained.minilm_l6_v2_path(), device="cpu")
    model.train()
    if chunk:
        loss_fn = losses.CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=chunk)
    else:
        loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)

    def features(batch: int) -> list[dict]:
        queries, docs = bench_train._texts(batch, 1)
        tokenize = model.tokenizer
        return [
            dict(tokenize(t, padding="max_length", truncation=True, max_length=length, return_tensors="pt"))
            for t in (queries, docs)
        ]

    def step(feats: list[dict]) -> float:
        loss = loss_fn(feats, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss)

    # torch's first step pays one-time set-up (kernels, thread pools) and creates
    # AdamW's moments; a two-pair step takes both, so the measured step holds the
    # same state as embedder's (whose moments exist from init_state on).
    step(features(2))
    feats = features(batch)
    start = time.perf_counter()
    loss = step(feats)
    return {"seconds": time.perf_counter() - start, "loss": loss}


def _child(args) -> None:
    side, kind = args.child.split("-")
    chunk = args.chunk if kind == "cached" else 0
    fn = run_embedder if side == "embedder" else run_peer
    result = fn(args.batch, args.length, chunk)
    print("RESULT " + json.dumps(result), flush=True)
    print(f"{PEAK_LINE}{_peak_rss(os.getpid())}", flush=True)


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except FileNotFoundError:
        pass
    return platform.processor() or platform.machine()


# A child's last line: its own VmHWM in bytes, read just before it exits.
PEAK_LINE = "PEAK_RSS "


def _peak_rss(pid: int) -> int | None:
    """The process's peak resident memory so far in bytes (VmHWM), None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@dataclasses.dataclass(frozen=True)
class CappedRun:
    """How a watched process ended: exit code, peak RSS in bytes, and its output."""

    returncode: int
    peak: int
    over_cap: bool
    timed_out: bool
    stdout: str
    stderr: str


def run_capped(cmd: list[str], env: dict, cap: int, sample_s: float, timeout: float) -> CappedRun:
    """Runs `cmd`, killing it once its peak RSS passes `cap` bytes or it runs past `timeout` s.

    The watcher reads VmHWM (the kernel's high-water mark, so a spike between two
    samples still counts) every `sample_s`; a child that prints a PEAK_LINE as it
    exits (its own VmHWM) adds the last moments after the final sample.
    """
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        peak, over_cap, timed_out = 0, False, False
        deadline = time.monotonic() + timeout
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _peak_rss(proc.pid) or 0)
            over_cap, timed_out = over_cap or peak > cap, timed_out or time.monotonic() > deadline
            if over_cap or timed_out:
                os.kill(proc.pid, signal.SIGKILL)
            time.sleep(sample_s)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        out.seek(0)
        err.seek(0)
        stdout = out.read()
        reported = [int(line[len(PEAK_LINE) :]) for line in stdout.splitlines() if line.startswith(PEAK_LINE)]
        peak = max([peak, *reported])
        return CappedRun(proc.returncode, peak, peak > cap, timed_out, stdout, err.read())


def trial(contender: str, batch: int, args) -> dict:
    """One optimizer step of one contender at one batch, in a capped subprocess.

    Returns:
      {"ok": bool, "peak": bytes, "seconds": step seconds, "why": reason of a failure}.
    """
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        HF_HUB_OFFLINE="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={args.threads}",
    )
    cmd = [sys.executable, __file__, "--child", contender, "--batch", str(batch)]
    cmd += ["--length", str(args.length), "--chunk", str(args.chunk)]
    run = run_capped(cmd, env, int(args.cap_gib * GIB), args.sample_ms / 1000, args.timeout)
    if run.over_cap:
        return {"ok": False, "peak": run.peak, "why": f"over the {args.cap_gib:g} GiB cap"}
    if run.timed_out:
        return {"ok": False, "peak": run.peak, "why": f"past --timeout {args.timeout:g} s"}
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    if run.returncode or not lines:
        raise RuntimeError(
            f"{contender} at batch {batch} failed (exit {run.returncode}):\n{run.stderr[-3000:]}"
        )
    result = json.loads(lines[-1][len("RESULT ") :])
    return {"ok": True, "peak": run.peak, "seconds": result["seconds"], "loss": result["loss"]}


def search(contender: str, args) -> dict:
    """The largest batch that trains, by doubling (halving if the start fails) then bisecting."""
    grain = args.chunk if contender.endswith("cached") else 1
    best, fail = None, None
    limit = args.max_batch // grain * grain
    batch = args.start
    while batch:
        r = _report(contender, batch, trial(contender, batch, args))
        if r["ok"]:
            best = (batch, r)
            if fail or batch >= limit:
                break
            batch = min(2 * batch, limit)
        else:
            fail = batch
            if best:
                break
            batch = batch // 2 // grain * grain
    for _ in range(args.bisect if best and fail else 0):
        mid = (best[0] + fail) // 2 // grain * grain
        if mid <= best[0]:
            break
        r = _report(contender, mid, trial(contender, mid, args))
        if r["ok"]:
            best = (mid, r)
        else:
            fail = mid
    return {"batch": best[0] if best else 0, "result": best[1] if best else None, "at_limit": fail is None}


def _report(contender: str, batch: int, r: dict) -> dict:
    note = f"{r['seconds']:.1f} s step" if r["ok"] else r["why"]
    print(
        f"  {contender:<16} batch {batch:>6}: {'ok  ' if r['ok'] else 'FAIL'} peak {r['peak'] / GIB:.2f} GiB, {note}",
        flush=True,
    )
    return r


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cap_gib",
        type=float,
        default=2.0,
        help="resident memory cap per process (GiB) (default: %(default)s)",
    )
    parser.add_argument(
        "--length", type=int, default=32, help="query and document length (tokens) (default: %(default)s)"
    )
    parser.add_argument(
        "--chunk",
        type=int,
        default=32,
        help="gradient cache chunk = peer's mini_batch_size (default: %(default)s)",
    )
    parser.add_argument(
        "--start",
        type=int,
        default=64,
        help="first batch tried (a multiple of --chunk) (default: %(default)s)",
    )
    parser.add_argument(
        "--max_batch", type=int, default=512, help="the largest batch tried (default: %(default)s)"
    )
    parser.add_argument(
        "--bisect", type=int, default=1, help="bisection steps after the first failure (default: %(default)s)"
    )
    parser.add_argument(
        "--contenders", default=",".join(CONTENDERS), help="comma-separated subset (default: %(default)s)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="OMP/MKL/XLA threads per child (default: %(default)s)",
    )
    parser.add_argument(
        "--sample_ms", type=float, default=50.0, help="memory watcher period (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds one trial may run (default: %(default)s)"
    )
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return
    if args.start % args.chunk:
        parser.error(f"--start {args.start} must be a multiple of --chunk {args.chunk}")
    if args.max_batch < args.start:
        parser.error(f"--max_batch {args.max_batch} is below --start {args.start}")

    print(
        f"machine: {_cpu_name()}, {os.cpu_count()} cores, {args.threads} threads; cap {args.cap_gib:g} GiB RSS, "
        f"length {args.length}, chunk {args.chunk}, batches {args.start}..{args.max_batch}"
    )
    start = time.perf_counter()
    found = {c: search(c, args) for c in args.contenders.split(",")}
    base = found.get("peer-plain", {}).get("batch")
    print(f"\n{'contender':<16} {'batch':>7} {'peak RSS':>9} {'step s':>7} {'vs peer-plain':>14}")
    for contender, f in found.items():
        r = f["result"]
        batch = (">=" if f["at_limit"] else "") + str(f["batch"])
        peak = f"{r['peak'] / GIB:.2f}GiB" if r else "-"
        seconds = f"{r['seconds']:.1f}" if r else "-"
        ratio = (">=" if f["at_limit"] else "") + f"{f['batch'] / base:.1f}x" if base else "-"
        print(f"{contender:<16} {batch:>7} {peak:>9} {seconds:>7} {ratio:>14}")
    cached = found.get("embedder-cached")
    if base and cached:
        ratio = cached["batch"] / base
        verdict = (
            "met"
            if ratio >= TARGET_RATIO
            else "NOT met" + (" (raise --max_batch)" if cached["at_limit"] else "")
        )
        print(
            f"target: embedder-cached trains a {TARGET_RATIO:g}x larger batch than peer-plain under the cap: "
            f"{verdict} ({'>=' if cached['at_limit'] else ''}{ratio:.1f}x)"
        )
    print(f"wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
