"""seqio vocabularies: BERT WordPiece (the peer's ids) and what the pipeline needs of any vocabulary.

`WordPieceVocabulary` tokenises exactly as `wordpiece.WordPieceTokenizer` (and so as
the peer, HF `tokenizers`): `_encode` in Python with that tokenizer, `_encode_tf`
in the tf.data graph with the in-graph tokenizer of `wordpiece_tf`. Neither adds
[CLS]/[SEP]: as in seqio, ids come bare, and the pipeline adds the sequence's
special tokens after truncation (`sequence_specials`), so a truncated text keeps
its [SEP] as the peer's does.

A SentencePiece folder (`tokenizer.model` + `tokenizer_config.json`) gets
`SentencePieceFolderVocabulary`: seqio's `SentencePieceVocabulary` (in the graph
through tensorflow_text), with the folder's pad id and its `<bos>` / `<eos>` as
`tokenizer_config.json` asks. A `tokenizer.json` folder gets
`HuggingFaceVocabulary`, which runs the `tokenizers` package through
`tf.numpy_function` (tensorflow_text has no in-graph form of a `tokenizer.json`).
`for_folder(folder)` picks the one matching `tokenizers.load_tokenizer(folder)`,
so the seqio path and the Python path give the same ids.

Any other seqio vocabulary works too (the sequence then ends in EOS, with no
start token).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import seqio
import tensorflow as tf

from embedder.data import tokenizers, wordpiece


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

    def specials(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix) of every sequence: [CLS] and [SEP]."""
        return [self.bos_id], [self.eos_id]

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


def _decode_in_python(vocabulary: seqio.Vocabulary, ids: tf.Tensor) -> tf.Tensor:
    """Decodes in Python (`tf.numpy_function`): decoding is for inspection, not training."""

    def decode_rows(array: np.ndarray) -> np.ndarray:
        rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
        texts = [
            vocabulary._decode([int(i) for i in row if i != vocabulary.pad_id]).encode("utf-8")
            for row in rows
        ]
        return np.array(texts, dtype=object).reshape(array.shape[:-1])

    ids = tf.convert_to_tensor(ids)
    out = tf.numpy_function(decode_rows, [ids], tf.string, stateful=False)
    out.set_shape(ids.shape[:-1])
    return out


def _encode_in_python(encode: Any, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
    """`encode` (str -> ids) over a scalar string ([n]) or a vector (ragged [b, None]), int32, in tf.data."""

    def encode_rows(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = [encode(t.decode("utf-8")) for t in texts.reshape(-1)]
        values = np.fromiter((i for row in rows for i in row), np.int32)
        return values, np.array([len(row) for row in rows], np.int64)

    s = tf.convert_to_tensor(s, tf.string)
    values, lengths = tf.numpy_function(encode_rows, [s], (tf.int32, tf.int64), stateful=False)
    values.set_shape([None])
    lengths.set_shape([None])
    if s.shape.rank == 0:
        return values
    return tf.RaggedTensor.from_row_lengths(values, lengths)


class SentencePieceFolderVocabulary(seqio.SentencePieceVocabulary):
    """seqio's SentencePiece vocabulary for a model folder (`tokenizer.model` + config).

    The pad id and the sequence's `<bos>` / `<eos>` are the folder's
    (`tokenizers.SentencePieceTokenizer.from_dir`), not seqio's fixed 0 / EOS.
    By default `_encode_tf` runs the `sentencepiece` package through
    `tf.numpy_function`, so the ids equal the Python path's: tensorflow_text's
    SentencePiece op (seqio's in-graph encoder, `in_graph=True`) bundles an older
    sentencepiece whose unigram search breaks ties between equal-scoring
    segmentations differently (seen on runs of punctuation).

    Args:
        folder: the model or tokenizer folder.
        in_graph: encode with tensorflow_text's op, as seqio does.
    """

    def __init__(self, folder: str | os.PathLike, in_graph: bool = False):
        self._folder = os.fspath(folder)
        self._in_graph = in_graph
        self._tokenizer = tokenizers.SentencePieceTokenizer.from_dir(self._folder)
        super().__init__(self._tokenizer.model_path)

    @property
    def vocab_dir(self) -> str:
        """The folder the vocabulary was read from."""
        return self._folder

    @property
    def tokenizer(self) -> tokenizers.SentencePieceTokenizer:
        """The Python tokenizer with the same ids (specials included)."""
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        return self._tokenizer.pad_id

    def specials(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix): `<bos>` / `<eos>` as the folder's tokenizer_config.json says."""
        return self._tokenizer.specials()

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        if self._in_graph:
            return super()._encode_tf(s)
        return _encode_in_python(self._tokenizer.encode_bare, s)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SentencePieceFolderVocabulary):
            return False
        same = os.path.realpath(self._folder) == os.path.realpath(other._folder)
        return same and self._in_graph == other._in_graph

    def __hash__(self) -> int:
        return hash(os.path.realpath(self._folder))

    def __str__(self) -> str:
        return f"SentencePieceFolderVocabulary(vocab_dir={self._folder!r}, size={self.vocab_size})"


class HuggingFaceVocabulary(seqio.Vocabulary):
    """A `tokenizer.json` folder for seqio, run by the `tokenizers` package.

    tensorflow_text has no in-graph form of a `tokenizer.json` (byte-level BPE,
    Metaspace Unigram, normalizers, ...), so `_encode_tf` calls the Rust
    tokenizer through `tf.numpy_function`; the ids are those of
    `tokenizers.HuggingFaceTokenizer` without the post-processor's specials,
    which the pipeline adds after truncation (`specials`).

    Args:
        folder: a folder with `tokenizer.json` (and `tokenizer_config.json`).
    """

    def __init__(self, folder: str | os.PathLike):
        self._folder = os.fspath(folder)
        self._tokenizer = tokenizers.HuggingFaceTokenizer.from_dir(self._folder)
        self._prefix, self._suffix = self._tokenizer.specials()
        super().__init__(extra_ids=0)

    @property
    def vocab_dir(self) -> str:
        """The folder the vocabulary was read from."""
        return self._folder

    @property
    def tokenizer(self) -> tokenizers.HuggingFaceTokenizer:
        """The Python tokenizer with the same ids (specials included)."""
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        return self._tokenizer.pad_id

    @property
    def bos_id(self) -> int | None:
        return self._prefix[0] if self._prefix else None

    @property
    def eos_id(self) -> int | None:
        return self._suffix[-1] if self._suffix else None

    @property
    def unk_id(self) -> int | None:
        return None

    @property
    def _base_vocab_size(self) -> int:
        return self._tokenizer.vocab_size

    def specials(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix): what the tokenizer.json post-processor adds around a text."""
        return list(self._prefix), list(self._suffix)

    def _encode(self, s: str) -> Sequence[int]:
        return self._tokenizer.encode_bare(s)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer._tokenizer.decode(list(ids))

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor | tf.RaggedTensor:
        """Ids of a scalar string ([n]) or of a vector of strings (ragged [b, None]), int32."""
        return _encode_in_python(self._tokenizer.encode_bare, s)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        return _decode_in_python(self, ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HuggingFaceVocabulary):
            return False
        return os.path.realpath(self._folder) == os.path.realpath(other._folder)

    def __hash__(self) -> int:
        return hash(os.path.realpath(self._folder))

    def __str__(self) -> str:
        return f"HuggingFaceVocabulary(vocab_dir={self._folder!r}, size={self.vocab_size})"


def for_folder(folder: str | os.PathLike) -> seqio.Vocabulary:
    """The seqio vocabulary of a model folder, tokenising as `tokenizers.load_tokenizer(folder)`.

    Args:
        folder: a model or tokenizer folder.

    Returns:
        A `WordPieceVocabulary`, `HuggingFaceVocabulary` or `SentencePieceFolderVocabulary`.

    Raises:
        DataError: the folder holds no tokenizer.
    """
    tokenizer = tokenizers.load_tokenizer(folder)
    if isinstance(tokenizer, wordpiece.WordPieceTokenizer):
        return WordPieceVocabulary(folder)
    if isinstance(tokenizer, tokenizers.HuggingFaceTokenizer):
        return HuggingFaceVocabulary(folder)
    return SentencePieceFolderVocabulary(folder)


def sequence_specials(vocabulary: seqio.Vocabulary) -> tuple[list[int], list[int]]:
    """The ids a tokenised sequence starts and ends with, for a model using `vocabulary`.

    Args:
        vocabulary: a seqio vocabulary.

    Returns:
        (prefix, suffix): the vocabulary's own `specials()` where it has them
        ([CLS], [SEP] for WordPiece, as BERT and the peer; the folder's for
        SentencePiece and tokenizer.json);
        ([], [EOS]) for any other vocabulary with an EOS id (e.g. SentencePiece);
        ([], []) otherwise.
    """
    if hasattr(vocabulary, "specials"):
        return vocabulary.specials()
    eos = vocabulary.eos_id
    return [], ([] if eos is None else [int(eos)])
