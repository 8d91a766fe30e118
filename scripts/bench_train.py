"""Training throughput: embedder vs sentence-transformers, same model, same work.

Both train the real all-MiniLM-L6-v2 with in-batch NCE (scale 20 = temperature
0.05; the peer's MultipleNegativesRankingLoss) and AdamW on the same stdlib
docstring -> code pairs, every text padded or truncated to the same length, on
the same threads. Each side runs in its own subprocess (so peak RSS is its own),
warms up, then times `--repeats` steps; pairs/s is batch / median step time. MFU
is against this machine's fp32 matmul peak, measured here (the best of numpy,
torch and XLA on a 2048^3 matmul). Then the bf16 paths: embedder with bf16
compute (fp32 params) and the peer under torch.autocast(bfloat16).

A setting `real64` trains on the same pairs as they come (batch 64, queries up
to 32 tokens, documents up to 128, the quickstart's lengths): the peer pads each
batch to its longest text (its collator's default), embedder cuts each batch to
the smallest of its length buckets (16, 32, 64, 128) that holds it
(`data.bucketing`). MFU then counts each step's FLOPs at its own lengths.

A setting `gemmaB` (e.g. `gemma64`) is the LLM family: a small random Gemma 3
(bidirectional attention, as EmbeddingGemma; grouped-query attention; three
sliding-window layers of span 32, then a global one), built with transformers'
own code and `save_pretrained` into a temporary folder at the start, with a
Unigram `tokenizer.json` trained there on the stdlib texts (`<bos> text <eos>`).
Both sides start from that folder: embedder reads it (`formats.hf_llm`), the
peer is sentence-transformers' Transformer + mean Pooling + Normalize on it.
Queries are padded to 32 tokens and documents to 128 (the `real64` limits), so
both do the same work; MFU counts FLOPs with `summaries.train_flops_per_step`
on the folder's config. Before timing, one batch's initial embeddings of the
two sides must agree within 1e-4 (fp32), or the run stops.

Settings `tailD` (`tail256`, `tail512`; `tail256x32` sets the batch, 32 by
default) train on the same long-tailed pairs with queries up to 64 tokens and
documents up to D: the peer pads each batch to its longest text (its collator's
default), embedder runs with its defaults (`PACKING = True` in the run files:
each side's texts packed into rows of 64 / D tokens by `data.packing.Packer`,
the row count from its ladder). Each packed shape that occurs is compiled in the
warm-up (a training run compiles each once; the table times steps, not XLA),
and the table gives both sides' token utilisation (real tokens / computed
tokens, queries / documents).

    .venv/bin/python scripts/bench_train.py [--settings 64x128,32x64,real64,gemma64,tail256,tail512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _texts(batch: int, steps: int) -> tuple[list[str], list[str]]:
    from embedder.data import stdlib_pairs

    pairs = stdlib_pairs.build_pairs("train")
    n = batch * steps
    pairs = (pairs * (n // len(pairs) + 1))[:n]
    return [p.query for p in pairs], [p.positive for p in pairs]


REAL_QUERY_LEN, REAL_DOC_LEN = 32, 128
REAL_BUCKETS = (16, 32, 64, 128)


def _flops_per_step(config, batch: int, query_len: int, doc_len: int) -> float:
    from embedder import summaries

    return summaries.train_flops_per_step(config, batch, query_len, doc_len, 0, False)


# The long-tailed settings: queries up to this many tokens, documents up to the setting's limit.
TAIL_QUERY_LEN, TAIL_BATCH = 64, 32


def _step_flops(config, step: dict) -> float:
    """FLOPs of one recorded step from the tokens it computed (rows x row length, each side)."""
    from embedder import summaries

    return summaries.train_flops(
        config, step["query_tokens"], step["query_len"], step["doc_tokens"], step["doc_len"], False
    )


def _utilisation(real: int, computed: int) -> float:
    return real / computed if computed else 0.0


def _lengths(length: int) -> tuple[int, int]:
    """(query, document) length limits: `length` for both, or the real setting's (0 or -1)."""
    return (REAL_QUERY_LEN, REAL_DOC_LEN) if length <= 0 else (length, length)


# The LLM-family setting (`length` -1): every text padded to the real limits.
GEMMA_LENGTH = -1
GEMMA_VOCAB, GEMMA_WINDOW = 4000, 32
TOLERANCE = 1e-4


def build_gemma_folder(folder: str) -> str:
    """A small random Gemma 3 folder (config, safetensors, tokenizer), deterministic.

    Bidirectional as EmbeddingGemma; width 256, 4 layers (3 sliding-window of span
    GEMMA_WINDOW, then 1 global), 4 query heads sharing 2 key/value heads of 64,
    GeGLU 1024; a Unigram tokenizer.json trained on the stdlib pairs' texts that
    writes `<bos> text <eos>` (pad 0, eos 1, bos 2, unk 3).

    Returns:
      The folder.
    """
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    queries, docs = _texts(1000, 1)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=GEMMA_VOCAB,
        special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(queries + docs, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 1)]
    )
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "pad_token": "<pad>",
                "bos_token": "<bos>",
                "eos_token": "<eos>",
                "unk_token": "<unk>",
                "model_max_length": 2048,
            },
            f,
        )
    config = transformers.Gemma3TextConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        sliding_window=GEMMA_WINDOW,
        layer_types=["sliding_attention"] * 3 + ["full_attention"],
        query_pre_attn_scalar=64,
        use_bidirectional_attention=True,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    transformers.Gemma3TextModel(config).save_pretrained(folder)
    return folder


def _gemma_config(folder: str, dtype: str = "float32"):
    from embedder.formats import hf_llm

    return hf_llm.config_from_hf(folder, dtype=dtype)


def gemma_trainer(folder: str, steps: int, dtype: str):
    """(Trainer, initial state, mesh, tokenizer) of the LLM setting's embedder side."""
    from embedder import losses, partitioning, trainer
    from embedder.data import tokenizers
    from embedder.models import dual_encoder, spec

    model = spec.ModelSpec(
        dual_encoder.DualEncoder(_gemma_config(folder, dtype), pooling="mean"),
        vocab_dir=folder,
        init_from=folder,
    )
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, num_devices=1))
    runner = trainer.Trainer(
        model,
        losses.ContrastiveLossConfig(temperature=0.05, mask_duplicates=False),
        trainer.OptimizerConfig(learning_rate=2e-5, warmup_steps=0, weight_decay=0.01, max_grad_norm=0.0),
        mesh,
        steps,
    )
    return runner, runner.init_state(0), mesh, tokenizers.load_tokenizer(folder)


def _padded(tok, texts: list[str], length: int):
    """[len(texts), length] int32 ids of `tok` (specials kept, cut to fit), padded with its pad id."""
    import numpy as np

    out = np.full((len(texts), length), tok.pad_id, np.int32)
    for row, text in enumerate(texts):
        ids = tok.encode(text, length)
        out[row, : len(ids)] = ids
    return out


def gemma_peer(folder: str, max_length: int):
    """The peer's model of the LLM setting: Transformer + mean Pooling + Normalize on the folder."""
    from sentence_transformers import SentenceTransformer, models

    body = models.Transformer(folder, max_seq_length=max_length)
    pooling = models.Pooling(body.get_embedding_dimension(), pooling_mode="mean")
    return SentenceTransformer(modules=[body, pooling, models.Normalize()], device="cpu")


def check_same_function(folder: str, batch: int) -> float:
    """Max |embedder - peer| over the first batch's initial query and document embeddings (fp32).

    Raises:
      RuntimeError: the two sides' token ids differ, or their embeddings differ by
        more than TOLERANCE: the benchmark would compare two different functions.
    """
    import jax
    import numpy as np
    import torch

    from embedder.data import tokenizers
    from embedder.models import dual_encoder, spec

    module = dual_encoder.DualEncoder(_gemma_config(folder), pooling="mean")
    params = spec.ModelSpec(module, vocab_dir=folder, init_from=folder).init_params(jax.random.key(0))
    tok = tokenizers.load_tokenizer(folder)
    peer = gemma_peer(folder, REAL_DOC_LEN).eval()
    queries, docs = _texts(batch, 1)
    worst = 0.0
    for tower, texts, length in (("query", queries, REAL_QUERY_LEN), ("document", docs, REAL_DOC_LEN)):
        ids = _padded(tok, texts, length)
        feats = peer.tokenizer(
            texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        if not np.array_equal(ids, feats["input_ids"].numpy()):
            raise RuntimeError(f"gemma {tower} ids differ between embedder and the peer's tokenizer")
        mask = feats["attention_mask"].numpy().astype(bool)
        ours = np.asarray(module.apply({"params": params}, ids, tower, mask=mask, method=module.encode))
        with torch.no_grad():
            theirs = peer(dict(feats))["sentence_embedding"].numpy()
        diff = float(np.abs(ours - theirs).max())
        if not diff <= TOLERANCE:
            raise RuntimeError(
                f"gemma {tower} initial embeddings differ by {diff:.2e} > {TOLERANCE}: the two sides do not "
                "compute the same function"
            )
        worst = max(worst, diff)
    return worst


def embedder_trainer(steps: int, dtype: str, grad_cache_chunk: int = 0):
    """(Trainer, initial state, mesh, tokenizer) of the benchmark's embedder side
    (also bench_batch's and profile_step's)."""
    from embedder import losses, partitioning, trainer
    from embedder.data import wordpiece
    from embedder.formats import huggingface
    from embedder.models import dual_encoder, pretrained, spec

    path = pretrained.minilm_l6_v2_path()
    config = huggingface.config_from_hf(path, dtype=dtype)
    model = spec.ModelSpec(dual_encoder.DualEncoder(config), vocab_dir=path, init_from=path)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=1, num_devices=1))
    runner = trainer.Trainer(
        model,
        losses.ContrastiveLossConfig(temperature=0.05, mask_duplicates=False),
        trainer.OptimizerConfig(learning_rate=2e-5, warmup_steps=0, weight_decay=0.01, max_grad_norm=0.0),
        mesh,
        steps,
        grad_cache_chunk=grad_cache_chunk,
    )
    return runner, runner.init_state(0), mesh, wordpiece.WordPieceTokenizer.from_pretrained_dir(path)


def run_embedder_packed(batch: int, doc_limit: int, steps: int, dtype: str) -> dict:
    """embedder with its defaults on the long-tailed setting: each side's texts packed into rows.

    Every batch is packed first (the host work is inside each timed step again);
    each distinct packed shape is compiled in the warm-up, then the steps are timed.
    """
    import jax
    import numpy as np

    from embedder import partitioning
    from embedder.data import packing

    runner, state, mesh, tok = embedder_trainer(steps, dtype)
    packer = packing.Packer(tok.pad_id, num_groups=partitioning.data_parallel_size(mesh))
    queries, docs = _texts(batch, steps)

    def make(i: int) -> dict:
        sl = slice(i * batch, (i + 1) * batch)
        q = tok.encode_batch(queries[sl], max_length=TAIL_QUERY_LEN, pad_to=TAIL_QUERY_LEN)
        d = tok.encode_batch(docs[sl], max_length=doc_limit, pad_to=doc_limit)
        return packer({"query_tokens": q, "positive_tokens": d, "weights": np.ones(batch, np.float32)})

    compiled = set()
    for i in range(steps):  # one warm-up step per packed shape, outside the timing
        arrays = make(i)
        shape = (arrays["query_tokens"].shape, arrays["positive_tokens"].shape)
        if shape not in compiled:
            compiled.add(shape)
            state, metrics = runner.train_step(state, partitioning.global_batch(mesh, arrays))
            jax.block_until_ready(metrics["loss"])
    times, shapes, records = [], [], []
    for i in range(steps):
        start = time.perf_counter()
        arrays = make(i)
        state, metrics = runner.train_step(state, partitioning.global_batch(mesh, arrays))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
        q, d = arrays["query_tokens"], arrays["positive_tokens"]
        shapes.append((q.shape[-2], d.shape[-2]))  # rows (per group) of each side
        util = packing.token_utilisation(arrays, tok.pad_id)
        records.append(
            {
                "query_tokens": q.size,
                "query_len": q.shape[-1],
                "doc_tokens": d.size,
                "doc_len": d.shape[-1],
                "query_real": round(util["token_utilisation/query"] * q.size),
                "doc_real": round(util["token_utilisation/document"] * d.size),
            }
        )
    return {
        "times": times,
        "shapes": shapes,
        "steps": records,
        "compiles": len(compiled),
        "loss": float(metrics["loss"]),
    }


def run_embedder(batch: int, length: int, steps: int, dtype: str, folder: str | None = None) -> dict:
    import jax
    import numpy as np

    from embedder import partitioning
    from embedder.data import bucketing

    if length == GEMMA_LENGTH:
        runner, state, mesh, tok = gemma_trainer(folder, steps, dtype)
    else:
        runner, state, mesh, tok = embedder_trainer(steps, dtype)
    query_len, doc_len = _lengths(length)
    cut = bucketing.LengthBuckets(REAL_BUCKETS if length == 0 else (), query_len, doc_len, tok.pad_id)
    queries, docs = _texts(batch, steps)
    times, shapes = [], []
    for i in range(steps):
        sl = slice(i * batch, (i + 1) * batch)
        start = time.perf_counter()
        if length == GEMMA_LENGTH:
            q, d = _padded(tok, queries[sl], query_len), _padded(tok, docs[sl], doc_len)
        else:
            q = tok.encode_batch(queries[sl], max_length=query_len, pad_to=query_len)
            d = tok.encode_batch(docs[sl], max_length=doc_len, pad_to=doc_len)
        batch_arrays = cut({"query_tokens": q, "positive_tokens": d, "weights": np.ones(batch, np.float32)})
        state, metrics = runner.train_step(state, partitioning.global_batch(mesh, batch_arrays))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - start)
        shapes.append((batch_arrays["query_tokens"].shape[1], batch_arrays["positive_tokens"].shape[1]))
    return {"times": times, "shapes": shapes, "loss": float(metrics["loss"])}


def run_peer(
    batch: int, length: int, steps: int, dtype: str, folder: str | None = None, doc_limit: int = 0
) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer, losses

    from embedder.models import pretrained

    torch.manual_seed(0)
    query_len, doc_len = (TAIL_QUERY_LEN, doc_limit) if doc_limit else _lengths(length)
    if length == GEMMA_LENGTH:
        model = gemma_peer(folder, doc_len)
    else:
        model = SentenceTransformer(pretrained.minilm_l6_v2_path(), device="cpu")
    # Full-length settings pad every text to the length; the real one pads each
    # batch to its longest text, as the peer's data collator does.
    padding = "longest" if length == 0 or doc_limit else "max_length"
    model.train()
    loss_fn = losses.MultipleNegativesRankingLoss(model, scale=20.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    queries, docs = _texts(batch, steps)
    tokenizer = model.tokenizer
    times, shapes, records = [], [], []
    for i in range(steps):
        sl = slice(i * batch, (i + 1) * batch)
        start = time.perf_counter()
        feats = [
            dict(tokenizer(t, padding=padding, truncation=True, max_length=n, return_tensors="pt"))
            for t, n in ((queries[sl], query_len), (docs[sl], doc_len))
        ]
        shapes.append(tuple(f["input_ids"].shape[1] for f in feats))
        (q_ids, q_mask), (d_ids, d_mask) = ((f["input_ids"], f["attention_mask"]) for f in feats)
        records.append(
            {
                "query_tokens": q_ids.numel(),
                "query_len": q_ids.shape[1],
                "doc_tokens": d_ids.numel(),
                "doc_len": d_ids.shape[1],
                "query_real": int(q_mask.sum()),
                "doc_real": int(d_mask.sum()),
            }
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = loss_fn(feats, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return {"times": times, "shapes": shapes, "steps": records, "loss": float(loss)}


def measure_peak() -> dict:
    """fp32 and bf16 matmul FLOP/s of this machine (best of numpy, torch, XLA)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    n = 2048
    out = {}
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)

    def best(fn, reps=5):
        fn()
        t = min(_timed(fn) for _ in range(reps))
        return 2 * n**3 / t

    out["numpy_fp32"] = best(lambda: a @ a)
    ta = torch.from_numpy(a)
    out["torch_fp32"] = best(lambda: ta @ ta)
    tb = ta.bfloat16()
    out["torch_bf16"] = best(lambda: tb @ tb)
    ja = jnp.asarray(a)
    f32 = jax.jit(lambda x: x @ x)
    out["xla_fp32"] = best(lambda: f32(ja).block_until_ready())
    jb = ja.astype(jnp.bfloat16)
    bf = jax.jit(lambda x: jnp.matmul(x, x, preferred_element_type=jnp.float32))
    out["xla_bf16"] = best(lambda: bf(jb).block_until_ready())
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _child(args) -> None:
    if args.child == "check":
        print("RESULT " + json.dumps({"max_diff": check_same_function(args.folder, args.batch)}))
        return
    if args.doc_limit and args.child == "embedder":
        result = run_embedder_packed(args.batch, args.doc_limit, args.steps, args.dtype)
    elif args.doc_limit:
        result = run_peer(args.batch, 0, args.steps, args.dtype, doc_limit=args.doc_limit)
    else:
        fn = {"embedder": run_embedder, "peer": run_peer}[args.child]
        result = fn(args.batch, args.length, args.steps, args.dtype, args.folder)
    result["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps(result))


def _spawn(
    side: str,
    batch: int,
    length: int,
    steps: int,
    dtype: str,
    threads: int,
    folder: str | None = None,
    doc_limit: int = 0,
) -> dict:
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS=f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}",
    )
    cmd = [sys.executable, __file__, "--child", side, "--batch", str(batch), "--length", str(length)]
    cmd += ["--steps", str(steps), "--dtype", dtype] + (["--folder", folder] if folder else [])
    cmd += ["--doc_limit", str(doc_limit)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--settings",
        default="64x128,32x64,real64",
        help="BATCHxLENGTH (every text padded to LENGTH), realBATCH, gemmaBATCH or tailDOCS[xBATCH], "
        "comma-separated",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--no_bf16", action="store_true")
    parser.add_argument("--child", choices=("embedder", "peer", "check"))
    parser.add_argument("--folder", help="the LLM setting's Gemma 3 folder (children only)")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--length", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--doc_limit", type=int, default=0, help="a tail setting's document limit (children)")
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    import platform

    peak = measure_peak()
    peak_fp32 = max(v for k, v in peak.items() if k.endswith("fp32"))
    peak_bf16 = max(v for k, v in peak.items() if k.endswith("bf16"))
    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, {args.threads} threads each side")
    print("matmul peak (2048^3): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peak.items()))
    dtypes = ["float32"] if args.no_bf16 else ["float32", "bfloat16"]
    shapes_seen = {}
    settings = args.settings.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        if any(setting.startswith("gemma") for setting in settings):
            folder = build_gemma_folder(os.path.join(tmp, "gemma3"))
            gemma = _gemma_config(folder)
            print(
                f"gemma: {gemma.num_layers} layers, width {gemma.hidden_size}, {gemma.num_heads} heads / "
                f"{gemma.kv_heads} kv heads of {gemma.head_size}, mlp {gemma.mlp_dim}, vocab {gemma.vocab_size}"
            )
        print(
            f"{'setting':>9} {'dtype':>9} {'side':>9} {'pairs/s':>8} {'step s':>7} {'MFU':>6} {'peak RSS':>9}"
            f" {'tokens used q/d':>15}"
        )
        for setting in settings:
            _run_setting(setting, dtypes, args, folder, peak_fp32, peak_bf16, shapes_seen)
    for (setting, dtype, side), shapes in shapes_seen.items():
        if setting.startswith("real"):
            print(f"{setting} {dtype} {side}: (query, document) lengths padded to: {shapes}")
        elif setting.startswith("tail"):
            what = "packed rows (query, document)" if side == "embedder" else "(query, document) lengths"
            print(f"{setting} {dtype} {side}: {what}: {shapes}")


def _run_setting(setting, dtypes, args, folder, peak_fp32, peak_bf16, shapes_seen) -> None:
    """Both sides of one setting in each dtype: a table row each, then the ratio."""
    from embedder.models import transformer

    config = transformer.TransformerConfig()
    doc_limit = 0
    if setting.startswith("real"):
        batch, length = int(setting[len("real") :]), 0
    elif setting.startswith("gemma"):
        batch, length = int(setting[len("gemma") :]), GEMMA_LENGTH
        config = _gemma_config(folder)
        diff = _spawn("check", batch, length, 1, "float32", args.threads, folder)["max_diff"]
        print(f"{setting}: initial embeddings of one batch agree, max |embedder - peer| = {diff:.1e}")
    elif setting.startswith("tail"):
        limit, _, size = setting[len("tail") :].partition("x")
        doc_limit, batch, length = int(limit), int(size or TAIL_BATCH), 0
    else:
        batch, length = (int(x) for x in setting.split("x"))
    tail = setting.startswith("tail")
    for dtype in dtypes:
        peak_flops = peak_fp32 if dtype == "float32" else peak_bf16
        rates = {}
        for side in ("embedder", "peer"):
            # A tail setting's packed side also compiles each of its shapes before its steps.
            steps = args.warmup + args.repeats
            r = _spawn(side, batch, length, steps, dtype, args.threads, folder, doc_limit if tail else 0)
            timed = range(args.warmup, len(r["times"]))
            step = statistics.median(r["times"][i] for i in timed)
            # MFU over the timed steps, each at the lengths (and rows) it computed.
            if tail:
                flops = sum(_step_flops(config, r["steps"][i]) for i in timed)
            else:
                flops = sum(_flops_per_step(config, batch, *r["shapes"][i]) for i in timed)
            mfu = flops / sum(r["times"][i] for i in timed) / peak_flops
            rates[side] = batch / step
            shapes_seen[(setting, dtype, side)] = sorted(set(map(tuple, r["shapes"])))
            used = ""
            if tail:
                records = [r["steps"][i] for i in timed]
                q = _utilisation(
                    sum(s["query_real"] for s in records), sum(s["query_tokens"] for s in records)
                )
                d = _utilisation(sum(s["doc_real"] for s in records), sum(s["doc_tokens"] for s in records))
                used = f" {q:>7.0%}/{d:<4.0%}" + (f" ({r['compiles']} shapes)" if "compiles" in r else "")
            print(
                f"{setting:>9} {dtype:>9} {side:>9} {batch / step:>8.1f} {step:>7.2f} "
                f"{mfu:>6.1%} {r['max_rss'] / 2**30:>7.2f}GiB{used}",
                flush=True,
            )
        print(f"{setting:>9} {dtype:>9} {'ratio':>9} {rates['embedder'] / rates['peer']:>7.2f}x")


if __name__ == "__main__":
    main()
