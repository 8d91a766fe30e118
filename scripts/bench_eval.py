"""Evaluation throughput: encoding (texts/s) and exact top-k search (queries/s).

Encoding: the real all-MiniLM-L6-v2 embeds the stdlib code-search test split
(docstring queries and code documents, truncated to --max_length tokens),
embedder's `Embedder.encode` against sentence-transformers' `encode` (torch
CPU), same texts, same batch size (each side's default, 32), same threads.
Each side batches as it does by default: embedder by `encoding.plan` (tight
length buckets, a token budget of batch size x length limit per pass, the last
batch of a bucket padded to a few rows), the peer by character count, each
batch padded to its longest text. Token utilisation (real tokens / computed
tokens) is each side's own plan, the peer's read off its tokenizer's masks.
Search: exact cosine top-100 of --queries random queries over a --docs-document
random corpus (384 dims), `search.cosine_top_k` (one size, then the three
Matryoshka sizes 384/128/64 in one sweep) against a numpy brute force (blocked
matmul + argpartition), and the fraction of queries whose top-100 ids agree. Each measurement runs in its own
subprocess after a warm-up pass (compiles, caches); the best of --repeats is
reported.

    .venv/bin/python scripts/bench_eval.py [--docs 100000] [--queries 1000] [--repeats 3]
        [--work encode,search]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIM = 384
K = 100


def _encode_texts(kind: str) -> list[str]:
    from embedder.data import eval_tasks

    task = eval_tasks.load_task("stdlib_code_search")
    return list(task.queries if kind == "query" else task.documents)


def _best(fn, repeats: int) -> float:
    fn()  # warm-up: compiles every bucket shape, fills caches
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def encode_embedder(kind: str, args) -> dict:
    from embedder import encoding, inference
    from embedder.models import pretrained

    embedder = inference.Embedder.from_sentence_transformers(pretrained.minilm_l6_v2_path())
    embedder.max_length = args.max_length
    texts = _encode_texts(kind)
    seconds = _best(lambda: embedder.encode(texts, kind=kind, batch_size=args.batch_size), args.repeats)
    ids, batches = embedder.encoding_plan(texts, kind, batch_size=args.batch_size)
    util = encoding.utilisation([len(x) for x in ids], batches)
    return {"rate": len(texts) / seconds, "n": len(texts), "util": util, "passes": len(batches)}


def encode_peer(kind: str, args) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from embedder.models import pretrained

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(pretrained.minilm_l6_v2_path(), device="cpu")
    model.max_seq_length = args.max_length
    texts = _encode_texts(kind)
    seconds = _best(lambda: model.encode(texts, batch_size=args.batch_size), args.repeats)
    return {"rate": len(texts) / seconds, "n": len(texts), **_peer_utilisation(model, texts, args.batch_size)}


def _peer_utilisation(model, texts: list[str], batch_size: int) -> dict:
    """The peer's real / computed tokens, batched as its `encode` batches (its own sort and tokenizer)."""
    import numpy as np

    order = np.argsort([-model._input_length(t) for t in texts])
    if model._can_flatten_inputs():  # no padding at all then (flash attention on GPU)
        order = model._interleave_sorted_indices(order)
    real = computed = passes = 0
    for start in range(0, len(order), batch_size):
        mask = model.preprocess([texts[i] for i in order[start : start + batch_size]])["attention_mask"]
        real, computed, passes = real + int(mask.sum()), computed + mask.numel(), passes + 1
    return {"util": real / computed, "passes": passes}


def _random_data(args):
    import numpy as np

    rng = np.random.default_rng(0)
    corpus = rng.standard_normal((args.docs, DIM), dtype=np.float32)
    queries = rng.standard_normal((args.queries, DIM), dtype=np.float32)
    return queries, corpus


def search_embedder(dims: str, args) -> dict:
    import numpy as np

    from embedder import search

    queries, corpus = _random_data(args)
    sizes = [int(d) for d in dims.split(",")]
    result = {}

    def run():
        result["ids"] = search.cosine_top_k(queries, corpus, K, sizes)[1]

    seconds = _best(run, args.repeats)
    np.save(os.path.join(args.scratch, f"ids_{dims}.npy"), result["ids"][0])
    return {"rate": len(queries) / seconds, "n": len(queries)}


def search_peer(dims: str, args) -> dict:
    import numpy as np

    queries, corpus = _random_data(args)
    sizes = [int(d) for d in dims.split(",")]
    result = {}

    def run():
        out = []
        for d in sizes:
            c = corpus[:, :d] / np.linalg.norm(corpus[:, :d], axis=1, keepdims=True)
            q = queries[:, :d] / np.linalg.norm(queries[:, :d], axis=1, keepdims=True)
            ids = np.empty((len(q), K), np.int64)
            for start in range(0, len(q), 256):
                scores = q[start : start + 256] @ c.T
                top = np.argpartition(-scores, K, axis=1)[:, :K]
                order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
                ids[start : start + 256] = np.take_along_axis(top, order, axis=1)
            out.append(ids)
        result["ids"] = out

    seconds = _best(run, args.repeats)
    ours = np.load(os.path.join(args.scratch, f"ids_{dims}.npy"))
    same = np.mean([set(a) == set(b) for a, b in zip(ours, result["ids"][0], strict=True)])
    return {"rate": len(queries) / seconds, "n": len(queries), "agree": float(same)}


CHILDREN = {
    "encode_embedder": encode_embedder,
    "encode_peer": encode_peer,
    "search_embedder": search_embedder,
    "search_peer": search_peer,
}


def _spawn(child: str, arg: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--child={child}", f"--child_arg={arg}"]
    for name in ("docs", "queries", "repeats", "threads", "batch_size", "max_length", "scratch", "work"):
        cmd.append(f"--{name}={getattr(args, name)}")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{child} {arg} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--work", default="encode,search", help="what to measure: encode, search or both")
    parser.add_argument("--scratch", default=None, help="folder for the search results compared across sides")
    parser.add_argument("--child", choices=sorted(CHILDREN))
    parser.add_argument("--child_arg")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args.child_arg, args)))
        return

    import platform
    import tempfile

    args.scratch = args.scratch or tempfile.mkdtemp(prefix="bench_eval_")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads"
    )
    print(f"{'work':>34} {'side':>9} {'rate':>10}  unit")
    work_items = set(args.work.split(","))
    if not work_items <= {"encode", "search"}:
        parser.error(f"--work={args.work}: expected encode, search or both")
    for kind in ("query", "document") if "encode" in work_items else ():
        work = f"encode {kind} (stdlib test, {args.max_length} tok)"
        rates = {}
        for side in ("embedder", "peer"):
            r = _spawn(f"encode_{side}", kind, args)
            rates[side] = r["rate"]
            print(
                f"{work:>34} {side:>9} {r['rate']:>10.1f}  texts/s ({r['n']} texts, {r['passes']} passes, "
                f"token utilisation {r['util']:.0%})",
                flush=True,
            )
        print(f"{work:>34} {'ratio':>9} {rates['embedder'] / rates['peer']:>9.2f}x", flush=True)
    for dims in (str(DIM), "384,128,64") if "search" in work_items else ():
        work = f"top-{K} of {args.docs} docs, dims {dims}"
        rates = {}
        for side in ("embedder", "peer"):
            r = _spawn(f"search_{side}", dims, args)
            rates[side] = r["rate"]
            extra = f", top-{K} sets equal for {r['agree']:.1%}" if "agree" in r else ""
            print(f"{work:>34} {side:>9} {r['rate']:>10.1f}  queries/s ({r['n']} queries{extra})", flush=True)
        print(f"{work:>34} {'ratio':>9} {rates['embedder'] / rates['peer']:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
