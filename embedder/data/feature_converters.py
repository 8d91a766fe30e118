"""seqio feature converter: tokenised (query, positive, negatives) -> fixed-shape model features.

Per example (batching is the pipeline's job, so a batch can mix tasks or not):

    query_tokens     int32 [Lq]      positive_tokens   int32 [Ld]
    query_mask       int32 [Lq]      positive_mask     int32 [Ld]
    negative_tokens  int32 [n, Ld]   negative_mask     int32 [n, Ld]
    negative_valid   int32 [n]       (1 for a real negative, 0 for an empty row)
    query_ids        int32 []        positive_ids      int32 []

Masks come from the true lengths, not from `pad_id`, so a text that spells the
pad token keeps it. The ids are `batching.duplicate_id` of the truncated token
ids, as the JSONL batcher computes them: inputs the model cannot tell apart
(duplicates, or texts equal after truncation) share an id on both data paths,
which is what the loss's duplicate mask needs. The negative rows (all but
`negative_valid`) appear only when `num_negatives > 0`; an example with more
negatives keeps its first n.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import seqio
import tensorflow as tf

from embedder.data import batching
from embedder.errors import ConfigError

_Spec = seqio.FeatureConverter.FeatureSpec


def duplicate_id(ids: tf.Tensor) -> tf.Tensor:
    """`batching.duplicate_id` of a row of token ids, in the graph.

    Args:
        ids: int32 [n] the truncated, unpadded token ids.

    Returns:
        int32 scalar.
    """
    value = tf.numpy_function(
        lambda row: np.int32(batching.duplicate_id(row)), [ids], tf.int32, stateful=False
    )
    return tf.ensure_shape(value, [])


class PairFeatureConverter(seqio.FeatureConverter):
    """Pads (query, positive, negatives) token ids to the model's fixed shapes.

    Args:
        num_negatives: hard-negative rows per example (0: no negative features).
        pad_id: the id that fills padding positions.

    `task_feature_lengths` names `query`, `positive` and, with negatives,
    `negatives` (the document length of each negative row).
    """

    TASK_FEATURES: Mapping[str, _Spec] = {}
    MODEL_FEATURES: Mapping[str, _Spec] = {}
    PACKING_FEATURE_DTYPES = None

    def __init__(self, num_negatives: int = 0, pad_id: int = 0):
        if num_negatives < 0:
            raise ConfigError(f"num_negatives must be >= 0, got {num_negatives}")
        self.num_negatives = num_negatives
        self.pad_id = pad_id
        task = {"query": _Spec(tf.int32), "positive": _Spec(tf.int32)}
        model = {
            "query_tokens": _Spec(tf.int32),
            "query_mask": _Spec(tf.int32),
            "positive_tokens": _Spec(tf.int32),
            "positive_mask": _Spec(tf.int32),
            "query_ids": _Spec(tf.int32, rank=0),
            "positive_ids": _Spec(tf.int32, rank=0),
        }
        if num_negatives:
            task["negatives"] = _Spec(tf.int32, rank=2, sequence_dim=1)
            model["negative_tokens"] = _Spec(tf.int32, rank=2, sequence_dim=1)
            model["negative_mask"] = _Spec(tf.int32, rank=2, sequence_dim=1)
            model["negative_valid"] = _Spec(tf.int32, rank=1)
        # Instance attributes: which features exist depends on num_negatives.
        self.TASK_FEATURES = task
        self.MODEL_FEATURES = model
        self._compiled = {}
        super().__init__(pack=False)

    def _pad(self, ids: tf.Tensor, length: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """ids [any] -> (tokens [length], mask [length], duplicate id []) of the first `length`."""
        ids = ids[:length]
        size = tf.shape(ids)[0]
        tokens = tf.pad(ids, [[0, length - size]], constant_values=self.pad_id)
        mask = tf.cast(tf.range(length) < size, tf.int32)
        tokens.set_shape([length])
        mask.set_shape([length])
        return tokens, mask, duplicate_id(ids)

    def _convert_features(
        self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]
    ) -> tf.data.Dataset:
        query_len = task_feature_lengths["query"]
        doc_len = task_feature_lengths["positive"]
        negatives_len = task_feature_lengths.get("negatives", doc_len)
        n = self.num_negatives

        def convert(features):
            query_tokens, query_mask, query_id = self._pad(features["query"], query_len)
            positive_tokens, positive_mask, positive_id = self._pad(features["positive"], doc_len)
            out = {
                "query_tokens": query_tokens,
                "query_mask": query_mask,
                "positive_tokens": positive_tokens,
                "positive_mask": positive_mask,
                "query_ids": query_id,
                "positive_ids": positive_id,
            }
            if n:
                negatives = features["negatives"][:n]
                if not isinstance(negatives, tf.RaggedTensor):
                    negatives = tf.RaggedTensor.from_tensor(negatives)
                negatives = negatives[:, :negatives_len]
                rows = negatives.nrows(out_type=tf.int32)
                tokens = negatives.to_tensor(default_value=self.pad_id, shape=[n, negatives_len])
                lengths = tf.pad(negatives.row_lengths(), [[0, n - rows]])
                mask = tf.cast(
                    tf.range(negatives_len, dtype=lengths.dtype)[None, :] < lengths[:, None], tf.int32
                )
                out["negative_tokens"] = tf.ensure_shape(tokens, [n, negatives_len])
                out["negative_mask"] = tf.ensure_shape(mask, [n, negatives_len])
                out["negative_valid"] = tf.ensure_shape(tf.cast(tf.range(n) < rows, tf.int32), [n])
            return out

        # One tf.function per lengths, traced once and reused by every dataset converted.
        key = (query_len, doc_len, negatives_len)
        if key not in self._compiled:
            self._compiled[key] = tf.function(convert, autograph=False)
        return ds.map(self._compiled[key], num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        query_len = task_feature_lengths["query"]
        doc_len = task_feature_lengths["positive"]
        lengths = {
            "query_tokens": query_len,
            "query_mask": query_len,
            "positive_tokens": doc_len,
            "positive_mask": doc_len,
            "query_ids": 1,
            "positive_ids": 1,
        }
        if self.num_negatives:
            negatives_len = task_feature_lengths.get("negatives", doc_len)
            lengths.update(
                negative_tokens=negatives_len, negative_mask=negatives_len, negative_valid=self.num_negatives
            )
        return lengths
