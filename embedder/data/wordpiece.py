"""Pure-Python BERT WordPiece tokenizer, id-for-id compatible with HF `tokenizers`.

The pipeline is the one a BERT `tokenizer.json` describes, step for step:

1. special tokens written literally in the text (``[MASK]``, ``[SEP]``, ...) are
   split out first, case-sensitively and before any normalisation;
2. BertNormalizer: drop NUL, U+FFFD and control characters (categories Cc, Cf, Co;
   tab, newline and carriage return excepted), map Unicode White_Space to ' ', put spaces
   around CJK ideographs, strip accents (NFD, then drop category Mn), lowercase
   character by character;
3. BertPreTokenizer: split on White_Space, isolate every punctuation character
   (ASCII punctuation or category P*);
4. WordPiece: greedy longest-match-first with '##' continuations; a word that is
   too long or cannot be covered by vocabulary pieces becomes one [UNK].

Character classes follow the peer, not today's Unicode: the peer classifies
with Unicode 8.0 tables (the `unicode_categories` crate), where later characters
are unassigned, so they are neither dropped, stripped nor split off. Python 3.11's
`unicodedata` is Unicode 14.0; `_NEWER_THAN_UNICODE_8` lists the control, mark and
punctuation characters added in 9.0-14.0, which makes the two agree on every
character up to Unicode 14.0 (checked one code point at a time against the peer).
"""

from __future__ import annotations

import functools
import json
import os
import re
import string
import unicodedata
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from embedder.errors import ConfigError

# Unicode's White_Space property. Python's str.isspace() differs (it also accepts
# U+001C..U+001F), so the set is spelled out.
_WHITE_SPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
    "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)

# The CJK ideograph blocks the peer pads with spaces. 0x2B820..0x2B91F is not in
# the list (the peer skips it, unlike the original BERT code), so neither is it here.
_CJK_RANGES = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B920, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)

_CONTINUATION = "##"

# tokenizer_config.json keys -> WordPieceTokenizer arguments.
_CONFIG_KEYS = {
    "do_lower_case": "lowercase",
    "strip_accents": "strip_accents",
    "tokenize_chinese_chars": "tokenize_chinese_chars",
    "unk_token": "unk_token",
    "cls_token": "cls_token",
    "sep_token": "sep_token",
    "pad_token": "pad_token",
    "mask_token": "mask_token",
}

# The peer counts all of ASCII punctuation, symbols such as $+<=>^`|~ included.
_ASCII_PUNCTUATION = frozenset(string.punctuation)


# Control (Cf), mark (Mn) and punctuation (P*) characters the peer does not know:
# added in Unicode 9.0-14.0 (or, for a few, moved into these categories from a letter
# or symbol one). Hex code points and inclusive ranges, found by classifying every
# code point with both this module and the peer; the list is exactly those that differed.
_NEWER_THAN_UNICODE_8 = """
061D 07FD 0890-0891 0898-089F 08CA-08E2 09FD-09FE 0A76 0AFA-0AFF 0B55 0C04 0C3C 0C77
0C84 0D00 0D3B-0D3C 0D81 0EBA 180F 1885-1886 1ABF-1ACE 1B7D-1B7E 1DF6-1DFB 2E43-2E4F
2E52-2E5D A82C A8C5 A8FF A9BD 10D24-10D27 10EAB-10EAD 10F46-10F50 10F55-10F59
10F82-10F89 11070 11073-11074 110C2 110CD 111CF 1123E 1133B 11438-1143F
11442-11444 11446 1144B-1144F 1145A-1145B 1145D-1145E 11660-1166C 116B9 1182F-11837
11839-1183B 1193B-1193C 1193E 11943-11946 119D4-119D7 119DA-119DB 119E0 119E2
11A01-11A0A 11A33-11A38 11A3B-11A47 11A51-11A56 11A59-11A5B 11A8A-11A96 11A98-11A9C
11A9E-11AA2 11C30-11C36 11C38-11C3D 11C3F 11C41-11C45 11C70-11C71 11C92-11CA7
11CAA-11CB0 11CB2-11CB3 11CB5-11CB6 11D31-11D36 11D3A 11D3C-11D3D 11D3F-11D45 11D47
11D90-11D91 11D95 11D97 11EF3-11EF4 11EF7-11EF8 11FFF 12FF1-12FF2 13430-13438
16E97-16E9A 16F4F 16FE2 16FE4 1CF00-1CF2D 1CF30-1CF46 1E000-1E006 1E008-1E018
1E01B-1E021 1E023-1E024 1E026-1E02A 1E130-1E136 1E2AE 1E2EC-1E2EF 1E944-1E94A
1E95E-1E95F
"""

# Characters whose category changed after Unicode 8.0; the peer keeps the old one.
_UNICODE_8_CATEGORIES = {"\u166d": "Po", "\u1734": "Mn", "\U000111c9": "Po"}


def _parse_code_points(spec: str) -> frozenset[int]:
    """Expands "0890-0891 0C04 ..." into the set of code points it names."""
    code_points = set()
    for item in spec.split():
        low, _, high = item.partition("-")
        code_points.update(range(int(low, 16), int(high or low, 16) + 1))
    return frozenset(code_points)


_UNASSIGNED_IN_UNICODE_8 = _parse_code_points(_NEWER_THAN_UNICODE_8)


def _category(char: str) -> str:
    """General category of `char` as the peer's Unicode 8.0 tables give it."""
    if ord(char) in _UNASSIGNED_IN_UNICODE_8:
        return "Cn"
    return _UNICODE_8_CATEGORIES.get(char) or unicodedata.category(char)


def _is_control(char: str) -> bool:
    """Whether BERT's clean-up drops `char`.

    That is category Cc, Cf, Co or Cs except tab, LF and CR; unassigned code points
    (Cn) are kept, as in the peer, and end up as [UNK].
    """
    if char in "\t\n\r":
        return False
    return _category(char) in ("Cc", "Cf", "Co", "Cs")


def _is_chinese_char(char: str) -> bool:
    """Whether `char` lies in one of the CJK ideograph blocks in `_CJK_RANGES`."""
    code_point = ord(char)
    return any(low <= code_point <= high for low, high in _CJK_RANGES)


def _is_punctuation(char: str) -> bool:
    """BERT punctuation: ASCII punctuation or category P*."""
    return char in _ASCII_PUNCTUATION or _category(char).startswith("P")


class _LazyTable(dict):
    """A `str.translate` table that computes each character's mapping on first use.

    `str.translate` looks every code point up in the table, so a dict that fills
    itself through `__missing__` turns a per-character Python function into one
    C-level pass over the text, paying the Python call once per distinct character.
    """

    def __init__(self, fn: Callable[[str], str]):
        super().__init__()
        self._fn = fn

    def __missing__(self, code_point: int) -> str:
        value = self._fn(chr(code_point))
        self[code_point] = value
        return value


def _read_fast_tokenizer(path: str) -> dict | None:
    """A Hugging Face `tokenizer.json` as a dict, or None when the file is absent."""
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class WordPieceTokenizer:
    """BERT WordPiece tokenizer that matches HF `tokenizers` token for token.

    Args:
        vocab: token -> id mapping, or a list of tokens whose index is the id (a token
            listed twice gets its later id, as in Hugging Face's loaders).
        lowercase: lowercase the text (BERT "uncased").
        strip_accents: strip accents; None means "whenever `lowercase` is on".
        tokenize_chinese_chars: put spaces around CJK ideographs so each is a word.
        unk_token, cls_token, sep_token, pad_token, mask_token: special tokens;
            all but `mask_token` must be in the vocabulary.
        max_input_chars_per_word: a longer word becomes a single `unk_token`.
    """

    def __init__(
        self,
        vocab: dict[str, int] | list[str],
        *,
        lowercase: bool = True,
        strip_accents: bool | None = None,
        tokenize_chinese_chars: bool = True,
        unk_token: str = "[UNK]",
        cls_token: str = "[CLS]",
        sep_token: str = "[SEP]",
        pad_token: str = "[PAD]",
        mask_token: str = "[MASK]",
        max_input_chars_per_word: int = 100,
    ):
        if isinstance(vocab, dict):
            self._vocab = dict(vocab)
            self._id_to_token = {index: token for token, index in vocab.items()}
        else:
            self._vocab = {token: index for index, token in enumerate(vocab)}
            self._id_to_token = dict(enumerate(vocab))
        self._vocab_size = max(self._id_to_token, default=-1) + 1
        required = {
            "unk_token": unk_token,
            "cls_token": cls_token,
            "sep_token": sep_token,
            "pad_token": pad_token,
        }
        missing = [f"{name}={token!r}" for name, token in required.items() if token not in self._vocab]
        if missing:
            raise ConfigError(f"the vocabulary lacks the special tokens {', '.join(missing)}")
        self.lowercase = lowercase
        self.strip_accents = lowercase if strip_accents is None else strip_accents
        self.tokenize_chinese_chars = tokenize_chinese_chars
        self.unk_token = unk_token
        self.cls_token = cls_token
        self.sep_token = sep_token
        self.pad_token = pad_token
        self.mask_token = mask_token
        self.max_input_chars_per_word = max_input_chars_per_word

        # Special tokens typed in the text stay whole, as in the peer, where they are
        # "added tokens" matched on the raw text. Longest first gives leftmost-longest.
        specials = {unk_token, cls_token, sep_token, pad_token, mask_token} & set(self._vocab)
        self._special_tokens = frozenset(specials)
        alternatives = "|".join(re.escape(t) for t in sorted(specials, key=len, reverse=True))
        self._special_pattern = re.compile(f"({alternatives})")

        self._clean_table = _LazyTable(self._clean_char)
        self._unmark_table = _LazyTable(lambda c: "" if _category(c) == "Mn" else c)
        # Per character, not str.lower(): the peer has no final-sigma rule.
        self._lower_table = _LazyTable(str.lower)
        self._split_table = _LazyTable(
            lambda c: " " if c in _WHITE_SPACE else (f" {c} " if _is_punctuation(c) else c)
        )
        # Natural text repeats words, so memoising pieces per word pays off quickly.
        self._word_pieces = functools.lru_cache(maxsize=1 << 16)(self._word_pieces_uncached)

    @classmethod
    def from_file(cls, vocab_path: str | os.PathLike, **kwargs) -> WordPieceTokenizer:
        """Loads a BERT `vocab.txt` (one token a line; the line number is the id).

        Args:
            vocab_path: path of the vocabulary file.
            **kwargs: keyword arguments of `WordPieceTokenizer`.

        Returns:
            The tokenizer.

        Raises:
            ValueError: naming the file, if a required special token is missing.
        """
        with open(vocab_path, encoding="utf-8") as f:
            # Only the line break goes, as in Hugging Face's loader: other whitespace
            # may be part of a token.
            tokens = [line.rstrip("\r\n") for line in f]
        try:
            return cls(tokens, **kwargs)
        except ValueError as error:
            raise ConfigError(
                f"{vocab_path} ({len(tokens)} lines): {error}; add each missing token "
                "on a line of its own (the token on line n gets id n - 1)"
            ) from None

    @classmethod
    def from_pretrained_dir(cls, path: str | os.PathLike) -> WordPieceTokenizer:
        """Loads `vocab.txt` (or the WordPiece model of `tokenizer.json`) and the settings.

        Args:
            path: a Hugging Face model folder (e.g. a sentence-transformers export;
                recent versions of transformers save `tokenizer.json` and no
                `vocab.txt`).

        Returns:
            The tokenizer, configured with the folder's `do_lower_case`,
            `strip_accents`, `tokenize_chinese_chars` and special tokens
            (`tokenizer_config.json`, else `tokenizer.json`'s BertNormalizer).

        Raises:
            FileNotFoundError: neither `vocab.txt` nor a WordPiece `tokenizer.json`.
        """
        kwargs = {}
        vocab_path = os.path.join(path, "vocab.txt")
        # tokenizer.json is only read when there is no vocab.txt (it is large).
        fast = (
            None if os.path.exists(vocab_path) else _read_fast_tokenizer(os.path.join(path, "tokenizer.json"))
        )
        if fast is not None:
            normalizer = fast.get("normalizer") or {}
            if normalizer.get("type") == "BertNormalizer":
                kwargs["lowercase"] = normalizer.get("lowercase", True)
                kwargs["strip_accents"] = normalizer.get("strip_accents")
                kwargs["tokenize_chinese_chars"] = normalizer.get("handle_chinese_chars", True)
        config_path = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(config_path):
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
            for key, name in _CONFIG_KEYS.items():
                value = config.get(key)
                # Newer configs store special tokens as {"content": ...} objects.
                if isinstance(value, dict):
                    value = value.get("content")
                # strip_accents=None is meaningful ("follow lowercase"); elsewhere None
                # means "not set", so the default stays.
                if value is not None or (key == "strip_accents" and key in config):
                    kwargs[name] = value
        if os.path.exists(vocab_path):
            return cls.from_file(vocab_path, **kwargs)
        model = (fast or {}).get("model") or {}
        if model.get("type") != "WordPiece" or not isinstance(model.get("vocab"), dict):
            raise FileNotFoundError(f"{path}: no vocab.txt and no WordPiece tokenizer.json")
        return cls(model["vocab"], **kwargs)

    @property
    def vocab_size(self) -> int:
        """Rows an embedding table needs for these ids: the largest id plus one."""
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        """Id of the padding token."""
        return self._vocab[self.pad_token]

    @property
    def cls_id(self) -> int:
        """Id of the token that starts every encoded sequence."""
        return self._vocab[self.cls_token]

    @property
    def sep_id(self) -> int:
        """Id of the token that ends every encoded sequence."""
        return self._vocab[self.sep_token]

    @property
    def unk_id(self) -> int:
        """Id of the token that stands for words the vocabulary cannot spell."""
        return self._vocab[self.unk_token]

    def _clean_char(self, char: str) -> str:
        """The clean-up and CJK steps of BertNormalizer for one character."""
        if char == "\x00" or char == "\ufffd" or _is_control(char):
            return ""
        if char in _WHITE_SPACE:
            return " "
        if self.tokenize_chinese_chars and _is_chinese_char(char):
            return f" {char} "
        return char

    def _normalize(self, text: str) -> str:
        """BertNormalizer: clean-up, CJK spacing, accent stripping, lowercasing."""
        text = text.translate(self._clean_table)
        if self.strip_accents:
            text = unicodedata.normalize("NFD", text).translate(self._unmark_table)
        if self.lowercase:
            text = text.translate(self._lower_table)
        return text

    def _word_pieces_uncached(self, word: str) -> tuple[str, ...]:
        """Greedy longest-match-first WordPiece split of one pre-tokenized word."""
        if len(word) > self.max_input_chars_per_word:
            return (self.unk_token,)
        vocab = self._vocab
        pieces = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else _CONTINUATION + word[start:end]
                if piece in vocab:
                    break
                end -= 1
            else:
                # One uncoverable position makes the whole word unknown, as in BERT.
                return (self.unk_token,)
            pieces.append(piece)
            start = end
        return tuple(pieces)

    def tokenize(self, text: str) -> list[str]:
        """Splits text into word pieces, without [CLS]/[SEP].

        Args:
            text: any Unicode string.

        Returns:
            The word pieces, continuations prefixed with '##'. Special tokens written
            literally in `text` (e.g. "[MASK]") come back whole.
        """
        pieces: list[str] = []
        for index, segment in enumerate(self._special_pattern.split(text)):
            # re.split with one capture group puts the separators at odd indices.
            if index % 2:
                pieces.append(segment)
                continue
            if not segment:
                continue
            for word in self._normalize(segment).translate(self._split_table).split(" "):
                if word:
                    pieces.extend(self._word_pieces(word))
        return pieces

    def encode(self, text: str, max_length: int | None = None, add_special_tokens: bool = True) -> list[int]:
        """Encodes text to token ids, as the peer does with truncation on.

        Args:
            text: any Unicode string.
            max_length: most ids to return, specials included; the first pieces are
                kept. None keeps everything.
            add_special_tokens: wrap the pieces in [CLS] ... [SEP].

        Returns:
            Token ids.

        Raises:
            ValueError: if `max_length` leaves no room for the special tokens.
        """
        vocab = self._vocab
        ids = [vocab[piece] for piece in self.tokenize(text)]
        if add_special_tokens:
            if max_length is not None:
                if max_length < 2:
                    raise ConfigError(f"max_length={max_length} cannot hold [CLS] and [SEP]")
                ids = ids[: max_length - 2]
            return [self.cls_id, *ids, self.sep_id]
        if max_length is not None:
            ids = ids[:max_length]
        return ids

    def encode_batch(self, texts: Sequence[str], max_length: int, pad_to: int | None = None) -> np.ndarray:
        """Encodes a batch of texts into one right-padded id array.

        Args:
            texts: strings to encode.
            max_length: most ids per row, [CLS] and [SEP] included.
            pad_to: width of the result; defaults to the longest encoded row. Use a
                fixed value to keep array shapes static under `jax.jit`.

        Returns:
            int32 array [len(texts), pad_to or longest row], padded with `pad_id`.

        Raises:
            TypeError: if an element of `texts` is not a string.
            ValueError: if `pad_to` is smaller than `max_length` allows rows to be.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a sequence of strings, not one string")
        rows = []
        for position, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch: texts[{position}] is {type(text).__name__}, not str")
            rows.append(self.encode(text, max_length=max_length))
        longest = max((len(row) for row in rows), default=0)
        width = longest if pad_to is None else pad_to
        if width < longest:
            raise ValueError(
                f"pad_to={pad_to} is shorter than the longest encoded row ({longest} ids); "
                f"set pad_to >= max_length={max_length}"
            )
        batch = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        for row_index, row in enumerate(rows):
            batch[row_index, : len(row)] = row
        return batch

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Turns ids back into text, as the peer's WordPiece decoder does.

        Continuations are glued to the previous piece and a space before . ? ! , is
        dropped. The text comes back normalised (lowercased, accents stripped), so
        decoding is the inverse of `encode` only for already-normal text.

        Args:
            ids: token ids (a list, or a 1-D array; padding may be included).
            skip_special_tokens: leave out [CLS], [SEP], [PAD], [UNK], [MASK].

        Returns:
            The decoded text.
        """
        tokens = [self._id_to_token.get(int(i), self.unk_token) for i in ids]
        if skip_special_tokens:
            tokens = [t for t in tokens if t not in self._special_tokens]
        parts = []
        for index, token in enumerate(tokens):
            if index:
                if token.startswith(_CONTINUATION):
                    token = token[len(_CONTINUATION) :]
                else:
                    token = " " + token
            # The peer cleans each piece on its own (with its leading space), not the
            # joined string, which is why multi-token patterns never apply.
            parts.append(_cleanup(token))
        return "".join(parts)


def _cleanup(piece: str) -> str:
    """The peer's decoder clean-up: drop the space before common punctuation."""
    for dirty, clean in _CLEANUPS:
        piece = piece.replace(dirty, clean)
    return piece


_CLEANUPS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" do not", " don't"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
