"""Peak memory and step time of the plain and the gradient-cached contrastive step.

MiniLM-size encoder (6 layers, 384 wide, random init), query and document length
64, in-batch NCE with Matryoshka dims (384, 128, 64), fp32, one CPU device.
Peak memory is XLA's own accounting of the compiled step (arguments + outputs +
temporaries, from `compiled.memory_analysis()`), so a step too large to run can
still be measured; time is the median wall time of the steps run after a warm-up.

    .venv/bin/python scripts/bench_gradcache.py [--batches 128,512,2048] [--chunk 64]
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import numpy as np

from embedder import gradcache, losses
from embedder.models import dual_encoder, transformer

GIB = 1024**3


def build(batch: int, length: int, chunk: int):
    config = transformer.TransformerConfig()  # the all-MiniLM-L6-v2 shape
    module = dual_encoder.DualEncoder(config)
    loss_config = losses.ContrastiveLossConfig(temperature=0.05, matryoshka_dims=(384, 128, 64))
    rng = np.random.default_rng(0)
    inputs = {
        "query_tokens": rng.integers(1000, 30000, size=(batch, length), dtype=np.int32),
        "positive_tokens": rng.integers(1000, 30000, size=(batch, length), dtype=np.int32),
    }
    params = nn.unbox(
        module.init(jax.random.key(0), inputs["query_tokens"][:1], inputs["positive_tokens"][:1])
    )["params"]

    def embed_fn(p, x):
        return module.apply({"params": p}, x["query_tokens"], x["positive_tokens"])

    def loss_fn(p, e):
        return losses.matryoshka_contrastive_loss(e["query"], e["positive"], config=loss_config)

    def plain(p, x):
        return jax.value_and_grad(lambda q: loss_fn(q, embed_fn(q, x)), has_aux=True)(p)

    def cached(p, x):
        return gradcache.cached_value_and_grad(embed_fn, loss_fn, p, x, chunk_size=chunk, num_shards=1)

    return params, inputs, {"plain": plain, "cached": cached}


def measure(fn, params, inputs, repeats: int, run: bool):
    compiled = jax.jit(fn).lower(params, inputs).compile()
    mem = compiled.memory_analysis()
    peak = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    if not run:
        return peak, float("nan")
    jax.block_until_ready(compiled(params, inputs))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, inputs))
        times.append(time.perf_counter() - start)
    return peak, float(np.median(times))


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", default="128,512,2048")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64, help="gradient cache chunk (global examples)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument(
        "--max_run_gib",
        type=float,
        default=12.0,
        help="only compile, do not run, steps whose peak exceeds this",
    )
    args = parser.parse_args()
    print(
        f"device: {jax.devices()[0].device_kind}, {jax.device_count()} device(s); length {args.length}, chunk {args.chunk}"
    )
    print(f"{'batch':>6} {'step':>7} {'peak GiB':>9} {'vs 128':>7} {'step s':>8} {'pairs/s':>8}")
    base = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        params, inputs, steps = build(batch, args.length, args.chunk)
        for name, fn in steps.items():
            peak, _ = measure(fn, params, inputs, 0, run=False)
            run = peak / GIB <= args.max_run_gib
            peak, seconds = (
                measure(fn, params, inputs, args.repeats, run=run) if run else (peak, float("nan"))
            )
            base.setdefault(name, peak)
            note = "" if run else "  (not run: over --max_run_gib)"
            print(
                f"{batch:>6} {name:>7} {peak / GIB:>9.2f} {peak / base[name]:>6.1f}x {seconds:>8.2f} "
                f"{batch / seconds:>8.1f}{note}",
                flush=True,
            )


if __name__ == "__main__":
    main()
