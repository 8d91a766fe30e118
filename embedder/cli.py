"""The `embedder` command (also `python -m embedder`): one subcommand per job.

A user's mistake (an `errors.EmbedderError`, or an `OSError`: a missing file,
a full or read-only disk) is one line, `embedder COMMAND: error: ...`, and exit
status 2; anything else is a bug and shows its traceback.

Each subcommand imports what it uses when it runs: this module loads only the
standard library, so `embedder check --slice_info` and a mistyped flag answer
at once, and `embedder encode` never loads TensorFlow.

One flag name means one thing in every subcommand (README, "Command line");
the older names still parse, with a deprecation warning on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Sequence

from embedder import console, errors, fileio

SUBCOMMANDS = {
    "train": "train a model from gin files",
    "eval": "evaluate a checkpoint or exported model",
    "soup": "average fine-tuned checkpoints",
    "export": "export a checkpoint (sentence-transformers, bundle, saved_model)",
    "encode": "embed the lines of a text file",
    "mine": "mine hard negatives with a model",
    "distill": "LLM-distilled data: generate queries, rerank neighbours, filter pairs (Gecko FRet, Gemini)",
    "check": "pre-flight check: a run's mesh, batch and memory against a TPU slice",
}
MINILM_NAME = "all-MiniLM-L6-v2"
MODEL_HELP = (
    "a checkpoint (model dir: its latest step, or a step folder), a bundle (embedder export "
    "--format=bundle), a sentence-transformers / Hugging Face BERT folder, or "
    f"{MINILM_NAME!r} for the packaged all-MiniLM-L6-v2"
)

# Old flag names, per subcommand: {old: new}. They parse as aliases of the new name
# and print a deprecation warning.
RENAMED_FLAGS: dict[str, dict[str, str]] = {
    "encode": {"--dim": "--dims", "--task": "--prompt_task"},
    "eval": {"--checkpoint": "--model", "--task": "--tasks", "--output_dir": "--output"},
    "export": {"--checkpoint": "--model", "--matryoshka_dims": "--dims"},
    "check": {"--model": "--gin_file"},
}


def _renamed(command: str, new: str) -> list[str]:
    """The old names of flag `new` in `command` (argparse aliases)."""
    return [old for old, name in RENAMED_FLAGS.get(command, {}).items() if name == new]


def _add_gin_flags(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument(
        "--gin_file",
        *_renamed(command, "--gin_file"),
        action="append",
        default=[],
        help="gin file (repeatable)",
    )
    parser.add_argument(
        "--gin_search_paths", default="", help="comma-separated folders to look for gin files in"
    )
    parser.add_argument(
        "--gin.NAME=VALUE",
        dest="_gin_doc",
        metavar="",
        help="a gin binding or macro override, e.g. --gin.TRAIN_STEPS=100 (repeatable); also "
        "--gin_bindings='NAME = VALUE' (T5X's flag, repeatable)",
    )


def _split_gin_bindings(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates T5X's gin flags from the rest.

    `--gin.NAME=VALUE` and `--gin_bindings=BINDING` (or `--gin_bindings BINDING`,
    repeatable) are bindings; `--gin.MODEL_DIR=PATH`, T5X's way to name the
    model dir, becomes `--model_dir=PATH`.
    """
    import ast

    rest, bindings = [], []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--gin.MODEL_DIR="):
            value = arg.split("=", 1)[1]
            with contextlib.suppress(ValueError, SyntaxError):
                value = str(ast.literal_eval(value))  # T5X quotes it: --gin.MODEL_DIR="'/path'"
            rest.append(f"--model_dir={value}")
        elif arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin.") :].split("=", 1)
            bindings.append(f"{name} = {value}")
        elif arg.startswith("--gin_bindings="):
            bindings.append(arg.split("=", 1)[1])
        elif arg == "--gin_bindings":
            bindings.append(next(args, ""))
        else:
            rest.append(arg)
    return rest, bindings


def _split_verbosity(argv: Sequence[str]) -> tuple[list[str], int]:
    """Takes `--verbosity=N` / `--verbosity N` (any subcommand) out of `argv`; 0 if absent."""
    rest, verbosity = [], 0
    args = iter(argv)
    for arg in args:
        if arg == "--verbosity" or arg.startswith("--verbosity="):
            value = arg.split("=", 1)[1] if "=" in arg else next(args, "")
            try:
                verbosity = int(value)
            except ValueError:
                raise SystemExit(f"embedder: error: --verbosity takes an integer, got {value!r}") from None
        else:
            rest.append(arg)
    return rest, verbosity


def _search_paths(args) -> list[str]:
    return [p for p in args.gin_search_paths.split(",") if p]


# ---------------------------------------------------------------- flags


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    _add_gin_flags(p, "train")
    p.add_argument("--model_dir", required=True, help="checkpoints, metrics and config go here")
    p.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (multi-host)")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    p.add_argument(
        "--allow_changed_run",
        action="store_true",
        help="resume a model dir whose checkpoint was trained with other data, batch, seed or schedule "
        "(recorded in the checkpoint's metadata)",
    )


def _add_encode_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"{MODEL_HELP} (or give --gin_file with a model file)")
    _add_gin_flags(p, "encode")
    p.add_argument("--input", required=True, help="UTF-8 text file, one text per line")
    p.add_argument("--output", required=True, help="where to write the [n, dim] float32 .npy")
    p.add_argument("--kind", default="query", choices=("query", "document"))
    p.add_argument(
        "--prompt_task",
        *_renamed("encode", "--prompt_task"),
        default=None,
        help="the queries' task in the prompt (models trained with prompts)",
    )
    p.add_argument(
        "--dims",
        *_renamed("encode", "--dims"),
        type=int,
        default=None,
        help="one Matryoshka size: the embeddings' first DIMS components, re-normalised",
    )
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=None, help="truncate texts to this many tokens")


def _add_mine_flags(p: argparse.ArgumentParser) -> None:
    from embedder import mining

    defaults = mining.MiningConfig()
    p.add_argument(
        "--model", help=f"the model that ranks: {MODEL_HELP} (or give --gin_file with a model file)"
    )
    _add_gin_flags(p, "mine")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--input", required=True, help="JSONL examples ({query, positive, ...} a line)")
    p.add_argument("--output", required=True, help="where to write the JSONL with `negatives` filled")
    p.add_argument(
        "--corpus", default=None, help="UTF-8 text file, one document a line (default: the input's positives)"
    )
    p.add_argument("--num_negatives", type=int, default=defaults.num_negatives, help="negatives per example")
    p.add_argument(
        "--rank_start", type=int, default=defaults.rank_start, help="first rank of the window (0-based)"
    )
    p.add_argument(
        "--rank_end", type=int, default=defaults.rank_end, help="end of the rank window (exclusive)"
    )
    p.add_argument(
        "--margin",
        type=float,
        default=defaults.margin,
        help="skip candidates scoring above cosine(query, positive) minus this (likely false negatives)",
    )
    p.add_argument(
        "--duplicate_threshold",
        type=float,
        default=defaults.duplicate_threshold,
        help="skip candidates at least this similar to the positive (near-duplicates)",
    )
    p.add_argument("--sample", action="store_true", help="sample from the window instead of taking the top")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=None, help="truncate texts to this many tokens")


def _add_soup_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoints",
        nargs="+",
        required=True,
        help="model dirs (their latest step), checkpoints/ folders or step folders",
    )
    p.add_argument("--method", default="uniform", choices=("uniform", "greedy", "weighted"))
    p.add_argument("--weights", nargs="+", type=float, default=None, help="one per checkpoint (weighted)")
    p.add_argument(
        "--eval_task",
        default=None,
        help="held-out eval task for the metric, split named: 'stdlib_code_search_validation', "
        "a BEIR folder or qrels file, or a JSONL file of {query, positive} (as `embedder eval --task`)",
    )
    p.add_argument(
        "--metric", default="mrr@10", help="an eval metric: ndcg@K, recall@K, mrr@K, map@K (default mrr@10)"
    )
    p.add_argument(
        "--eval_limit", type=int, default=500, help="use at most this many held-out pairs (BEIR: queries)"
    )
    p.add_argument("--output", required=True, help="the soup's model dir (must not exist)")
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="spread each checkpoint over all devices as it loads (no device holds a whole model)",
    )


def _add_export_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        *_renamed("export", "--model"),
        required=True,
        help="the checkpoint: model dir (its latest step), checkpoints/ folder or step folder",
    )
    p.add_argument("--format", required=True, choices=("sentence-transformers", "bundle", "saved_model"))
    p.add_argument("--output", required=True, help="the folder to create (must not exist)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--max_length", type=int, default=None, help="truncate texts to this many tokens")
    p.add_argument(
        "--dims",
        *_renamed("export", "--dims"),
        nargs="*",
        type=int,
        default=[],
        help="Matryoshka sizes: recorded in a bundle, extra outputs embeddings_<d> of a SavedModel",
    )
    p.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        default=None,
        help="per-channel integer weights (e.g. after gin/runs/qat.gin with the same bits): a bundle "
        "stores the integers and scales, the other formats the dequantised weights",
    )
    p.add_argument(
        "--quantize_embeddings",
        action="store_true",
        help="with --quantize: the embedding tables too (as QAT_EMBEDDINGS = True)",
    )


def _add_eval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", *_renamed("eval", "--model"), help=MODEL_HELP)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument(
        "--tasks",
        *_renamed("eval", "--tasks"),
        nargs="+",
        action="extend",
        default=None,
        help="built-in task (stdlib_code_search, stdlib_code_search_validation), BEIR folder or "
        "qrels file, or JSONL of scored pairs {sentence1, sentence2, score}; several, or repeat "
        "the flag (default: stdlib_code_search)",
    )
    p.add_argument(
        "--dims",
        *_renamed("eval", "--dims"),
        nargs="+",
        type=int,
        default=None,
        help="Matryoshka sizes (default: full, 256, ..., 32)",
    )
    p.add_argument("--k", nargs="+", type=int, default=None, help="metric cut-offs (default: 1 3 5 10 100)")
    p.add_argument(
        "--embedding_precision",
        nargs="+",
        choices=("float32", "int8", "binary"),
        default=None,
        help="also search each retrieval task's corpus as an index of this precision (int8 calibrated "
        "on the corpus, binary sign bits), candidates rescored in float32; reports the index bytes",
    )
    p.add_argument(
        "--rescore_multiplier",
        type=int,
        default=4,
        help="with --embedding_precision: rescore this many candidates per result (default 4)",
    )
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_length", type=int, default=None, help="truncate texts to this many tokens")
    p.add_argument(
        "--output",
        *_renamed("eval", "--output"),
        default=None,
        help="the folder for results.json and the PNGs (default for a checkpoint: MODEL_DIR/eval/<step>)",
    )


def _add_check_flags(p: argparse.ArgumentParser) -> None:
    from embedder import preflight

    p.add_argument("--slice_info", metavar="ACCELERATOR", help="print one line of slice facts and exit")
    p.add_argument(
        "--check", action="store_true", help="validate the run's --gin_file ... against --accelerator"
    )
    p.add_argument("--accelerator", help="e.g. v4-32, v5e-16 (= v5litepod-16), v5p-128")
    _add_gin_flags(p, "check")
    p.add_argument("--no_memory", action="store_true", help="with --check: skip the HBM check")
    p.add_argument(
        "--batch_size", type=int, default=4096, help="without --check: the global batch the table splits"
    )
    p.add_argument(
        "--json", action="store_true", help="without --check: the table as JSON, one object a slice"
    )
    p.epilog = (
        "Without --check: the table of every gin/mesh file with the model of --gin_file "
        f"(default {preflight.DEFAULT_TABLE_MODEL})."
    )


DISTILL_ACTIONS = ("generate", "rerank", "filter")
LM_HELP = (
    "a Hugging Face causal-LM folder (Gemma 3, Qwen3: config.json, safetensors, tokenizer.json), or an "
    "LLM-family checkpoint (run causally, the head tied to its embedding)"
)


def _add_distill_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=DISTILL_ACTIONS, help="generate | rerank | filter")
    p.add_argument("--lm", required=True, help=LM_HELP)
    p.add_argument("--output", required=True, help="folder of *.jsonl shards and manifest.json (resumable)")
    p.add_argument("--passages", help="generate: JSONL passages {id, text, title?}")
    p.add_argument("--prompt_file", help="generate: the few-shot prompt ({title}, {text}); default: packaged")
    p.add_argument(
        "--max_new_tokens", type=int, default=None, help="generate: tokens for the task and the query"
    )
    p.add_argument("--seed", type=int, default=None, help="generate: the sampling seed")
    p.add_argument(
        "--model", help=f"rerank; filter (to mine hard negatives): the embedder that retrieves: {MODEL_HELP}"
    )
    p.add_argument(
        "--step", type=int, default=None, help="the embedder's checkpoint step (default: the latest)"
    )
    p.add_argument("--queries", help="rerank: a `distill generate` output folder")
    p.add_argument("--corpus", help="rerank: JSONL passages {id, text, title?} (those the queries came from)")
    p.add_argument("--top_n", type=int, default=None, help="rerank, filter --model: neighbours per query")
    p.add_argument("--input", help="filter: JSONL training pairs")
    p.add_argument("--keep_fraction", type=float, default=None, help="filter: keep this fraction, best first")
    p.add_argument(
        "--threshold", type=float, default=None, help="filter: keep log p(yes) - log p(no) >= this"
    )
    p.add_argument("--batch_size", type=int, default=8, help="LM rows per call (rounded to the data axes)")
    p.add_argument("--max_prompt_len", type=int, default=1024, help="the longest LM input, in tokens")
    p.add_argument("--shard_size", type=int, default=256, help="input rows per output shard")
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16"), help="the LM's weights and compute"
    )
    p.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0 (multi-host)")
    p.add_argument("--num_processes", type=int, default=None)
    p.add_argument("--process_id", type=int, default=None)
    _add_gin_flags(p, "distill")
    p.epilog = (
        "Settings beyond the flags come from gin: GenerateConfig.*, RerankConfig.* (e.g. "
        "--gin.RerankConfig.rrf_k=60, the negative window), FilterConfig.*."
    )


FLAGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "train": _add_train_flags,
    "eval": _add_eval_flags,
    "soup": _add_soup_flags,
    "export": _add_export_flags,
    "encode": _add_encode_flags,
    "mine": _add_mine_flags,
    "distill": _add_distill_flags,
    "check": _add_check_flags,
}


def build_parser(commands: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The `embedder` parser; only `commands` get their flags (all by default).

    Args:
      commands: the subcommands to give flags to. `main` builds only the one it
        runs, so a command never imports what another one's flags need.
    """
    parser = argparse.ArgumentParser(
        prog="embedder",
        description=__doc__.split("\n\n")[0],
        epilog="--verbosity=1 (any subcommand) shows other libraries' start-up lines (TensorFlow, XLA, "
        "jax), hidden by default",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if commands is None or name in commands:
            FLAGS[name](p)
    return parser


def warn_renamed_flags(command: str, argv: Sequence[str]) -> None:
    """Prints a deprecation warning on stderr for each old flag name in `argv`."""
    renamed = RENAMED_FLAGS.get(command, {})
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in renamed:
            print(
                f"embedder {command}: warning: {name} is deprecated; use {renamed[name]}",
                file=sys.stderr,
            )


# ---------------------------------------------------------------- helpers


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise errors.DataError(f"{path}: cannot read input: {e.strerror}") from e
    texts = []
    # Lines end at \n or \r\n only (as the JSONL reader's): a bare \r stays in the text.
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    lines = [line[:-1] if line.endswith(b"\r") else line for line in lines]
    for lineno, line in enumerate(lines, start=1):
        try:
            texts.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise errors.DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
    return texts


def _load_embedder(args, bindings):
    from embedder import gin_utils, inference
    from embedder.data import tokenizers
    from embedder.models import pretrained

    if bool(args.model) == bool(args.gin_file):
        raise errors.ConfigError("give either --model or --gin_file (a gin/models/*.gin file)")
    if args.model:
        if args.model == MINILM_NAME:
            return inference.Embedder.from_sentence_transformers(pretrained.minilm_l6_v2_path())
        return inference.Embedder.load(args.model, args.step)
    gin_utils.parse(args.gin_file, bindings, _search_paths(args))
    spec = gin_utils.macro("MODEL")
    if spec.vocab_dir is None:
        raise errors.ConfigError("the gin files set no ModelSpec.vocab_dir: no tokenizer to encode with")
    import jax

    params = spec.init_params(jax.random.key(0))
    tokenizer = tokenizers.load_tokenizer(spec.vocab_dir)
    return inference.Embedder(spec.module, params, tokenizer, max_length=spec.module.config.max_len)


# ---------------------------------------------------------------- subcommands


MULTI_HOST_FLAGS = ("coordinator_address", "num_processes", "process_id")
# The shell's status for a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


def check_multi_host_flags(args) -> None:
    """The multi-host flags are all given or none (left out on a TPU pod).

    Raises:
      ConfigError: naming the ones given and the ones missing.
    """
    given = [name for name in MULTI_HOST_FLAGS if getattr(args, name) is not None]
    if given and len(given) != len(MULTI_HOST_FLAGS):
        missing = [f"--{name}" for name in MULTI_HOST_FLAGS if name not in given]
        raise errors.ConfigError(
            f"--{given[0]} needs {' and '.join(missing)} too: give all of --coordinator_address, "
            "--num_processes, --process_id, or none (a TPU pod finds them itself)"
        )
    if given and not 0 <= args.process_id < args.num_processes:
        raise errors.ConfigError(
            f"--process_id={args.process_id} must be in [0, --num_processes={args.num_processes})"
        )


def run_train(args, bindings) -> int:
    check_multi_host_flags(args)
    if not args.gin_file:
        raise errors.ConfigError("give at least one --gin_file (e.g. gin/runs/quickstart.gin)")
    from embedder import gin_utils

    # The settings are checked before the devices or any file is touched.
    gin_utils.parse(args.gin_file, bindings, _search_paths(args))
    gin_utils.check_macros_read()
    gin_utils.check_run_macros()
    from embedder import partitioning

    # Before anything touches the devices: multi-host start-up.
    partitioning.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    from embedder import train_loop

    result = gin_utils.configured(train_loop.train)(
        model_dir=args.model_dir, allow_changed_run=args.allow_changed_run
    )
    if result.already_complete:
        print(
            f"the run in {args.model_dir} is complete (step {result.step}); checkpoint: {result.checkpoint_dir}"
        )
    elif result.preempted:
        print(
            f"stopped by {result.preempted} at step {result.step}; checkpoint: {result.checkpoint_dir}; "
            "resume with the same command"
        )
        if result.preempted == "SIGINT":
            return EXIT_INTERRUPTED
    else:
        print(f"trained to step {result.step}; checkpoint: {result.checkpoint_dir}")
    return 0


def run_encode(args, bindings) -> int:
    texts = _read_lines(args.input)
    if not texts:
        raise errors.DataError(f"{args.input}: no lines to encode")
    start = time.time()
    embedder = _load_embedder(args, bindings)
    if args.max_length:
        embedder.max_length = args.max_length
    embeddings = embedder.encode(
        texts, kind=args.kind, task=args.prompt_task, dim=args.dims, batch_size=args.batch_size
    )
    fileio.save_npy_atomically(args.output, embeddings)
    print(
        f"encoded {len(texts)} texts -> {args.output} "
        f"[{embeddings.shape[0]}, {embeddings.shape[1]}] float32 in {time.time() - start:.1f}s"
    )
    return 0


def run_soup(args, bindings) -> int:
    from embedder import soup

    if args.eval_limit < 1:
        raise errors.ConfigError(f"--eval_limit={args.eval_limit} must be >= 1")
    start = time.time()
    ingredients = soup.read_ingredients(args.checkpoints)
    metric = None
    if args.eval_task:
        metric = soup.held_out_metric(ingredients[0].meta, args.eval_task, args.metric, args.eval_limit)
    sharding = soup.fsdp_shardings(ingredients[0].meta) if args.fsdp else None
    record = soup.soup_checkpoints(
        ingredients, args.method, args.output, args.weights, metric, args.metric if metric else None, sharding
    )
    for item in record["ingredients"]:
        score = "" if item["metric"] is None else f" {args.metric}={item['metric']:.4f}"
        status = "in" if item["accepted"] else "left out"
        print(f"  {status:8s} {item['checkpoint']}{score}")
    score = "" if record["soup_metric"] is None else f" {args.metric}={record['soup_metric']:.4f}"
    print(
        f"{args.method} soup of {len(ingredients)} checkpoints{score} -> {record['output']} ({time.time() - start:.1f}s)"
    )
    return 0


def run_export(args, bindings) -> int:
    from embedder import export

    start = time.time()
    output = export.export(
        args.model,
        args.format,
        args.output,
        args.step,
        args.max_length,
        args.dims,
        quantize=args.quantize,
        quantize_embeddings=args.quantize_embeddings,
    )
    print(f"exported {args.format} -> {output} ({time.time() - start:.1f}s)")
    return 0


def _eval_model(args):
    """(Embedder, step folder or None for an exported model) of `embedder eval`'s flags."""
    from embedder import checkpointing, inference
    from embedder.models import pretrained

    if not args.model:
        raise errors.ConfigError(
            f"give --model (a run's model dir or checkpoint, or an exported model, or {MINILM_NAME!r})"
        )
    if args.model == MINILM_NAME:
        return inference.Embedder.from_sentence_transformers(pretrained.minilm_l6_v2_path()), None
    embedder = inference.Embedder.load(args.model, args.step)
    try:
        step_dir = checkpointing.resolve_step_dir(args.model, args.step)
    except errors.CheckpointError:
        step_dir = None  # an exported model
    return embedder, step_dir


def run_eval(args, bindings) -> int:
    from embedder import eval_report, evaluation, fileio
    from embedder.data import eval_tasks

    start = time.time()
    tasks = [eval_tasks.load_task(spec) for spec in args.tasks or ["stdlib_code_search"]]
    embedder, step_dir = _eval_model(args)
    if args.max_length:
        embedder.max_length = args.max_length
    full = embedder.module.embedding_dim
    dims = evaluation.check_dims(args.dims or evaluation.default_dims(full), full)
    k_values = tuple(sorted(set(args.k or evaluation.DEFAULT_K_VALUES)))
    if args.batch_size < 1 or min(k_values) < 1 or args.rescore_multiplier < 1:
        raise errors.ConfigError("--batch_size, --k and --rescore_multiplier must be positive")
    run_dir = None
    if step_dir is not None and os.path.basename(os.path.dirname(step_dir)) == "checkpoints":
        run_dir = os.path.dirname(os.path.dirname(step_dir))
    output_dir = args.output
    if output_dir is None:
        if run_dir is None:
            raise errors.ConfigError("give --output (the folder for results.json and the plots)")
        output_dir = os.path.join(run_dir, "eval", os.path.basename(step_dir))

    results = evaluation.evaluate(
        tasks,
        evaluation.embedder_encoder(embedder, args.batch_size),
        dims,
        k_values,
        precisions=args.embedding_precision or (),
        rescore_multiplier=args.rescore_multiplier,
    )
    print(evaluation.format_table(results), end="")
    info = {
        "model": fileio.absolute(args.model),
        "step": int(os.path.basename(step_dir)) if step_dir else None,
        "dims": list(dims),
        "k_values": list(k_values),
        "max_length": embedder.max_length,
        "embedding_precisions": list(args.embedding_precision or ()),
        "rescore_multiplier": args.rescore_multiplier if args.embedding_precision else None,
    }
    written = eval_report.write_report(output_dir, results, info, run_dir)
    for path in written.values():
        print(f"wrote {path}")
    print(f"evaluated in {time.time() - start:.1f}s")
    return 0


def run_mine(args, bindings) -> int:
    from embedder import mining
    from embedder.data import jsonl

    start = time.time()
    examples = jsonl.read_jsonl(args.input)
    corpus = None
    if args.corpus:
        corpus = _read_lines(args.corpus)
        if not corpus:
            raise errors.DataError(f"{args.corpus}: no documents")
    config = mining.MiningConfig(
        num_negatives=args.num_negatives,
        rank_start=args.rank_start,
        rank_end=args.rank_end,
        margin=args.margin,
        duplicate_threshold=args.duplicate_threshold,
        sample=args.sample,
        seed=args.seed,
    )
    embedder = _load_embedder(args, bindings)
    if args.max_length:
        embedder.max_length = args.max_length

    def encode(texts, kind):
        return embedder.encode(texts, kind=kind, batch_size=args.batch_size)

    result = mining.mine_hard_negatives(examples, encode, config, corpus=corpus)
    jsonl.write_jsonl(args.output, result.examples)
    print(
        f"mined ranks [{config.rank_start}, {config.rank_end}) for {len(examples)} examples -> {args.output} "
        f"in {time.time() - start:.1f}s; left out {result.skipped_duplicates} near-duplicates of the positive "
        f"and {result.skipped_margin} within the margin; {len(result.short)} examples got fewer than "
        f"{config.num_negatives} negatives"
    )
    return 0


_DISTILL_CONFIGURABLES: dict[str, Callable] = {}


def _distill_configs(args, bindings):
    """(GenerateConfig, RerankConfig, FilterConfig) factories: gin's bindings, then the flags."""
    import gin
    from embedder import gin_utils
    from embedder.lm import jobs, rerank

    if not _DISTILL_CONFIGURABLES:
        # An earlier parse in this process (a run, an API call) has finalized, so locked, gin's config.
        with gin.unlock_config():
            for cls in (jobs.GenerateConfig, rerank.RerankConfig, jobs.FilterConfig):
                _DISTILL_CONFIGURABLES[cls.__name__] = gin.external_configurable(cls, module="embedder.lm")
    if args.gin_file or bindings:
        gin_utils.parse(args.gin_file, bindings, _search_paths(args))
    else:
        gin.clear_config()
    return (
        _DISTILL_CONFIGURABLES["GenerateConfig"],
        _DISTILL_CONFIGURABLES["RerankConfig"],
        _DISTILL_CONFIGURABLES["FilterConfig"],
    )


def _given(**flags):
    """The flags that were given (not None), as keyword arguments."""
    return {k: v for k, v in flags.items() if v is not None}


def _require(args, *names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        raise errors.ConfigError(f"`distill {args.action}` needs {', '.join(missing)}")


def run_distill(args, bindings) -> int:
    """`embedder distill generate | rerank | filter` (see `embedder.lm.jobs`)."""
    import dataclasses
    import hashlib

    check_multi_host_flags(args)
    generate_config, rerank_config, filter_config = _distill_configs(args, bindings)
    required = {"generate": ("passages",), "rerank": ("model", "queries", "corpus"), "filter": ("input",)}
    _require(args, *required[args.action])
    if args.action == "generate":
        config = generate_config(**_given(max_new_tokens=args.max_new_tokens, seed=args.seed))
    elif args.action == "rerank":
        config = rerank_config(**_given(top_n=args.top_n))
    else:
        config = filter_config(**_given(keep_fraction=args.keep_fraction, threshold=args.threshold))
        relevance = rerank_config(**_given(top_n=args.top_n))
    from embedder import partitioning

    partitioning.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    from embedder.lm import decode, jobs
    from embedder.lm import model as lm_model

    start = time.time()
    output = fileio.absolute(args.output)
    mesh = partitioning.make_mesh(partitioning.MeshConfig())
    lm = lm_model.load(args.lm, mesh=mesh, dtype=args.dtype, param_dtype=args.dtype)
    batch = decode.BatchConfig(args.batch_size, args.max_prompt_len)
    job = {
        "action": args.action,
        "lm": fileio.absolute(args.lm),
        "config": dataclasses.asdict(config),
        "rows_per_call": decode.rows_per_call(lm, batch),
        "max_prompt_len": args.max_prompt_len,
        "dtype": args.dtype,
    }
    if args.action == "generate":
        passages = jobs.read_passages(args.passages)
        template = jobs.read_prompt(args.prompt_file)
        job.update(
            passages=fileio.absolute(args.passages), prompt=hashlib.sha256(template.encode()).hexdigest()
        )
        work = jobs.generate_work(lm, template, config, batch)
        manifest = jobs.run_sharded(output, passages, work, job, args.shard_size, "distill generate")
    elif args.action == "rerank":
        rows = jobs.read_output(args.queries)
        passages = jobs.read_passages(args.corpus)
        index = {p.id: i for i, p in enumerate(passages)}
        seeds = [index.get(str(r.get("seed_id"))) for r in rows]
        job.update(queries=fileio.absolute(args.queries), corpus=fileio.absolute(args.corpus))
        job.update(model=fileio.absolute(args.model), step=args.step)
        # --gin_file configures the distill job here, not the embedder.
        embedder = _load_embedder(argparse.Namespace(model=args.model, step=args.step, gin_file=[]), [])
        candidates = jobs.rerank_candidates(embedder, rows, passages, config.top_n, seeds)
        work = jobs.rerank_work(lm, passages, candidates, config, batch)
        manifest = jobs.run_sharded(output, rows, work, job, args.shard_size, "distill rerank")
    else:
        from embedder.data import jsonl

        examples = jsonl.read_jsonl(args.input)
        job.update(input=fileio.absolute(args.input), relevance=dataclasses.asdict(relevance))
        candidates = corpus = None
        if args.model:
            # LLM-mined hard negatives: the embedder's candidates among the input's positives,
            # reranked by the LM; each pair keeps its positive.
            job.update(model=fileio.absolute(args.model), step=args.step)
            corpus, own = jobs.positives_corpus(examples)
            embedder = _load_embedder(argparse.Namespace(model=args.model, step=args.step, gin_file=[]), [])
            rows = [{"query": e.query} for e in examples]
            candidates = jobs.rerank_candidates(embedder, rows, corpus, relevance.top_n, own)
        scores_dir = os.path.join(output, "scores")
        work = jobs.filter_work(lm, examples, relevance, batch, candidates, corpus)
        jobs.run_sharded(scores_dir, examples, work, job, args.shard_size, "distill filter")
        import jax

        if jax.process_index() == 0:
            manifest = jobs.write_filtered(output, examples, scores_dir, config, job)
            print(
                f"kept {manifest['kept']} of {len(examples)} pairs -> {output} in {time.time() - start:.1f}s"
            )
        return 0
    rows_out = sum(s["rows"] for s in manifest["finished"])
    print(
        f"distill {args.action}: {rows_out} rows in {manifest['num_shards']} shards -> {output} "
        f"in {time.time() - start:.1f}s"
    )
    return 0


def run_check(args, bindings) -> int:
    """`embedder check`: slice facts, the pre-flight check of a run, or the table (see `preflight`)."""
    import json

    from embedder import preflight

    if args.slice_info:
        print(preflight.slice_info_line(args.slice_info))
        return 0
    if args.check:
        if not args.accelerator:
            raise errors.ConfigError("--check needs --accelerator")
        tpu = preflight.parse_slice(args.accelerator)
        preflight.use_fake_devices(tpu.chips)
        report = preflight.check(
            args.accelerator, args.gin_file, bindings, not args.no_memory, _search_paths(args)
        )
        print(preflight.check_line(report))
        return 0
    preflight.use_fake_devices(max(preflight.parse_slice(name).chips for name in preflight.MESH_SLICES))
    model_files = args.gin_file or [os.path.join(preflight.REPO, preflight.DEFAULT_TABLE_MODEL)]
    reports = preflight.table(model_files, args.batch_size, bindings, _search_paths(args))
    if args.json:
        print(json.dumps([preflight.report_dict(r) for r in reports], indent=1))
        return 0
    print(
        f"model {' '.join(model_files)}: {reports[0].num_params / 1e9:.3f}B parameters; GiB a device "
        "(params fp32, Adam moments, one gradient buffer); free = HBM left for activations"
    )
    print(preflight.format_table(reports))
    return 0


RUNNERS: dict[str, Callable[[argparse.Namespace, list[str]], int]] = {
    "train": run_train,
    "eval": run_eval,
    "soup": run_soup,
    "export": run_export,
    "encode": run_encode,
    "mine": run_mine,
    "distill": run_distill,
    "check": run_check,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one subcommand.

    Args:
      argv: the arguments after the program name (default: sys.argv[1:]).

    Returns:
      The exit status: 0, or 2 for a user's mistake (printed as one line). A bad
      flag exits through argparse (SystemExit, status 2); a bug raises.
    """
    # The start-up noise filter swaps file descriptor 2 for the whole process: only the
    # `embedder` program itself (argv None) does that, never a caller of main() in-process.
    is_program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, verbosity = _split_verbosity(argv)
    if not is_program:
        verbosity = max(verbosity, 1)
    argv, bindings = _split_gin_bindings(argv)
    # The subcommand is the first word: the top-level parser takes no option with a value.
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser([command] if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    warn_renamed_flags(args.command, argv)
    try:
        with console.quiet_stderr(verbosity):
            return RUNNERS[args.command](args, bindings)
    except KeyboardInterrupt:
        # Ctrl-C outside a training loop (which saves and stops by itself): no traceback.
        print(f"embedder {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (errors.EmbedderError, OSError) as e:
        # gin appends "In call to configurable ..." lines: noise for a user.
        message = "\n".join(line for line in str(e).splitlines() if "In call to configurable" not in line)
        print(f"embedder {args.command}: error: {message}", file=sys.stderr)
        return 2
