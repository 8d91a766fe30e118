"""Reciprocal rank fusion, relabelling and the hard-negative window on a hand-computed example."""

import pytest

from embedder import errors
from embedder.lm import rerank

# Five candidates A..E in the embedder's order (index 0..4).
QUERY_LIKELIHOOD = [-1.0, -0.5, -0.5, -2.0, -0.1]  # ranks: A 4, B 2, C 2 (tie), D 5, E 1
RELEVANCE = [2.0, 1.0, 3.0, 3.0, 0.0]  # ranks: A 3, B 4, C 1, D 1 (tie), E 5


def test_ties_share_the_best_rank():
    assert rerank.competition_ranks(QUERY_LIKELIHOOD).tolist() == [4, 2, 2, 5, 1]
    assert rerank.competition_ranks(RELEVANCE).tolist() == [3, 4, 1, 1, 5]


def test_fusion_relabels_and_takes_the_negative_from_the_window():
    config = rerank.RerankConfig(rrf_k=1.0, negative_rank_start=1, negative_rank_end=3, num_negatives=1)
    fused = rerank.fuse(QUERY_LIKELIHOOD, RELEVANCE, config, seed=0)
    # By hand, with k = 1: A 1/5 + 1/4 = .45, B 1/3 + 1/5 = .533, C 1/3 + 1/2 = .833,
    # D 1/6 + 1/2 = .667, E 1/2 + 1/6 = .667 (a tie: the embedder's order puts D first).
    assert [r["rrf"] for r in fused.records] == pytest.approx([0.45, 8 / 15, 5 / 6, 2 / 3, 2 / 3], abs=1e-12)
    assert fused.order == (2, 3, 4, 1, 0)
    assert fused.positive == 2 and fused.relabelled  # C, not the seed A
    assert fused.negatives == (3,)  # D: the first of positions [1, 3)
    assert [r["rank"] for r in fused.records] == [5, 4, 1, 2, 3]
    assert [r["query_likelihood_rank"] for r in fused.records] == [4, 2, 2, 5, 1]


def test_the_seed_is_never_a_negative_and_a_short_window_gives_fewer():
    config = rerank.RerankConfig(rrf_k=1.0, negative_rank_start=3, negative_rank_end=5, num_negatives=2)
    fused = rerank.fuse(QUERY_LIKELIHOOD, RELEVANCE, config, seed=0)
    assert fused.negatives == (1,)  # B; A (position 4) is the seed
    unseeded = rerank.fuse(QUERY_LIKELIHOOD, RELEVANCE, config, seed=None)
    assert unseeded.negatives == (1, 0) and not unseeded.relabelled


def test_the_constant_changes_the_order():
    # X is first by one score and last by the other; Y second by both. By hand:
    # k = 0: Z 1/3 + 1 = 1.333, X 1 + 1/4 = 1.25, Y 1/2 + 1/2 = 1, W 1/4 + 1/3 = .583;
    # k = 60: Z 1/63 + 1/61 = .032266, Y 2/62 = .032258, X 1/61 + 1/64 = .032018, W .031498.
    likelihood, relevance = [4.0, 3.0, 2.0, 1.0], [0.0, 2.0, 3.0, 1.0]  # X, Y, Z, W
    assert rerank.fuse(likelihood, relevance, rerank.RerankConfig(rrf_k=0.0)).order == (2, 0, 1, 3)
    assert rerank.fuse(likelihood, relevance, rerank.RerankConfig(rrf_k=60.0)).order == (2, 1, 0, 3)


def test_bad_window_is_a_config_error():
    with pytest.raises(errors.ConfigError, match="negative window"):
        rerank.RerankConfig(negative_rank_start=0)


def test_mining_for_a_given_pair_keeps_its_positive_and_skips_it_in_the_window():
    config = rerank.RerankConfig(rrf_k=1.0, negative_rank_start=1, negative_rank_end=3, num_negatives=1)
    # Fused order C, D, E, B, A (as above). The pair's own positive is D.
    fused = rerank.fuse(QUERY_LIKELIHOOD, RELEVANCE, config, seed=3, keep_seed=True)
    assert fused.positive == 3 and not fused.relabelled
    assert fused.negatives == (4,)  # E: D is skipped, and C (position 0) is never a negative
