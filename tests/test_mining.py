"""Hard-negative mining: the rank window, the positive, planted near-duplicates and false negatives.

Embeddings come from a table built here (each text's vector is chosen), so the
expected negatives are computed with a plain numpy ranking of the same vectors.
"""

import json

import numpy as np
import pytest

from embedder import cli, mining
from embedder.data import jsonl
from embedder.data.jsonl import Example

DIM = 16


def _unit(v):
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def planted():
    """20 examples; per example a near-duplicate of its positive and a near-positive decoy."""
    rng = np.random.default_rng(0)
    vectors = {}
    examples = []
    for i in range(20):
        positive = _unit(rng.normal(size=DIM))
        query = _unit(positive + 0.3 * rng.normal(size=DIM))
        vectors[f"q{i}"] = query
        vectors[f"p{i}"] = positive
        # Near-duplicate of the positive: cosine with it ~0.999 (above the 0.98 threshold).
        vectors[f"p{i} (copy)"] = _unit(positive + 0.02 * rng.normal(size=DIM))
        # Scores with the query just below the positive (within the margin), not a duplicate.
        decoy = _unit(query + 0.45 * rng.normal(size=DIM))
        vectors[f"decoy{i}"] = decoy
        examples.append(Example(f"q{i}", f"p{i}", negatives=("old",) if i == 0 else ()))
    for j in range(60):
        vectors[f"other{j}"] = _unit(rng.normal(size=DIM))
    vectors["old"] = _unit(rng.normal(size=DIM))
    corpus = [t for t in vectors if t.startswith(("p", "decoy", "other"))]
    return examples, vectors, corpus


def _encoder(vectors, calls=None):
    def encode(texts, kind):
        if calls is not None:
            calls.append(kind)
        return np.stack([vectors[t] for t in texts]).astype(np.float32)

    return encode


def _reference(examples, vectors, corpus, config):
    """Mining spelled out with a full numpy ranking."""
    texts = list(dict.fromkeys(list(corpus) + [e.positive for e in examples]))
    matrix = np.stack([vectors[t] for t in texts])
    expected = []
    for example in examples:
        query, positive = vectors[example.query], vectors[example.positive]
        scores = matrix @ query
        order = sorted(range(len(texts)), key=lambda r: (-scores[r], r))
        picked = []
        for rank in range(config.rank_start, min(config.rank_end, len(order))):
            row = order[rank]
            if texts[row] == example.positive:
                continue
            if matrix[row] @ positive >= config.duplicate_threshold:
                continue
            if scores[row] > query @ positive - config.margin:
                continue
            picked.append(texts[row])
        expected.append(picked[: config.num_negatives])
    return expected


@pytest.mark.parametrize(
    "config",
    [
        mining.MiningConfig(num_negatives=3, rank_start=0, rank_end=12),
        mining.MiningConfig(num_negatives=4, rank_start=10, rank_end=100),
        mining.MiningConfig(num_negatives=2, rank_start=0, rank_end=40, margin=0.0, duplicate_threshold=0.9),
    ],
    ids=["top-window", "ranks-10-100", "no-margin"],
)
def test_mined_negatives_follow_the_numpy_reference(planted, config):
    examples, vectors, corpus = planted
    calls = []
    result = mining.mine_hard_negatives(examples, _encoder(vectors, calls), config, corpus=corpus)
    assert sorted(calls) == ["document", "query"]  # the corpus once, the queries once
    expected = _reference(examples, vectors, corpus, config)
    for example, mined, want in zip(examples, result.examples, expected, strict=True):
        assert list(mined.negatives) == list(example.negatives) + want
        assert (mined.query, mined.positive, mined.task) == (example.query, example.positive, example.task)


def test_neither_the_positive_nor_planted_duplicates_nor_margin_violators(planted):
    examples, vectors, corpus = planted
    config = mining.MiningConfig(num_negatives=5, rank_start=0, rank_end=30)
    result = mining.mine_hard_negatives(examples, _encoder(vectors), config, corpus=corpus)
    assert result.skipped_duplicates >= 19  # the planted copies rank near the top of the window
    assert result.skipped_margin >= 10  # the decoys score within the margin of the positive
    for example, mined in zip(examples, result.examples, strict=True):
        new = [n for n in mined.negatives if n not in example.negatives]
        i = example.query[1:]
        assert len(new) == 5
        assert example.positive not in new
        assert f"p{i} (copy)" not in new
        query, positive = vectors[example.query], vectors[example.positive]
        for negative in new:
            assert vectors[negative] @ positive < config.duplicate_threshold
            assert vectors[negative] @ query <= query @ positive - config.margin + 1e-6


def test_sampling_is_seeded_and_stays_in_the_eligible_set(planted):
    examples, vectors, corpus = planted
    base = mining.MiningConfig(num_negatives=3, rank_start=0, rank_end=40)
    eligible = _reference(
        examples, vectors, corpus, mining.MiningConfig(num_negatives=40, rank_start=0, rank_end=40)
    )
    sampled = mining.mine_hard_negatives(
        examples, _encoder(vectors), mining.MiningConfig(**{**base.__dict__, "sample": True}), corpus
    )
    again = mining.mine_hard_negatives(
        examples, _encoder(vectors), mining.MiningConfig(**{**base.__dict__, "sample": True}), corpus
    )
    top = mining.mine_hard_negatives(examples, _encoder(vectors), base, corpus)
    assert [e.negatives for e in sampled.examples] == [e.negatives for e in again.examples]
    assert [e.negatives for e in sampled.examples] != [e.negatives for e in top.examples]
    for mined, allowed in zip(sampled.examples[1:], eligible[1:], strict=True):
        assert set(mined.negatives) <= set(allowed)


def test_small_corpus_reports_short_examples(planted):
    examples, vectors, _ = planted
    # Only the positives as the corpus: ranks 10-100 of 20 documents leave at most 10 candidates.
    config = mining.MiningConfig(num_negatives=12, rank_start=10, rank_end=100)
    result = mining.mine_hard_negatives(examples, _encoder(vectors), config)
    assert result.short == list(range(20))
    assert all(
        len(e.negatives) <= 10 + len(o.negatives) for e, o in zip(result.examples, examples, strict=True)
    )


def test_config_errors():
    with pytest.raises(ValueError, match="empty"):
        mining.MiningConfig(rank_start=5, rank_end=5)
    with pytest.raises(ValueError, match="fewer than"):
        mining.MiningConfig(num_negatives=8, rank_start=0, rank_end=4)
    with pytest.raises(ValueError, match="num_negatives"):
        mining.MiningConfig(num_negatives=0)


def test_embedder_mine_command(tmp_path, capsys):
    # The real MiniLM ranks a small code corpus; the output is valid JSONL for training.
    records = [
        {"query": f"return the {word} of a list", "positive": f"def {word}(xs):\n    return {expr}"}
        for word, expr in [
            ("sum", "sum(xs)"),
            ("maximum", "max(xs)"),
            ("minimum", "min(xs)"),
            ("length", "len(xs)"),
            ("first element", "xs[0]"),
            ("last element", "xs[-1]"),
            ("sorted copy", "sorted(xs)"),
            ("reversed copy", "xs[::-1]"),
            ("unique items", "set(xs)"),
            ("mean", "sum(xs) / len(xs)"),
        ]
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "def product(xs):\n    return math.prod(xs)\n" + "def noop():\n    pass\n", encoding="utf-8"
    )
    out = tmp_path / "mined.jsonl"
    argv = ["mine", "--model=all-MiniLM-L6-v2", f"--input={data}", f"--output={out}", "--num_negatives=2"]
    code = cli.main([*argv, "--rank_start=1", "--rank_end=8", f"--corpus={corpus}", "--margin=0"])
    assert code == 0, capsys.readouterr().err
    mined = jsonl.read_jsonl(out)
    assert [m.query for m in mined] == [r["query"] for r in records]
    for example in mined:
        assert len(example.negatives) == 2
        assert example.positive not in example.negatives
    assert "mined ranks [1, 8) for 10 examples" in capsys.readouterr().out

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"query": "q", "positive": "p"}\n{"query": "q"}\n')
    assert cli.main(["mine", "--model=all-MiniLM-L6-v2", f"--input={bad}", f"--output={out}"]) == 2
    assert f"{bad}:2: missing required key(s) 'positive'" in capsys.readouterr().err
