"""The bundle: our own self-contained model folder, read and written.

A bundle holds everything `Embedder` needs and nothing else (no gin files, no
orbax): CONFIG (`embedder_bundle.json`: format and version, the model
description, max length, prompts (their tasks included), Matryoshka sizes, where it came from),
PARAMS (`params.safetensors`, one tensor per parameter path in its stored
dtype, named as `flatten_params` names them) and TOKENIZER/ (vocab.txt,
tokenizer_config.json, ...). Any architecture fits, unlike a
sentence-transformers folder.

A quantised bundle (`write(..., quantize_bits=8 | 4)`, `embedder export
--quantize=int8|int4`) stores each kernel (and on request each embedding table)
as its integers and per-output-channel scales (`quantization.quantize`):
`NAME.int8` (int8, the kernel's shape) or `NAME.int4` (two values a byte along
the last axis, low nibble first, `quantization.pack_int4`) and `NAME.scale`
(float32, the kernel's shape with its input axes 1). CONFIG's "quantization"
names every such weight with its shape, input axes and float dtype
(`quantization.describe_weights`). `read` dequantises them (`q * scale`), which
is bit for bit the fake-quantised weight a quantisation-aware forward pass
uses, so the bundle reproduces that forward pass exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax

from embedder import fileio, quantization
from embedder.errors import ExportError
from embedder.formats import LoadedModel, copy_tokenizer, prompts_from_dict
from embedder.models import spec

FORMAT = "embedder-bundle"
VERSION = 1
# A quantised bundle's version: a reader that knows only VERSION refuses it by name
# instead of failing on the NAME.int8 / NAME.scale tensors it would not understand.
QUANTIZED_VERSION = 2
CONFIG = "embedder_bundle.json"
PARAMS = "params.safetensors"
# Suffixes of a quantised weight's stored tensors.
INT8, INT4, SCALE = ".int8", ".int4", ".scale"
TOKENIZER = "tokenizer"


def is_bundle(path: str) -> bool:
    """Whether `path` is a bundle's folder (it holds CONFIG)."""
    return fileio.exists(os.path.join(path, CONFIG))


def flatten_params(params: Any) -> dict[str, Any]:
    """{"encoder/layer_0/mlp/wi/kernel": array, ...}: the bundle's tensor names."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def unflatten_params(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `flatten_params`."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def read(bundle_dir: str) -> LoadedModel:
    """Reads a bundle written by `write`.

    Args:
      bundle_dir: the bundle's folder.

    Returns:
      The model (parameters as jax arrays in their stored dtype; a quantised
      bundle's weights dequantised, its record in `origin["quantization"]`), with
      the bundle's prompts and max length.

    Raises:
      ExportError: CONFIG names another format or version than this code reads, or
        a quantised weight's integers or scale are missing or misshapen.
    """
    from safetensors.flax import load_file

    config_path = os.path.join(bundle_dir, CONFIG)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format") != FORMAT or config.get("version") not in (VERSION, QUANTIZED_VERSION):
        raise ExportError(
            f"{config_path}: format {config.get('format')!r} version {config.get('version')!r}; "
            f"this embedder reads {FORMAT!r} versions {VERSION} and {QUANTIZED_VERSION} (quantised)"
        )
    flat = load_file(os.path.join(bundle_dir, PARAMS))
    origin = {"bundle": os.path.abspath(bundle_dir), **config.get("origin", {})}
    if config.get("quantization"):
        flat = _dequantized(flat, config["quantization"], config_path)
        origin["quantization"] = config["quantization"]
    return LoadedModel(
        module=spec.module_from_description(config["model_config"]),
        params=unflatten_params(flat),
        vocab_dir=os.path.join(bundle_dir, TOKENIZER),
        max_length=config["max_length"],
        prompts=prompts_from_dict(config.get("prompts")),
        origin=origin,
    )


def _dequantized(flat: dict[str, Any], record: dict[str, Any], config_path: str) -> dict[str, Any]:
    """The stored integers and scales of every quantised weight replaced by `q * scale`."""
    import numpy as np

    bits = record["bits"]
    flat = dict(flat)
    quantized = {}
    for name, weight in record["weights"].items():
        stored = name + (INT8 if bits == 8 else INT4)
        if stored not in flat or name + SCALE not in flat:
            raise ExportError(
                f"{config_path}: the quantised weight {name} has no {stored} or {name + SCALE} tensor"
            )
        values = flat.pop(stored)
        if bits == 4:
            values = quantization.unpack_int4(np.asarray(values), weight["shape"][-1])
        if list(values.shape) != weight["shape"]:
            raise ExportError(
                f"{config_path}: {stored} has shape {list(values.shape)}, expected {weight['shape']}"
            )
        quantized[name] = quantization.QuantizedTensor(
            values=jax.numpy.asarray(values), scale=flat.pop(name + SCALE), bits=bits, dtype=weight["dtype"]
        )
    return {**flat, **quantization.dequantize_params(quantized)}


def write(
    source: LoadedModel,
    output: str,
    matryoshka_dims: Sequence[int] = (),
    quantize_bits: int = 0,
    quantize_embeddings: bool = False,
) -> str:
    """Writes `source` as a bundle, into a temporary folder renamed to `output` when complete.

    Args:
      source: the model.
      output: the folder to create (must not exist, or be empty).
      matryoshka_dims: the sizes the model was trained for (recorded, informative).
      quantize_bits: 0 (float weights as they are), 8 or 4: every kernel stored as
        per-channel integers and scales (see the module docstring).
      quantize_embeddings: with quantize_bits, the embedding tables too.

    Returns:
      The output folder (absolute).
    """
    from safetensors.flax import save_file

    tensors = flatten_params(source.params)
    record = None
    if quantize_bits:
        record = quantization.describe_weights(
            source.params, bits=quantize_bits, include_embeddings=quantize_embeddings
        )
        tensors = _quantized_tensors(source.params, quantize_bits, quantize_embeddings)
    with fileio.atomic_directory(output) as tmp:
        save_file(tensors, os.path.join(tmp, PARAMS))
        copy_tokenizer(source.vocab_dir, os.path.join(tmp, TOKENIZER))
        fileio.write_json(
            os.path.join(tmp, CONFIG),
            {
                "format": FORMAT,
                "version": QUANTIZED_VERSION if quantize_bits else VERSION,
                "model_config": spec.describe_module(source.module),
                "max_length": source.max_length,
                "prompts": dataclasses.asdict(source.prompts),
                "matryoshka_dims": list(matryoshka_dims),
                "origin": source.origin,
                "quantization": record,
            },
        )
    return os.path.abspath(output)


def _quantized_tensors(params: Any, bits: int, include_embeddings: bool) -> dict[str, Any]:
    """The bundle's tensors with every quantised weight as NAME.int8 / NAME.int4 and NAME.scale."""
    import numpy as np

    quantized = quantization.quantize_params(params, bits=bits, include_embeddings=include_embeddings)
    leaves = jax.tree_util.tree_flatten_with_path(
        quantized, is_leaf=lambda x: isinstance(x, quantization.QuantizedTensor)
    )[0]
    tensors = {}
    for path, leaf in leaves:
        name = "/".join(str(k.key) for k in path)
        if not isinstance(leaf, quantization.QuantizedTensor):
            tensors[name] = leaf
        elif bits == 8:
            tensors[name + INT8], tensors[name + SCALE] = leaf.values, leaf.scale
        else:
            packed = quantization.pack_int4(np.asarray(leaf.values))
            tensors[name + INT4], tensors[name + SCALE] = jax.numpy.asarray(packed), leaf.scale
    return tensors
