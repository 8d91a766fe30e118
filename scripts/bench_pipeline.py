"""Input pipeline throughput: tokenised pairs per second, against what training consumes.

Reads the stdlib docstring -> code pairs (TFDS `stdlib_code_search`, built here
offline if missing) through the registered seqio tasks with the MiniLM WordPiece
vocabulary, at the MiniLM quickstart's shapes (global batch 32, query 32 / document
128 tokens), and times `--steps` batches after the first one (epoch re-opens and
shuffle-buffer refills included). Variants: one task, the stdlib mixture with
mixed batches and with task-homogeneous batches, and the pure-Python
`PairBatcher` on the same pairs as a reference. The ratio is against the
training step's pairs/s (`--train_pairs_per_sec`: the quickstart's 13.96 on the
2-core Intel Xeon, from README.md).

    .venv/bin/python scripts/bench_pipeline.py [--steps 300] [--tfds_dir DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _time_source(source, steps: int) -> tuple[float, float]:
    """(seconds to the first batch, steady pairs/s over the next `steps` batches)."""
    start = time.perf_counter()
    source.batch(0)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(1, steps + 1):
        source.batch(step)
    elapsed = time.perf_counter() - start
    return first, steps * source.global_batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="batches timed after the first")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--query_len", type=int, default=32)
    parser.add_argument("--doc_len", type=int, default=128)
    parser.add_argument("--tfds_dir", default=None, help="TFDS data dir (default: a temporary one)")
    parser.add_argument("--train_pairs_per_sec", type=float, default=13.96, help="the training step's rate")
    args = parser.parse_args()

    from embedder.data import batching, pipeline, stdlib_pairs, tasks, vocabularies
    from embedder.models import pretrained

    vocab_dir = pretrained.minilm_l6_v2_path()
    vocab = vocabularies.WordPieceVocabulary(vocab_dir)
    tfds_dir = args.tfds_dir or tempfile.mkdtemp(prefix="bench_tfds_")
    tasks.register_stdlib_tasks(vocab, tfds_dir)
    shapes = dict(global_batch_size=args.batch_size, query_len=args.query_len, doc_len=args.doc_len, seed=0)
    rows = []
    for label, name, homogeneous in (
        ("seqio task", tasks.STDLIB_TASK, False),
        ("seqio mixture, mixed", tasks.STDLIB_MIXTURE, False),
        ("seqio mixture, one task a batch", tasks.STDLIB_MIXTURE, True),
    ):
        source = pipeline.SeqioPairSource(name, task_homogeneous=homogeneous, **shapes)
        rows.append((label, *_time_source(source, args.steps)))
    batcher = batching.PairBatcher(
        stdlib_pairs.build_pairs("train"), vocab.tokenizer, **{**shapes, "global_batch_size": args.batch_size}
    )
    rows.append(("PairBatcher (Python)", *_time_source(batcher, args.steps)))

    cores = len(os.sched_getaffinity(0))
    print(
        f"batch {args.batch_size}, query {args.query_len} / doc {args.doc_len} tokens, {args.steps} batches, "
        f"{cores} cores; training consumes {args.train_pairs_per_sec:.2f} pairs/s"
    )
    print(f"{'pipeline':>34} {'first batch s':>14} {'pairs/s':>9} {'vs training':>12}")
    for label, first, rate in rows:
        print(f"{label:>34} {first:>14.2f} {rate:>9.0f} {rate / args.train_pairs_per_sec:>11.1f}x")


if __name__ == "__main__":
    main()
