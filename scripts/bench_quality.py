"""Fine-tuning quality: embedder vs sentence-transformers, same model, data and settings.

Both sides fine-tune the real all-MiniLM-L6-v2 on the stdlib docstring -> code
train split (`stdlib_pairs.build_pairs("train")`, written to one JSONL file) and
are scored on the test split (`stdlib_code_search`: 352 docstrings against the
split's 359 code documents). What is equal on both sides:

* the examples of every step: the peer takes the batches of embedder's own
  batcher (`PairBatcher.global_indices(step)`, seeded), in the same order;
* the objective: in-batch NCE, query -> document only, scale 20 (temperature
  0.05), no duplicate masking (the peer's MultipleNegativesRankingLoss has none);
  the Matryoshka rows sum the same loss over the same prefix sizes, each
  re-normalised (the peer's MatryoshkaLoss);
* the optimiser: AdamW (betas 0.9/0.999, eps 1e-6, weight decay 0.01, none on
  biases and LayerNorm), gradients clipped to global norm 1, linear warm-up from
  0 then linear decay to 0 (embedder's optax schedule and transformers'
  get_linear_schedule_with_warmup give the same rate at every step);
* the lengths: queries and documents truncated to the same token counts, the
  same dropout (off by default, as the quickstart trains), the same threads.

embedder trains through its real entry point (`python -m embedder train` with
gin/runs/quickstart.gin and flag overrides) into a temporary folder; the peer
trains in a plain torch loop with its own model and loss classes and saves its
folder. Each run is its own process; its wall time covers start-up, loading,
compilation and training. Then one process evaluates every model the same way:
`Embedder.load` on the base model, the peer's saved folders and embedder's
checkpoint, `evaluation.evaluate` at every Matryoshka size (prefix,
re-normalised), texts truncated to `--eval_len` tokens. A check encodes test
documents with the peer's own `SentenceTransformer.encode` too and prints the
largest difference. The loss of the first two steps (learning rate 0 at step 0,
so both start from the same weights) must agree between the sides.

Rows: the base model (zero-shot), the peer with MatryoshkaLoss over embedder's
Matryoshka sizes (the like-for-like run), embedder; `--peer_plain` adds the peer
with MultipleNegativesRankingLoss alone. The project's targets, printed as
ratios: embedder's nDCG@10 >= the like-for-like peer's, and embedder's 128-dim
nDCG@10 >= 0.95 of its full-size one.

    .venv/bin/python scripts/bench_quality.py [--steps 60] [--batch 32] [--lr 5e-5] [--peer_plain]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_TASK = "stdlib_code_search"
EVAL_DIMS = (384, 256, 128, 64, 32)
# The optimiser settings of gin/runs/finetune.gin (trainer.OptimizerConfig), given to the peer.
WEIGHT_DECAY = 0.01
ADAM_EPS = 1e-6
MAX_GRAD_NORM = 1.0
SCALE = 20.0  # 1 / temperature


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


# ---------------------------------------------------------------- embedder


def train_embedder(args, train_file: str, model_dir: str, env: dict) -> dict:
    """`embedder train` with the quickstart config and this run's settings; wall time and losses."""
    query_len, doc_len = args.lengths
    overrides = {
        "TRAIN_FILES": f"['{train_file}']",
        "TRAIN_STEPS": args.steps,
        "BATCH_SIZE": args.batch,
        "LEARNING_RATE": args.lr,
        "WARMUP_STEPS": args.warmup,
        "QUERY_LEN": query_len,
        "DOC_LEN": doc_len,
        "MRL_DIMS": list(args.mrl_dims),
        "TEMPERATURE": 1.0 / SCALE,
        "SEED": args.seed,
        "SAVE_EVERY": args.steps,
        "losses.ContrastiveLossConfig.mask_duplicates": False,
        "losses.ContrastiveLossConfig.symmetric": False,
        "transformer.TransformerConfig.dropout_rate": args.dropout,
        "transformer.TransformerConfig.attention_dropout_rate": args.dropout,
        "train_loop.train.log_every": 1,
    }
    cmd = [sys.executable, "-m", "embedder", "train", "--gin_file=gin/runs/quickstart.gin"]
    cmd += [f"--gin.{name}={value}" for name, value in overrides.items()]
    cmd += [f"--model_dir={model_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"embedder train failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(model_dir, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    losses = [row["loss"] for row in sorted(rows, key=lambda r: r["step"]) if "loss" in row]
    return {"seconds": seconds, "losses": losses}


# ---------------------------------------------------------------- peer


def run_peer(args, train_file: str, out_dir: str, mrl_dims: tuple[int, ...]) -> dict:
    """Fine-tunes with sentence-transformers on embedder's batches; saves the model to out_dir."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer, losses

    from embedder.data import batching, jsonl, wordpiece
    from embedder.models import pretrained

    torch.manual_seed(args.seed)
    path = pretrained.minilm_l6_v2_path()
    model = SentenceTransformer(
        path,
        device="cpu",
        config_kwargs={"hidden_dropout_prob": args.dropout, "attention_probs_dropout_prob": args.dropout},
    )
    bert_config = model[0].auto_model.config
    if (bert_config.hidden_dropout_prob, bert_config.attention_probs_dropout_prob) != (args.dropout,) * 2:
        raise RuntimeError(f"the peer's dropout is not {args.dropout}: {bert_config}")
    model.train()
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=SCALE)
    if mrl_dims:
        loss_fn = losses.MatryoshkaLoss(model, loss_fn, matryoshka_dims=list(mrl_dims))
    # BERT's convention, as embedder's trainer.decay_mask: no decay on biases and LayerNorm.
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if n.endswith("bias") or "LayerNorm" in n]
    decay = [p for n, p in named if not (n.endswith("bias") or "LayerNorm" in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        eps=ADAM_EPS,
    )
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, args.warmup, args.steps)

    query_len, doc_len = args.lengths
    examples = jsonl.read_jsonl(train_file)
    ours = wordpiece.WordPieceTokenizer.from_pretrained_dir(path)
    batcher = batching.PairBatcher(
        examples, ours, global_batch_size=args.batch, query_len=query_len, doc_len=doc_len, seed=args.seed
    )
    tokenizer = model.tokenizer

    def features(texts, length):
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt"))

    token_mismatches = 0
    history = []
    start = time.perf_counter()
    for step in range(args.steps):
        batch = [examples[i] for i in batcher.global_indices(step)]
        queries = [e.query for e in batch]
        docs = [e.positive for e in batch]
        feats = [features(queries, query_len), features(docs, doc_len)]
        if step == 0:  # the peer's tokens are embedder's tokens
            for texts, feat, length in ((queries, feats[0], query_len), (docs, feats[1], doc_len)):
                for text, ids, mask in zip(texts, feat["input_ids"], feat["attention_mask"], strict=True):
                    token_mismatches += ids[mask.bool()].tolist() != ours.encode(text, max_length=length)
        loss = loss_fn(feats, None)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        history.append(float(loss))
    loop_seconds = time.perf_counter() - start
    model.save(out_dir)  # read back by embedder's Embedder.load, tokenizer.json and all
    return {"losses": history, "loop_seconds": loop_seconds, "token_mismatches": int(token_mismatches)}


# ---------------------------------------------------------------- evaluation


def run_eval(args, models: list[tuple[str, str]], peer_dir: str | None) -> dict:
    """Every model through embedder's evaluation, the same encoder code and lengths."""
    import numpy as np

    from embedder import evaluation, inference
    from embedder.data import eval_tasks

    task = eval_tasks.load_task(EVAL_TASK)
    out = {}
    for name, path in models:
        model = inference.Embedder.load(path)
        model.max_length = args.eval_len
        start = time.perf_counter()

        def encode(texts, kind, task_name=None, model=model):
            return model.encode(texts, kind=kind, task=task_name, batch_size=64)

        result = evaluation.evaluate([task], encode, EVAL_DIMS)[task.name]
        out[name] = {
            "seconds": time.perf_counter() - start,
            "metrics": {str(d): m for d, m in result["metrics"].items()},
            "num_queries": result["num_queries"],
            "num_documents": result["num_documents"],
        }
    if peer_dir:
        from sentence_transformers import SentenceTransformer

        docs = list(task.documents[:32])
        peer = SentenceTransformer(peer_dir, device="cpu")
        peer.max_seq_length = args.eval_len
        theirs = peer.encode(docs, batch_size=32, convert_to_numpy=True)
        model = inference.Embedder.load(peer_dir)
        model.max_length = args.eval_len
        ours = model.encode(docs, kind="document", batch_size=32)
        out["_encode_check"] = float(np.abs(ours - theirs).max())
    return out


# ---------------------------------------------------------------- driver


def _child(args) -> None:
    if args.child == "eval":
        result = run_eval(args, json.loads(args.models), args.peer_dir)
    else:
        dims = args.mrl_dims if args.child == "peer_mrl" else ()
        result = run_peer(args, args.train_file, args.out_dir, dims)
    print("RESULT " + json.dumps(result))


def _env(threads: int) -> dict:
    return dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        TOKENIZERS_PARALLELISM="false",
        XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}",
    )


def _spawn(args, child: str, env: dict, **extra: str) -> tuple[dict, float]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", child]
    cmd += ["--steps", str(args.steps), "--batch", str(args.batch), "--lr", str(args.lr)]
    cmd += ["--warmup", str(args.warmup), "--lengths", ",".join(map(str, args.lengths))]
    cmd += ["--mrl_dims", ",".join(map(str, args.mrl_dims)), "--dropout", str(args.dropout)]
    cmd += ["--seed", str(args.seed), "--eval_len", str(args.eval_len)]
    for name, value in extra.items():
        cmd += [f"--{name}", value]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{child} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :]), seconds


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _print_tables(evals: dict, train_seconds: dict) -> None:
    names = [n for n in evals if not n.startswith("_")]
    width = max(len(n) for n in names) + 2
    dims = [str(d) for d in EVAL_DIMS]
    for metric, label in (("ndcg@10", "nDCG@10"), ("recall@10", "Recall@10")):
        print(f"\n{label}, {EVAL_TASK} test split, at each embedding size (prefix, re-normalised);")
        print("train s: wall time of the training process (start-up, loading, compilation included)")
        print(f"{'model':<{width}}{'train s':>8}" + "".join(f"{d:>8}" for d in dims))
        for name in names:
            seconds = train_seconds.get(name)
            cell = f"{seconds:>8.0f}" if seconds is not None else f"{'-':>8}"
            row = "".join(f"{evals[name]['metrics'][d][metric]:>8.4f}" for d in dims)
            print(f"{name:<{width}}{cell}{row}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (quickstart: 60)")
    parser.add_argument("--batch", type=int, default=32, help="pairs per step (quickstart: 32)")
    parser.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (quickstart: 5e-5)")
    parser.add_argument("--warmup", type=int, default=6, help="linear warm-up steps (quickstart: 6)")
    parser.add_argument(
        "--lengths",
        type=_ints,
        default=(32, 128),
        help="QUERY,DOC training token lengths (quickstart: 32,128)",
    )
    parser.add_argument(
        "--mrl_dims",
        type=_ints,
        default=(384, 128, 64),
        help="Matryoshka loss sizes (quickstart: 384,128,64)",
    )
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout on both sides (quickstart: 0)")
    parser.add_argument("--eval_len", type=int, default=256, help="eval token length (the model's max: 256)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of every process")
    parser.add_argument("--seed", type=int, default=0, help="example order and initialisation")
    parser.add_argument(
        "--peer_plain",
        action="store_true",
        help="also train the peer with MultipleNegativesRankingLoss alone (no Matryoshka; +2-4 minutes)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (models, data)")
    parser.add_argument("--child", choices=("peer", "peer_mrl", "eval"), help=argparse.SUPPRESS)
    parser.add_argument("--train_file", help=argparse.SUPPRESS)
    parser.add_argument("--out_dir", help=argparse.SUPPRESS)
    parser.add_argument("--models", help=argparse.SUPPRESS)
    parser.add_argument("--peer_dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if len(args.lengths) != 2:
        parser.error(f"--lengths takes QUERY,DOC, got {args.lengths}")
    if args.child:
        _child(args)
        return

    from embedder.data import jsonl, stdlib_pairs
    from embedder.models import pretrained

    total_start = time.perf_counter()
    work = tempfile.mkdtemp(prefix="bench_quality_")
    env = _env(args.threads)
    try:
        train_file = os.path.join(work, "train.jsonl")
        jsonl.write_jsonl(train_file, stdlib_pairs.build_pairs("train"))
        query_len, doc_len = args.lengths
        mrl = "/".join(map(str, args.mrl_dims))
        print(f"machine: {_cpu_name()}, {os.cpu_count()} cores; {args.threads} threads per process")
        print(
            f"settings: {args.steps} steps x {args.batch} pairs, lr {args.lr:g}, warm-up {args.warmup} then linear "
            f"decay to 0, AdamW wd {WEIGHT_DECAY} eps {ADAM_EPS:g}, clip {MAX_GRAD_NORM:g}, scale {SCALE:g}, "
            f"lengths {query_len}/{doc_len}, dropout {args.dropout:g}, seed {args.seed}, "
            f"Matryoshka {mrl}, eval length {args.eval_len}",
            flush=True,
        )
        runs = {}
        embedder_dir = os.path.join(work, "embedder")
        runs[f"embedder MRL {mrl}"] = train_embedder(args, train_file, embedder_dir, env)
        print(f"embedder trained in {runs[f'embedder MRL {mrl}']['seconds']:.0f}s", flush=True)
        peers = [("peer_mrl", f"peer MRL {mrl}")]
        if args.peer_plain:
            peers.insert(0, ("peer", "peer MNRL"))
        peer_dirs = {}
        for child, name in peers:
            peer_dirs[name] = os.path.join(work, child)
            result, seconds = _spawn(args, child, env, train_file=train_file, out_dir=peer_dirs[name])
            runs[name] = {**result, "seconds": seconds}
            print(
                f"{name} trained in {seconds:.0f}s (tokens differing from embedder's: "
                f"{result['token_mismatches']})",
                flush=True,
            )

        models = [("zero-shot (base)", pretrained.minilm_l6_v2_path())]
        models += [(name, peer_dirs[name]) for _, name in peers]
        models += [(f"embedder MRL {mrl}", embedder_dir)]
        evals, eval_seconds = _spawn(
            args, "eval", env, models=json.dumps(models), peer_dir=peer_dirs[peers[-1][1]]
        )
        print(f"evaluated {len(models)} models in {eval_seconds:.0f}s", flush=True)

        _print_tables(evals, {name: run["seconds"] for name, run in runs.items()})
        print("\nloss (steps 1, 2, last):")
        for name, run in runs.items():
            first = ", ".join(f"{x:.4f}" for x in run["losses"][:2])
            print(f"  {name:<24} {first}, {run['losses'][-1]:.4f}")
        ndcg = {name: evals[name]["metrics"] for name in evals if not name.startswith("_")}
        ours, theirs = f"embedder MRL {mrl}", f"peer MRL {mrl}"
        full = str(max(EVAL_DIMS))
        print(
            f"\nembedder / peer (both Matryoshka {mrl}), nDCG@10 at {full}: "
            f"{ndcg[ours][full]['ndcg@10'] / ndcg[theirs][full]['ndcg@10']:.3f} (target >= 1)"
        )
        if args.peer_plain:
            print(
                f"embedder / peer MNRL, nDCG@10 at {full}: "
                f"{ndcg[ours][full]['ndcg@10'] / ndcg['peer MNRL'][full]['ndcg@10']:.3f}"
            )
        for name in (ours, theirs):
            target = " (target >= 0.95)" if name == ours else ""
            print(
                f"{name}: nDCG@10 at 128 / at {full}: "
                f"{ndcg[name]['128']['ndcg@10'] / ndcg[name][full]['ndcg@10']:.3f}{target}"
            )
        print(
            f"peer folder encoded by embedder vs the peer's own encode: max |diff| "
            f"{evals['_encode_check']:.1e}"
        )
        print(f"total wall time: {time.perf_counter() - total_start:.0f}s")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
