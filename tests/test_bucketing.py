"""Length bucketing: the right shapes, the same training, one compile per shape and no more."""

import json
import logging
import re

import numpy as np
import pytest

from embedder import summaries
from embedder.data import batching, bucketing, jsonl, wordpiece
from embedder.models import pretrained
from tests import training_helpers

PAD = 0


def _padded(lengths, width, rng):
    """Rows of random non-pad ids of the given lengths, right-padded with PAD."""
    rows = np.full((len(lengths), width), PAD, dtype=np.int32)
    for i, n in enumerate(lengths):
        rows[i, :n] = rng.integers(1, 1000, size=n)
    return rows


def test_used_length_matches_a_loop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(0, 12, size=rng.integers(1, 6))
        rows = _padded(lengths, 12, rng)
        assert bucketing.used_length(rows, PAD) == max(lengths)
        stacked = rows.reshape(len(lengths), 1, 12)  # [B, K, L] (negatives)
        assert bucketing.used_length(stacked, PAD) == max(lengths)


def test_a_pad_id_inside_a_text_does_not_shorten_it():
    rows = np.array([[101, 0, 0, 7, 102, 0, 0, 0]])  # a literal [PAD] in the text
    assert bucketing.used_length(rows, PAD) == 5


@pytest.mark.parametrize("negatives", [0, 2])
def test_batches_are_cut_to_the_smallest_bucket_that_holds_them(negatives):
    rng = np.random.default_rng(1)
    buckets = bucketing.LengthBuckets([4, 8, 16, 64], query_len=16, doc_len=32, pad_id=PAD)
    assert buckets.query_lengths == (4, 8, 16) and buckets.doc_lengths == (4, 8, 16, 32)
    for _ in range(30):
        q = rng.integers(2, 17, size=6)
        d = rng.integers(2, 33, size=6 * (1 + negatives))
        features = {
            "query_tokens": _padded(q, 16, rng),
            "positive_tokens": _padded(d[:6], 32, rng),
            "query_ids": np.arange(6),
        }
        if negatives:
            features["negative_tokens"] = _padded(d[6:], 32, rng).reshape(6, negatives, 32)
        cut = buckets(features)
        want_q = min(b for b in (4, 8, 16) if b >= q.max())
        want_d = min(b for b in (4, 8, 16, 32) if b >= d.max())
        assert cut["query_tokens"].shape == (6, want_q)
        assert cut["positive_tokens"].shape == (6, want_d)
        if negatives:
            assert cut["negative_tokens"].shape == (6, negatives, want_d)
        for key, value in cut.items():  # nothing but padding was dropped
            np.testing.assert_array_equal(value, features[key][..., : value.shape[-1]])
            assert not (features[key][..., value.shape[-1] :] != PAD).any()


def test_lengths_are_agreed_over_processes():
    buckets = bucketing.LengthBuckets([4, 8], query_len=16, doc_len=16, pad_id=PAD)
    rng = np.random.default_rng(2)
    features = {"query_tokens": _padded([3, 3], 16, rng), "positive_tokens": _padded([3, 2], 16, rng)}
    # Another process holds a 12-token query and a 7-token document.
    cut = buckets(features, combine=lambda mine: np.maximum(mine, [12, 7]))
    assert cut["query_tokens"].shape[-1] == 16 and cut["positive_tokens"].shape[-1] == 8


def test_no_buckets_changes_nothing_and_bad_buckets_are_named():
    features = {"query_tokens": np.ones((2, 16), np.int32), "positive_tokens": np.ones((2, 32), np.int32)}
    same = bucketing.LengthBuckets([], 16, 32, PAD)(features)
    assert {k: v.shape for k, v in same.items()} == {"query_tokens": (2, 16), "positive_tokens": (2, 32)}
    with pytest.raises(ValueError, match=r"length bucket 1 must be an integer >= 2"):
        bucketing.LengthBuckets([1, 8], 16, 32, PAD)


# ------------------------------------------------------------- in the training loop

STEPS = 12  # two epochs of 6 batches of 16


@pytest.fixture(scope="module")
def varied_file(tmp_path_factory):
    """96 pairs, 5 of them long: some batches hold one, the others are all short."""
    rng = np.random.default_rng(3)
    words = "sort list parse file open read write json path join split string".split()
    rows = []
    for i in range(96):
        long = i % 20 == 0
        q = " ".join(rng.choice(words, size=int(rng.integers(1, 14 if long else 3))))
        d = " ".join(rng.choice(words, size=int(rng.integers(2, 30 if long else 4))))
        rows.append({"query": f"{q} {i}", "positive": f"def f{i}(): {d}", "negatives": [f"x = {i}"]})
    path = tmp_path_factory.mktemp("data") / "varied.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _expected_shapes(train_file, buckets):
    """The (query, document) lengths of each step, computed from the batcher directly."""
    tok = wordpiece.WordPieceTokenizer.from_pretrained_dir(pretrained.minilm_l6_v2_path())
    batcher = batching.PairBatcher(
        jsonl.read_jsonl(train_file), tok, global_batch_size=16, query_len=16, doc_len=32, num_negatives=1
    )
    cut = bucketing.LengthBuckets(buckets, 16, 32, tok.pad_id)
    return [
        (b["query_tokens"].shape[1], b["positive_tokens"].shape[1])
        for b in (cut(batcher.batch(s)) for s in range(STEPS))
    ]


def _train(model_dir, train_file, buckets):
    return training_helpers.reference_train(
        model_dir, train_file, STEPS, extra=[f"LENGTH_BUCKETS = {list(buckets)}", "PACKING = False"]
    )


@pytest.fixture(scope="module")
def full_length_run(varied_file, tmp_path_factory):
    return _train(tmp_path_factory.mktemp("full"), varied_file, [])


@pytest.mark.slow
def test_bucketed_training_equals_full_length_and_compiles_once_per_shape(
    varied_file, full_length_run, tmp_path, caplog
):
    import jax

    buckets = [8, 16]
    shapes = _expected_shapes(varied_file, buckets)
    assert 2 <= len(set(shapes)) < STEPS - 2  # several shapes, most of them repeated
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        run = _train(tmp_path, varied_file, buckets)
    compiles = [
        r.getMessage() for r in caplog.records if re.search(r"Compiling jit\(_step\)", r.getMessage())
    ]
    # One compile per distinct shape; a shape seen again runs the compiled step.
    assert len(compiles) == len(set(shapes)), compiles
    # Padding is masked, so cutting it changes nothing but float rounding.
    np.testing.assert_allclose(run.losses, full_length_run.losses, rtol=2e-5, atol=2e-6)
    tokens = {m["step"]: m["tokens_per_sec"] for m in summaries.read_metrics(str(tmp_path))}
    assert len(tokens) == STEPS
