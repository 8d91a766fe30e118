"""seqio vocabularies: BERT WordPiece (the peer's ids) and what the pipeline needs of any vocabulary.

`WordPieceVocabulary` tokenises exactly as `wordpiece.WordPieceTokenizer` (and so as
the peer, HF `tokenizers`): `_encode` in Python with that tokenizer, `_encode_tf`
in the tf.data graph with the in-graph tokenizer of `wordpiece_tf`. Neither adds
[CLS]/[SEP]: as in seqio, ids come bare, and the pipeline adds the sequence's
special tokens after truncation (`sequence_specials`), so a truncated text keeps
its [SEP] as the peer's does.

seqio's own `SentencePieceVocabulary` works too, for models that use one (the
sequence then ends in EOS, with no start token).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import seqio
import tensorflow as tf

from embedder.data import wordpiece


class WordPieceVocabulary(seqio.Vocabulary):
    """A BERT WordPiece vocabulary (`vocab.txt` plus `tokenizer_config.json`) for seqio.

    Args:
        vocab_dir: a Hugging Face / sentence-transformers model folder holding `vocab.txt`.

    Ids: `pad_id` is [PAD], `unk_id` [UNK], `bos_id` [CLS] and `eos_id` [SEP]
    (so seqio's decode stops at [SEP]).
    """

    def __init__(self, vocab_dir: str | os.PathLike):
        self._vocab_dir = os.fspath(vocab_dir)
        self._tokenizer = wordpiece.WordPieceTokenizer.from_pretrained_dir(self._vocab_dir)
        super().__init__(extra_ids=0)

    @property
    def vocab_dir(self) -> str:
        """The folder the vocabulary was read from."""
        return self._vocab_dir

    @property
    def tokenizer(self) -> wordpiece.WordPieceTokenizer:
        """The Python tokenizer behind `_encode`."""
        return self._tokenizer

    @functools.cached_property
    def tf_tokenizer(self):
        """The in-graph tokenizer behind `_encode_tf` (built on first use)."""
        from embedder.data import wordpiece_tf

        return wordpiece_tf.TFWordPieceTokenizer(self._tokenizer)

    @property
    def pad_id(self) -> int:
        return self._tokenizer.pad_id

    @property
    def bos_id(self) -> int:
        return self._tokenizer.cls_id

    @property
    def eos_id(self) -> int:
        return self._tokenizer.sep_id

    @property
    def unk_id(self) -> int:
        return self._tokenizer.unk_id

    @property
    def _base_vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    def _encode(self, s: str) -> Sequence[int]:
        return self._tokenizer.encode(s, add_special_tokens=False)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids)

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        """Ids of a scalar string ([n]) or of a vector of strings (ragged [b, None]), int32."""
        return self.tf_tokenizer.encode(s)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """Decodes in Python (`tf.numpy_function`): decoding is for inspection, not training."""

        def decode_rows(array: np.ndarray) -> np.ndarray:
            rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
            texts = [self._decode([int(i) for i in row if i != self.pad_id]).encode("utf-8") for row in rows]
            return np.array(texts, dtype=object).reshape(array.shape[:-1])

        ids = tf.convert_to_tensor(ids)
        out = tf.numpy_function(decode_rows, [ids], tf.string, stateful=False)
        out.set_shape(ids.shape[:-1])
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WordPieceVocabulary):
            return False
        return os.path.realpath(self._vocab_dir) == os.path.realpath(other._vocab_dir)

    def __hash__(self) -> int:
        return hash(os.path.realpath(self._vocab_dir))

    def __str__(self) -> str:
        return f"WordPieceVocabulary(vocab_dir={self._vocab_dir!r}, size={self.vocab_size})"


def sequence_specials(vocabulary: seqio.Vocabulary) -> tuple[list[int], list[int]]:
    """The ids a tokenised sequence starts and ends with, for a model using `vocabulary`.

    Args:
        vocabulary: a seqio vocabulary.

    Returns:
        (prefix, suffix): ([CLS], [SEP]) for WordPiece, as BERT and the peer;
        ([], [EOS]) for any other vocabulary with an EOS id (e.g. SentencePiece);
        ([], []) otherwise.
    """
    if isinstance(vocabulary, WordPieceVocabulary):
        return [vocabulary.bos_id], [vocabulary.eos_id]
    eos = vocabulary.eos_id
    return [], ([] if eos is None else [int(eos)])
