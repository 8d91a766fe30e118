"""seqio preprocessors for (query, positive, negatives) examples.

A pair task's source yields examples with the string features

    query: []   positive: []   negatives: [n] (n >= 0)   task: [] ("" = the task's default)

and its preprocessors are, in order: `add_prompts` (the task prompt, with
optional task dropout), `seqio.preprocessors.tokenize` (bare ids from the
vocabulary), `truncate_and_add_specials` (cut to the query / document length,
then [CLS] ... [SEP] or ... EOS). All are pure functions of a `tf.data.Dataset`.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from embedder.data import prompts, vocabularies

TEXT_FEATURES = ("query", "positive", "negatives")


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


@seqio.map_over_dataset
def _add_prompts_fixed(features, config, task_text):
    return _prompted(features, config, task_text, drop=None)


@seqio.map_over_dataset(num_seeds=1)
def _add_prompts_with_dropout(features, seed, config, task_text):
    drop = tf.random.stateless_uniform([], seed=seed) < config.task_dropout
    return _prompted(features, config, task_text, drop=drop)


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


def _truncate_and_wrap(
    ids: tf.Tensor | tf.RaggedTensor, length: int, prefix: list[int], suffix: list[int]
) -> tf.Tensor | tf.RaggedTensor:
    """ids[..., :length - specials] with `prefix` before and `suffix` after each sequence."""
    keep = length - len(prefix) - len(suffix)
    if isinstance(ids, tf.RaggedTensor):
        rows = ids.nrows()
        ids = ids[:, :keep]
        parts = []
        if prefix:
            parts.append(tf.RaggedTensor.from_tensor(tf.tile([prefix], [rows, 1])))
        parts.append(ids)
        if suffix:
            parts.append(tf.RaggedTensor.from_tensor(tf.tile([suffix], [rows, 1])))
        return tf.concat(parts, axis=1)
    return tf.concat([tf.constant(prefix, tf.int32), ids[:keep], tf.constant(suffix, tf.int32)], axis=0)


def truncate_and_add_specials(
    dataset: tf.data.Dataset,
    output_features: Mapping[str, seqio.Feature],
    sequence_length: Mapping[str, int] | None,
) -> tf.data.Dataset:
    """Cuts token ids to their lengths and adds the sequence's special tokens.

    With WordPiece, each sequence becomes [CLS] + ids[:length - 2] + [SEP], exactly
    as the peer truncates; with another vocabulary, ids[:length - 1] + EOS. An
    empty text gives [CLS] [SEP]. `negatives` ([n, None], ragged) is cut row by row.

    Args:
        dataset: tokenised examples (int32 `query`, `positive`, optional `negatives`).
        output_features: the task's features (their vocabularies give the specials).
        sequence_length: token length of each feature, specials included; a feature
            left out (or None) is not cut.

    Returns:
        The dataset with the features cut and wrapped.

    Raises:
        ValueError: if a length cannot hold the special tokens, naming the feature.
    """
    plans = {}
    for key, feature in output_features.items():
        if key not in TEXT_FEATURES:
            continue
        prefix, suffix = vocabularies.sequence_specials(feature.vocabulary)
        length = (sequence_length or {}).get(key)
        if length is None:
            length = 2**31 - 1
        elif length < len(prefix) + len(suffix):
            raise ValueError(
                f"sequence_length[{key!r}]={length} cannot hold the {len(prefix) + len(suffix)} "
                "special tokens of each sequence; use a larger length"
            )
        plans[key] = (length, prefix, suffix)

    def wrap(features):
        result = dict(features)
        for key, (length, prefix, suffix) in plans.items():
            if key in features:
                result[key] = _truncate_and_wrap(features[key], length, prefix, suffix)
        return result

    return dataset.map(wrap, num_parallel_calls=tf.data.AUTOTUNE)
