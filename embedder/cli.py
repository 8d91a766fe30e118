"""The `embedder` command (also `python -m embedder`): one subcommand per job."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

SUBCOMMANDS = {
    "train": "train a model from gin files",
    "eval": "evaluate a checkpoint or exported model",
    "soup": "average fine-tuned checkpoints",
    "export": "export a checkpoint (sentence-transformers, bundle, saved_model)",
    "encode": "embed the lines of a text file",
    "mine": "mine hard negatives with a model",
}
MINILM_NAME = "all-MiniLM-L6-v2"


class UserError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def _add_gin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
    parser.add_argument(
        "--gin_search_paths", default="", help="comma-separated folders to look for gin files in"
    )
    parser.add_argument(
        "--gin.NAME=VALUE",
        dest="_gin_doc",
        metavar="",
        help="a gin binding or macro override, e.g. --gin.TRAIN_STEPS=100 (repeatable)",
    )


def _split_gin_bindings(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates T5X-style `--gin.NAME=VALUE` flags from the rest."""
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin.") :].split("=", 1)
            bindings.append(f"{name} = {value}")
        else:
            rest.append(arg)
    return rest, bindings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedder", description=__doc__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == "train":
            _add_gin_flags(p)
            p.add_argument("--model_dir", required=True, help="checkpoints, metrics and config go here")
            p.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (multi-host)")
            p.add_argument("--num_processes", type=int, default=None)
            p.add_argument("--process_id", type=int, default=None)
        if name == "encode":
            p.add_argument(
                "--model",
                help=f"a sentence-transformers / Hugging Face BERT folder, or {MINILM_NAME!r} "
                "for the packaged all-MiniLM-L6-v2 (or give --gin_file with a model file)",
            )
            _add_gin_flags(p)
            p.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
            p.add_argument("--output", required=True, help="where to write the [n, dim] float32 .npy")
            p.add_argument("--kind", default="query", choices=("query", "document"))
            p.add_argument("--batch_size", type=int, default=32)
            p.add_argument("--max_length", type=int, default=None, help="truncate texts to this many tokens")
    return parser


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read input: {e.strerror}") from e
    texts = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        try:
            texts.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    return texts


def save_npy_atomically(path: str, array: np.ndarray) -> None:
    """Writes to a temporary name in the same folder, then renames: never a partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _load_embedder(args, bindings):
    from embedder import gin_utils, inference
    from embedder.data import wordpiece
    from embedder.models import pretrained

    if bool(args.model) == bool(args.gin_file):
        raise UserError("give either --model or --gin_file (a gin/models/*.gin file)")
    if args.model:
        model_dir = pretrained.minilm_l6_v2_path() if args.model == MINILM_NAME else args.model
        return inference.Embedder.from_sentence_transformers(model_dir)
    search = [p for p in args.gin_search_paths.split(",") if p]
    gin_utils.parse(args.gin_file, bindings, search)
    spec = gin_utils.macro("MODEL")
    if spec.vocab_dir is None:
        raise UserError("the gin files set no ModelSpec.vocab_dir: no tokenizer to encode with")
    import jax

    params = spec.init_params(jax.random.key(0))
    tokenizer = wordpiece.WordPieceTokenizer.from_pretrained_dir(spec.vocab_dir)
    return inference.Embedder(spec.module, params, tokenizer, max_length=spec.module.config.max_len)


def run_train(args, bindings) -> int:
    from embedder import partitioning

    # Before anything touches the devices: multi-host start-up.
    partitioning.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    from embedder import gin_utils, train_loop

    if not args.gin_file:
        raise UserError("give at least one --gin_file (e.g. gin/runs/quickstart.gin)")
    search = [p for p in args.gin_search_paths.split(",") if p]
    gin_utils.parse(args.gin_file, bindings, search)
    result = gin_utils.configured(train_loop.train)(model_dir=args.model_dir)
    if result.preempted:
        print(f"stopped by SIGTERM at step {result.step}; checkpoint: {result.checkpoint_dir}")
    else:
        print(f"trained to step {result.step}; checkpoint: {result.checkpoint_dir}")
    return 0


def run_encode(args, bindings) -> int:
    texts = _read_lines(args.input)
    if not texts:
        raise UserError(f"{args.input}: no lines to encode")
    start = time.time()
    embedder = _load_embedder(args, bindings)
    if args.max_length:
        embedder.max_length = args.max_length
    embeddings = embedder.encode(texts, kind=args.kind, batch_size=args.batch_size)
    save_npy_atomically(args.output, embeddings)
    print(
        f"encoded {len(texts)} texts -> {args.output} "
        f"[{embeddings.shape[0]}, {embeddings.shape[1]}] float32 in {time.time() - start:.1f}s"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, bindings = _split_gin_bindings(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    runners = {"encode": run_encode, "train": run_train}
    if args.command not in runners:
        print(f"embedder {args.command}: not built yet", file=sys.stderr)
        return 2
    try:
        return runners[args.command](args, bindings)
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        # gin appends "In call to configurable ..." lines: noise for a user.
        message = "\n".join(line for line in str(e).splitlines() if "In call to configurable" not in line)
        print(f"embedder {args.command}: error: {message}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[Exception], ...]:
    """Errors that a sentence explains (bad input, config or model dir): no traceback."""
    from embedder.checkpointing import CheckpointError
    from embedder.train_loop import NonFiniteLossError

    return (UserError, ValueError, FileNotFoundError, CheckpointError, NonFiniteLossError)
