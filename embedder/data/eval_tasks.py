"""Evaluation tasks: retrieval (BEIR format, or pairs) and STS (scored pairs), and the built-in ones.

A task is named by a string (a gin list entry, an `embedder eval --task` flag):

* a built-in name: `stdlib_code_search` (the stdlib docstring -> code pairs'
  test split: queries = docstrings, corpus = all code of the split, each query's
  own function is its one relevant document) or `stdlib_code_search_validation`
  (the same on the validation split: choose checkpoints on this one, report the
  test split);
* a BEIR folder (`corpus.jsonl`, `queries.jsonl`, `qrels/test.tsv`), or one
  qrels file inside it (`DIR/qrels/dev.tsv`) for another split;
* a `.jsonl` file of scored pairs, `{"sentence1", "sentence2", "score"}` a line
  (STS), or of the training format `{"query", "positive", ...}` (retrieval over
  the file's positives, as for the stdlib task).

Reading is strict: a bad line, an unknown id in the qrels, a duplicated id is a
`DataError` naming the file, the line and the id.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from embedder.data import jsonl, stdlib_pairs
from embedder.errors import ConfigError

DataError = jsonl.DataError
BEIR_CORPUS = "corpus.jsonl"
BEIR_QUERIES = "queries.jsonl"
BEIR_QRELS = "qrels"
STS_KEYS = ("sentence1", "sentence2", "score")
# The stdlib queries' prompt task: EmbeddingGemma's description for code
# retrieval, as the registered stdlib training task uses (data.tasks.CODE_RETRIEVAL).
CODE_RETRIEVAL = "code retrieval"


@dataclasses.dataclass(frozen=True)
class RetrievalTask:
    """Queries, a corpus and graded relevance judgements.

    Attributes:
      name: the task's name in metric names and reports.
      query_ids, queries: the judged queries and their texts.
      doc_ids, documents: the corpus.
      qrels: {query id: {doc id: relevance}}; relevance >= 1 is relevant, higher
        is better (graded), 0 or less is judged non-relevant.
      prompt_task: the task text of the query prompt, for models trained with
        prompts (None: the model's default task).
    """

    name: str
    query_ids: tuple[str, ...]
    queries: tuple[str, ...]
    doc_ids: tuple[str, ...]
    documents: tuple[str, ...]
    qrels: Mapping[str, Mapping[str, int]]
    prompt_task: str | None = None


@dataclasses.dataclass(frozen=True)
class STSTask:
    """Sentence pairs with gold similarity scores.

    Attributes:
      name: the task's name.
      sentences1, sentences2: the pairs.
      scores: [num_pairs] float64 gold scores (any scale; only their order and
        linear relation matter to Spearman and Pearson).
      prompt_task: as for RetrievalTask (both sentences are encoded as queries).
    """

    name: str
    sentences1: tuple[str, ...]
    sentences2: tuple[str, ...]
    scores: np.ndarray
    prompt_task: str | None = None


Task = RetrievalTask | STSTask


def _json_lines(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line; DataError naming file and line otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    rows = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}:{number}: not a JSON line ({e})") from e
        if not isinstance(value, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(value).__name__}")
        rows.append((number, value))
    if not rows:
        raise DataError(f"{path}: no lines")
    return rows


def _text(path: str, number: int, row: Mapping[str, Any], key: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        what = "missing" if value is None else f"a {type(value).__name__}, not a string"
        raise DataError(f"{path}:{number}: {key!r} is {what}")
    return value


def _id(path: str, number: int, row: Mapping[str, Any]) -> str:
    value = row.get("_id")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value:
        raise DataError(f"{path}:{number}: '_id' is missing or not a non-empty string")
    return value


def _read_beir_texts(path: str, with_title: bool) -> dict[str, str]:
    """{id: text} of a BEIR corpus or queries file; a document is "title text" (BEIR's convention)."""
    texts: dict[str, str] = {}
    lines: dict[str, int] = {}
    for number, row in _json_lines(path):
        key = _id(path, number, row)
        if key in texts:
            raise DataError(f"{path}:{number}: duplicate _id {key!r} (first on line {lines[key]})")
        text = _text(path, number, row, "text")
        if with_title:
            title = _text(path, number, row, "title", required=False)
            text = f"{title} {text}".strip() if title else text
        texts[key] = text
        lines[key] = number
    return texts


def read_qrels(
    path: str, query_ids: Mapping[str, Any], doc_ids: Mapping[str, Any]
) -> dict[str, dict[str, int]]:
    """A BEIR qrels TSV (`query-id  corpus-id  score`, one header line).

    Args:
      path: the file.
      query_ids, doc_ids: the known ids (membership is checked).

    Returns:
      {query id: {doc id: relevance}}.

    Raises:
      DataError: naming the file, the line and the id, for a malformed line, an
        unknown query or document id, a non-integer score or a repeated pair.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read qrels: {e}") from e
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if number == 1 and fields[0].strip().lower() in ("query-id", "query_id", "qid"):
            continue  # the header
        if len(fields) != 3:
            raise DataError(f"{path}:{number}: expected 3 tab-separated fields, got {len(fields)}")
        query, doc, score = (x.strip() for x in fields)
        if query not in query_ids:
            raise DataError(f"{path}:{number}: query id {query!r} is not in {BEIR_QUERIES}")
        if doc not in doc_ids:
            raise DataError(f"{path}:{number}: corpus id {doc!r} is not in {BEIR_CORPUS}")
        try:
            relevance = int(score)
        except ValueError as e:
            raise DataError(f"{path}:{number}: score {score!r} is not an integer") from e
        if doc in qrels.setdefault(query, {}):
            raise DataError(f"{path}:{number}: ({query!r}, {doc!r}) is judged twice")
        qrels[query][doc] = relevance
    if not qrels:
        raise DataError(f"{path}: no judgements")
    return qrels


def load_beir(path: str, name: str | None = None) -> RetrievalTask:
    """A BEIR folder, or one of its qrels files (the split).

    Args:
      path: `DIR` (uses `DIR/qrels/test.tsv`, or the only file in `DIR/qrels/`)
        or `DIR/qrels/SPLIT.tsv`.
      name: the task name; default the folder's name (plus `/SPLIT` unless test).

    Returns:
      The task over the judged queries (queries without qrels are left out) and
      the whole corpus.
    """
    if not os.path.exists(path):
        raise DataError(f"{path}: no such BEIR folder or qrels file")
    if os.path.isfile(path):
        qrels_path = path
        folder = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    else:
        folder = path
        qrels_dir = os.path.join(folder, BEIR_QRELS)
        choices = (
            sorted(f for f in os.listdir(qrels_dir) if f.endswith(".tsv")) if os.path.isdir(qrels_dir) else []
        )
        if "test.tsv" in choices:
            choices = ["test.tsv"]
        if len(choices) != 1:
            raise DataError(
                f"{folder}: expected {BEIR_QRELS}/test.tsv or a single qrels file, found {choices or 'none'}; "
                f"name the split's file, e.g. {os.path.join(qrels_dir, 'dev.tsv')}"
            )
        qrels_path = os.path.join(qrels_dir, choices[0])
    split = os.path.splitext(os.path.basename(qrels_path))[0]
    for part in (BEIR_CORPUS, BEIR_QUERIES):
        if not os.path.isfile(os.path.join(folder, part)):
            raise DataError(f"{folder}: no {part}; not a BEIR folder")
    corpus = _read_beir_texts(os.path.join(folder, BEIR_CORPUS), with_title=True)
    queries = _read_beir_texts(os.path.join(folder, BEIR_QUERIES), with_title=False)
    qrels = read_qrels(qrels_path, queries, corpus)
    query_ids = tuple(q for q in queries if q in qrels)
    if name is None:
        name = os.path.basename(os.path.normpath(folder)) + ("" if split == "test" else f"/{split}")
    return RetrievalTask(
        name=name,
        query_ids=query_ids,
        queries=tuple(queries[q] for q in query_ids),
        doc_ids=tuple(corpus),
        documents=tuple(corpus.values()),
        qrels=qrels,
    )


def retrieval_task_from_pairs(
    name: str, pairs: Sequence[tuple[str, str]], prompt_task: str | None = None
) -> RetrievalTask:
    """A retrieval task from (query, positive) pairs: the corpus is every positive.

    Identical documents become one document, and identical queries one query
    with all their positives relevant, so duplicates neither tie nor count a
    correct answer as wrong.

    Args:
      name: the task name.
      pairs: (query text, relevant document text).
      prompt_task: the queries' prompt task.

    Returns:
      The task; ids are "q0", "q1", ... and "d0", "d1", ... in first-seen order.
    """
    doc_index: dict[str, str] = {}
    query_index: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    for query, positive in pairs:
        doc_id = doc_index.setdefault(positive, f"d{len(doc_index)}")
        query_id = query_index.setdefault(query, f"q{len(query_index)}")
        qrels.setdefault(query_id, {})[doc_id] = 1
    if not qrels:
        raise DataError(f"task {name!r}: no pairs")
    return RetrievalTask(
        name=name,
        query_ids=tuple(query_index.values()),
        queries=tuple(query_index),
        doc_ids=tuple(doc_index.values()),
        documents=tuple(doc_index),
        qrels=qrels,
        prompt_task=prompt_task,
    )


def load_scored_pairs(path: str, name: str | None = None) -> STSTask:
    """A JSONL file of `{"sentence1": str, "sentence2": str, "score": number}` lines.

    Raises:
      DataError: naming the file and line, for a missing or mistyped field or a
        score that is not a finite number.
    """
    first, second, scores = [], [], []
    for number, row in _json_lines(path):
        first.append(_text(path, number, row, "sentence1"))
        second.append(_text(path, number, row, "sentence2"))
        score = row.get("score")
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise DataError(f"{path}:{number}: 'score' must be a finite number, got {score!r}")
        scores.append(float(score))
    if len(scores) < 2:
        raise DataError(f"{path}: needs at least 2 scored pairs for a correlation")
    return STSTask(
        name=name or os.path.splitext(os.path.basename(path))[0],
        sentences1=tuple(first),
        sentences2=tuple(second),
        scores=np.asarray(scores, np.float64),
    )


def stdlib_code_search(split: str = "test", limit: int | None = None) -> RetrievalTask:
    """The stdlib docstring -> code pairs of one split as a retrieval task.

    Args:
      split: "test" (the task `stdlib_code_search`) or "validation"
        (`stdlib_code_search_validation`).
      limit: use the split's first `limit` pairs (the corpus is their code); None: all.
    """
    name = "stdlib_code_search" + ("" if split == "test" else f"_{split}")
    pairs = [(e.query, e.positive) for e in stdlib_pairs.build_pairs(split)[:limit]]
    return retrieval_task_from_pairs(name, pairs, prompt_task=CODE_RETRIEVAL)


BUILTIN_TASKS = {
    "stdlib_code_search": lambda limit=None: stdlib_code_search("test", limit),
    "stdlib_code_search_validation": lambda limit=None: stdlib_code_search("validation", limit),
}


def first_queries(task: RetrievalTask, limit: int) -> RetrievalTask:
    """The task over its first `limit` judged queries (the corpus stays whole)."""
    query_ids = task.query_ids[:limit]
    return dataclasses.replace(
        task,
        query_ids=query_ids,
        queries=task.queries[:limit],
        qrels={q: task.qrels[q] for q in query_ids if q in task.qrels},
    )


def load_task(spec: str, limit: int | None = None) -> Task:
    """The task a string names (see the module docstring).

    Args:
      spec: a built-in name, a BEIR folder or qrels file, or a .jsonl file.
      limit: use at most this many examples (None: all): the first `limit` pairs
        of a pair file or built-in task (the corpus is their positives), the first
        `limit` judged queries of a BEIR task (the whole corpus), the first
        `limit` scored pairs of an STS file.

    Raises:
      DataError: the string names no built-in task and no usable file or folder,
        or a pair file mixes tasks (each query's prompt task must be the task's).
      ValueError: a limit below 1.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit={limit} must be positive (or None: every example)")
    if spec in BUILTIN_TASKS:
        return BUILTIN_TASKS[spec](limit)
    if os.path.isdir(spec) or spec.endswith(".tsv"):
        task = load_beir(spec)
        return task if limit is None else first_queries(task, limit)
    if spec.endswith(".jsonl") and os.path.isfile(spec):
        rows = _json_lines(spec)
        first = rows[0][1]
        if "score" in first:
            task = load_scored_pairs(spec)
            if limit is None:
                return task
            return dataclasses.replace(
                task,
                sentences1=task.sentences1[:limit],
                sentences2=task.sentences2[:limit],
                scores=task.scores[:limit],
            )
        if "query" in first:
            examples = jsonl.read_jsonl(spec)[:limit]
            tasks = sorted({str(e.task) for e in examples})
            if len(tasks) > 1:
                raise DataError(
                    f"{spec}: the pairs name several tasks {tasks}; an eval task has one prompt task, "
                    "so give one file per task"
                )
            name = os.path.splitext(os.path.basename(spec))[0]
            pairs = [(e.query, e.positive) for e in examples]
            return retrieval_task_from_pairs(name, pairs, prompt_task=examples[0].task)
        raise DataError(
            f"{spec}:{rows[0][0]}: neither a scored pair ({', '.join(STS_KEYS)}) nor a query/positive pair"
        )
    raise DataError(
        f"eval task {spec!r}: not a built-in task ({', '.join(BUILTIN_TASKS)}), "
        "a BEIR folder or qrels file, or a .jsonl file"
    )
