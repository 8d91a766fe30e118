"""Evaluation: metrics against hand-computed values, pytrec_eval and scipy; the sharded search
against brute force; the evaluators end to end; task files and their errors."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pytrec_eval
import scipy.stats

from embedder import errors, evaluation, matryoshka, search
from embedder.data import eval_tasks

# ---------------------------------------------------------------- retrieval metrics, by hand
#
# q1: qrels a=2, b=1, c=0, e=3 (e never retrieved); run a .9, d .7, b .5, c .5.
#   trec_eval order: a, d, then the tie b/c by descending id: c, b  ->  rels 2, 0, 0, 1.
#   relevant (rel >= 1): a, b, e -> 3.
#   DCG@3 = 2/log2(2) = 2;  IDCG@3 = 3/log2(2) + 2/log2(3) + 1/log2(4)  (ideal rels 3, 2, 1)
#   DCG@5 = 2 + 1/log2(5);  IDCG@5 = IDCG@3 (the fourth ideal rel is 0)
#   recall@1 = recall@3 = 1/3, recall@5 = 2/3;  MRR@1 = 1
#   MAP@3 = P@1 / 3 = 1/3;  MAP@5 = (P@1 + P@4) / 3 = (1 + 2/4) / 3 = 1/2
# q2: qrels x=1; run x .3, y .3: the tie puts y first -> x at rank 2.
#   nDCG@1 = 0, nDCG@3 = 1/log2(3); recall@1 = 0, recall@3 = 1; MRR@1 = 0, MRR@3 = 1/2; MAP@3 = 1/2
# q3: qrels z=0 only (nothing relevant): every metric 0, and it counts in the mean.
IDCG3 = 3 + 2 / math.log2(3) + 0.5
HAND = {
    "q1": (
        {"a": 2, "b": 1, "c": 0, "e": 3},
        {"a": 0.9, "d": 0.7, "b": 0.5, "c": 0.5},
        {
            "ndcg@1": 2 / 3,
            "ndcg@3": 2 / IDCG3,
            "ndcg@5": (2 + 1 / math.log2(5)) / IDCG3,
            "recall@1": 1 / 3,
            "recall@3": 1 / 3,
            "recall@5": 2 / 3,
            "mrr@1": 1.0,
            "mrr@3": 1.0,
            "mrr@5": 1.0,
            "map@1": 1 / 3,
            "map@3": 1 / 3,
            "map@5": 1 / 2,
        },
    ),
    "q2": (
        {"x": 1},
        {"x": 0.3, "y": 0.3},
        {
            "ndcg@1": 0.0,
            "ndcg@3": 1 / math.log2(3),
            "ndcg@5": 1 / math.log2(3),
            "recall@1": 0.0,
            "recall@3": 1.0,
            "recall@5": 1.0,
            "mrr@1": 0.0,
            "mrr@3": 0.5,
            "mrr@5": 0.5,
            "map@1": 0.0,
            "map@3": 0.5,
            "map@5": 0.5,
        },
    ),
    "q3": ({"z": 0}, {"z": 1.0}, dict.fromkeys(["ndcg@1", "ndcg@3", "ndcg@5"], 0.0)),
}


@pytest.mark.parametrize("query", sorted(HAND))
def test_metrics_match_hand_computed_values(query):
    qrels, run, expected = HAND[query]
    got = evaluation.retrieval_metrics({query: run}, {query: qrels}, k_values=(1, 3, 5))
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_mean_counts_every_judged_query():
    qrels = {q: HAND[q][0] for q in HAND}
    run = {q: HAND[q][1] for q in HAND}
    got = evaluation.retrieval_metrics(run, qrels, k_values=(1, 3, 5))
    assert got["map@5"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)
    assert got["ndcg@3"] == pytest.approx((2 / IDCG3 + 1 / math.log2(3)) / 3)


def test_ties_follow_trec_eval_descending_id():
    assert evaluation.trec_order({"a": 1.0, "c": 1.0, "b": 1.0, "z": 0.5, "d": 2.0}) == [
        "d",
        "c",
        "b",
        "a",
        "z",
    ]


def _random_case(rng, num_queries=6, num_docs=25):
    """Graded qrels (-1..3) and a run with many exact ties (integer scores)."""
    docs = [f"d{i:02d}" for i in range(num_docs)]
    qrels, run = {}, {}
    for q in range(num_queries):
        judged = rng.choice(docs, size=rng.integers(1, 9), replace=False)
        qrels[f"q{q}"] = {str(d): int(rng.integers(-1, 4)) for d in judged}
        retrieved = rng.choice(docs, size=rng.integers(1, num_docs), replace=False)
        run[f"q{q}"] = {str(d): float(rng.integers(0, 6)) for d in retrieved}
    return qrels, run


def _mrr_reference(run, qrels, k):
    """BEIR's MRR@k, loop by loop: 1 / rank of the first relevant document in the top k."""
    total = 0.0
    for q, judged in qrels.items():
        for rank, doc in enumerate(evaluation.trec_order(run.get(q, {}))[:k], start=1):
            if judged.get(doc, 0) >= 1:
                total += 1.0 / rank
                break
    return total / len(qrels)


def test_metrics_match_pytrec_eval_with_ties_and_graded_qrels():
    """pytrec_eval (trec_eval's C code, what BEIR reports) on 100 random runs."""
    rng = np.random.default_rng(0)
    ks = (1, 3, 5, 10, 20)
    measures = {f"{m}.{','.join(map(str, ks))}" for m in ("ndcg_cut", "recall", "map_cut")}
    for _ in range(100):
        qrels, run = _random_case(rng)
        reference = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
        ours = evaluation.retrieval_metrics(run, qrels, ks)
        for k in ks:
            for name, trec_name in (("ndcg", "ndcg_cut"), ("recall", "recall"), ("map", "map_cut")):
                expected = np.mean([reference[q][f"{trec_name}_{k}"] for q in qrels])
                assert ours[f"{name}@{k}"] == pytest.approx(expected, abs=1e-12), (name, k)
            assert ours[f"mrr@{k}"] == pytest.approx(_mrr_reference(run, qrels, k), abs=1e-12)


# ---------------------------------------------------------------- correlation


@pytest.mark.parametrize("ties", [False, True])
def test_spearman_and_pearson_match_scipy(ties):
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = rng.integers(0, 5, 40).astype(float) if ties else rng.standard_normal(40)
        y = x + rng.standard_normal(40)
        if ties:
            y = np.round(y)
        assert evaluation.spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)
        assert evaluation.pearson(x, y) == pytest.approx(scipy.stats.pearsonr(x, y).statistic, abs=1e-12)
    assert np.array_equal(evaluation.rankdata([3, 1, 3, 2]), scipy.stats.rankdata([3, 1, 3, 2]))


def test_constant_input_has_no_correlation():
    assert math.isnan(evaluation.spearman([1, 1, 1], [1, 2, 3]))


# ---------------------------------------------------------------- Matryoshka sizes


def test_matryoshka_prefix_is_renormalised():
    x = np.array([[3.0, 4.0, 12.0]], np.float32)
    np.testing.assert_allclose(matryoshka.prefix(x, 2), [[0.6, 0.8]])
    assert evaluation.default_dims(384) == (384, 256, 128, 64, 32)
    assert evaluation.default_dims(32) == (32,)
    assert matryoshka.check_dims([64, 384, 64], 384) == (384, 64)
    with pytest.raises(ValueError, match=r"\[512\] are outside \[1, 384\]"):
        matryoshka.check_dims([512], 384)


def test_matryoshka_prefix_of_jax_arrays_and_zero_rows():
    x = np.array([[[3.0, 4.0, 12.0], [0.0, 0.0, 5.0]]], np.float32)  # [1, 2, 3]: any leading axes
    on_device = matryoshka.prefix(jnp.asarray(x), 2)
    assert isinstance(on_device, jax.Array)
    # By hand: (3, 4) / 5; the zero prefix stays zero (norm floor), not NaN.
    np.testing.assert_allclose(np.asarray(on_device), [[[0.6, 0.8], [0.0, 0.0]]], atol=1e-7)
    np.testing.assert_allclose(matryoshka.prefix(x, 2), np.asarray(on_device), atol=1e-7)
    traced = jax.jit(lambda v: matryoshka.prefix(v, 1))(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(traced), [[[1.0], [0.0]]])
    np.testing.assert_array_equal(matryoshka.prefix(x, 2, normalize=False), x[..., :2])
    assert matryoshka.check_dims(None, 8) == (8,)
    with pytest.raises(errors.ConfigError, match=r"\[0\] are outside \[1, 8\]"):
        matryoshka.check_dims([4, 0], 8)


# ---------------------------------------------------------------- the sharded, blocked search


def _brute_force(queries, corpus, k, dim):
    """numpy: normalise the prefixes, full score matrix, stable sort (ties: lower index)."""
    q = queries[:, :dim] / np.linalg.norm(queries[:, :dim], axis=1, keepdims=True)
    c = corpus[:, :dim] / np.linalg.norm(corpus[:, :dim], axis=1, keepdims=True)
    scores = q.astype(np.float64) @ c.T.astype(np.float64)
    ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, ids, axis=1), ids


def test_sharded_blocked_top_k_equals_brute_force():
    assert jax.device_count() == 8
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((70, 48)).astype(np.float32)
    corpus = rng.standard_normal((1003, 48)).astype(np.float32)  # not a multiple of 8 x 32
    dims = [48, 16, 8]
    scores, ids = search.cosine_top_k(queries, corpus, 10, dims, block_size=32, query_block=32)
    assert scores.shape == ids.shape == (3, 70, 10)
    for j, dim in enumerate(dims):
        expected_scores, expected_ids = _brute_force(queries, corpus, 10, dim)
        np.testing.assert_allclose(scores[j], expected_scores, atol=1e-5)
        np.testing.assert_array_equal(ids[j], expected_ids)


def test_search_ties_go_to_the_lower_index_across_blocks_and_devices():
    rng = np.random.default_rng(3)
    corpus = rng.standard_normal((203, 16)).astype(np.float32)
    query = corpus[150:151].copy()
    # Copies of the query's row in other blocks and on other devices: all score exactly 1.
    for row in (3, 77, 190):
        corpus[row] = corpus[150]
    scores, ids = search.cosine_top_k(query, corpus, 6, block_size=8)
    assert list(ids[0, 0, :4]) == [3, 77, 150, 190]
    np.testing.assert_allclose(scores[0, 0, :4], 1.0, atol=1e-6)


def test_search_k_above_corpus_size_and_one_device():
    rng = np.random.default_rng(4)
    queries, corpus = rng.standard_normal((5, 8)), rng.standard_normal((3, 8))
    scores, ids = search.cosine_top_k(queries, corpus, 10, devices=jax.devices()[:1])
    expected_scores, expected_ids = _brute_force(queries, corpus, 3, 8)
    np.testing.assert_array_equal(ids[0], expected_ids)
    np.testing.assert_allclose(scores[0], expected_scores, atol=1e-6)


# ---------------------------------------------------------------- evaluators end to end


class LookupEncoder:
    """Embeds each text as a fixed vector (no model): the evaluator's plumbing alone."""

    def __init__(self, vectors):
        self.vectors = vectors
        self.calls = []

    def __call__(self, texts, kind, task=None):
        self.calls.append((kind, task))
        return np.stack([self.vectors[t] for t in texts]).astype(np.float32)


def test_retrieval_evaluator_equals_metrics_of_a_brute_force_run():
    rng = np.random.default_rng(5)
    doc_ids = [f"doc{i:03d}" for i in range(150)]
    documents = [f"document {i}" for i in range(150)]
    queries = [f"query {i}" for i in range(40)]
    vectors = {t: rng.standard_normal(24) for t in documents + queries}
    # Exact duplicates: tied scores, which trec_eval orders by descending id.
    vectors["document 7"] = vectors["document 120"] = vectors["document 64"]
    vectors["query 0"] = vectors["document 64"]
    qrels = {
        f"q{i}": {doc_ids[j]: int(rng.integers(0, 3)) for j in rng.choice(150, 4, replace=False)}
        for i in range(40)
    }
    qrels["q0"] = {"doc007": 1, "doc120": 2, "doc064": 0}
    task = eval_tasks.RetrievalTask(
        "toy", tuple(qrels), tuple(queries), tuple(doc_ids), tuple(documents), qrels
    )
    encoder = LookupEncoder(vectors)
    result = evaluation.evaluate_retrieval(task, encoder, dims=[24, 8], k_values=(1, 5, 10), search_block=16)
    assert encoder.calls == [("query", None), ("document", None)]
    for dim in (24, 8):
        run = {}
        for q, text in zip(qrels, queries, strict=True):
            qv = matryoshka.prefix(vectors[text][None], dim)[0]
            scores = {
                d: float(np.float32(qv @ matryoshka.prefix(vectors[t][None], dim)[0]))
                for d, t in zip(doc_ids, documents, strict=True)
            }
            run[q] = scores
        expected = evaluation.retrieval_metrics(run, qrels, (1, 5, 10))
        for name, value in expected.items():
            assert result["metrics"][dim][name] == pytest.approx(value, abs=1e-9), (dim, name)
    # q0's three copies tie at the top: doc120 (rel 2), doc064 (0), doc007 (1).
    assert evaluation.retrieval_metrics({"q0": {"doc120": 1, "doc064": 1, "doc007": 1}}, {"q0": qrels["q0"]})[
        "ndcg@10"
    ] == pytest.approx((2 + 1 / 2) / (2 + 1 / math.log2(3)))


def test_sts_evaluator_and_scalar_names():
    rng = np.random.default_rng(6)
    first = [f"a{i}" for i in range(30)]
    second = [f"b{i}" for i in range(30)]
    vectors = {t: rng.standard_normal(16) for t in first + second}
    gold = rng.integers(0, 5, 30).astype(float)
    task = eval_tasks.STSTask("sts", tuple(first), tuple(second), gold)
    results = evaluation.evaluate([task], LookupEncoder(vectors), dims=[16, 4])
    for dim in (16, 4):
        cosine = [
            float(matryoshka.prefix(vectors[a][None], dim)[0] @ matryoshka.prefix(vectors[b][None], dim)[0])
            for a, b in zip(first, second, strict=True)
        ]
        assert results["sts"]["metrics"][dim]["spearman"] == pytest.approx(
            scipy.stats.spearmanr(cosine, gold).statistic, abs=1e-6
        )
    flat = evaluation.scalars(results)
    assert flat["eval/sts/spearman"] == results["sts"]["metrics"][16]["spearman"]
    assert flat["eval/sts/spearman/dim_4"] == results["sts"]["metrics"][4]["spearman"]
    assert flat["eval/spearman"] == flat["eval/sts/spearman"]
    assert sorted(flat) == sorted(evaluation.scalar_names([task], [16, 4]))


# ---------------------------------------------------------------- task files


def _write_beir(folder, qrels_lines, corpus=None):
    corpus = corpus or [{"_id": "d1", "title": "T", "text": "one"}, {"_id": "d2", "text": "two"}]
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (folder / "queries.jsonl").write_text(
        json.dumps({"_id": "q1", "text": "first?"})
        + "\n"
        + json.dumps({"_id": "q2", "text": "unjudged"})
        + "\n"
    )
    (folder / "qrels").mkdir(exist_ok=True)
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(qrels_lines))


def test_beir_folder_loads(tmp_path):
    _write_beir(tmp_path, ["q1\td1\t2\n", "q1\td2\t0\n"])
    task = eval_tasks.load_task(str(tmp_path))
    assert task.query_ids == ("q1",) and task.queries == ("first?",)
    assert task.doc_ids == ("d1", "d2") and task.documents == ("T one", "two")
    assert task.qrels == {"q1": {"d1": 2, "d2": 0}}


@pytest.mark.parametrize(
    "qrels_line, message",
    [
        ("q1\tnope\t1\n", r"test.tsv:2: corpus id 'nope' is not in corpus.jsonl"),
        ("q9\td1\t1\n", r"test.tsv:2: query id 'q9' is not in queries.jsonl"),
        ("q1\td1\thigh\n", r"test.tsv:2: score 'high' is not an integer"),
        ("q1 d1 1\n", r"test.tsv:2: expected 3 tab-separated fields"),
    ],
)
def test_bad_qrels_name_file_line_and_id(tmp_path, qrels_line, message):
    _write_beir(tmp_path, [qrels_line])
    with pytest.raises(eval_tasks.DataError, match=message):
        eval_tasks.load_task(str(tmp_path))


def test_bad_corpus_and_sts_lines_name_file_and_line(tmp_path):
    _write_beir(tmp_path, ["q1\td1\t1\n"], corpus=[{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}])
    with pytest.raises(eval_tasks.DataError, match=r"corpus.jsonl:2: duplicate _id 'd1' \(first on line 1\)"):
        eval_tasks.load_task(str(tmp_path))
    sts = tmp_path / "sts.jsonl"
    sts.write_text('{"sentence1": "a", "sentence2": "b", "score": 1}\n{"sentence1": "a", "sentence2": "b"}\n')
    with pytest.raises(eval_tasks.DataError, match=r"sts.jsonl:2: 'score' must be a finite number"):
        eval_tasks.load_task(str(sts))
    with pytest.raises(eval_tasks.DataError, match=r"not a built-in task"):
        eval_tasks.load_task("no_such_task")


def test_stdlib_code_search_task():
    task = eval_tasks.load_task("stdlib_code_search")
    assert task.name == "stdlib_code_search"
    assert len(task.query_ids) == len(task.queries) == len(task.qrels) > 300
    assert len(set(task.documents)) == len(task.documents)
    # Every judgement is relevant; a docstring shared by two functions has both as answers.
    assert all(r == 1 for judged in task.qrels.values() for r in judged.values())
    assert max(len(judged) for judged in task.qrels.values()) > 1
