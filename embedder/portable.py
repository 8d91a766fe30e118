"""Self-contained model dirs: the tokenizer travels with the checkpoints.

A checkpoint's metadata names its tokenizer folder (`CheckpointMeta.vocab_dir`).
Recorded as the absolute path it was trained from (often inside that machine's
virtual environment), a model dir copied to another machine or path could not
be evaluated, souped, exported or encoded. So the first save copies the
tokenizer's files into `MODEL_DIR/tokenizer/` and records `vocab_dir` as
"tokenizer", relative to the model dir; `checkpointing.read_meta` resolves it
against the model dir the checkpoint is read from, wherever that is now. The
prompt templates are part of the metadata itself.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from embedder import fileio
from embedder.errors import CheckpointError

# The tokenizer's folder inside a model dir (what `vocab_dir` then records).
TOKENIZER_DIR = "tokenizer"
# What a tokenizer folder may hold that tokenising and truncating read: WordPiece
# (vocab.txt), a fast tokenizer (tokenizer.json), SentencePiece models, the
# Hugging Face tokenizer config, and sentence-transformers' truncation length.
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer.model",
    "spiece.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "sentence_bert_config.json",
)


def _is_relative(path: str) -> bool:
    return not (fileio.is_url(path) or os.path.isabs(path))


def copy_tokenizer(vocab_dir: str, model_dir: str) -> str:
    """Copies the tokenizer files of `vocab_dir` into `model_dir/tokenizer/`, once.

    Files already there are kept (a resumed run, or a second save, copies
    nothing); each file is written atomically.

    Args:
      vocab_dir: the tokenizer's folder (local).
      model_dir: the model dir (local or a URL).

    Returns:
      The folder the files are in, `model_dir/tokenizer`.

    Raises:
      CheckpointError: `vocab_dir` holds none of TOKENIZER_FILES.
    """
    destination = os.path.join(model_dir, TOKENIZER_DIR)
    names = [name for name in TOKENIZER_FILES if fileio.exists(os.path.join(vocab_dir, name))]
    if not names:
        raise CheckpointError(f"tokenizer folder {vocab_dir} holds none of {list(TOKENIZER_FILES)}")
    for name in names:
        target = os.path.join(destination, name)
        if fileio.exists(target):
            continue
        with fileio.open_file(os.path.join(vocab_dir, name), "rb") as f:
            data = f.read()
        fileio.write_atomically(target, lambda out, data=data: out.write(data), "wb")
    return destination


def bundle_tokenizer(model_dir: str, meta: Any) -> Any:
    """`meta` with its tokenizer copied into `model_dir` and `vocab_dir` recorded relative to it.

    Args:
      model_dir: where the checkpoints are saved (`model_dir/checkpoints/<step>`).
      meta: a `checkpointing.CheckpointMeta`.

    Returns:
      The same meta with `vocab_dir="tokenizer"`; unchanged when it names no
      tokenizer or already a relative one.
    """
    if not meta.vocab_dir or _is_relative(meta.vocab_dir):
        return meta
    copy_tokenizer(meta.vocab_dir, model_dir)
    return dataclasses.replace(meta, vocab_dir=TOKENIZER_DIR)


def resolve_vocab_dir(step_dir: str, meta: Any) -> Any:
    """`meta` with a relative `vocab_dir` made a path inside the model dir holding `step_dir`.

    Args:
      step_dir: the checkpoint's folder, `MODEL_DIR/checkpoints/<step>`.
      meta: the `checkpointing.CheckpointMeta` read from it.

    Returns:
      The meta with `vocab_dir` = MODEL_DIR/vocab_dir (absolute paths and URLs unchanged).
    """
    if not meta.vocab_dir or not _is_relative(meta.vocab_dir):
        return meta
    model_dir = os.path.dirname(os.path.dirname(fileio.absolute(step_dir).rstrip("/")))
    return dataclasses.replace(meta, vocab_dir=os.path.join(model_dir, meta.vocab_dir))
