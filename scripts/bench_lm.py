"""Causal-LM throughput: embedder's JAX decoder vs transformers, same weights, same run.

A small random Qwen3 (or Gemma 3) is built with transformers' own code, saved,
and loaded by `embedder.lm.model.load`. Both sides then run the same work:

    generate  greedy decoding of --new_tokens tokens after --batch prompts of
              --prompt_len tokens (left-padded batch; every row runs to the end:
              no EOS); new tokens per second
    score     per-token log-probabilities of --batch texts of --score_len
              tokens (one forward, log-softmax, gather); tokens per second

embedder's times leave out the first (compiling) call; torch's leave out one
warm-up call too. Each number is the best of --repeats. Ratios are embedder /
transformers. On a shared CPU the absolute numbers are noisy; the ratio of
the same run is what holds. With a GPU, jax runs on it and torch does too when
--torch_device=cuda.

    .venv/bin/python scripts/bench_lm.py [--family qwen3] [--width 256] [--layers 4] [--batch 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def _config(family: str, args, transformers):
    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.width,
        intermediate_size=args.width * 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.width // 64,
        num_key_value_heads=max(1, args.width // 128),
        head_dim=64,
        max_position_embeddings=4096,
        eos_token_id=None,
        pad_token_id=0,
    )
    if family == "gemma3":
        return transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
            **common, sliding_window=512, query_pre_attn_scalar=64
        )
    return transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**common, tie_word_embeddings=True)


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="qwen3", choices=("qwen3", "gemma3"))
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--score_len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--torch_device", default="cpu")
    args = parser.parse_args()

    import jax
    import torch
    import transformers

    from embedder.lm import decode, score
    from embedder.lm import model as lm_model

    cls, config = _config(args.family, args, transformers)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        peer = cls(config).eval()
        peer.save_pretrained(folder)
        lm = lm_model.load(folder)
    peer = peer.to(args.torch_device)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, args.vocab, size=args.prompt_len)) for _ in range(args.batch)]
    texts = [list(rng.integers(1, args.vocab, size=args.score_len)) for _ in range(args.batch)]
    rows = []

    # generate
    sampling = decode.SamplingConfig(max_new_tokens=args.new_tokens)
    batch = decode.BatchConfig(args.batch, max_prompt_len=args.prompt_len, min_bucket=args.prompt_len)
    ours = decode.generate(lm, prompts, sampling, batch)  # compiles
    ids = torch.tensor(prompts, device=args.torch_device)
    kwargs = dict(
        do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0
    )
    with torch.no_grad():
        theirs = peer.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    same = [o == t for o, t in zip(ours, theirs[:, args.prompt_len :].tolist(), strict=True)]
    t_ours = _best(lambda: decode.generate(lm, prompts, sampling, batch), args.repeats)
    with torch.no_grad():
        t_peer = _best(
            lambda: peer.generate(ids, attention_mask=torch.ones_like(ids), **kwargs), args.repeats
        )
    new = args.batch * args.new_tokens
    rows.append(
        ("generate (new tokens/s)", new / t_ours, new / t_peer, f"{sum(same)}/{len(same)} rows equal")
    )

    # score
    cont = [t[1:] for t in texts]
    first = [t[:1] for t in texts]
    sbatch = decode.BatchConfig(args.batch, max_prompt_len=args.score_len, min_bucket=args.score_len)
    score.continuation_logprobs(lm, first, cont, sbatch)  # compiles
    t_ours = _best(lambda: score.continuation_logprobs(lm, first, cont, sbatch), args.repeats)
    tokens = torch.tensor(texts, device=args.torch_device)

    def peer_score():
        with torch.no_grad():
            logp = torch.log_softmax(peer(input_ids=tokens).logits[:, :-1].float(), -1)
            return logp.gather(-1, tokens[:, 1:, None])[..., 0].cpu().numpy()

    peer_score()
    t_peer = _best(peer_score, args.repeats)
    scored = args.batch * (args.score_len - 1)
    rows.append(("score (tokens/s)", scored / t_ours, scored / t_peer, ""))

    print(
        f"{args.family}: width {args.width}, {args.layers} layers, vocab {args.vocab}, batch {args.batch}; "
        f"jax {jax.default_backend()} ({os.cpu_count()} CPUs), torch {args.torch_device} "
        f"({torch.get_num_threads()} threads)"
    )
    print("| work | embedder | transformers | ratio | |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, a, b, note in rows:
        print(f"| {name} | {a:,.0f} | {b:,.0f} | {a / b:.2f} | {note} |")


if __name__ == "__main__":
    main()
