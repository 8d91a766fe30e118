"""Docstring -> code pairs from the Python standard library: real data, no download.

A CodeSearchNet-like retrieval task built from the interpreter that runs this code:
for every function and method with a docstring, the query is the docstring's first
paragraph and the positive is the function's source with the docstring cut out.

The split is by top-level module (everything under `email/` is the module
"email"; `os.py` is "os"), never by function, so validation and test ask about
code the model has not seen. A module goes to a split by a hash of its name, so
the assignment is the same on every machine and does not move when other modules
are added. Docstrings are often copied between modules (`__repr__`, "Return
self==value." ...); a validation or test pair whose docstring also occurs in an
earlier split is dropped, so the held-out queries are new text.

Pre-finetuning (`build_pretrain_pairs`) takes the same training modules' functions
but pairs every docstring sentence, and the summary line, with the whole function:
a larger and noisier set (many sentences describe an argument, not the function),
as Gecko's and Gemini Embedding's first stage wants. It never reads a validation or
test module.

Run as `python -m embedder.data.stdlib_pairs --output_dir DIR` to write
`train.jsonl`, `validation.jsonl` and `test.jsonl` (and `pretrain.jsonl` with
`--pretrain`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import hashlib
import importlib.util
import inspect
import os
import re
import sys
import sysconfig
import time
from collections.abc import Iterator, Sequence

from embedder.data import jsonl
from embedder.errors import ConfigError

TASK = "code_search"
SPLITS = ("train", "validation", "test")
# Fractions of modules (not of pairs) in each split, in the order of SPLITS.
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
MASKED_NAME = "func"

# Folders that are not library code a user would search: tests, the IDLE app, the
# 2to3 fixers, demos, bundled wheels, and installed third-party packages.
_SKIPPED_DIRS = frozenset(
    {"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "__pycache__"}
)
_MIN_QUERY_WORDS = 3
_MIN_BODY_LINES = 2

# The line breaks the Python tokenizer knows (\n, \r\n, \r), unlike str.splitlines,
# which also breaks at \f, \v, \x1c... and would shift ast's line numbers.
_LINE_BREAK = re.compile(r"(?<=\n)|(?<=\r)(?!\n)")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# A sentence ends at . ! or ? followed by whitespace and a capital, a quote or a bracket
# ("e.g. foo" and "os.path.join" do not end one).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z`'\"(\[])")


@dataclasses.dataclass(frozen=True)
class _Pair:
    """One documented function: where it is, its query and its code."""

    module: str
    path: str  # relative to the stdlib folder, '/'-separated
    line: int
    name: str
    query: str
    code: str
    docstring: str  # the whole docstring, cleaned (inspect.cleandoc)


def split_of_module(module: str) -> str:
    """The split a top-level module belongs to, from a hash of its name.

    Args:
        module: the top-level module name, e.g. "json" or "os".

    Returns:
        "train", "validation" or "test", with probabilities `SPLIT_FRACTIONS`.
    """
    # md5, not hash(): str hashes are salted per process.
    digest = hashlib.md5(module.encode("utf-8")).digest()
    position = int.from_bytes(digest[:8], "big") / 2**64
    cumulative = 0.0
    for split, fraction in zip(SPLITS, SPLIT_FRACTIONS, strict=True):
        cumulative += fraction
        if position < cumulative:
            return split
    return SPLITS[-1]


def default_stdlib_dir() -> str:
    """The standard library folder of the running interpreter."""
    return sysconfig.get_paths()["stdlib"]


def _iter_source_files(stdlib_dir: str) -> Iterator[tuple[str, str]]:
    """Yields (top-level module, path relative to `stdlib_dir`) for every library .py file, sorted."""
    for entry in sorted(os.listdir(stdlib_dir)):
        full = os.path.join(stdlib_dir, entry)
        if os.path.isdir(full):
            # Only importable packages: this also skips config-3.x-*/ and lib-dynload/.
            if not entry.isidentifier() or entry in _SKIPPED_DIRS:
                continue
            for root, dirs, files in os.walk(full):
                dirs[:] = sorted(d for d in dirs if d not in _SKIPPED_DIRS)
                for file in sorted(files):
                    if file.endswith(".py"):
                        relative = os.path.relpath(os.path.join(root, file), stdlib_dir)
                        yield entry, relative.replace(os.sep, "/")
        elif entry.endswith(".py") and entry[:-3].isidentifier():
            yield entry[:-3], entry


def _first_paragraph(docstring: str) -> str:
    """The docstring's first paragraph on one line, whitespace collapsed."""
    paragraph = _PARAGRAPH_BREAK.split(inspect.cleandoc(docstring).strip(), maxsplit=1)[0]
    return " ".join(paragraph.split())


def _byte_to_char(line: str, byte_offset: int) -> int:
    """Converts ast's UTF-8 byte column on `line` into a str index."""
    return len(line.encode("utf-8")[:byte_offset].decode("utf-8", errors="ignore"))


def _code_without_docstring(lines: Sequence[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The function's source from `def` to its last line, docstring removed, dedented.

    `ast.get_source_segment` would do the slicing but re-splits the whole file on
    every call, which makes the stdlib walk quadratic; the lines are split once here.
    """
    docstring = node.body[0]
    first, last = node.lineno - 1, node.end_lineno - 1
    doc_first, doc_last = docstring.lineno - 1, docstring.end_lineno - 1
    segment = []
    for index in range(first, last + 1):
        # Whole lines, the last one too: after the final statement only a comment can follow.
        line = lines[index]
        if doc_first <= index <= doc_last:
            # Keep what shares a line with the docstring (a `def f(): "doc"` header, or
            # `; return x` after it); drop the line if nothing but blanks remain.
            before = line[: _byte_to_char(line, docstring.col_offset)] if index == doc_first else ""
            after = line[_byte_to_char(line, docstring.end_col_offset) :] if index == doc_last else ""
            after = after.lstrip(" \t;") if not before.strip() else after
            line = before + after
            if not line.strip():
                continue
        segment.append(line.rstrip("\r\n"))
    # Remove the def line's indentation (methods), but only where a line has it:
    # string literals inside the body may start further left.
    indent = segment[0][: len(segment[0]) - len(segment[0].lstrip())]
    return "\n".join(line[len(indent) :] if line.startswith(indent) else line for line in segment)


def _body_lines(lines: Sequence[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Non-blank source lines of the body after the docstring."""
    if len(node.body) < 2:
        return 0
    start = node.body[1].lineno - 1
    return sum(1 for line in lines[start : node.end_lineno] if line.strip())


def _pairs_of_file(stdlib_dir: str, module: str, relative: str) -> list[_Pair]:
    """All usable (docstring, code) pairs of one source file; none if it does not parse."""
    with open(os.path.join(stdlib_dir, relative), "rb") as f:
        data = f.read()
    try:
        # decode_source follows a PEP 263 coding cookie, as the importer does.
        source = importlib.util.decode_source(data)
        tree = ast.parse(source, filename=relative)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = _LINE_BREAK.split(source)
    pairs = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        docstring = ast.get_docstring(node, clean=False)
        if docstring is None:
            continue
        query = _first_paragraph(docstring)
        if len(query.split()) < _MIN_QUERY_WORDS or _body_lines(lines, node) < _MIN_BODY_LINES:
            continue
        code = _code_without_docstring(lines, node)
        pairs.append(
            _Pair(module, relative, node.lineno, node.name, query, code, inspect.cleandoc(docstring).strip())
        )
    return pairs


@functools.lru_cache(maxsize=4)
def _split_pairs(stdlib_dir: str) -> dict[str, tuple[_Pair, ...]]:
    """Every pair of the stdlib, by split, deduplicated across splits, in output order."""
    by_split: dict[str, list[_Pair]] = {split: [] for split in SPLITS}
    for module, relative in _iter_source_files(stdlib_dir):
        by_split[split_of_module(module)].extend(_pairs_of_file(stdlib_dir, module, relative))
    seen: set[str] = set()
    result = {}
    # Splits in order: validation loses what train has, test what train or validation has.
    for split in SPLITS:
        pairs = sorted(by_split[split], key=lambda p: (p.module, p.path, p.line))
        if split != SPLITS[0]:
            pairs = [pair for pair in pairs if pair.query not in seen]
        seen.update(pair.query for pair in pairs)
        result[split] = tuple(pairs)
    return result


def mask_name(code: str, name: str) -> str:
    """Replaces the whole-word occurrences of `name` in `code` by `MASKED_NAME`.

    Args:
        code: source text.
        name: the identifier to hide.

    Returns:
        The code with `name` replaced wherever it is a whole word (the definition,
        recursive calls, `self.name` references).
    """
    return re.sub(rf"\b{re.escape(name)}\b", MASKED_NAME, code)


def build_pairs(split: str, mask_names: bool = False, stdlib_dir: str | None = None) -> list[jsonl.Example]:
    """The docstring -> code examples of one split.

    Args:
        split: "train", "validation" or "test".
        mask_names: the harder variant: the function's own name in the code becomes
            `func`, so the name cannot give the answer away.
        stdlib_dir: the standard library folder; defaults to the running interpreter's.

    Returns:
        Examples with `task="code_search"`, sorted by module, file and line.

    Raises:
        ConfigError: for an unknown split.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    pairs = _split_pairs(os.path.abspath(stdlib_dir or default_stdlib_dir()))[split]
    return [
        jsonl.Example(
            query=pair.query,
            positive=mask_name(pair.code, pair.name) if mask_names else pair.code,
            task=TASK,
        )
        for pair in pairs
    ]


def build_records(
    split: str, mask_names: bool = False, stdlib_dir: str | None = None
) -> list[dict[str, str | int]]:
    """The examples of `build_pairs` with where each comes from.

    Args:
        split: "train", "validation" or "test".
        mask_names: as in `build_pairs`.
        stdlib_dir: as in `build_pairs`.

    Returns:
        One dict per example, in `build_pairs` order: `query`, `positive` (the code),
        `module` (top-level module), `path` (file relative to the stdlib folder),
        `line` (1-based line of the `def`) and `name` (the function's name).

    Raises:
        ConfigError: for an unknown split.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    pairs = _split_pairs(os.path.abspath(stdlib_dir or default_stdlib_dir()))[split]
    return [
        {
            "query": pair.query,
            "positive": mask_name(pair.code, pair.name) if mask_names else pair.code,
            "module": pair.module,
            "path": pair.path,
            "line": pair.line,
            "name": pair.name,
        }
        for pair in pairs
    ]


def write_split(
    path: str | os.PathLike, split: str, mask_names: bool = False, stdlib_dir: str | None = None
) -> int:
    """Writes one split as JSONL (atomically).

    Args:
        path: the output file.
        split: "train", "validation" or "test".
        mask_names: as in `build_pairs`.
        stdlib_dir: as in `build_pairs`.

    Returns:
        The number of examples written.
    """
    examples = build_pairs(split, mask_names=mask_names, stdlib_dir=stdlib_dir)
    jsonl.write_jsonl(path, examples)
    return len(examples)


def docstring_queries(docstring: str) -> list[str]:
    """The pre-finetuning queries of one docstring: its summary line and every sentence.

    Paragraphs with a doctest (a `>>>` line) are code, not prose, and are skipped.
    Whitespace inside a sentence is collapsed; sentences of fewer than three words
    are dropped; a query occurs once, in docstring order.

    Args:
        docstring: the docstring (raw or cleaned).

    Returns:
        The summary line (the docstring's first line) first, then the sentences of
        every prose paragraph.
    """
    cleaned = inspect.cleandoc(docstring).strip()
    queries = [" ".join(cleaned.split("\n", 1)[0].split())]
    for paragraph in _PARAGRAPH_BREAK.split(cleaned):
        if any(line.lstrip().startswith(">>>") for line in paragraph.splitlines()):
            continue
        queries.extend(_SENTENCE_END.split(" ".join(paragraph.split())))
    unique = dict.fromkeys(q for q in queries if len(q.split()) >= _MIN_QUERY_WORDS)
    return list(unique)


def build_pretrain_pairs(stdlib_dir: str | None = None) -> list[jsonl.Example]:
    """The noisy pre-finetuning pairs: every docstring query against its whole function.

    Only functions of the training modules are used (the ones `build_pairs("train")`
    uses), so validation and test code stays unseen. Each function gives one pair
    per query of `docstring_queries`, its positive the function's code without the
    docstring (as in `build_pairs`).

    Args:
        stdlib_dir: the standard library folder; defaults to the running interpreter's.

    Returns:
        Examples with `task="code_search"`, in module, file, line, then docstring order.
    """
    pairs = _split_pairs(os.path.abspath(stdlib_dir or default_stdlib_dir()))[SPLITS[0]]
    return [
        jsonl.Example(query=query, positive=pair.code, task=TASK)
        for pair in pairs
        for query in docstring_queries(pair.docstring)
    ]


def write_pretrain(path: str | os.PathLike, stdlib_dir: str | None = None) -> int:
    """Writes `build_pretrain_pairs` as JSONL (atomically).

    Args:
        path: the output file.
        stdlib_dir: as in `build_pretrain_pairs`.

    Returns:
        The number of examples written.
    """
    examples = build_pretrain_pairs(stdlib_dir=stdlib_dir)
    jsonl.write_jsonl(path, examples)
    return len(examples)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: writes train/validation/test JSONL files and prints their sizes."""
    parser = argparse.ArgumentParser(
        prog="python -m embedder.data.stdlib_pairs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--output_dir", required=True, help="folder for {train,validation,test}.jsonl")
    parser.add_argument(
        "--mask_names", action="store_true", help="replace each function's own name in its code by 'func'"
    )
    parser.add_argument("--stdlib_dir", default=None, help="standard library folder (default: this Python's)")
    parser.add_argument(
        "--pretrain",
        action="store_true",
        help="also write pretrain.jsonl: every docstring sentence of the train modules against its function",
    )
    args = parser.parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    start = time.perf_counter()
    for split in SPLITS:
        path = os.path.join(args.output_dir, f"{split}.jsonl")
        count = write_split(path, split, mask_names=args.mask_names, stdlib_dir=args.stdlib_dir)
        print(f"{split:<10} {count:>6} pairs  {path}")
    if args.pretrain:
        path = os.path.join(args.output_dir, "pretrain.jsonl")
        print(f"{'pretrain':<10} {write_pretrain(path, stdlib_dir=args.stdlib_dir):>6} pairs  {path}")
    print(f"built in {time.perf_counter() - start:.1f} s from {args.stdlib_dir or default_stdlib_dir()}")


if __name__ == "__main__":
    main(sys.argv[1:])
