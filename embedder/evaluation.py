"""Retrieval and STS evaluation: metrics (pure numpy), Matryoshka sizes, evaluators.

Retrieval metrics are trec_eval's, as BEIR reports them through pytrec_eval
(Thakur et al. 2021, "BEIR", §4; trec_eval: https://github.com/usnistgov/trec_eval):

* Ranking: documents by descending score; equal scores by descending document
  id (trec_eval's `comp_sim_docno`, a strcmp with the operands swapped).
* A document is relevant when its judged relevance is >= 1 (trec_eval's default
  relevance level); unjudged documents have relevance 0.
* nDCG@k (trec_eval `ndcg_cut`; Järvelin & Kekäläinen 2002) with linear gains:
  DCG@k = sum_{i=1..k} max(rel_i, 0) / log2(i + 1), divided by the DCG@k of the
  ideal ordering of all the query's judged relevances; 0 when that is 0.
* Recall@k (trec_eval `recall`): |relevant in the top k| / |relevant|.
* MAP@k (trec_eval `map_cut`): sum over relevant documents at ranks i <= k of
  precision@i, divided by |relevant| (not by min(k, |relevant|)).
* MRR@k (BEIR's `mrr`): 1 / the rank of the first relevant document within the
  top k, else 0.
* Every judged query counts in the mean, one with no relevant document as 0
  (trec_eval -c).

STS: Spearman's rank correlation (Pearson's r of the ranks, ties given their
average rank, as `scipy.stats.spearmanr`) and Pearson's r between the cosine
similarity of each pair and its gold score.

A Matryoshka size d is the embedding's first d values, re-normalised; every
metric is computed for every size from one encoding pass, and the retrieval
search scores all sizes in one sweep over the corpus (`search.cosine_top_k`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import numpy as np

from embedder import matryoshka, search
from embedder.data import eval_tasks
from embedder.data import prompts as prompts_lib
from embedder.errors import ConfigError, DataError

DEFAULT_K_VALUES = (1, 3, 5, 10, 100)
RETRIEVAL_METRICS = ("ndcg", "recall", "mrr", "map")
STS_METRICS = ("spearman", "pearson")
RELEVANCE_LEVEL = 1


class Encoder(Protocol):
    """Embeds texts: [len(texts), dim] float32, in input order.

    kind is "query" or "document"; task is the queries' prompt task (None: the
    model's default; ignored by models trained without prompts).
    """

    def __call__(self, texts: Sequence[str], kind: str, task: str | None = None) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """How evaluation during training runs.

    Attributes:
      batch_size: texts per forward pass at the length limit; shorter texts go
        more per pass, to the same token count (`Embedder.encode`).
      k_values: the cut-offs of the retrieval metrics.
      dims: Matryoshka sizes to report; None: the loss's Matryoshka dims (or the
        full size when there are none).
      search_block: corpus rows scored at once per device.
    """

    batch_size: int = 64
    k_values: tuple[int, ...] = DEFAULT_K_VALUES
    dims: tuple[int, ...] | None = None
    search_block: int = 2048


# ---------------------------------------------------------------- retrieval metrics


def trec_order(scores: Mapping[str, float]) -> list[str]:
    """Document ids by descending score, ties by descending id (trec_eval's order).

    Args:
      scores: {doc id: score} of one query.

    Returns:
      The ids, best first.
    """
    return sorted(scores, key=lambda doc: (scores[doc], doc), reverse=True)


def _fit(rows: np.ndarray, width: int) -> np.ndarray:
    """Truncates or zero-pads the columns of a [q, n] array to `width`."""
    rows = rows[:, :width]
    return np.pad(rows, ((0, 0), (0, width - rows.shape[1])))


def ranking_metrics(
    ranked_relevance: np.ndarray,
    judged_relevance: np.ndarray,
    num_relevant: np.ndarray,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
) -> dict[str, np.ndarray]:
    """Per-query nDCG@k, Recall@k, MRR@k and MAP@k (definitions in the module docstring).

    Args:
      ranked_relevance: [queries, n] the judged relevance of the document at each
        rank, best first (0 where unjudged); n may be shorter than max(k_values)
        (fewer documents retrieved: the rest count as non-relevant).
      judged_relevance: [queries, m] every relevance the query's qrels hold, any
        order, zero-padded (the ideal ranking is these, sorted).
      num_relevant: [queries] how many judged documents have relevance >= 1.
      k_values: the cut-offs.

    Returns:
      {"ndcg@k": [queries], "recall@k": ..., "mrr@k": ..., "map@k": ...} float64.
    """
    if min(k_values) < 1:
        raise ConfigError(f"k_values {tuple(k_values)} must be positive")
    depth = max(k_values)
    ranked = _fit(np.asarray(ranked_relevance, np.float64), depth)  # [q, depth]
    ideal = _fit(-np.sort(-np.asarray(judged_relevance, np.float64), axis=1), depth)
    num_relevant = np.asarray(num_relevant, np.float64)
    ranks = np.arange(1, depth + 1, dtype=np.float64)
    discount = 1.0 / np.log2(ranks + 1)
    dcg = np.cumsum(np.maximum(ranked, 0) * discount, axis=1)
    ideal_dcg = np.cumsum(np.maximum(ideal, 0) * discount, axis=1)
    hits = ranked >= RELEVANCE_LEVEL
    hits_at = np.cumsum(hits, axis=1)
    precision_sum = np.cumsum(hits * hits_at / ranks, axis=1)
    first_hit = np.where(hits.any(axis=1), np.argmax(hits, axis=1) + 1, depth + 1)

    def ratio(numerator, denominator):
        return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)

    metrics: dict[str, np.ndarray] = {}
    for k in k_values:
        metrics[f"ndcg@{k}"] = ratio(dcg[:, k - 1], ideal_dcg[:, k - 1])
    for k in k_values:
        metrics[f"recall@{k}"] = ratio(hits_at[:, k - 1].astype(np.float64), num_relevant)
    for k in k_values:
        metrics[f"mrr@{k}"] = np.where(first_hit <= k, 1.0 / first_hit, 0.0)
    for k in k_values:
        metrics[f"map@{k}"] = ratio(precision_sum[:, k - 1], num_relevant)
    return metrics


def _judged_arrays(
    qrels: Mapping[str, Mapping[str, int]], query_ids: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """([queries, max judged] relevances, zero-padded; [queries] relevant counts)."""
    width = max((len(qrels.get(q, {})) for q in query_ids), default=0)
    judged = np.zeros((len(query_ids), max(width, 1)), np.float64)
    for i, q in enumerate(query_ids):
        values = list(qrels.get(q, {}).values())
        judged[i, : len(values)] = values
    return judged, (judged >= RELEVANCE_LEVEL).sum(axis=1)


def retrieval_metrics(
    run: Mapping[str, Mapping[str, float]],
    qrels: Mapping[str, Mapping[str, int]],
    k_values: Sequence[int] = DEFAULT_K_VALUES,
) -> dict[str, float]:
    """Mean retrieval metrics of a run, in pytrec_eval's input format.

    Args:
      run: {query id: {doc id: score}} (a query missing here retrieved nothing).
      qrels: {query id: {doc id: relevance}}; the mean is over these queries.
      k_values: the cut-offs.

    Returns:
      {"ndcg@10": mean, ...} as in `ranking_metrics`.
    """
    query_ids = list(qrels)
    if not query_ids:
        raise DataError("no judged queries")
    depth = max(k_values)
    ranked = np.zeros((len(query_ids), depth), np.float64)
    for i, q in enumerate(query_ids):
        top = trec_order(run.get(q, {}))[:depth]
        ranked[i, : len(top)] = [qrels[q].get(doc, 0) for doc in top]
    judged, num_relevant = _judged_arrays(qrels, query_ids)
    per_query = ranking_metrics(ranked, judged, num_relevant, k_values)
    return {name: float(values.mean()) for name, values in per_query.items()}


# ---------------------------------------------------------------- correlation


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the average of the ranks they span (scipy's "average")."""
    values = np.asarray(values)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    # Start of each run of equal values, and the run each sorted position belongs to.
    starts = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    run = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.concatenate([first[1:], [len(values)]]) - 1
    average = (first + last) / 2.0 + 1.0  # [runs]
    ranks = np.empty(len(values), np.float64)
    ranks[order] = average[run]
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r = cov(x, y) / (std(x) std(y)); NaN when either is constant (as scipy)."""
    x = np.asarray(x, np.float64) - np.mean(x)
    y = np.asarray(y, np.float64) - np.mean(y)
    denominator = math.sqrt(float(np.dot(x, x)) * float(np.dot(y, y)))
    if denominator == 0.0:
        return float("nan")
    return float(np.clip(np.dot(x, y) / denominator, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the average ranks (Spearman 1904; scipy.stats.spearmanr)."""
    return pearson(rankdata(x), rankdata(y))


# ---------------------------------------------------------------- Matryoshka


# The check of the sizes lives in `matryoshka`; the command line still calls it by this name.
check_dims = matryoshka.check_dims


def default_dims(full_dim: int) -> tuple[int, ...]:
    """The full size, then the powers of two below it down to 32 (or the full size when smaller)."""
    dims = [full_dim]
    d = 1 << (full_dim - 1).bit_length()
    while d // 2 >= min(32, full_dim):
        d //= 2
        if d < full_dim:
            dims.append(d)
    return tuple(dims)


# ---------------------------------------------------------------- evaluators


def _ranked_relevance(task: eval_tasks.RetrievalTask, row_ids: Sequence[str], top: np.ndarray) -> np.ndarray:
    """[..., queries, k] relevance of the retrieved rows (`top`, indices into `row_ids`)."""
    num_rows = len(row_ids)
    row_of = {doc: row for row, doc in enumerate(row_ids)}
    keys, values = [], []
    for i, q in enumerate(task.query_ids):
        for doc, relevance in task.qrels.get(q, {}).items():
            keys.append(i * num_rows + row_of[doc])
            values.append(relevance)
    keys = np.asarray(keys, np.int64)
    values = np.asarray(values, np.float64)
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    wanted = np.arange(len(task.query_ids), dtype=np.int64)[:, None] * num_rows + top.astype(np.int64)
    where = np.clip(np.searchsorted(keys, wanted), 0, max(len(keys) - 1, 0))
    found = (keys[where] == wanted) if len(keys) else np.zeros(wanted.shape, bool)
    return np.where(found, values[where] if len(keys) else 0.0, 0.0)


def evaluate_retrieval(
    task: eval_tasks.RetrievalTask,
    encoder: Encoder,
    dims: Sequence[int] | None = None,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    devices: Sequence[jax.Device] | None = None,
    search_block: int = 2048,
    precisions: Sequence[str] = (),
    rescore_multiplier: int = 4,
) -> dict[str, Any]:
    """Encodes a retrieval task's queries and corpus once and scores every Matryoshka size.

    Args:
      task: the queries, corpus and qrels.
      encoder: embeds texts ("query" / "document").
      dims: Matryoshka sizes; None: the full size.
      k_values: metric cut-offs.
      devices: devices the exact search is sharded over (default all).
      search_block: corpus rows scored at once per device.
      precisions: also search the corpus as a `quantization.QuantizedIndex` of each
        of these precisions ("float32", "int8", "binary"), at every size.
      rescore_multiplier: the indexes' candidates per result rescored in float32.

    Returns:
      {"type": "retrieval", "num_queries", "num_documents", "metrics": {dim: {"ndcg@10": ...}}},
      with precisions also "precisions": {precision: {"metrics": {dim: {...}},
      "index_bytes": {dim: bytes in memory}, "rescore_multiplier": int}}.
    """
    if not any(relevance > 0 for judged in task.qrels.values() for relevance in judged.values()):
        raise DataError(
            f"eval task {task.name}: every qrels relevance is 0, so every metric would be 0; "
            "relevant documents need a relevance >= 1"
        )
    query_embeddings = encoder(task.queries, "query", task.prompt_task)
    doc_embeddings = encoder(task.documents, "document", None)  # documents take a title, not a task
    dims = check_dims(dims, query_embeddings.shape[1])
    # The search breaks ties by the lower row; trec_eval by the higher id: rows in descending id order.
    rows = sorted(range(len(task.doc_ids)), key=task.doc_ids.__getitem__, reverse=True)
    row_ids = [task.doc_ids[r] for r in rows]
    _, top = search.cosine_top_k(
        query_embeddings, doc_embeddings[rows], max(k_values), dims, devices=devices, block_size=search_block
    )  # [dims, queries, k]
    ranked = _ranked_relevance(task, row_ids, top)
    judged, num_relevant = _judged_arrays(task.qrels, task.query_ids)
    metrics = {}
    for j, dim in enumerate(dims):
        per_query = ranking_metrics(ranked[j], judged, num_relevant, k_values)
        metrics[dim] = {name: float(values.mean()) for name, values in per_query.items()}
    result = {
        "type": "retrieval",
        "num_queries": len(task.query_ids),
        "num_documents": len(task.doc_ids),
        "metrics": metrics,
    }
    if precisions:
        result["precisions"] = {
            precision: _index_metrics(
                task,
                row_ids,
                query_embeddings,
                doc_embeddings[rows],
                dims,
                k_values,
                precision,
                rescore_multiplier,
            )
            for precision in precisions
        }
    return result


def _index_metrics(
    task: eval_tasks.RetrievalTask,
    row_ids: Sequence[str],
    query_embeddings: np.ndarray,
    doc_embeddings: np.ndarray,
    dims: Sequence[int],
    k_values: Sequence[int],
    precision: str,
    rescore_multiplier: int,
) -> dict[str, Any]:
    """The task's metrics searched through a `QuantizedIndex` of one precision, at each size."""
    from embedder import quantization

    judged, num_relevant = _judged_arrays(task.qrels, task.query_ids)
    metrics, index_bytes = {}, {}
    for dim in dims:
        queries = matryoshka.prefix(query_embeddings, dim)
        index = quantization.QuantizedIndex.build(matryoshka.prefix(doc_embeddings, dim), precision)
        _, top = index.search(queries, max(k_values), rescore_multiplier=rescore_multiplier)
        per_query = ranking_metrics(_ranked_relevance(task, row_ids, top), judged, num_relevant, k_values)
        metrics[dim] = {name: float(values.mean()) for name, values in per_query.items()}
        index_bytes[dim] = index.nbytes
    return {"metrics": metrics, "index_bytes": index_bytes, "rescore_multiplier": rescore_multiplier}


def evaluate_sts(
    task: eval_tasks.STSTask, encoder: Encoder, dims: Sequence[int] | None = None
) -> dict[str, Any]:
    """Spearman and Pearson between each pair's cosine and its gold score, for every size.

    Returns:
      {"type": "sts", "num_pairs", "metrics": {dim: {"spearman": ..., "pearson": ...}}}.
    """
    if len(task.scores) < 2 or np.ptp(np.asarray(task.scores, np.float64)) == 0:
        raise DataError(
            f"eval task {task.name}: the gold scores are all equal ({len(task.scores)} pairs), so Spearman "
            "and Pearson correlations are undefined; the task needs pairs of different scores"
        )
    first = encoder(task.sentences1, "query", task.prompt_task)
    second = encoder(task.sentences2, "query", task.prompt_task)
    dims = check_dims(dims, first.shape[1])
    metrics = {}
    for dim in dims:
        cosine = np.sum(matryoshka.prefix(first, dim) * matryoshka.prefix(second, dim), axis=1)
        metrics[dim] = {"spearman": spearman(cosine, task.scores), "pearson": pearson(cosine, task.scores)}
    return {"type": "sts", "num_pairs": len(task.scores), "metrics": metrics}


def evaluate(
    tasks: Sequence[eval_tasks.Task],
    encoder: Encoder,
    dims: Sequence[int] | None = None,
    k_values: Sequence[int] = DEFAULT_K_VALUES,
    devices: Sequence[jax.Device] | None = None,
    search_block: int = 2048,
    precisions: Sequence[str] = (),
    rescore_multiplier: int = 4,
) -> dict[str, dict[str, Any]]:
    """Runs every task.

    Args:
      tasks, encoder, dims, k_values, devices, search_block: see `evaluate_retrieval`.
      precisions, rescore_multiplier: retrieval tasks also searched through
        quantised indexes (see `evaluate_retrieval`); STS tasks compare pairs, not
        an index, and ignore them.

    Returns:
      {task name: the task's result (see evaluate_retrieval / evaluate_sts) plus "seconds"}.
    """
    names = [task.name for task in tasks]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"eval tasks named more than once: {repeated}")
    results = {}
    for task in tasks:
        start = time.perf_counter()
        if isinstance(task, eval_tasks.RetrievalTask):
            result = evaluate_retrieval(
                task, encoder, dims, k_values, devices, search_block, precisions, rescore_multiplier
            )
        else:
            result = evaluate_sts(task, encoder, dims)
        result["seconds"] = time.perf_counter() - start
        results[task.name] = result
    return results


def metric_names(task: eval_tasks.Task, k_values: Sequence[int] = DEFAULT_K_VALUES) -> list[str]:
    """The metrics a task reports, in report order."""
    if isinstance(task, eval_tasks.RetrievalTask):
        return [f"{m}@{k}" for m in RETRIEVAL_METRICS for k in k_values]
    return list(STS_METRICS)


def scalar_names(
    tasks: Sequence[eval_tasks.Task], dims: Sequence[int], k_values=DEFAULT_K_VALUES
) -> list[str]:
    """The names `scalars` gives, known before anything is encoded (to check a best_metric early)."""
    fake = {
        task.name: {"metrics": {d: dict.fromkeys(metric_names(task, k_values), 0.0) for d in dims}}
        for task in tasks
    }
    return list(scalars(fake))


def scalars(results: Mapping[str, Mapping[str, Any]], prefix: str = "eval") -> dict[str, float]:
    """Flat scalar names for TensorBoard, metrics.jsonl and the best-checkpoint choice.

    `eval/TASK/METRIC` is the full size; `eval/TASK/METRIC/dim_D` each size (the
    full one too, as the training loss does); `eval/METRIC` the mean over the tasks
    that report METRIC, at the full size.
    """
    out: dict[str, float] = {}
    per_metric: dict[str, list[float]] = {}
    for name, result in results.items():
        by_dim = result["metrics"]
        full = max(by_dim)
        for metric, value in by_dim[full].items():
            out[f"{prefix}/{name}/{metric}"] = value
            per_metric.setdefault(metric, []).append(value)
        for dim, values in by_dim.items():
            for metric, value in values.items():
                out[f"{prefix}/{name}/{metric}/dim_{dim}"] = value
    for metric, values in per_metric.items():
        out[f"{prefix}/{metric}"] = float(np.mean(values))
    return out


def headline_metrics(result: Mapping[str, Any]) -> list[str]:
    """The few metrics a table shows: @10 (or the nearest cut-off) of each kind, and recall at the deepest."""
    names = list(next(iter(result["metrics"].values())))
    if result["type"] != "retrieval":
        return names
    ks = sorted({int(n.split("@")[1]) for n in names})
    k = min(ks, key=lambda x: (abs(x - 10), x))
    shown = [f"{m}@{k}" for m in RETRIEVAL_METRICS]
    if ks[-1] != k:
        shown.append(f"recall@{ks[-1]}")
    return shown


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A plain-text table: one row per (task, size), the headline metrics as columns."""
    lines = []
    for name, result in results.items():
        columns = headline_metrics(result)
        size = (
            f"{result['num_queries']} queries, {result['num_documents']} documents"
            if result["type"] == "retrieval"
            else f"{result['num_pairs']} pairs"
        )
        lines.append(f"{name} ({size}, {result.get('seconds', 0.0):.1f}s)")
        lines.append(f"{'dim':>6}" + "".join(f"{c:>12}" for c in columns))
        for dim, values in result["metrics"].items():
            lines.append(f"{dim:>6}" + "".join(f"{values[c]:>12.4f}" for c in columns))
        for precision, record in result.get("precisions", {}).items():
            lines.append(f"  {precision} index, rescored x{record['rescore_multiplier']}")
            for dim, values in record["metrics"].items():
                cells = "".join(f"{values[c]:>12.4f}" for c in columns)
                lines.append(f"{dim:>6}{cells}  {record['index_bytes'][dim]:>10} bytes")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


class TrainingEvaluator:
    """Evaluates the parameters of a running training job, on every process.

    The tasks are loaded once; each call encodes with the current (sharded)
    parameters through an `inference.Embedder` on the training mesh (the same
    loop, prompts and task names as `Embedder.encode` and `embedder eval`) and
    searches over all of the mesh's devices.

    Args:
      task_specs: task names, folders or files (see `data.eval_tasks`).
      module: the DualEncoder being trained.
      tokenizer: its tokenizer.
      mesh: the training mesh.
      config: batch size, cut-offs, sizes.
      default_dims: the sizes when config.dims is None (the loss's Matryoshka dims).
      max_length: {"query": tokens, "document": tokens}.
      prompts: the prompts the model is trained with (None: none).
    """

    def __init__(
        self,
        task_specs: Sequence[str],
        module: Any,
        tokenizer: Any,
        mesh: jax.sharding.Mesh,
        config: EvalConfig,
        default_dims: Sequence[int] | None,
        max_length: Mapping[str, int],
        prompts: prompts_lib.PromptConfig | None = None,
    ):
        from embedder import inference

        if not task_specs:
            raise ConfigError(
                "eval_every is set but there are no eval_tasks (e.g. ['stdlib_code_search_validation'])"
            )
        self.tasks = [eval_tasks.load_task(spec) for spec in task_specs]
        self.config = config
        self.dims = check_dims(config.dims or default_dims, module.embedding_dim)
        self.embedder = inference.Embedder(module, None, tokenizer, max_length, prompts, mesh=mesh)
        self.devices = list(mesh.devices.flat)

    def scalar_names(self) -> list[str]:
        return scalar_names(self.tasks, self.dims, self.config.k_values)

    def __call__(self, params: Any) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
        """(results by task, flat scalars) of `params`."""
        self.embedder.params = params
        try:
            results = evaluate(
                self.tasks,
                embedder_encoder(self.embedder, self.config.batch_size),
                self.dims,
                self.config.k_values,
                self.devices,
                self.config.search_block,
            )
        finally:
            self.embedder.params = None  # the evaluator does not keep a training state alive
        return results, scalars(results)


def embedder_encoder(embedder: Any, batch_size: int) -> Encoder:
    """The `Encoder` of an `inference.Embedder`: each task's queries get its prompt task.

    `embedder eval`, evaluation during training and the soup's held-out score
    all encode through this.
    """

    def encode(texts: Sequence[str], kind: str, task: str | None = None) -> np.ndarray:
        return embedder.encode(texts, kind=kind, task=task, batch_size=batch_size)

    return encode
