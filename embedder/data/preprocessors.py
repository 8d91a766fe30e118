"""seqio preprocessors for (query, positive, negatives) examples.

A pair task's source yields examples with the string features

    query: []   positive: []   negatives: [n] (n >= 0)   task: [] ("" = the task's default)

and its preprocessors are, in order: `add_prompts` (the task prompt, with
optional task dropout) and `tokenize_and_truncate` (ids from the vocabulary, cut
to the query / document length, then [CLS] ... [SEP], or ... EOS for other
vocabularies). Both are pure functions of a `tf.data.Dataset`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import seqio
import tensorflow as tf

from embedder.data import prompts, vocabularies
from embedder.errors import ConfigError

TEXT_FEATURES = ("query", "positive", "negatives")

# tf.data traces a map function again for every new dataset (the pipeline makes
# one an epoch), and tracing the tokenizer's ragged ops takes about a second; a
# tf.function is traced once per input structure and then reused by every graph.
_TRACED: dict[tuple, tuple[Any, Callable]] = {}


def _traced_once(key: tuple, fn: Callable, keep_alive: Any = None) -> Callable:
    """The tf.function of `fn` for `key`, made on first use (`keep_alive` pins ids in the key)."""
    entry = _TRACED.get(key)
    if entry is None:
        entry = _TRACED[key] = (keep_alive, tf.function(fn, autograph=False))
    return entry[1]


def _format(template: str, **values: tf.Tensor | str) -> tf.Tensor:
    """`template.format(**values)` with string tensors (scalars, or vectors of one shape)."""
    parts: list[tf.Tensor | str] = []
    for literal, field in prompts.template_segments(template):
        if literal:
            parts.append(literal)
        if field is not None:
            parts.append(values[field])
    if not parts:
        return tf.constant("")
    if all(isinstance(part, str) for part in parts):
        return tf.constant("".join(parts))
    return tf.strings.join(parts)


def _prompted(features: Mapping[str, tf.Tensor], config: prompts.PromptConfig, task_text: str | None, drop):
    """The example with its query and documents written in the prompt templates."""
    task = features.get("task")
    default_task = task_text or config.default_task
    if task is None:
        task = tf.constant(default_task)
    else:
        task = tf.where(tf.equal(task, ""), default_task, task)
    query = _format(config.query_template, task=task, text=features["query"])
    if drop is not None:
        query = tf.where(drop, _format(config.no_task_query_template, text=features["query"]), query)
    result = dict(features)
    result["query"] = query
    title = config.empty_title
    result["positive"] = _format(config.document_template, title=title, text=features["positive"])
    if "negatives" in features:
        negatives = features["negatives"]
        # An example with no negatives keeps its empty [0] vector (join would broadcast the literals).
        result["negatives"] = tf.cond(
            tf.size(negatives) > 0,
            lambda: _format(config.document_template, title=title, text=negatives),
            lambda: negatives,
        )
    return result


def _prompted_with_seed(features, seed, config: prompts.PromptConfig, task_text: str | None):
    drop = tf.random.stateless_uniform([], seed=seed) < config.task_dropout
    return _prompted(features, config, task_text, drop=drop)


@seqio.map_over_dataset
def _add_prompts_fixed(features, config, task_text):
    fn = _traced_once(("prompts", config, task_text), lambda f: _prompted(f, config, task_text, drop=None))
    return fn(features)


@seqio.map_over_dataset(num_seeds=1)
def _add_prompts_with_dropout(features, seed, config, task_text):
    fn = _traced_once(
        ("prompts-dropout", config, task_text), lambda f, s: _prompted_with_seed(f, s, config, task_text)
    )
    return fn(features, seed)


def add_prompts(
    dataset: tf.data.Dataset, config: prompts.PromptConfig, task_text: str | None = None
) -> tf.data.Dataset:
    """Writes queries and documents in the Gecko / EmbeddingGemma prompt format.

    Queries become `config.query_template` with the example's own `task` (or,
    when it has none, `task_text`, else `config.default_task`); with probability
    `config.task_dropout` a query is written with `config.no_task_query_template`
    instead. The draw uses seqio's per-example seeds, so a pipeline built with the
    same seed drops the same queries. Positives and negatives become
    `config.document_template` with the empty title. Disabled prompts leave the
    texts alone.

    Args:
        dataset: examples with string features `query`, `positive`, optional
            `negatives` [n] and optional `task`.
        config: the templates (the same `PromptConfig` as at inference).
        task_text: this task's description, e.g. "code retrieval".

    Returns:
        The dataset with `query`, `positive` and `negatives` rewritten.
    """
    if not config.enabled:
        return dataset
    if config.task_dropout > 0:
        return _add_prompts_with_dropout(dataset, config=config, task_text=task_text)
    return _add_prompts_fixed(dataset, config=config, task_text=task_text)


def _plan(output_features: Mapping[str, seqio.Feature], sequence_length: Mapping[str, int] | None):
    """(vocabulary, prefix, suffix, {feature: length}) of a pair task, checked."""
    vocabulary = output_features["query"].vocabulary
    for key in TEXT_FEATURES:
        if key in output_features and output_features[key].vocabulary != vocabulary:
            raise ConfigError(
                f"feature {key!r} uses {output_features[key].vocabulary} but 'query' uses {vocabulary}; "
                "a pair task tokenises all its texts with one vocabulary"
            )
    prefix, suffix = vocabularies.sequence_specials(vocabulary)
    lengths = {}
    for key in TEXT_FEATURES:
        length = (sequence_length or {}).get(key)
        if length is None:
            length = 2**31 - 1
        elif length < len(prefix) + len(suffix):
            raise ConfigError(
                f"sequence_length[{key!r}]={length} cannot hold the {len(prefix) + len(suffix)} "
                "special tokens of each sequence; use a larger length"
            )
        lengths[key] = length
    return vocabulary, prefix, suffix, lengths


def _truncate_rows(
    ids: tf.RaggedTensor, keep: tf.Tensor, prefix: list[int], suffix: list[int]
) -> tf.RaggedTensor:
    """Row r of `ids` cut to keep[r] ids, with `prefix` before and `suffix` after it."""
    rows = ids.value_rowids()
    position = tf.range(tf.size(ids.flat_values, out_type=rows.dtype)) - tf.gather(ids.row_starts(), rows)
    kept = position < tf.gather(keep, rows)
    ids = tf.RaggedTensor.from_value_rowids(
        tf.boolean_mask(ids.flat_values, kept), tf.boolean_mask(rows, kept), nrows=ids.nrows()
    )
    parts = []
    if prefix:
        parts.append(tf.RaggedTensor.from_tensor(tf.tile([prefix], [ids.nrows(), 1])))
    parts.append(ids)
    if suffix:
        parts.append(tf.RaggedTensor.from_tensor(tf.tile([suffix], [ids.nrows(), 1])))
    return tf.concat(parts, axis=1) if len(parts) > 1 else ids


def tokenize_and_truncate(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    sequence_length: Mapping[str, int] | None,
) -> tf.data.Dataset:
    """Tokenises the texts, cuts them to their lengths and adds the sequence's special tokens.

    All texts of an example (query, positive, negatives) go through the
    vocabulary's `encode_tf` in one call. With WordPiece each becomes
    [CLS] + ids[:length - 2] + [SEP], exactly as the peer truncates; with another
    vocabulary, ids[:length - 1] + EOS. An empty text gives [CLS] [SEP].

    Args:
        dataset: examples with string `query`, `positive` and optional `negatives` [n].
        output_features: the task's features (one vocabulary for all texts).
        sequence_length: token length of `query`, `positive` and `negatives`
            (specials included); a feature left out (or None) is not cut.

    Returns:
        The dataset with int32 `query` [<= Lq], `positive` [<= Ld] and `negatives`
        (ragged [n, <= Ln]); other features pass through.

    Raises:
        ConfigError: if a length cannot hold the special tokens, naming the feature,
            or if the texts use different vocabularies.
    """
    vocabulary, prefix, suffix, lengths = _plan(output_features, sequence_length)
    specials = len(prefix) + len(suffix)

    def tokenize_uncompiled(features):
        negatives = features.get("negatives", tf.zeros([0], tf.string))
        count = tf.size(negatives)
        texts = tf.concat([tf.stack([features["query"], features["positive"]]), negatives], axis=0)
        ids = vocabulary.encode_tf(texts)
        if not isinstance(ids, tf.RaggedTensor):
            ids = tf.RaggedTensor.from_tensor(ids)
        ids = tf.cast(ids, tf.int32)
        keep = tf.concat(
            [
                [lengths["query"] - specials, lengths["positive"] - specials],
                tf.fill([count], lengths["negatives"] - specials),
            ],
            axis=0,
        )
        ids = _truncate_rows(ids, tf.cast(keep, ids.row_splits.dtype), prefix, suffix)
        result = dict(features)
        result["query"] = ids[0]
        result["positive"] = ids[1]
        result["negatives"] = ids[2:]
        return result

    key = ("tokenize", id(vocabulary), tuple(prefix), tuple(suffix), tuple(sorted(lengths.items())))
    tokenize = _traced_once(key, tokenize_uncompiled, keep_alive=vocabulary)
    return dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
