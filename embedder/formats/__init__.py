"""Outside model formats, one module each, reading and writing it.

* `huggingface`: Hugging Face BERT folders and sentence-transformers folders
  (config.json, model.safetensors, the tokenizer files, modules.json with
  Pooling / Dense / Normalize, prefix prompts).
* `bundle`: our own self-contained folder (parameters, model description,
  tokenizer, prompts), which any architecture fits.
* `saved_model`: a TF SavedModel for TF Serving (written only; TensorFlow reads it).

Every reader returns a `LoadedModel` and every writer takes one, so a format
knows nothing of checkpoints (`embedder.export` turns a checkpoint into a
`LoadedModel`) nor of `Embedder` (which wraps what a reader returns). Formats
may import `models` and `data`; nothing below them imports formats.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from embedder.data import prompts as prompts_lib
from embedder.data import tokenizers
from embedder.errors import ConfigError, ExportError
from embedder.models import dual_encoder

# Tokenizer files copied from a vocabulary folder when it has them.
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    *tokenizers.SENTENCEPIECE_NAMES,
)
# sentence-transformers' record of the truncation length, in a tokenizer's folder.
SENTENCE_BERT_CONFIG = "sentence_bert_config.json"
_TEXT_MARK = "\x00embedder-text\x00"


@dataclasses.dataclass
class LoadedModel:
    """A model with everything needed to encode text as it was trained to.

    Attributes:
      module: the DualEncoder.
      params: its parameters (numpy or jax arrays, the "params" collection unboxed).
      vocab_dir: the tokenizer's folder (vocab.txt, tokenizer_config.json, ...).
      max_length: texts are truncated to this many tokens (specials included).
      prompts: the model's prompt templates.
      origin: where it came from (e.g. checkpoint step folder and step), for the record.
    """

    module: dual_encoder.DualEncoder
    params: Any
    vocab_dir: str
    max_length: int
    prompts: prompts_lib.PromptConfig
    origin: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def tokenizer(self) -> tokenizers.Tokenizer:
        return tokenizers.load_tokenizer(self.vocab_dir)


def prompts_from_dict(fields: dict[str, Any] | None) -> prompts_lib.PromptConfig:
    """A PromptConfig from its JSON form (checkpoint meta or bundle); None or {}: prompts off.

    Raises:
      ConfigError: a field PromptConfig does not have.
    """
    if not fields:
        return prompts_lib.PromptConfig()
    known = {f.name for f in dataclasses.fields(prompts_lib.PromptConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ConfigError(f"prompt config has unknown fields {unknown}")
    return prompts_lib.PromptConfig(**fields)


def default_max_length(module: dual_encoder.DualEncoder, vocab_dir: str | None) -> int:
    """The truncation length of a model whose tokenizer lives in `vocab_dir`.

    What the tokenizer's folder says (sentence-transformers' max_seq_length, e.g.
    256 for all-MiniLM-L6-v2), else the model's positions (512 at most for the
    llm family, which has none).
    """
    limit = module.config.max_len if module.config.family == "bert" else 512
    if vocab_dir:
        path = os.path.join(vocab_dir, SENTENCE_BERT_CONFIG)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return min(int(json.load(f).get("max_seq_length", limit)), limit)
    return limit


def copy_tokenizer(vocab_dir: str, destination: str) -> None:
    """Copies the TOKENIZER_FILES that `vocab_dir` has into `destination` (created if missing)."""
    os.makedirs(destination, exist_ok=True)
    for name in TOKENIZER_FILES:
        path = os.path.join(vocab_dir, name)
        if os.path.exists(path):
            shutil.copyfile(path, os.path.join(destination, name))


def prompt_affixes(prompts: prompts_lib.PromptConfig, kind: str, task: str | None = None) -> tuple[str, str]:
    """(prefix, suffix) that the `kind` ("query" / "document") prompt puts around a text.

    With `task` (None: the default task) for queries and the empty title for
    documents, as `Embedder.encode` uses when none is given; ("", "") when
    prompts are off.

    Raises:
      ExportError: the template does not hold {text} exactly once.
    """
    if kind == "query":
        prompted = prompts_lib.format_query(_TEXT_MARK, task, prompts)
    else:
        prompted = prompts_lib.format_document(_TEXT_MARK, None, prompts)
    if prompted.count(_TEXT_MARK) != 1:
        raise ExportError(f"the {kind} prompt must hold {{text}} exactly once")
    prefix, suffix = prompted.split(_TEXT_MARK)
    return prefix, suffix
