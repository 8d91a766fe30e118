"""The bundle: our own self-contained model folder, read and written.

A bundle holds everything `Embedder` needs and nothing else (no gin files, no
orbax): CONFIG (`embedder_bundle.json`: format and version, the model
description, max length, prompts (their tasks included), Matryoshka sizes, where it came from),
PARAMS (`params.safetensors`, one tensor per parameter path in its stored
dtype, named as `flatten_params` names them) and TOKENIZER/ (vocab.txt,
tokenizer_config.json, ...). Any architecture fits, unlike a
sentence-transformers folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax

from embedder import fileio
from embedder.errors import ExportError
from embedder.formats import LoadedModel, copy_tokenizer, prompts_from_dict
from embedder.models import spec

FORMAT = "embedder-bundle"
VERSION = 1
CONFIG = "embedder_bundle.json"
PARAMS = "params.safetensors"
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
      The model (parameters as jax arrays in their stored dtype), with the
      bundle's prompts and max length.

    Raises:
      ExportError: CONFIG names another format or version than this code reads.
    """
    from safetensors.flax import load_file

    config_path = os.path.join(bundle_dir, CONFIG)
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise ExportError(
            f"{config_path}: format {config.get('format')!r} version {config.get('version')!r}; "
            f"this embedder reads {FORMAT!r} version {VERSION}"
        )
    return LoadedModel(
        module=spec.module_from_description(config["model_config"]),
        params=unflatten_params(load_file(os.path.join(bundle_dir, PARAMS))),
        vocab_dir=os.path.join(bundle_dir, TOKENIZER),
        max_length=config["max_length"],
        prompts=prompts_from_dict(config.get("prompts")),
        origin={"bundle": os.path.abspath(bundle_dir), **config.get("origin", {})},
    )


def write(source: LoadedModel, output: str, matryoshka_dims: Sequence[int] = ()) -> str:
    """Writes `source` as a bundle, into a temporary folder renamed to `output` when complete.

    Args:
      source: the model.
      output: the folder to create (must not exist, or be empty).
      matryoshka_dims: the sizes the model was trained for (recorded, informative).

    Returns:
      The output folder (absolute).
    """
    from safetensors.flax import save_file

    with fileio.atomic_directory(output) as tmp:
        save_file(flatten_params(source.params), os.path.join(tmp, PARAMS))
        copy_tokenizer(source.vocab_dir, os.path.join(tmp, TOKENIZER))
        fileio.write_json(
            os.path.join(tmp, CONFIG),
            {
                "format": FORMAT,
                "version": VERSION,
                "model_config": spec.describe_module(source.module),
                "max_length": source.max_length,
                "prompts": dataclasses.asdict(source.prompts),
                "matryoshka_dims": list(matryoshka_dims),
                "origin": source.origin,
            },
        )
    return os.path.abspath(output)
