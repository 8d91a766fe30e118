"""`embedder export`: a checkpoint as a sentence-transformers folder, a bundle or a TF SavedModel.

The checkpoint side lives here (`load_source` reads a training or soup
checkpoint into the `LoadedModel` every format writes from); each format is
written by its own module in `embedder.formats`:

* ``sentence-transformers``: `formats.huggingface.write`, what
  `SentenceTransformer(OUT)` loads with no code of ours (BERT family, one shared
  tower; anything else is an ExportError naming what cannot be expressed);
* ``bundle``: `formats.bundle.write`, our own folder for `Embedder.load`, any
  architecture;
* ``saved_model``: `formats.saved_model.write`, raw strings in, embeddings out.

`--quantize=int8|int4` (`quantize_source`) exports the weights as a quantised
model serves them (per-channel symmetric integers, `embedder.quantization`): the
bundle stores the integers and scales (int4 two to a byte), the
sentence-transformers folder and the SavedModel the dequantised weights
`q * scale` (exactly the values the quantised forward pass uses), and each
records which weights were quantised and how (the bundle's CONFIG,
quantization.json in the sentence-transformers folder, the SavedModel's
export info).

Every format is written into a temporary folder beside OUT and renamed to OUT
when complete (`fileio.atomic_directory`), so a folder named OUT is always a
whole export.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from embedder import checkpointing, fileio, matryoshka, quantization
from embedder.data import tokenizers
from embedder.errors import DataError, ExportError
from embedder.formats import (
    LoadedModel,
    bundle,
    default_max_length,
    huggingface,
    saved_model,
)
from embedder.models import spec

FORMATS = ("sentence-transformers", "bundle", "saved_model")
# What every format is written from (the name `embedder export` has always used).
ExportSource = LoadedModel


def load_source(checkpoint: str, step: int | None = None, max_length: int | None = None) -> LoadedModel:
    """Reads a checkpoint (training or soup) for export.

    Args:
      checkpoint: model dir, its checkpoints/ folder or a step folder.
      step: the step; None = the latest.
      max_length: truncation length; None: `formats.default_max_length`.

    Returns:
      The model, its origin the step folder and step.

    Raises:
      CheckpointError: no such checkpoint or step (the message lists the steps saved).
      ExportError: the checkpoint's vocabulary folder is gone, or max_length is
        longer than the model takes.
    """
    step_dir = checkpointing.resolve_step_dir(checkpoint, step)
    params, meta = checkpointing.load_model_params(step_dir)
    module = spec.module_from_description(meta.model_config)
    vocab_dir = meta.vocab_dir
    if not vocab_dir:
        raise ExportError(f"{step_dir}: the checkpoint names no vocab_dir (tokenizer folder)")
    try:
        tokenizers.load_tokenizer(vocab_dir)
    except DataError as e:
        raise ExportError(
            f"{step_dir}: the checkpoint's vocab_dir {vocab_dir!r} holds no readable tokenizer: {e}"
        ) from e
    limit = default_max_length(module, vocab_dir)
    if max_length is not None and max_length > limit:
        raise ExportError(f"max_length={max_length} exceeds what the model takes ({limit})")
    return LoadedModel(
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


def quantize_source(source: LoadedModel, bits: int, include_embeddings: bool = False) -> LoadedModel:
    """`source` with every kernel replaced by its dequantised per-channel integers.

    What the sentence-transformers folder and the SavedModel of a quantised export
    hold: float weights equal, bit for bit, to those of the quantisation-aware
    forward pass (`quantization.fake_quantize_params`); the origin records how
    (`quantization.describe_weights`).

    Args:
      source: the float model.
      bits: 8 or 4.
      include_embeddings: the embedding tables too.

    Returns:
      A new LoadedModel.
    """
    import dataclasses

    params = quantization.dequantize_params(
        quantization.quantize_params(source.params, bits=bits, include_embeddings=include_embeddings)
    )
    record = quantization.describe_weights(source.params, bits=bits, include_embeddings=include_embeddings)
    return dataclasses.replace(source, params=params, origin={**source.origin, "quantization": record})


def export(
    checkpoint: str,
    format: str,
    output: str,
    step: int | None = None,
    max_length: int | None = None,
    matryoshka_dims: Sequence[int] = (),
    quantize: str | None = None,
    quantize_embeddings: bool = False,
) -> str:
    """Exports a checkpoint; the entry point of `embedder export`.

    Args:
      checkpoint: model dir, checkpoints/ or step folder.
      format: one of FORMATS.
      output: the folder to create (must not exist, or be empty).
      step: the step; None = the latest.
      max_length: truncation length (default: the tokenizer folder's or the model's).
      matryoshka_dims: sizes the bundle records and the SavedModel also returns.
      quantize: None (float weights), "int8" or "int4": per-channel integer weights
        (see the module docstring), e.g. of a model trained with gin/runs/qat.gin.
      quantize_embeddings: with quantize, the embedding tables too (as
        `QuantizationAwareConfig.include_embeddings`).

    Returns:
      The output folder.

    Raises:
      ExportError: an unknown format, or a model the format cannot express
        (found from the checkpoint's metadata, before its weights load).
      FileExistsError: `output` exists and is not an empty folder.
    """
    if format not in FORMATS:
        raise ExportError(f"format={format!r}: expected one of {FORMATS}")
    bits = quantization.weight_bits(quantize) if quantize is not None else 0
    if quantize_embeddings and not bits:
        raise ExportError("quantize_embeddings needs quantize='int8' or 'int4'")
    fileio.check_new_output(output)
    if format == "sentence-transformers":
        # From the metadata alone: a model the format cannot express is refused before its weights load.
        step_dir = checkpointing.resolve_step_dir(checkpoint, step)
        module = spec.module_from_description(checkpointing.read_meta(step_dir).model_config)
        huggingface.check_expressible(module, step_dir)
    source = load_source(checkpoint, step, max_length)
    dims = matryoshka.check_dims(matryoshka_dims, source.module.embedding_dim) if matryoshka_dims else ()
    if format == "bundle":
        return bundle.write(source, output, dims, bits, quantize_embeddings)
    if bits:
        source = quantize_source(source, bits, quantize_embeddings)
    if format == "sentence-transformers":
        return huggingface.write(source, output)
    return saved_model.write(source, output, dims)
