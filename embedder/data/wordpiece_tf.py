"""BERT WordPiece tokenisation inside a TensorFlow graph, equal to `wordpiece.WordPieceTokenizer`.

For tf.data pipelines (seqio's `_encode_tf`) and anything else that needs raw
strings in and ids out of a graph. The steps mirror the Python tokenizer:

1. special tokens written literally in the text are split out first
   (an RE2 match of the same alternatives, longest first);
2. normalisation and the punctuation / whitespace split are one per-character
   map, `f(c) = split(normalize(c))`, computed by the Python tokenizer itself for
   every code point and stored as a two-level table (256-code-point pages, equal
   pages shared): most characters map to themselves, to "" (dropped), to " "
   or to " c " (isolated), the rest (~14k: capitals, accented letters, ...) to a
   string of their own. Every Unicode-version quirk of the Python tokenizer
   (Unicode 8.0 categories, per-character lowercasing, the CJK ranges) is in the
   table by construction;
3. split on " ", replace words longer than `max_input_chars_per_word` characters by
   the unknown token, then `tensorflow_text.FastWordpieceTokenizer` (greedy
   longest-match-first with '##' continuations, one uncoverable position makes the
   whole word unknown), as in BERT.

One difference is left, and only for unusual text: the Python tokenizer applies
NFD to whole strings, which reorders a run of combining characters by their
combining class; the table decomposes each character alone. The results differ
only if such a run holds two or more characters the tokenizer keeps (marks added
after Unicode 8.0, or the few spacing marks with a combining class such as
U+1D165) with different classes. `tests/test_seqio_pipeline.py` checks the parity
inputs and every code point one at a time.
"""

from __future__ import annotations

import functools
import unicodedata

import numpy as np
import tensorflow as tf
import tensorflow_text as tf_text

from embedder.data import wordpiece

_MAX_CODE_POINT = 0x10FFFF
_PAGE = 256
# Classes of the per-character map; larger values index `replacements`.
_SAME, _DROP, _SPACE, _ISOLATE = 0, 1, 2, 3
# Marks special tokens in the text (see `words`).
_MARK = b"\xff"


@functools.lru_cache(maxsize=4)
def _character_map(lowercase: bool, strip_accents: bool, tokenize_chinese_chars: bool):
    """The per-character map of a tokenizer configuration as (page index, pages, replacements)."""
    # A vocabulary-free tokenizer with the same normalisation: the map does not depend on the vocab.
    probe = wordpiece.WordPieceTokenizer(
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]"],
        lowercase=lowercase,
        strip_accents=strip_accents,
        tokenize_chinese_chars=tokenize_chinese_chars,
    )
    classes = np.zeros(_MAX_CODE_POINT + 1, dtype=np.int32)
    replacements = ["", "", " ", ""]  # slots of _SAME, _DROP, _SPACE, _ISOLATE
    index_of = {}
    cjk = np.zeros(_MAX_CODE_POINT + 1, dtype=bool)
    for low, high in wordpiece._CJK_RANGES:
        cjk[low : high + 1] = True
    for code_point in range(_MAX_CODE_POINT + 1):
        if 0xD800 <= code_point <= 0xDFFF:
            continue  # surrogates never come out of UTF-8 decoding
        char = chr(code_point)
        # Unassigned in Python's Unicode and outside the CJK blocks: every step keeps it as is.
        if not cjk[code_point] and unicodedata.category(char) == "Cn":
            continue
        mapped = probe._normalize(char).translate(probe._split_table)
        if mapped == char:
            continue
        if mapped == "":
            classes[code_point] = _DROP
        elif mapped == " ":
            classes[code_point] = _SPACE
        elif mapped == f" {char} ":
            classes[code_point] = _ISOLATE
        else:
            if mapped not in index_of:
                index_of[mapped] = len(replacements)
                replacements.append(mapped)
            classes[code_point] = index_of[mapped]
    pages = classes.reshape(-1, _PAGE)
    unique_pages, page_index = np.unique(pages, axis=0, return_inverse=True)
    return page_index.astype(np.int32).reshape(-1), unique_pages.reshape(-1), replacements


class TFWordPieceTokenizer:
    """In-graph WordPiece with the vocabulary and configuration of a Python tokenizer.

    Args:
        tokenizer: the `wordpiece.WordPieceTokenizer` to reproduce.
    """

    def __init__(self, tokenizer: wordpiece.WordPieceTokenizer):
        # Built eagerly even when first asked for inside a tf.function or a dataset
        # map, so that every later graph can capture the same tables.
        with tf.init_scope():
            self._build(tokenizer)

    def _build(self, tokenizer: wordpiece.WordPieceTokenizer) -> None:
        self._python = tokenizer
        page_index, pages, replacements = _character_map(
            tokenizer.lowercase, tokenizer.strip_accents, tokenizer.tokenize_chinese_chars
        )
        self._page_index = tf.constant(page_index)
        self._pages = tf.constant(pages)
        self._replacements = tf.constant(replacements)
        specials = sorted(tokenizer._special_tokens, key=len, reverse=True)
        self._special_pattern = "|".join(_re2_escape(token) for token in specials)
        self._specials = tf.constant(specials)
        # Ids may have holes (a token listed twice keeps its later id); a hole gets a
        # placeholder holding NUL, which normalisation removes from every word.
        tokens = [f"\x00unused{index}" for index in range(tokenizer.vocab_size)]
        for token, index in tokenizer._vocab.items():
            tokens[index] = token
        self._max_chars = tokenizer.max_input_chars_per_word
        self._wordpiece = tf_text.FastWordpieceTokenizer(
            vocab=tokens,
            suffix_indicator=wordpiece._CONTINUATION,
            # Words are cut by characters below; 4 bytes a character is the UTF-8 maximum.
            max_bytes_per_word=4 * self._max_chars,
            token_out_type=tf.int32,
            unknown_token=tokenizer.unk_token,
            no_pretokenization=True,
        )
        # Traced once, then called from every graph that tokenises (each dataset map
        # would otherwise rebuild the ~150 ops of the tokenizer).
        self._encode_vector = tf.function(
            self._encode_uncompiled, input_signature=[tf.TensorSpec([None], tf.string)]
        )

    def _normalize(self, segments: tf.Tensor) -> tf.Tensor:
        """The per-character map over a vector of strings."""
        chars = tf.strings.unicode_split(segments, "UTF-8", errors="replace")
        code_points = tf.strings.unicode_decode(segments, "UTF-8", errors="replace")
        flat = code_points.flat_values
        classes = tf.gather(self._pages, tf.gather(self._page_index, flat // _PAGE) * _PAGE + flat % _PAGE)
        flat_chars = chars.flat_values
        mapped = tf.where(
            classes == _SAME,
            flat_chars,
            tf.where(
                classes == _ISOLATE,
                tf.strings.join([" ", flat_chars, " "]),
                tf.gather(self._replacements, classes),
            ),
        )
        return tf.strings.reduce_join(chars.with_flat_values(mapped), axis=-1)

    def words(self, texts: tf.Tensor) -> tf.RaggedTensor:
        """The words WordPiece sees: [batch] strings -> ragged [batch, None] strings."""
        if self._special_pattern:
            # Each special token gets a 0xFF byte on either side (a byte valid UTF-8 never
            # holds), then the text is cut at those bytes: a segment equal to a special
            # token is one. (Cheaper per new tf.data iterator than regex_split.)
            marked = tf.strings.regex_replace(texts, self._special_pattern, _MARK + b"\\0" + _MARK)
            segments = tf.strings.split(marked, sep=_MARK)
        else:
            segments = tf.RaggedTensor.from_tensor(texts[:, tf.newaxis])
        flat = segments.flat_values
        is_special = tf.reduce_any(tf.equal(flat[:, tf.newaxis], self._specials[tf.newaxis, :]), axis=1)
        # A special token stays whole: no normalisation, a word of its own.
        normalized = tf.where(is_special, tf.strings.join([" ", flat, " "]), self._normalize(flat))
        joined = tf.strings.reduce_join(segments.with_flat_values(normalized), axis=-1, separator=" ")
        words = tf.strings.split(joined, sep=" ")
        words = tf.ragged.boolean_mask(words, tf.strings.length(words) > 0)
        too_long = tf.strings.length(words.flat_values, unit="UTF8_CHAR") > self._max_chars
        # The unknown token is in the vocabulary, so the word becomes exactly one [UNK].
        return words.with_flat_values(tf.where(too_long, self._python.unk_token, words.flat_values))

    def encode(self, texts: tf.Tensor | str) -> tf.Tensor | tf.RaggedTensor:
        """Token ids without [CLS]/[SEP], as `WordPieceTokenizer.encode(add_special_tokens=False)`.

        Args:
            texts: a string scalar or a vector of strings (UTF-8; invalid bytes become U+FFFD,
                which is then dropped).

        Returns:
            int32: [n] for a scalar, ragged [batch, None] for a vector.
        """
        texts = tf.convert_to_tensor(texts, dtype=tf.string)
        if texts.shape.rank == 0:
            return self.encode(texts[tf.newaxis])[0]
        if texts.shape.rank != 1:
            raise ValueError(f"encode takes a string scalar or vector, got shape {texts.shape}")
        return self._encode_vector(texts)

    def _encode_uncompiled(self, texts: tf.Tensor) -> tf.RaggedTensor:
        pieces = self._wordpiece.tokenize(self.words(texts))  # [batch, words, pieces]
        return pieces.merge_dims(1, 2)


def _re2_escape(text: str) -> str:
    """Escapes every non-alphanumeric ASCII character for RE2 (as Python's re.escape does)."""
    return "".join(c if c.isalnum() or ord(c) > 127 else "\\" + c for c in text)
