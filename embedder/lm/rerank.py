"""LLM reranking of retrieved passages: Gecko's FRet step 2 and Gemini's LLM filtering.

Two LM scores for a (query, passage) pair, both from the same forward pass
machinery (`embedder.lm.score`):

* query likelihood: the mean log-probability of the query's tokens after a
  prompt holding the passage (how well the passage "explains" the query);
* relevance classification: log p(yes) - log p(no) for the next token after a
  prompt asking whether the passage answers the query.

Each score ranks the candidates; the rankings are fused with reciprocal rank
fusion, ``rrf(d) = sum over rankings of 1 / (rrf_k + rank(d))`` with 1-based
ranks. Equal scores share the best rank of their group (competition ranking,
"1, 2, 2, 4"), and equal fused scores keep the embedder's order. The first
passage of the fused order is the positive (relabelled when it is not the seed
passage the query was written from); the hard negatives come from a window of
the fused order, the positive and the seed passage left out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from embedder.errors import ConfigError

QUERY_LIKELIHOOD_TEMPLATE = (
    "Passage: {title}{text}\nPlease write a question or a search query that this passage answers.\nQuery:"
)
RELEVANCE_TEMPLATE = (
    "Query: {query}\nPassage: {title}{text}\nDoes the passage answer the query? Answer yes or no.\nAnswer:"
)


@dataclasses.dataclass(frozen=True)
class RerankConfig:
    """How candidates are scored, fused and turned into a positive and negatives.

    Attributes:
      top_n: neighbours retrieved by the embedder for each query.
      rrf_k: the reciprocal rank fusion constant (60 in Cormack et al. 2009).
      negative_rank_start: first position (0-based) of the fused order the hard
        negatives are taken from (position 0 is the positive).
      negative_rank_end: end of that window (exclusive).
      num_negatives: hard negatives per query (fewer where the window is short).
      query_likelihood_template: prompt before the query (``{title}``, ``{text}``).
      relevance_template: prompt before the yes/no answer (``{query}``, ``{title}``, ``{text}``).
      yes, no: the answers whose first tokens the relevance score compares.
      max_passage_tokens: a passage is cut to this many tokens in the prompts.
    """

    top_n: int = 20
    rrf_k: float = 60.0
    negative_rank_start: int = 1
    negative_rank_end: int = 10
    num_negatives: int = 1
    query_likelihood_template: str = QUERY_LIKELIHOOD_TEMPLATE
    relevance_template: str = RELEVANCE_TEMPLATE
    yes: str = " yes"
    no: str = " no"
    max_passage_tokens: int = 256

    def __post_init__(self):
        if self.top_n < 1 or self.num_negatives < 0 or self.max_passage_tokens < 1:
            raise ConfigError(
                f"RerankConfig: top_n={self.top_n}, num_negatives={self.num_negatives}, "
                f"max_passage_tokens={self.max_passage_tokens}: expected top_n >= 1, num_negatives >= 0, "
                "max_passage_tokens >= 1"
            )
        if not 1 <= self.negative_rank_start <= self.negative_rank_end:
            raise ConfigError(
                f"RerankConfig: negative window [{self.negative_rank_start}, {self.negative_rank_end}) must "
                "start at 1 or later (0 is the positive) and not end before it starts"
            )
        if self.rrf_k < 0:
            raise ConfigError(f"RerankConfig.rrf_k={self.rrf_k}: expected >= 0")


def competition_ranks(scores: Sequence[float]) -> np.ndarray:
    """1-based ranks, highest score first; equal scores share the best rank ("1, 2, 2, 4")."""
    s = np.asarray(scores, np.float64)
    return 1 + (s[None, :] > s[:, None]).sum(axis=1)


def reciprocal_rank_fusion(rankings: Sequence[Sequence[int]], k: float) -> np.ndarray:
    """sum over rankings of 1 / (k + rank), per candidate (ranks 1-based)."""
    ranks = np.asarray(rankings, np.float64)  # [rankings, candidates]
    return (1.0 / (k + ranks)).sum(axis=0)


@dataclasses.dataclass(frozen=True)
class Fused:
    """The reranking of one query's candidates.

    Attributes:
      order: candidate indices, best first (fused score, then embedder order).
      positive: index of the positive (order[0]).
      negatives: indices of the hard negatives.
      relabelled: the positive is not the seed passage.
      records: per candidate (in the embedder's order), its scores and ranks.
    """

    order: tuple[int, ...]
    positive: int
    negatives: tuple[int, ...]
    relabelled: bool
    records: tuple[dict[str, Any], ...]


def fuse(
    query_likelihood: Sequence[float],
    relevance: Sequence[float],
    config: RerankConfig,
    seed: int | None = None,
    embedder_scores: Sequence[float] | None = None,
    keep_seed: bool = False,
) -> Fused:
    """Ranks candidates by both LM scores, fuses the ranks, picks the positive and negatives.

    Args:
      query_likelihood: per candidate (in the embedder's order), the mean log p(query | passage).
      relevance: per candidate, log p(yes) - log p(no).
      config: rrf_k and the negative window.
      seed: index of the seed passage among the candidates, or None if absent.
      embedder_scores: per candidate, the embedder's cosine (recorded only).
      keep_seed: the seed stays the positive (mining negatives for a given
        pair); the top of the fused order is then never a negative either.

    Returns:
      The `Fused` result.
    """
    n = len(query_likelihood)
    if n == 0 or len(relevance) != n:
        raise ConfigError(f"{n} query-likelihood scores and {len(relevance)} relevance scores")
    ql_ranks = competition_ranks(query_likelihood)
    rc_ranks = competition_ranks(relevance)
    rrf = reciprocal_rank_fusion([ql_ranks, rc_ranks], config.rrf_k)
    order = sorted(range(n), key=lambda i: (-rrf[i], i))
    positive = seed if keep_seed and seed is not None else order[0]
    window = order[config.negative_rank_start : config.negative_rank_end]
    negatives = tuple(i for i in window if i != seed)[: config.num_negatives]
    position = {c: p for p, c in enumerate(order)}
    records = tuple(
        {
            "embedder_rank": i + 1,
            "embedder_score": None if embedder_scores is None else float(embedder_scores[i]),
            "query_likelihood": float(query_likelihood[i]),
            "relevance": float(relevance[i]),
            "query_likelihood_rank": int(ql_ranks[i]),
            "relevance_rank": int(rc_ranks[i]),
            "rrf": float(rrf[i]),
            "rank": position[i] + 1,
        }
        for i in range(n)
    )
    return Fused(tuple(order), positive, negatives, seed is not None and positive != seed, records)


def passage_text(title: str | None, text: str) -> tuple[str, str]:
    """(title prefix, text) for the templates: "Title: " before the text where there is a title."""
    return (f"{title}: " if title else ""), text


def query_likelihood_prompt(config: RerankConfig, title: str | None, text: str) -> str:
    prefix, body = passage_text(title, text)
    return config.query_likelihood_template.format(title=prefix, text=body)


def relevance_prompt(config: RerankConfig, query: str, title: str | None, text: str) -> str:
    prefix, body = passage_text(title, text)
    return config.relevance_template.format(query=query, title=prefix, text=body)


def score_pairs(lm: Any, pairs: Sequence[tuple[str, str | None, str]], config: RerankConfig, batch: Any):
    """Both LM scores of (query, title, passage) triples.

    Args:
      lm: a `model.LanguageModel` with a tokenizer.
      pairs: (query, passage title or None, passage text).
      config: templates and the passage length limit.
      batch: the `decode.BatchConfig` the scoring runs at.

    Returns:
      (query likelihood [n], relevance [n]) float32 arrays.
    """
    from embedder.lm import score

    def cut(text):
        ids = lm.encode(text, specials=False)[: config.max_passage_tokens]
        return lm.decode(ids) if len(ids) == config.max_passage_tokens else text

    ql_prompts, ql_queries, rc_prompts = [], [], []
    for query, title, text in pairs:
        text = cut(text)
        ql_prompts.append(lm.encode(query_likelihood_prompt(config, title, text)))
        ql_queries.append(lm.encode(" " + query, specials=False) or lm.encode(" ", specials=False))
        rc_prompts.append(lm.encode(relevance_prompt(config, query, title, text)))
    yes, no = lm.encode(config.yes, specials=False), lm.encode(config.no, specials=False)
    if not yes or not no or yes[0] == no[0]:
        raise ConfigError(f"the answers {config.yes!r} and {config.no!r} must start with different tokens")
    logps = score.continuation_logprobs(lm, ql_prompts, ql_queries, batch)
    query_likelihood = np.array([lp.mean() for lp in logps], np.float32)
    answer = score.next_token_logprobs(lm, rc_prompts, [yes[0], no[0]], batch)
    return query_likelihood, (answer[:, 0] - answer[:, 1]).astype(np.float32)
