"""`embedder export`: a checkpoint as a sentence-transformers folder, a bundle or a TF SavedModel.

* ``sentence-transformers``: what `SentenceTransformer(OUT)` loads with no code
  of ours: Hugging Face BERT `config.json` and `model.safetensors` (HF names and
  layouts), the tokenizer files, `modules.json` with Transformer, Pooling, Dense
  (our projection: no bias, identity activation) and Normalize, and the prompts
  as sentence-transformers prefix prompts ("query", "document"). BERT family,
  one shared tower; anything else is an ExportError naming what cannot be expressed.
* ``bundle``: our own folder for `Embedder.load`: parameters (safetensors, one
  tensor per parameter path, stored dtype), model config, max length, prompts,
  Matryoshka sizes and the vocabulary; no gin files, no orbax.
* ``saved_model``: see `embedder.saved_model`.

Every format is written into a temporary folder beside OUT and renamed to OUT
when complete, so a folder named OUT is always a whole export.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from embedder import checkpointing, inference
from embedder.data import prompts as prompts_lib
from embedder.data import wordpiece
from embedder.errors import ExportError
from embedder.models import dual_encoder, pretrained, spec

FORMATS = ("sentence-transformers", "bundle", "saved_model")
# Tokenizer files copied from the vocabulary folder when it has them.
TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")
_TEXT_MARK = "\x00embedder-text\x00"


def check_new_output(output: str) -> str:
    """The absolute path of `output`, a folder still to be written.

    Called before any work, so a taken name is refused at once, not after the
    checkpoints are loaded.

    Raises:
      ExportError: `output` exists and is not an empty folder (nothing is overwritten).
    """
    output = os.path.abspath(output)
    if os.path.exists(output) and not (os.path.isdir(output) and not os.listdir(output)):
        raise ExportError(f"{output} already exists; remove it or choose another output")
    return output


@contextlib.contextmanager
def atomic_directory(output: str) -> Iterator[str]:
    """Yields a temporary folder beside `output`; renames it to `output` if the block succeeds.

    Raises:
      ExportError: `output` exists and is not an empty folder (nothing is overwritten).
    """
    output = check_new_output(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked above
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclasses.dataclass
class ExportSource:
    """What every format is written from.

    Attributes:
      module: the DualEncoder.
      params: its parameters.
      vocab_dir: the tokenizer's folder (vocab.txt, tokenizer_config.json, ...).
      max_length: texts are truncated to this many tokens.
      prompts: the model's prompt templates.
      origin: where it came from (checkpoint step folder and step), for the record.
    """

    module: dual_encoder.DualEncoder
    params: Any
    vocab_dir: str
    max_length: int
    prompts: prompts_lib.PromptConfig
    origin: dict[str, Any]

    @property
    def tokenizer(self) -> wordpiece.WordPieceTokenizer:
        return wordpiece.WordPieceTokenizer.from_pretrained_dir(self.vocab_dir)


def load_source(checkpoint: str, step: int | None = None, max_length: int | None = None) -> ExportSource:
    """Reads a checkpoint (training or soup) for export.

    Args:
      checkpoint: model dir, its checkpoints/ folder or a step folder.
      step: the step; None = the latest.
      max_length: truncation length; None: `inference.default_max_length`.

    Raises:
      CheckpointError: no such checkpoint or step (the message lists the steps saved).
    """
    step_dir = checkpointing.resolve_step_dir(checkpoint, step)
    params, meta = checkpointing.load_model_params(step_dir)
    module = spec.module_from_description(meta.model_config)
    vocab_dir = meta.vocab_dir
    if not vocab_dir or not os.path.exists(os.path.join(vocab_dir, "vocab.txt")):
        raise ExportError(f"{step_dir}: the checkpoint's vocab_dir {vocab_dir!r} holds no vocab.txt")
    limit = inference.default_max_length(module, vocab_dir)
    if max_length is not None and max_length > limit:
        raise ExportError(f"max_length={max_length} exceeds what the model takes ({limit})")
    return ExportSource(
        module=module,
        params=params,
        vocab_dir=vocab_dir,
        max_length=max_length or limit,
        prompts=meta.prompts,
        origin={
            "checkpoint": step_dir,
            "step": meta.step if meta.step is not None else int(os.path.basename(step_dir)),
        },
    )


def export(
    checkpoint: str,
    format: str,
    output: str,
    step: int | None = None,
    max_length: int | None = None,
    matryoshka_dims: Sequence[int] = (),
) -> str:
    """Exports a checkpoint; the entry point of `embedder export`.

    Args:
      checkpoint: model dir, checkpoints/ or step folder.
      format: one of FORMATS.
      output: the folder to create (must not exist, or be empty).
      step: the step; None = the latest.
      max_length: truncation length (default: the tokenizer folder's or the model's).
      matryoshka_dims: sizes the bundle records and the SavedModel also returns.

    Returns:
      The output folder.
    """
    if format not in FORMATS:
        raise ExportError(f"format={format!r}: expected one of {FORMATS}")
    check_new_output(output)
    if format == "sentence-transformers":
        # From the metadata alone: a model the format cannot express is refused before its weights load.
        step_dir = checkpointing.resolve_step_dir(checkpoint, step)
        module = spec.module_from_description(checkpointing.read_meta(step_dir).model_config)
        _check_sentence_transformers(module, step_dir)
    source = load_source(checkpoint, step, max_length)
    dims = check_dims(matryoshka_dims, source.module.embedding_dim)
    if format == "sentence-transformers":
        return export_sentence_transformers(source, output)
    if format == "bundle":
        return export_bundle(source, output, dims)
    from embedder import saved_model

    return saved_model.export_saved_model(source, output, dims)


def check_dims(dims: Sequence[int], full: int) -> tuple[int, ...]:
    """Validated Matryoshka sizes, largest first."""
    bad = [d for d in dims if not 0 < d <= full]
    if bad:
        raise ExportError(f"Matryoshka sizes {bad} are not in 1..{full} (the embedding size)")
    return tuple(sorted(set(int(d) for d in dims), reverse=True))


def write_json(path: str, value: Any) -> None:
    """Pretty JSON, UTF-8, newline at the end."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def _copy_tokenizer(vocab_dir: str, destination: str) -> None:
    os.makedirs(destination, exist_ok=True)
    for name in TOKENIZER_FILES:
        path = os.path.join(vocab_dir, name)
        if os.path.exists(path):
            shutil.copyfile(path, os.path.join(destination, name))


def prompt_prefixes(prompts: prompts_lib.PromptConfig) -> dict[str, str]:
    """The prompts as sentence-transformers prefixes {"query": ..., "document": ...}.

    The query's task is the default task and the document's title the empty
    title, as `Embedder.encode` uses when none is given.

    Raises:
      ExportError: a template puts text after {text} (prefixes cannot express it).
    """
    if not prompts.enabled:
        return {}
    prefixes = {}
    for name, prompted in (
        ("query", prompts_lib.format_query(_TEXT_MARK, None, prompts)),
        ("document", prompts_lib.format_document(_TEXT_MARK, None, prompts)),
    ):
        if prompted.count(_TEXT_MARK) != 1 or not prompted.endswith(_TEXT_MARK):
            raise ExportError(
                f"the {name} prompt {prompted.replace(_TEXT_MARK, '{text}')!r} does not end with the "
                "text; sentence-transformers prompts are prefixes"
            )
        prefixes[name] = prompted[: -len(_TEXT_MARK)]
    return prefixes


def _check_sentence_transformers(module: dual_encoder.DualEncoder, checkpoint: str) -> None:
    problems = []
    if not module.shared_tower:
        problems.append("two towers (sentence-transformers' Transformer module is one encoder)")
    if module.pooling not in pretrained.ST_POOLING_KEYS:
        problems.append(f"pooling={module.pooling!r}")
    try:
        pretrained.hf_config(module.config)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        family = module.config.family
        raise ExportError(
            f"cannot export {checkpoint} ({family}-family encoder) as sentence-transformers: "
            + "; ".join(problems)
            + "; --format=bundle takes any architecture"
        )


def export_sentence_transformers(source: ExportSource, output: str) -> str:
    """Writes a folder that `SentenceTransformer(output)` loads and that encodes as we do.

    Args:
      source: the model (see load_source).
      output: the folder to create.

    Returns:
      The output folder.

    Raises:
      ExportError: the architecture has no sentence-transformers form (an LLM-family
        tower, two towers, ...), naming what.
    """
    from safetensors.numpy import save_file

    module = source.module
    _check_sentence_transformers(module, source.origin.get("checkpoint", "the model"))
    prefixes = prompt_prefixes(source.prompts)
    with atomic_directory(output) as tmp:
        write_json(os.path.join(tmp, "config.json"), pretrained.hf_config(module.config))
        save_file(
            pretrained.bert_tensors(source.params["encoder"], module.config),
            os.path.join(tmp, "model.safetensors"),
            metadata={"format": "pt"},
        )
        _copy_tokenizer(source.vocab_dir, tmp)
        write_json(
            os.path.join(tmp, "sentence_bert_config.json"),
            {"max_seq_length": source.max_length, "do_lower_case": False},
        )
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]

        def add(kind: str) -> str:
            path = f"{len(modules)}_{kind}"
            modules.append(
                {
                    "idx": len(modules),
                    "name": str(len(modules)),
                    "path": path,
                    "type": f"sentence_transformers.models.{kind}",
                }
            )
            os.makedirs(os.path.join(tmp, path))
            return os.path.join(tmp, path)

        pooling = {key: False for key in pretrained.ST_POOLING_KEYS.values()}
        pooling.update({"pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})
        pooling[pretrained.ST_POOLING_KEYS[module.pooling]] = True
        write_json(
            os.path.join(add("Pooling"), "config.json"),
            {"word_embedding_dimension": module.config.hidden_size, **pooling},
        )
        if module.projection_dim:
            dense_dir = add("Dense")
            kernel = np.asarray(source.params["projection"]["kernel"], np.float32)  # [in, out]
            write_json(
                os.path.join(dense_dir, "config.json"),
                {
                    "in_features": int(kernel.shape[0]),
                    "out_features": int(kernel.shape[1]),
                    "bias": False,
                    "activation_function": pretrained.ST_IDENTITY,
                },
            )
            save_file(
                {"linear.weight": np.ascontiguousarray(kernel.T)},
                os.path.join(dense_dir, "model.safetensors"),
                metadata={"format": "pt"},
            )
        if module.normalize:
            add("Normalize")
        write_json(os.path.join(tmp, "modules.json"), modules)
        write_json(
            os.path.join(tmp, "config_sentence_transformers.json"),
            {"prompts": prefixes, "default_prompt_name": None, "similarity_fn_name": "cosine"},
        )
    return os.path.abspath(output)


def export_bundle(source: ExportSource, output: str, matryoshka_dims: Sequence[int] = ()) -> str:
    """Writes our own self-contained folder, which `Embedder.load` reads.

    Args:
      source: the model (see load_source).
      output: the folder to create.
      matryoshka_dims: the sizes the model was trained for (recorded, informative).

    Returns:
      The output folder.
    """
    from safetensors.flax import save_file

    with atomic_directory(output) as tmp:
        save_file(inference.flatten_params(source.params), os.path.join(tmp, inference.BUNDLE_PARAMS))
        _copy_tokenizer(source.vocab_dir, os.path.join(tmp, inference.BUNDLE_TOKENIZER))
        write_json(
            os.path.join(tmp, inference.BUNDLE_CONFIG),
            {
                "format": inference.BUNDLE_FORMAT,
                "version": inference.BUNDLE_VERSION,
                "model_config": spec.describe_module(source.module),
                "max_length": source.max_length,
                "prompts": dataclasses.asdict(source.prompts),
                "matryoshka_dims": list(matryoshka_dims),
                "origin": source.origin,
            },
        )
    return os.path.abspath(output)
