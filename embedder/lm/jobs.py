"""The `embedder distill` jobs: generate (FRet step 1), rerank (FRet step 2), filter (Gemini).

Every job turns a list of input rows into JSONL shards in an output folder:

* shard i holds the output of input rows [i * shard_size, (i + 1) * shard_size)
  and is named ``shard-0000i-of-0000n.jsonl``; in a multi-host run process p
  does the shards with ``i % process_count == p``;
* a shard is written under a temporary name and renamed into place, then
  marked finished by an empty file ``done/<name>``; `manifest.json` records
  the job's settings and the finished shards (row counts), rewritten after
  each shard and, complete, at the end;
* a job started again with the same settings skips the finished shards and
  redoes the others from their first row (a shard renamed but not yet marked
  is rewritten whole), so a run killed at any moment, SIGKILL included, ends
  with exactly the rows of an uninterrupted run: the output of a row depends
  only on the row, its index and the seed, never on which run computed it;
* a progress bar on stderr counts rows and rows/s.

A shard with no output rows (e.g. every generated query was empty) writes no
file but is marked finished, so the `*.jsonl` files are always valid
`TRAIN_FILES` (JSONL that `embedder train` reads).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from embedder import fileio
from embedder.errors import ConfigError, DataError

MANIFEST = "manifest.json"
DONE_DIR = "done"
DETAILS_DIR = "candidates"
PROMPT_FILE = os.path.join(os.path.dirname(__file__), "prompts", "fret_generate.txt")


# ---------------------------------------------------------------- shards and manifest


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.jsonl"


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """How a job's rows split into shards, and which of them are this process's.

    Attributes:
      num_rows: input rows.
      shard_size: rows per shard.
      process_index, process_count: this process and how many share the job.
    """

    num_rows: int
    shard_size: int
    process_index: int = 0
    process_count: int = 1

    @property
    def num_shards(self) -> int:
        return max(1, -(-self.num_rows // self.shard_size))

    def rows(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_rows))

    def mine(self) -> list[int]:
        return [i for i in range(self.num_shards) if i % self.process_count == self.process_index]


def read_manifest(output: str) -> dict[str, Any] | None:
    path = os.path.join(output, MANIFEST)
    if not fileio.exists(path):
        return None
    try:
        with fileio.open_file(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e


def finished_shards(output: str) -> set[str]:
    done = os.path.join(output, DONE_DIR)
    return set(fileio.listdir(done)) if fileio.isdir(done) else set()


def _write_manifest(output: str, job: dict[str, Any], plan: ShardPlan, counts: dict[str, int]) -> None:
    names = [shard_name(i, plan.num_shards) for i in range(plan.num_shards)]
    finished = [{"name": n, "rows": counts[n]} for n in names if n in counts]
    fileio.write_json(
        os.path.join(output, MANIFEST),
        {
            "job": job,
            "num_rows": plan.num_rows,
            "shard_size": plan.shard_size,
            "num_shards": plan.num_shards,
            "finished": finished,
            "complete": len(finished) == plan.num_shards,
        },
    )


def _counts(output: str, done: set[str]) -> dict[str, int]:
    counts = {}
    for name in done:
        with fileio.open_file(os.path.join(output, DONE_DIR, name)) as f:
            counts[name] = int(f.read().strip() or 0)
    return counts


def _write_lines(path: str, rows: Sequence[dict[str, Any]]) -> None:
    fileio.write_atomically(
        path, lambda f: f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    )


# A shard's work: (input rows, index of the first) -> (output rows, detail rows or None).
ShardFn = Callable[[Sequence[Any], int], tuple[list[dict[str, Any]], list[dict[str, Any]] | None]]


def run_sharded(
    output: str,
    rows: Sequence[Any],
    work: ShardFn,
    job: dict[str, Any],
    shard_size: int,
    description: str,
) -> dict[str, Any]:
    """Runs `work` over every unfinished shard of this process (see the module docstring).

    Args:
      output: the output folder (created).
      rows: every input row (the same on every process).
      work: computes one shard.
      job: the settings the output depends on (JSON); a folder holding another
        job's output is refused.
      shard_size: input rows per shard.
      description: the progress bar's label.

    Returns:
      The manifest (complete once every process is done).

    Raises:
      ConfigError: the folder holds the output of a job with other settings.
    """
    import jax

    if shard_size < 1:
        raise ConfigError(f"shard_size={shard_size}: expected >= 1")
    plan = ShardPlan(len(rows), shard_size, jax.process_index(), jax.process_count())
    old = read_manifest(output)
    if old is not None and (old.get("job") != job or old.get("shard_size") != shard_size):
        raise ConfigError(
            f"{os.path.join(output, MANIFEST)}: the folder holds the output of another job "
            f"({old.get('job')}, shard_size={old.get('shard_size')}); this one is {job}, "
            f"shard_size={shard_size}: choose another --output"
        )
    fileio.makedirs(os.path.join(output, DONE_DIR))
    if plan.process_index == 0 and old is None:
        _write_manifest(output, job, plan, {})
    mine = plan.mine()
    names = {i: shard_name(i, plan.num_shards) for i in mine}
    done = finished_shards(output)
    todo = [i for i in mine if names[i] not in done]
    total = sum(len(plan.rows(i)) for i in mine)
    from tqdm import tqdm

    bar = tqdm(
        total=total,
        initial=total - sum(len(plan.rows(i)) for i in todo),
        desc=description,
        unit="row",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    try:
        for i in todo:
            span = plan.rows(i)
            out, details = work(rows[span.start : span.stop], span.start)
            if details is not None:
                _write_lines(os.path.join(output, DETAILS_DIR, names[i]), details)
            if out:
                _write_lines(os.path.join(output, names[i]), out)
            fileio.write_text_atomically(os.path.join(output, DONE_DIR, names[i]), f"{len(out)}\n")
            bar.update(len(span))
            if plan.process_index == 0:
                _write_manifest(output, job, plan, _counts(output, finished_shards(output)))
    finally:
        bar.close()
    if plan.process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"distill {description} {output}")
    if plan.process_index == 0:
        _write_manifest(output, job, plan, _counts(output, finished_shards(output)))
    return read_manifest(output)


def read_output(folder: str, details: bool = False) -> list[dict[str, Any]]:
    """The rows of a finished job's folder, in shard order (`details`: the candidates files).

    Raises:
      DataError: no manifest, or the job is not complete (resume it first).
    """
    manifest = _complete_manifest(folder)
    rows = []
    for shard in manifest["finished"]:
        if not shard["rows"]:
            continue
        path = os.path.join(folder, DETAILS_DIR if details else "", shard["name"])
        with fileio.open_file(path) as f:
            for lineno, line in enumerate(f, start=1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg}") from e
    return rows


def _complete_manifest(folder: str) -> dict[str, Any]:
    manifest = read_manifest(folder)
    if manifest is None:
        raise DataError(f"{folder}: no {MANIFEST}: not the output of an `embedder distill` job")
    if not manifest.get("complete"):
        raise DataError(
            f"{os.path.join(folder, MANIFEST)}: {len(manifest.get('finished', []))} of "
            f"{manifest.get('num_shards')} shards finished; run the job again to complete it"
        )
    return manifest


def shard_files(folder: str) -> list[str]:
    """The `*.jsonl` shards of a finished job, in order (e.g. a TRAIN_DIR's TRAIN_FILES).

    Raises:
      DataError: no manifest, or the job is not complete.
    """
    manifest = _complete_manifest(folder)
    return [os.path.join(folder, s["name"]) for s in manifest["finished"] if s["rows"]]


# ---------------------------------------------------------------- inputs


@dataclasses.dataclass(frozen=True)
class Passage:
    """One passage of a corpus: its id (as a string), text and optional title."""

    id: str
    text: str
    title: str | None = None


def read_passages(path: str) -> list[Passage]:
    """Passages from JSONL, one ``{"id", "text", "title"?}`` object a line.

    Raises:
      DataError: naming the file and line, for bad JSON, a missing or wrongly
        typed field, or an id seen before.
    """
    passages, seen = [], {}
    with fileio.open_file(path, "rb") as f:
        data = f.read()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{where}: not a JSON line ({e})") from None
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object")
        unknown = sorted(set(record) - {"id", "text", "title"})
        if unknown or "id" not in record or not isinstance(record.get("text"), str):
            raise DataError(
                f'{where}: a passage is {{"id", "text", "title"?}} with a string text; got keys '
                f"{sorted(record)}"
            )
        if not isinstance(record["id"], str | int) or not isinstance(record.get("title", ""), str):
            raise DataError(f"{where}: `id` must be a string or integer and `title` a string")
        pid = str(record["id"])
        if pid in seen:
            raise DataError(f"{where}: id {pid!r} also on line {seen[pid]}")
        seen[pid] = lineno
        passages.append(Passage(pid, record["text"], record.get("title") or None))
    if not passages:
        raise DataError(f"{path}: no passages")
    return passages


def read_prompt(path: str | None) -> str:
    """The few-shot generation prompt: a text with ``{title}`` and ``{text}`` (default: the packaged one)."""
    path = path or PROMPT_FILE
    with fileio.open_file(path) as f:
        prompt = f.read()
    if "{text}" not in prompt:
        raise ConfigError(f"{path}: the prompt has no {{text}} placeholder for the passage")
    return prompt


# ---------------------------------------------------------------- generate


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """FRet step 1: a task and a query for each passage.

    Attributes:
      max_new_tokens: tokens for the task and, again, for the query.
      temperature, top_p, seed: sampling (see `decode.SamplingConfig`).
      max_passage_tokens: the passage is cut to this many tokens in the prompt.
    """

    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    max_passage_tokens: int = 384


def _first_line(lm, ids: Sequence[int]) -> str:
    return lm.decode(list(ids)).split("\n", 1)[0].strip()


def _cut(lm, text: str, limit: int) -> str:
    ids = lm.encode(text, specials=False)
    return text if len(ids) <= limit else lm.decode(ids[:limit])


def fill_prompt(template: str, passage: Passage) -> str:
    title = f"{passage.title}: " if passage.title else ""
    return template.replace("{title}", title).replace("{text}", passage.text)


def generate_work(lm, template: str, config: GenerateConfig, batch) -> ShardFn:
    """The generate job's shard function: passages -> {seed_id, title, passage, task, query} rows."""
    from embedder.lm import decode

    sampling = decode.SamplingConfig(config.max_new_tokens, config.temperature, config.top_p, config.seed)
    template = template.rstrip("\n")

    def work(passages: Sequence[Passage], start: int):
        cut = [dataclasses.replace(p, text=_cut(lm, p.text, config.max_passage_tokens)) for p in passages]
        prompts = [fill_prompt(template, p) for p in cut]
        # Two random streams per row (task, query): row ids 2r and 2r + 1.
        ids = [2 * (start + i) for i in range(len(passages))]
        stops = lm.line_break_ids  # the task and the query end at a line break
        task_ids = decode.generate(lm, [lm.encode(p) for p in prompts], sampling, batch, ids, stops)
        tasks = [_first_line(lm, t) for t in task_ids]
        query_prompts = [lm.encode(f"{p} {t}\nQuery:") for p, t in zip(prompts, tasks, strict=True)]
        query_ids = decode.generate(lm, query_prompts, sampling, batch, [i + 1 for i in ids], stops)
        rows = [
            {
                "seed_id": p.id,
                **({"title": p.title} if p.title else {}),
                "passage": p.text,
                "task": task,
                "query": _first_line(lm, q),
            }
            for p, task, q in zip(passages, tasks, query_ids, strict=True)
        ]
        return rows, None

    return work


# ---------------------------------------------------------------- rerank and filter


def neighbours(embedder, queries: Sequence[str], corpus: Sequence[str], top_n: int, batch_size: int = 32):
    """The embedder's top_n corpus rows for each query, by exact search.

    Returns:
      (cosines [q, n], corpus ids [q, n], query embeddings, corpus embeddings).
    """
    from embedder import search

    q = embedder.encode(list(queries), kind="query", batch_size=batch_size)
    d = embedder.encode(list(corpus), kind="document", batch_size=batch_size)
    scores, ids = search.cosine_top_k(q, d, top_n)
    return scores[0], ids[0], q, d


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def rerank_work(lm, passages: Sequence[Passage], candidates, config, batch) -> ShardFn:
    """The rerank job's shard function: generated rows -> training rows and their candidates.

    Args:
      lm: the LanguageModel.
      passages: the corpus.
      candidates: per input row, (corpus ids, embedder cosines, seed index or None),
        the seed appended where the embedder did not retrieve it.
      config: a `rerank.RerankConfig`.
      batch: the `decode.BatchConfig` of the scoring.
    """
    from embedder.lm import rerank

    def work(rows: Sequence[dict[str, Any]], start: int):
        pairs, spans = [], []
        for offset, row in enumerate(rows):
            ids, _, _ = candidates[start + offset]
            spans.append((len(pairs), len(ids) if row["query"] else 0))
            if row["query"]:
                pairs += [(row["query"], passages[c].title, passages[c].text) for c in ids]
        likelihood, relevance = rerank.score_pairs(lm, pairs, config, batch) if pairs else ([], [])
        out, details = [], []
        for offset, (row, (lo, n)) in enumerate(zip(rows, spans, strict=True)):
            if not row["query"]:
                continue  # an empty generated query: nothing to train on
            ids, cosines, seed = candidates[start + offset]
            fused = rerank.fuse(likelihood[lo : lo + n], relevance[lo : lo + n], config, seed, cosines)
            positive = passages[ids[fused.positive]]
            example = {"query": row["query"], "positive": positive.text}
            negatives = [passages[ids[i]].text for i in fused.negatives]
            if negatives:
                example["negatives"] = negatives
            # The LM's relevance (log p(yes) - log p(no)) of the positive, then of each
            # negative: the JSONL `scores` the given-scores loss terms train on.
            scores = [float(relevance[lo + i]) for i in (fused.positive, *fused.negatives)]
            if all(np.isfinite(scores)):
                example["scores"] = scores
            if row.get("task"):
                example["task"] = row["task"]
            if positive.title:
                example["title"] = positive.title
            out.append(example)
            details.append(
                {
                    "query": row["query"],
                    "seed_id": row.get("seed_id"),
                    "positive_id": positive.id,
                    "negative_ids": [passages[ids[i]].id for i in fused.negatives],
                    "relabelled": fused.relabelled,
                    "candidates": [
                        {"id": passages[c].id, **record} for c, record in zip(ids, fused.records, strict=True)
                    ],
                }
            )
        return out, details

    return work


def rerank_candidates(
    embedder, rows: Sequence[dict[str, Any]], passages: Sequence[Passage], top_n: int, seeds: Sequence[Any]
) -> list[tuple[list[int], list[float], int | None]]:
    """Each row's candidates: the embedder's top_n passages, plus its seed passage if missed.

    Args:
      embedder: an `inference.Embedder`.
      rows: rows with a "query".
      passages: the corpus.
      top_n: neighbours per query.
      seeds: per row, the corpus index of its seed passage, or None.
    """
    texts = [f"{p.title}: {p.text}" if p.title else p.text for p in passages]
    scores, ids, q, d = neighbours(embedder, [r["query"] for r in rows], texts, top_n)
    out = []
    for r, seed in enumerate(seeds):
        cand, cos = [int(i) for i in ids[r]], [float(s) for s in scores[r]]
        if seed is not None and seed not in cand:
            cand.append(seed)
            cos.append(_cosine(q[r], d[seed]))
        out.append((cand, cos, cand.index(seed) if seed is not None else None))
    return out


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """Gemini's LLM filter: keep the pairs the LM judges relevant.

    Attributes:
      keep_fraction: keep this fraction of the pairs, the highest relevance first
        (ties by input order); or
      threshold: keep pairs with relevance (log p(yes) - log p(no)) >= this.
    """

    keep_fraction: float | None = None
    threshold: float | None = None

    def __post_init__(self):
        if (self.keep_fraction is None) == (self.threshold is None):
            raise ConfigError("give exactly one of --keep_fraction and --threshold")
        if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
            raise ConfigError(f"--keep_fraction={self.keep_fraction}: expected in (0, 1]")

    def kept(self, relevance: Sequence[float]) -> np.ndarray:
        """[n] bool: which pairs stay."""
        scores = np.asarray(relevance, np.float64)
        if self.threshold is not None:
            return scores >= self.threshold
        count = int(np.ceil(self.keep_fraction * len(scores)))
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        keep = np.zeros(len(scores), bool)
        keep[order[:count]] = True
        return keep


def filter_work(lm, examples, config, batch, candidates=None, corpus=None) -> ShardFn:
    """The filter job's scoring shard function: examples -> {"index", "relevance"} rows.

    Args:
      lm: the LanguageModel.
      examples: the input pairs.
      config: a `rerank.RerankConfig` (the relevance prompt; the negative window).
      batch: the `decode.BatchConfig` of the scoring.
      candidates: optional, per example, (corpus ids, embedder cosines, index of
        its own positive) (`rerank_candidates`): the candidates are reranked by
        the LM, the positive kept, and the row gets `negatives` from the window
        and each candidate's `candidates` record.
      corpus: the passages the candidate ids index (the input's positives).
    """
    from embedder.lm import rerank

    def work(chunk, start: int):
        pairs = [(e.query, e.title, e.positive) for e in chunk]
        _, relevance = rerank.score_pairs(lm, pairs, config, batch)
        rows = [{"index": start + i, "relevance": float(r)} for i, r in enumerate(relevance)]
        if candidates is None:
            return rows, None
        spans, pairs = [], []
        for i, example in enumerate(chunk):
            ids = candidates[start + i][0]
            spans.append((len(pairs), len(ids)))
            pairs += [(example.query, corpus[c].title, corpus[c].text) for c in ids]
        likelihood, llm_relevance = rerank.score_pairs(lm, pairs, config, batch)
        for i, (row, (lo, n)) in enumerate(zip(rows, spans, strict=True)):
            ids, cosines, own = candidates[start + i]
            fused = rerank.fuse(
                likelihood[lo : lo + n], llm_relevance[lo : lo + n], config, own, cosines, keep_seed=True
            )
            row["negatives"] = [corpus[ids[c]].text for c in fused.negatives]
            row["candidates"] = [
                {"id": corpus[c].id, **record} for c, record in zip(ids, fused.records, strict=True)
            ]
        return rows, None

    return work


def positives_corpus(examples) -> tuple[list[Passage], list[int]]:
    """The distinct positives of `examples` as passages, and each example's index among them."""
    corpus, index, own = [], {}, []
    for example in examples:
        key = (example.positive, example.title)
        if key not in index:
            index[key] = len(corpus)
            corpus.append(Passage(str(len(corpus)), example.positive, example.title))
        own.append(index[key])
    return corpus, own


def write_filtered(output: str, examples, scores_dir: str, config: FilterConfig, job: dict[str, Any]) -> dict:
    """The kept examples as shards beside the scores (process 0, after scoring); the manifest last.

    Returns:
      The manifest, with the number kept and the relevance threshold used.
    """
    from embedder.data import jsonl

    scored = read_output(scores_dir)
    relevance = [row["relevance"] for row in scored]
    keep = config.kept(relevance)
    manifest = read_manifest(scores_dir)
    plan = ShardPlan(len(examples), manifest["shard_size"])
    finished = []
    for i in range(plan.num_shards):
        name = shard_name(i, plan.num_shards)
        kept = [
            # New negatives: the input's scores (if any) no longer line up with them.
            dataclasses.replace(examples[r], negatives=tuple(scored[r]["negatives"]), scores=None)
            if "negatives" in scored[r]
            else examples[r]
            for r in plan.rows(i)
            if keep[r]
        ]
        if kept:
            jsonl.write_jsonl(os.path.join(output, name), kept)
        finished.append({"name": name, "rows": len(kept)})
    kept_scores = [s for s, k in zip(relevance, keep, strict=True) if k]
    result = {
        "job": job,
        "num_rows": len(examples),
        "shard_size": plan.shard_size,
        "num_shards": plan.num_shards,
        "finished": finished,
        "complete": True,
        "kept": int(keep.sum()),
        "lowest_kept_relevance": min(kept_scores) if kept_scores else None,
    }
    fileio.write_json(os.path.join(output, MANIFEST), result)
    return result
