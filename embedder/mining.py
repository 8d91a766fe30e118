"""Hard-negative mining with the current model (`embedder mine`).

For each example: embed its query and a corpus of documents (by default the
examples' own positives), rank the corpus by exact cosine similarity to the query
(`search.cosine_top_k`: sharded over the devices, blocked over the corpus), and
take negatives from a window of ranks, e.g. ranks 10-100: the very top ranks are
too often unlabelled positives. Within the window a candidate is skipped if it

* is the example's positive (the same text);
* is a near-duplicate of the positive: cosine(candidate, positive) >= `duplicate_threshold`;
* scores too close to the positive to be a safe negative: cosine(query, candidate) >
  cosine(query, positive) - `margin` (NV-Retriever's TopK-MarginPos; a likely false
  negative).

The rest are taken in rank order (hardest first), or sampled uniformly with a
seed. Ranks are 0-based: rank 0 is the most similar document.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from embedder.data import jsonl
from embedder.errors import ConfigError, DataError

# encode(texts, kind) -> [len(texts), dim] float32; kind is "query" or "document".
EncodeFn = Callable[[Sequence[str], str], np.ndarray]


@dataclasses.dataclass(frozen=True)
class MiningConfig:
    """Which negatives to mine.

    Attributes:
        num_negatives: negatives mined per example.
        rank_start: first rank of the window (0-based, inclusive).
        rank_end: end of the window (exclusive); the search retrieves this many.
        margin: skip candidates scoring above cosine(query, positive) - margin.
        duplicate_threshold: skip candidates whose cosine with the positive is at least this.
        sample: sample the negatives uniformly from the eligible candidates (seeded)
            instead of taking the highest-ranked ones.
        seed: the sampling seed.
    """

    num_negatives: int = 4
    rank_start: int = 10
    rank_end: int = 100
    margin: float = 0.05
    duplicate_threshold: float = 0.98
    sample: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.num_negatives < 1:
            raise ConfigError(f"num_negatives={self.num_negatives} must be >= 1")
        if not 0 <= self.rank_start < self.rank_end:
            raise ConfigError(f"the rank window [{self.rank_start}, {self.rank_end}) is empty or negative")
        if self.rank_end - self.rank_start < self.num_negatives:
            raise ConfigError(
                f"the rank window [{self.rank_start}, {self.rank_end}) holds fewer than "
                f"num_negatives={self.num_negatives} candidates"
            )


@dataclasses.dataclass
class MiningResult:
    """Mined examples and what happened.

    Attributes:
        examples: the input examples with the mined negatives appended to their own.
        short: indices of examples that got fewer than `num_negatives` (too few
            eligible candidates in the window).
        skipped_duplicates: candidates left out as near-duplicates of the positive.
        skipped_margin: candidates left out for scoring within the margin of the positive.
    """

    examples: list[jsonl.Example]
    short: list[int]
    skipped_duplicates: int
    skipped_margin: int


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def select_negatives(
    ranked_ids: np.ndarray,
    ranked_scores: np.ndarray,
    positive_ids: np.ndarray,
    positive_scores: np.ndarray,
    candidate_positive_similarity: np.ndarray,
    config: MiningConfig,
) -> tuple[list[list[int]], int, int]:
    """Picks negatives from ranked search results (the pure part of mining).

    Args:
        ranked_ids: int [q, k]: corpus rows by descending similarity to each query.
        ranked_scores: float [q, k]: their cosine with the query.
        positive_ids: int [q]: each query's positive corpus row.
        positive_scores: float [q]: cosine(query, positive).
        candidate_positive_similarity: float [q, k]: cosine(candidate, positive).
        config: the window, margin, threshold and sampling.

    Returns:
        (negatives, skipped_duplicates, skipped_margin): corpus rows per query, in
        rank order unless sampled, and how many candidates each rule left out.
    """
    rng = np.random.default_rng(config.seed)
    window = slice(config.rank_start, config.rank_end)
    ids = ranked_ids[:, window]
    not_positive = ids != positive_ids[:, None]
    not_duplicate = candidate_positive_similarity[:, window] < config.duplicate_threshold
    below_margin = ranked_scores[:, window] <= positive_scores[:, None] - config.margin
    present = ids >= 0  # the search pads with -1 when the corpus is small
    eligible = not_positive & not_duplicate & below_margin & present
    negatives = []
    for row in range(len(ids)):
        candidates = ids[row][eligible[row]]
        if config.sample and len(candidates) > config.num_negatives:
            chosen = np.sort(rng.choice(len(candidates), size=config.num_negatives, replace=False))
            candidates = candidates[chosen]
        negatives.append([int(c) for c in candidates[: config.num_negatives]])
    skipped_duplicates = int(np.sum(present & not_positive & ~not_duplicate))
    skipped_margin = int(np.sum(present & not_positive & not_duplicate & ~below_margin))
    return negatives, skipped_duplicates, skipped_margin


def mine_hard_negatives(
    examples: Sequence[jsonl.Example],
    encode: EncodeFn,
    config: MiningConfig = MiningConfig(),  # noqa: B008 (frozen dataclass)
    corpus: Sequence[str] | None = None,
    devices=None,
) -> MiningResult:
    """Mines hard negatives for `examples` with a model's `encode`.

    Args:
        examples: the examples (their existing negatives are kept, mined ones appended).
        encode: embeds texts: `encode(texts, kind)` with kind "query" or "document".
        config: what to mine.
        corpus: the documents to mine from; default: the examples' positives. The
            positives are always part of it (added if missing). Repeated texts count once.
        devices: devices to shard the search over (default: all).

    Returns:
        A `MiningResult`.
    """
    # Imported here: the command line reads MiningConfig's defaults without loading jax.
    from embedder import search

    if not examples:
        raise DataError("no examples to mine negatives for")
    documents: dict[str, int] = {}
    for text in list(corpus or []) + [example.positive for example in examples]:
        documents.setdefault(text, len(documents))
    texts = list(documents)
    if config.rank_start >= len(texts):
        raise ConfigError(
            f"the rank window [{config.rank_start}, {config.rank_end}) starts past the corpus of "
            f"{len(texts)} documents: no example would get a negative; lower --rank_start or give a larger --corpus"
        )
    positive_ids = np.array([documents[example.positive] for example in examples])

    corpus_embeddings = _normalize(np.asarray(encode(texts, "document"), np.float32))
    query_embeddings = _normalize(np.asarray(encode([e.query for e in examples], "query"), np.float32))
    scores, ids = search.cosine_top_k(query_embeddings, corpus_embeddings, config.rank_end, devices=devices)
    scores, ids = scores[0], ids[0]  # the full dimension
    if ids.shape[1] < config.rank_end:  # a corpus smaller than the window
        pad = config.rank_end - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
    positive_scores = np.sum(query_embeddings * corpus_embeddings[positive_ids], axis=1)
    candidate_positive = np.einsum(
        "qkd,qd->qk", corpus_embeddings[np.maximum(ids, 0)], corpus_embeddings[positive_ids]
    )
    negatives, skipped_duplicates, skipped_margin = select_negatives(
        ids, scores, positive_ids, positive_scores, candidate_positive, config
    )
    mined = []
    short = []
    for index, (example, rows) in enumerate(zip(examples, negatives, strict=True)):
        if len(rows) < config.num_negatives:
            short.append(index)
        new = [texts[row] for row in rows if texts[row] not in example.negatives]
        # The input's scores (if any) do not cover the mined negatives: they are dropped.
        mined.append(
            dataclasses.replace(example, negatives=tuple(example.negatives) + tuple(new), scores=None)
        )
    return MiningResult(mined, short, skipped_duplicates, skipped_margin)
