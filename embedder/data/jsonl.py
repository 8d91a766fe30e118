"""The project's own data format: JSONL, one training example a line.

Each non-blank line is a JSON object::

    {"query": str, "positive": str, "negatives": [str, ...], "task": str, "title": str,
     "scores": [float, ...]}

`negatives`, `task`, `title` (the positive's title) and `scores` are optional.
`scores` are a teacher's scores (a cross-encoder's, an LLM reranker's) of the
positive, then of each negative: one finite number each, `1 + len(negatives)`
in all, which the given-scores loss terms (`losses.margin_mse_loss`,
`losses.listwise_kl_loss`) train on. Reading is strict: a bad line is a
`DataError` naming the file, the 1-based line number and what is wrong, never a
silent skip, because a dropped line changes what a model is trained on without
anybody noticing. Empty strings and very long texts are legal (truncation is the
tokenizer's job).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from embedder import fileio
from embedder.errors import DataError

REQUIRED_KEYS = ("query", "positive")
OPTIONAL_KEYS = ("negatives", "task", "title", "scores")
ALLOWED_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS

_UTF8_BOM = b"\xef\xbb\xbf"


@dataclasses.dataclass(frozen=True)
class Example:
    """One training example: a query, its positive document and hard negatives.

    Attributes:
        query: the query text.
        positive: the document that answers the query.
        negatives: documents that look relevant but are not (hard negatives).
        task: the task name or prompt the example belongs to; None if unset.
        title: the positive document's title; None if unset.
        scores: a teacher's scores of the positive, then of each negative
            (`1 + len(negatives)` finite numbers); None if unset.
    """

    query: str
    positive: str
    negatives: tuple[str, ...] = ()
    task: str | None = None
    title: str | None = None
    scores: tuple[float, ...] | None = None

    def __post_init__(self):
        # A list is accepted for convenience; stored as a tuple so the example stays hashable.
        if isinstance(self.negatives, list):
            object.__setattr__(self, "negatives", tuple(self.negatives))
        if isinstance(self.scores, list):
            object.__setattr__(self, "scores", tuple(self.scores))
        problem = _field_problem("query", self.query) or _field_problem("positive", self.positive)
        problem = problem or _negatives_problem(self.negatives, tuple)
        if problem is None and self.task is not None:
            problem = _field_problem("task", self.task)
        if problem is None and self.title is not None:
            problem = _field_problem("title", self.title)
        if problem is None and self.scores is not None:
            problem = _scores_problem(self.scores, len(self.negatives), tuple)
        if problem:
            raise TypeError(f"Example: {problem}")


def _field_problem(key: str, value: Any) -> str | None:
    """Why `value` cannot be the string field `key`, or None if it can."""
    if not isinstance(value, str):
        return f"{key!r} must be a string, got {_json_type(value)}"
    if not _encodable(value):
        return f"{key!r} contains a lone surrogate (an unpaired \\ud800-\\udfff escape), not valid text"
    return None


def _negatives_problem(value: Any, sequence_type: type = list) -> str | None:
    """Why `value` cannot be the `negatives` field, or None if it can."""
    if not isinstance(value, sequence_type):
        return f"'negatives' must be a list of strings, got {_json_type(value)}"
    for index, negative in enumerate(value):
        if not isinstance(negative, str):
            return f"'negatives'[{index}] must be a string, got {_json_type(negative)}"
        if not _encodable(negative):
            return f"'negatives'[{index}] contains a lone surrogate (an unpaired \\ud800-\\udfff escape)"
    return None


def _scores_problem(value: Any, num_negatives: int, sequence_type: type = list) -> str | None:
    """Why `value` cannot be the `scores` of an example with `num_negatives` negatives, or None."""
    if not isinstance(value, sequence_type):
        return f"'scores' must be a list of numbers, got {_json_type(value)}"
    if len(value) != 1 + num_negatives:
        return (
            f"'scores' has {len(value)} entries but the example has 1 positive and {num_negatives} "
            f"negative(s): give one score each, the positive's first ({1 + num_negatives} in all)"
        )
    for index, score in enumerate(value):
        if isinstance(score, bool) or not isinstance(score, int | float):
            return f"'scores'[{index}] must be a number, got {_json_type(score)}"
        try:
            finite = math.isfinite(score)
        except OverflowError:  # an integer too large for a float
            finite = False
        if not finite:
            return f"'scores'[{index}] is {score!r}; every score must be a finite float"
    return None


def _encodable(text: str) -> bool:
    """Whether `text` is valid Unicode text (JSON escapes can smuggle in lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, for error messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    for python_type, name in names.items():
        if type(value) is python_type:
            return name
    if isinstance(value, int | float):
        return f"a number ({value!r})"
    return type(value).__name__


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook` that refuses {"query": 1, "query": 2} (json keeps the last silently)."""
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _parse_line(text: str) -> Example:
    """Turns one decoded, non-blank line into an Example.

    Raises:
        ValueError: saying what is wrong; the caller adds file and line.
    """
    try:
        record = json.loads(text, object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as error:
        raise ValueError(f"malformed JSON: {error.msg} at column {error.colno}") from None
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(record)}")
    unknown = sorted(set(record) - set(ALLOWED_KEYS))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys are "
            f"{', '.join(map(repr, ALLOWED_KEYS))}"
        )
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise ValueError(f"missing required key(s) {', '.join(map(repr, missing))}")
    problem = _field_problem("query", record["query"]) or _field_problem("positive", record["positive"])
    if problem is None and "negatives" in record:
        problem = _negatives_problem(record["negatives"])
    for key in ("task", "title"):
        if problem is None and key in record:
            problem = _field_problem(key, record[key])
            if record[key] is None:
                problem += f" (leave the key out for no {key})"
    if problem is None and "scores" in record:
        problem = _scores_problem(record["scores"], len(record.get("negatives", ())))
    if problem:
        raise ValueError(problem)
    return Example(
        query=record["query"],
        positive=record["positive"],
        negatives=tuple(record.get("negatives", ())),
        task=record.get("task"),
        title=record.get("title"),
        scores=None if "scores" not in record else tuple(float(x) for x in record["scores"]),
    )


def _numbered_examples(path: str | os.PathLike) -> Iterator[tuple[int, Example]]:
    """(1-based line number, example) of each non-blank line of `path`, as `read_jsonl` reads them."""
    with fileio.open_file(os.fspath(path), "rb") as f:  # local, or gs:// on a pod
        data = f.read()
    if data.startswith(_UTF8_BOM):
        data = data[len(_UTF8_BOM) :]
    # Split on LF only: a raw CR or other line separators cannot occur inside a JSON
    # string, and splitting bytes keeps the line numbers right even if a line is not UTF-8.
    for line_number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DataError(
                f"{path}:{line_number}: invalid UTF-8 at byte {error.start} of the line "
                f"({raw[error.start : error.start + 4]!r}); re-encode the file as UTF-8"
            ) from None
        if not text.strip():
            continue
        try:
            example = _parse_line(text)
        except ValueError as error:
            raise DataError(f"{path}:{line_number}: {error}") from None
        yield line_number, example


def read_jsonl(path: str | os.PathLike) -> list[Example]:
    """Reads one JSONL file of examples.

    Args:
        path: the file. Lines end in LF or CRLF; blank lines are skipped; a UTF-8
            byte order mark at the start is allowed.

    Returns:
        The examples in file order.

    Raises:
        DataError: naming the file and the 1-based line number, for invalid UTF-8,
            malformed JSON, a value that is not an object, a missing, unknown,
            duplicated or wrongly typed key; naming the file if it holds no example.
        OSError: if the file cannot be read.
    """
    examples = [example for _, example in _numbered_examples(path)]
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return examples


def read_jsonl_files(paths: Iterable[str | os.PathLike]) -> list[Example]:
    """Reads several JSONL files, one after another.

    Args:
        paths: the files, read in the given order.

    Returns:
        All examples, file by file, each file in line order.

    Raises:
        TypeError: if `paths` is a single string or path instead of a list of them.
        DataError: if `paths` is empty, or as `read_jsonl` for any file.
    """
    if isinstance(paths, str | bytes | os.PathLike):
        raise TypeError(f"read_jsonl_files takes a list of paths, got the single path {paths!r}")
    paths = list(paths)
    if not paths:
        raise DataError("read_jsonl_files: no files given")
    examples = []
    for path in paths:
        examples.extend(read_jsonl(path))
    return examples


def require_scores(paths: Iterable[str | os.PathLike]) -> None:
    """Checks that every line of the JSONL files carries `scores`.

    A run that trains on scores given in the data (`TeacherLossConfig.given_scores_weight`
    > 0) calls this first: a line without them would have nothing to learn from
    in the given-scores term, and filling them in would make up a teacher.

    Args:
        paths: the training files.

    Raises:
        DataError: naming the file and the 1-based line number of the first line
            without `scores`, or as `read_jsonl`.
    """
    for path in paths:
        for line_number, example in _numbered_examples(path):
            if example.scores is None:
                raise DataError(
                    f"{path}:{line_number}: no 'scores' key, but the run trains on scores given in the data "
                    "(TeacherLossConfig.given_scores_weight > 0); give every line a 'scores' list (the "
                    "positive's score, then one per negative) or set GIVEN_SCORES_WEIGHT = 0"
                )


def example_to_json(example: Example) -> str:
    """One JSONL line (without the line break) for `example`; optional fields only when set.

    Args:
        example: the example.

    Returns:
        A JSON object on one line, UTF-8 text kept as is (not \\u-escaped).
    """
    record: dict[str, Any] = {"query": example.query, "positive": example.positive}
    if example.negatives:
        record["negatives"] = list(example.negatives)
    if example.task is not None:
        record["task"] = example.task
    if example.title is not None:
        record["title"] = example.title
    if example.scores is not None:
        record["scores"] = list(example.scores)
    return json.dumps(record, ensure_ascii=False)


def write_jsonl(path: str | os.PathLike, examples: Sequence[Example]) -> None:
    """Writes examples as JSONL, atomically.

    The lines go to a temporary file in the same folder that then replaces `path`
    in one `os.replace`, so a reader never sees a half-written file and a crash
    leaves the old file intact.

    Args:
        path: the file to write; its folder must exist.
        examples: the examples; at least one, since `read_jsonl` rejects an empty file.

    Raises:
        DataError: if `examples` is empty.
        TypeError: if an element is not an `Example`.
    """
    examples = list(examples)
    if not examples:
        raise DataError(f"{path}: no examples to write (read_jsonl would reject the empty file)")
    for index, example in enumerate(examples):
        if not isinstance(example, Example):
            raise TypeError(f"write_jsonl: examples[{index}] is {type(example).__name__}, not Example")
    text = "".join(example_to_json(example) + "\n" for example in examples)
    path = os.fspath(path)
    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex}.tmp")
    # os.open with mode 0o666 lets the umask decide the permissions, as for a plain open().
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
