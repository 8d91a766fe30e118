"""One tokenizer interface for every model family.

Three kinds of model folder, one `Tokenizer` protocol (`encode(text, max_length)`
with the folder's special tokens and truncation, `pad_id`, `vocab_size`):

* a BERT `vocab.txt` (or a WordPiece `tokenizer.json` with a BertNormalizer):
  our `wordpiece.WordPieceTokenizer`, which matches Hugging Face token for token;
* a Hugging Face `tokenizer.json` (BPE, Unigram, WordPiece; Qwen, Llama, Gemma):
  the `tokenizers` package runs it, its post-processor adds the specials (e.g.
  Gemma's `<bos>`), `tokenizer_config.json` names the padding token and the
  length limit;
* a SentencePiece `.model` (Gemma's `tokenizer.model`, T5's `spiece.model`): the
  `sentencepiece` package, with `<bos>` / `<eos>` as `tokenizer_config.json`'s
  `add_bos_token` / `add_eos_token` say.

`load_tokenizer(folder)` picks the kind from the files present.
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Protocol, runtime_checkable

from embedder.errors import ConfigError, DataError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
VOCAB_TXT = "vocab.txt"
SENTENCEPIECE_NAMES = ("tokenizer.model", "spiece.model", "sentencepiece.model")


@runtime_checkable
class Tokenizer(Protocol):
    """What the batcher, evaluation, inference and export need from a tokenizer."""

    @property
    def vocab_size(self) -> int:
        """Rows an embedding table needs for these ids: the largest id plus one."""
        ...

    @property
    def pad_id(self) -> int:
        """Id of the padding token."""
        ...

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of `text`, special tokens included, at most `max_length` of them."""
        ...


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, TOKENIZER_CONFIG)
    return _read_json(path) if os.path.exists(path) else {}


def _model_max_length(config: dict[str, Any]) -> int | None:
    # transformers writes a huge sentinel (int(1e30)) when there is no limit.
    value = config.get("model_max_length")
    return int(value) if isinstance(value, (int, float)) and value < 1e12 else None


def _limit(max_length: int | None, model_max_length: int | None) -> int | None:
    if max_length is None:
        return model_max_length
    if model_max_length is None:
        return max_length
    return min(max_length, model_max_length)


class HuggingFaceTokenizer:
    """A `tokenizer.json` run by the `tokenizers` package (BPE, Unigram, WordPiece).

    Args:
      tokenizer: a `tokenizers.Tokenizer`; its post-processor adds the specials.
      pad_id: id of the padding token.
      model_max_length: the folder's length limit (None: none).
      truncation_side: "right" keeps the first tokens, "left" the last.
      source: where it was read from, for error messages.
    """

    def __init__(
        self,
        tokenizer: Any,
        pad_id: int,
        model_max_length: int | None = None,
        truncation_side: str = "right",
        source: str = "<memory>",
    ):
        if truncation_side not in ("right", "left"):
            raise ConfigError(f"{source}: truncation_side={truncation_side!r}: expected 'right' or 'left'")
        self._tokenizer = tokenizer
        # Our own truncation and no padding: encode() returns exactly the row.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._pad_id = pad_id
        self._vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.model_max_length = model_max_length
        self.truncation_side = truncation_side
        self._truncating: dict[int, Any] = {}
        self.source = source

    @classmethod
    def from_dir(cls, folder: str) -> HuggingFaceTokenizer:
        """Loads `tokenizer.json` and `tokenizer_config.json` (if present) from `folder`.

        The padding token is tokenizer_config.json's `pad_token`, else
        tokenizer.json's padding settings, else an added token named like a pad.

        Raises:
          DataError: a file is not valid JSON or tokenizer.json does not parse.
          ConfigError: the folder names no padding token that the vocabulary has.
        """
        from tokenizers import Tokenizer as RustTokenizer

        path = os.path.join(folder, TOKENIZER_JSON)
        try:
            tokenizer = RustTokenizer.from_file(path)
        except Exception as e:  # the Rust side raises a bare Exception on bad files.
            raise DataError(f"{path}: cannot read tokenizer: {e}") from e
        config = _read_config(folder)
        pad_token = _token_content(config.get("pad_token"))
        pad_id = tokenizer.token_to_id(pad_token) if pad_token else None
        if pad_token and pad_id is None:
            raise ConfigError(
                f"{os.path.join(folder, TOKENIZER_CONFIG)}: pad_token={pad_token!r} is not in {path}"
            )
        if pad_id is None and tokenizer.padding:
            pad_id = tokenizer.padding.get("pad_id")
        if pad_id is None:
            for candidate in ("<pad>", "[PAD]", "<|endoftext|>"):
                pad_id = tokenizer.token_to_id(candidate)
                if pad_id is not None:
                    break
        if pad_id is None:
            raise ConfigError(
                f"{folder}: no padding token: set pad_token in {TOKENIZER_CONFIG} to a token of {path}"
            )
        return cls(
            tokenizer,
            pad_id=pad_id,
            model_max_length=_model_max_length(config),
            truncation_side=config.get("truncation_side", "right"),
            source=path,
        )

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids with the post-processor's specials, truncated as transformers does.

        Args:
          text: any string.
          max_length: most ids, specials included (capped by the folder's
            model_max_length); the specials are kept, the text's tokens cut.

        Returns:
          Token ids.
        """
        limit = _limit(max_length, self.model_max_length)
        if limit is None:
            return self._tokenizer.encode(text).ids
        # The Rust tokenizer truncates leaving room for the post-processor's
        # specials, exactly as PreTrainedTokenizerFast(truncation=True) does.
        # A copy per limit keeps the shared tokenizer unconfigured.
        truncating = self._truncating.get(limit)
        if truncating is None:
            from tokenizers import Tokenizer as RustTokenizer

            truncating = RustTokenizer.from_str(self._tokenizer.to_str())
            try:
                truncating.enable_truncation(limit, direction=self.truncation_side)
            except Exception as e:
                raise ConfigError(f"{self.source}: max_length={limit}: {e}") from e
            self._truncating[limit] = truncating
        return truncating.encode(text).ids

    def encode_bare(self, text: str) -> list[int]:
        """The text's ids without the post-processor's specials and untruncated."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def specials(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix): the ids the post-processor puts before and after a text.

        Read off by encoding a probe text with and without the specials, so any
        single-sequence template (Gemma's `<bos> $A`, Qwen's `$A <|endoftext|>`)
        is covered.
        """
        probe = "a"
        bare = self.encode_bare(probe)
        full = self._tokenizer.encode(probe).ids
        for start in range(len(full) - len(bare) + 1):
            if full[start : start + len(bare)] == bare:
                return full[:start], full[start + len(bare) :]
        raise ConfigError(
            f"{self.source}: the post-processor rewrites the text's own ids; cannot split its specials"
        )


class SentencePieceTokenizer:
    """A SentencePiece `.model` run by the `sentencepiece` package.

    Args:
      model_path: the `.model` file.
      add_bos: start every sequence with the model's bos id.
      add_eos: end every sequence with the model's eos id.
      pad_id: the padding id; by default the model's own pad piece (a model
        trained without one needs it given).
      model_max_length: a length limit from the folder (None: none).
    """

    def __init__(
        self,
        model_path: str,
        add_bos: bool = False,
        add_eos: bool = False,
        pad_id: int | None = None,
        model_max_length: int | None = None,
    ):
        import sentencepiece

        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"{model_path}: cannot read SentencePiece model: {e}") from e
        self.source = model_path
        self.model_path = model_path
        for name, wanted, piece_id in (
            ("add_bos", add_bos, self._sp.bos_id()),
            ("add_eos", add_eos, self._sp.eos_id()),
        ):
            if wanted and piece_id < 0:
                raise ConfigError(f"{model_path}: {name}=True but the model has no such piece")
        self.add_bos, self.add_eos = add_bos, add_eos
        if pad_id is None:
            pad_id = self._sp.pad_id()
        if pad_id is None or pad_id < 0:
            raise ConfigError(
                f"{model_path}: the model has no pad piece; name one with pad_token in {TOKENIZER_CONFIG}"
            )
        self._pad_id = pad_id
        self.model_max_length = model_max_length

    @classmethod
    def from_dir(cls, folder: str, model_path: str | None = None) -> SentencePieceTokenizer:
        """Loads the folder's `.model` with tokenizer_config.json's add_bos_token,
        add_eos_token, pad_token and model_max_length (defaults: no bos, no eos,
        the model's pad piece, no limit)."""
        if model_path is None:
            model_path = _sentencepiece_file(folder)
            if model_path is None:
                raise DataError(f"{folder}: no SentencePiece .model file")
        config = _read_config(folder)
        pad_id = None
        pad_token = _token_content(config.get("pad_token"))
        if pad_token is not None:
            import sentencepiece

            sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
            pad_id = sp.piece_to_id(pad_token)
            if pad_id == sp.unk_id() and pad_token != sp.id_to_piece(sp.unk_id()):
                raise ConfigError(
                    f"{os.path.join(folder, TOKENIZER_CONFIG)}: pad_token={pad_token!r} is not a piece of {model_path}"
                )
        return cls(
            model_path,
            add_bos=bool(config.get("add_bos_token", False)),
            add_eos=bool(config.get("add_eos_token", False)),
            pad_id=pad_id,
            model_max_length=_model_max_length(config),
        )

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Pieces' ids between the optional bos and eos; the text's tail is cut to fit."""
        ids = self._sp.encode(text)
        limit = _limit(max_length, self.model_max_length)
        specials = int(self.add_bos) + int(self.add_eos)
        if limit is not None:
            if limit < specials:
                raise ConfigError(f"max_length={limit} cannot hold the {specials} special tokens")
            ids = ids[: limit - specials]
        return [self._sp.bos_id()] * self.add_bos + ids + [self._sp.eos_id()] * self.add_eos

    def encode_bare(self, text: str) -> list[int]:
        """The pieces' ids, without bos / eos and untruncated."""
        return self._sp.encode(text)

    def specials(self) -> tuple[list[int], list[int]]:
        """(prefix, suffix): [bos] and [eos] as the folder's config asks."""
        return [self._sp.bos_id()] * self.add_bos, [self._sp.eos_id()] * self.add_eos


def _sentencepiece_file(folder: str) -> str | None:
    for name in SENTENCEPIECE_NAMES:
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return path
    found = sorted(glob.glob(os.path.join(glob.escape(folder), "*.model")))
    return found[0] if found else None


def _is_bert_wordpiece(path: str) -> bool:
    fast = _read_json(path)
    model = fast.get("model") or {}
    normalizer = fast.get("normalizer") or {}
    return model.get("type") == "WordPiece" and normalizer.get("type") == "BertNormalizer"


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """The tokenizer a model folder describes.

    Picks, in order: `vocab.txt` (WordPiece); `tokenizer.json` (a BERT WordPiece
    one goes to our WordPiece tokenizer, anything else to `tokenizers`); a
    SentencePiece `.model` (tokenizer.model, spiece.model, or any *.model).

    Args:
      folder: a model or tokenizer folder.

    Returns:
      A `Tokenizer`.

    Raises:
      DataError: the folder holds none of these files, or one is unreadable.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: tokenizer folder not found")
    from embedder.data import wordpiece

    fast = os.path.join(folder, TOKENIZER_JSON)
    if os.path.exists(os.path.join(folder, VOCAB_TXT)) or (os.path.exists(fast) and _is_bert_wordpiece(fast)):
        return wordpiece.WordPieceTokenizer.from_pretrained_dir(folder)
    if os.path.exists(fast):
        return HuggingFaceTokenizer.from_dir(folder)
    model = _sentencepiece_file(folder)
    if model is not None:
        return SentencePieceTokenizer.from_dir(folder, model)
    raise DataError(
        f"{folder}: no tokenizer: expected {VOCAB_TXT}, {TOKENIZER_JSON} or a SentencePiece .model file"
    )
