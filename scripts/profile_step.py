"""Where embedder's training step spends its time on this CPU: a jax profiler trace, summarised.

Traces `--steps` steps of the benchmark's step (real all-MiniLM-L6-v2, in-batch
NCE, AdamW; `scripts/bench_train.py`'s embedder side) after a warm-up, reads the
XSpace the profiler writes, and adds up the time of every XLA:CPU thunk (one
HLO instruction or fusion each) by kind:

* matmul: `dot`, and the fusions XLA hands to its YNNPACK / oneDNN back ends
  (`ynn_fusion`, `onednn_*`), which are built around a dot;
* copy/layout: copies, transposes, broadcasts, concatenates, slices (also as
  the first op of a fusion, which XLA names after its ops);
* elementwise/reduce: XLA's other fusions (LayerNorm, GELU, softmax, the
  optimizer update, ...), reductions and scatters;
* other.

Prints the table, the biggest thunks, the step's FLOPs (XLA's cost analysis)
and the rate they imply. The raw trace stays in `--trace_dir` for TensorBoard's
profile plugin or Perfetto.

    .venv/bin/python scripts/profile_step.py [--batch 32 --length 64 --dtype float32]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LAYOUT = re.compile(r"^(wrapped_)?(copy|transpose|concatenate|dynamic|slice|pad|bitcast|broadcast|gather)")


def kind_of(name: str) -> str:
    """matmul, elementwise/reduce, copy/layout or other, from a thunk's name."""
    if name.startswith(("ynn_fusion", "dot", "onednn", "convolution", "custom-call")):
        return "matmul"
    if LAYOUT.match(name):
        return "copy/layout"
    if name.endswith("fusion") or name.startswith(("wrapped_", "reduce", "scatter", "select")):
        return "elementwise/reduce"
    return "other"


def thunk_times(trace_dir: str) -> collections.Counter:
    """{thunk name without its numeric suffix: total picoseconds} over the XLA:CPU threads."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise SystemExit(f"{trace_dir}: the profiler wrote no .xplane.pb")
    space = xplane_pb2.XSpace()
    with open(max(files, key=os.path.getmtime), "rb") as f:
        space.ParseFromString(f.read())
    totals: collections.Counter = collections.Counter()
    for plane in space.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue  # the Python thread's events are dispatch, not compute
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if name.startswith(("ThreadpoolListener", "ThunkExecutor", "end:")):
                    continue
                totals[re.sub(r"\.\d+$", "", name)] += event.duration_ps
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--trace_dir", default=None, help="where the trace goes (default: a temporary folder)"
    )
    args = parser.parse_args()

    import bench_train
    import jax
    import numpy as np

    from embedder import partitioning

    runner, state, mesh, tok = bench_train.embedder_trainer(args.steps + 1, args.dtype)
    queries, docs = bench_train._texts(args.batch, 1)
    batch = partitioning.global_batch(
        mesh,
        {
            "query_tokens": tok.encode_batch(queries, max_length=args.length, pad_to=args.length),
            "positive_tokens": tok.encode_batch(docs, max_length=args.length, pad_to=args.length),
            "weights": np.ones(args.batch, np.float32),
        },
    )
    state, metrics = runner.train_step(state, batch)  # compile and warm up
    jax.block_until_ready(metrics)
    cost = runner._step_fn.lower(state, batch).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))

    trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="embedder-profile-")
    start = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        for _ in range(args.steps):
            state, metrics = runner.train_step(state, batch)
            jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps

    totals = thunk_times(trace_dir)
    busy = sum(totals.values())
    by_kind: collections.Counter = collections.Counter()
    for name, ps in totals.items():
        by_kind[kind_of(name)] += ps
    threads = os.cpu_count()
    print(f"step {args.batch}x{args.length} {args.dtype}: {step_s:.2f} s/step (traced), trace in {trace_dir}")
    print(f"XLA cost analysis: {flops / 1e9:.1f} GFLOP/step -> {flops / step_s / 1e9:.0f} GFLOP/s achieved")
    print(f"thunk time summed over XLA threads: {busy / 1e12 / args.steps:.2f} s/step ({threads} cores)")
    print(f"{'kind':>20} {'share':>7} {'s/step':>8}")
    for kind, ps in by_kind.most_common():
        print(f"{kind:>20} {ps / busy:>7.1%} {ps / 1e12 / args.steps:>8.3f}")
    print(f"\n{'thunk':>32} {'kind':>20} {'share':>7}")
    for name, ps in totals.most_common(12):
        print(f"{name:>32} {kind_of(name):>20} {ps / busy:>7.1%}")


if __name__ == "__main__":
    main()
