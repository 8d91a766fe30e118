"""Hugging Face Gemma 3 and Qwen3 checkpoints -> our LLM-family encoder.

A Hugging Face folder holds `config.json` and the weights as one
`model.safetensors` or as shards listed by `model.safetensors.index.json`
(names like `model.layers.0.self_attn.q_proj.weight`, dense weights stored
[out, in], often in bfloat16). The loader reads one tensor at a time with
safetensors' `safe_open` (the file is memory-mapped, never read whole), converts
it to our layout and dtype and, given a target sharding, places it straight on
the mesh, so the host holds one tensor at a time.

Supported: `Gemma3TextModel` / `Gemma3ForCausalLM` (model_type "gemma3_text";
the LM head is tied to the embedding or ignored) and `Qwen3Model` /
`Qwen3ForCausalLM` (model_type "qwen3").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from embedder.errors import ConfigError, ExportError, WeightsError
from embedder.models import pretrained, transformer

GEMMA3, QWEN3 = "gemma3_text", "qwen3"
MODEL_TYPES = (GEMMA3, QWEN3)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Name prefixes of the decoder stack inside the architectures we read.
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
# Tensors a causal-LM checkpoint carries that an encoder does not use.
_IGNORED = ("lm_head.weight",)
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "silu": "silu"}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One Hugging Face tensor and its place in our encoder's parameter tree.

    Attributes:
      hf_name: the safetensors name, without the architecture's prefix.
      path: the key path below the encoder's parameters.
      layout: "copy"; "dense" ([out, in] -> [in, out]); "heads_in" (a q/k/v
        projection [heads*head_dim, embed] -> [embed, heads, head_dim]);
        "heads_out" (o_proj [embed, heads*head_dim] -> [heads, head_dim, embed]).
    """

    hf_name: str
    path: tuple[str, ...]
    layout: str = "copy"


def tensor_map(model_type: str, num_layers: int) -> list[TensorSpec]:
    """Every tensor of a Gemma 3 or Qwen3 decoder stack with `num_layers` layers."""
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type={model_type!r}: expected one of {MODEL_TYPES}")
    specs = [TensorSpec("embed_tokens.weight", ("token_embed", "embedding"))]
    for i in range(num_layers):
        hf, ours = f"layers.{i}.", f"layer_{i}"
        attn = (ours, "attention")
        specs += [
            TensorSpec(f"{hf}self_attn.q_proj.weight", (*attn, "query", "kernel"), "heads_in"),
            TensorSpec(f"{hf}self_attn.k_proj.weight", (*attn, "key", "kernel"), "heads_in"),
            TensorSpec(f"{hf}self_attn.v_proj.weight", (*attn, "value", "kernel"), "heads_in"),
            TensorSpec(f"{hf}self_attn.o_proj.weight", (*attn, "out", "kernel"), "heads_out"),
            TensorSpec(f"{hf}self_attn.q_norm.weight", (*attn, "query_norm", "scale")),
            TensorSpec(f"{hf}self_attn.k_norm.weight", (*attn, "key_norm", "scale")),
            TensorSpec(f"{hf}mlp.gate_proj.weight", (ours, "mlp", "wi_gate", "kernel"), "dense"),
            TensorSpec(f"{hf}mlp.up_proj.weight", (ours, "mlp", "wi_up", "kernel"), "dense"),
            TensorSpec(f"{hf}mlp.down_proj.weight", (ours, "mlp", "wo", "kernel"), "dense"),
            TensorSpec(f"{hf}input_layernorm.weight", (ours, "attention_norm", "scale")),
        ]
        if model_type == GEMMA3:
            # Gemma 3's four norms: post_attention_layernorm is on the attention
            # output; pre_feedforward_layernorm is the MLP's input norm.
            specs += [
                TensorSpec(f"{hf}post_attention_layernorm.weight", (ours, "post_attention_norm", "scale")),
                TensorSpec(f"{hf}pre_feedforward_layernorm.weight", (ours, "mlp_norm", "scale")),
                TensorSpec(f"{hf}post_feedforward_layernorm.weight", (ours, "post_mlp_norm", "scale")),
            ]
        else:
            # Qwen3's post_attention_layernorm is the MLP's input norm.
            specs.append(TensorSpec(f"{hf}post_attention_layernorm.weight", (ours, "mlp_norm", "scale")))
    specs.append(TensorSpec("norm.weight", ("final_norm", "scale")))
    return specs


def hf_to_ours(array: np.ndarray, layout: str, ours_shape: tuple[int, ...]) -> np.ndarray:
    """Converts one HF tensor into our layout (see TensorSpec.layout)."""
    if layout == "copy":
        return array
    if layout == "dense":
        return array.T
    if layout == "heads_in":
        return array.T.reshape(ours_shape)
    if layout == "heads_out":
        return array.T.reshape(ours_shape)
    raise ValueError(f"unknown layout {layout!r}")


def expected_hf_shape(layout: str, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape that `hf_to_ours` turns into `ours_shape`."""
    if layout == "copy":
        return tuple(ours_shape)
    if layout == "dense":
        return tuple(reversed(ours_shape))
    if layout == "heads_in":  # [embed, heads, head_dim] <- [heads*head_dim, embed]
        return (ours_shape[1] * ours_shape[2], ours_shape[0])
    if layout == "heads_out":  # [heads, head_dim, embed] <- [embed, heads*head_dim]
        return (ours_shape[2], ours_shape[0] * ours_shape[1])
    raise ValueError(f"unknown layout {layout!r}")


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from e


def _rope_thetas(hf: Mapping[str, Any], path: str) -> tuple[float, float | None]:
    """(global base, local base or None) from `rope_parameters` or the older keys."""
    params = hf.get("rope_parameters")
    if params is None:
        scaling = hf.get("rope_scaling")
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
            raise ConfigError(f"{path}: rope_scaling={scaling!r} is not supported (only default RoPE)")
        return float(hf.get("rope_theta", 10000.0)), hf.get("rope_local_base_freq")
    per_type = params if transformer.FULL_ATTENTION in params else {transformer.FULL_ATTENTION: params}
    for kind, p in per_type.items():
        if p.get("rope_type", "default") != "default":
            raise ConfigError(
                f"{path}: rope_parameters[{kind!r}] has rope_type={p['rope_type']!r}; only 'default' "
                "RoPE is supported"
            )
    local = per_type.get(transformer.SLIDING_ATTENTION)
    return float(per_type[transformer.FULL_ATTENTION]["rope_theta"]), (
        float(local["rope_theta"]) if local else None
    )


def config_from_hf(model_dir: str, **overrides: Any) -> transformer.TransformerConfig:
    """An llm-family TransformerConfig from a Gemma 3 or Qwen3 `config.json`.

    Gemma 3 keeps its attention direction (`use_bidirectional_attention`, as
    EmbeddingGemma sets; its stored sliding_window, the span of the window,
    becomes the half-width bound the bidirectional mask uses, as in
    transformers); Qwen3 is causal. `overrides` set any other field
    (e.g. dtype, remat, causal, pad_id).

    Raises:
      ConfigError: the folder's model is not Gemma 3 / Qwen3 or uses a feature our
        encoder does not have (logit soft-capping, attention bias, scaled RoPE).
      WeightsError: config.json is missing or not JSON.
    """
    path = os.path.join(model_dir, "config.json")
    hf = _read_json(path)
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:
        hf = {**hf["text_config"], "model_type": GEMMA3}
        model_type = GEMMA3
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{path}: model_type={model_type!r} is not one of {MODEL_TYPES}")
    if hf.get("attention_bias"):
        raise ConfigError(f"{path}: attention_bias=true is not supported")
    if hf.get("attn_logit_softcapping") is not None:
        raise ConfigError(f"{path}: attn_logit_softcapping={hf['attn_logit_softcapping']} is not supported")
    act_key = "hidden_activation" if model_type == GEMMA3 else "hidden_act"
    act = hf.get(act_key) or hf.get("hidden_act")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{path}: {act_key}={act!r}: expected one of {sorted(_ACTIVATIONS)}")
    theta, local_theta = _rope_thetas(hf, path)
    num_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    sliding_window = hf.get("sliding_window")
    if model_type == QWEN3 and not hf.get("use_sliding_window", False):
        sliding_window = None
    bidirectional = model_type == GEMMA3 and hf.get("use_bidirectional_attention", False)
    if sliding_window is not None and bidirectional:
        # config.json stores the window's whole span; Gemma3TextConfig turns it
        # into the half-width bound |q - k| < span // 2 + 1 that the mask uses.
        sliding_window = sliding_window // 2 + 1
    if sliding_window is None:
        layer_types = None
    elif layer_types is None:
        if model_type == GEMMA3:
            pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
            layer_types = [
                transformer.FULL_ATTENTION if (i + 1) % pattern == 0 else transformer.SLIDING_ATTENTION
                for i in range(num_layers)
            ]
        else:
            first_sliding = hf.get("max_window_layers", num_layers)
            layer_types = [
                transformer.SLIDING_ATTENTION if i >= first_sliding else transformer.FULL_ATTENTION
                for i in range(num_layers)
            ]
    gemma = model_type == GEMMA3
    fields: dict[str, Any] = dict(
        family="llm",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=num_layers,
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"],
        activation=_ACTIVATIONS[act],
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_local_theta=local_theta if gemma else None,
        scale_embeddings=gemma,
        norm_offset=gemma,
        qk_norm=True,
        post_norms=gemma,
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if gemma else None,
        causal=not bidirectional,
        sliding_window=sliding_window,
        layer_types=tuple(layer_types) if layer_types is not None else None,
        pad_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
        dtype="float32",
        param_dtype="float32",
    )
    fields.update(overrides)
    try:
        return transformer.TransformerConfig(**fields)
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from e


def weight_files(model_dir: str) -> dict[str, str]:
    """Tensor name -> the safetensors file that holds it (one file or an index's shards)."""
    index = os.path.join(model_dir, INDEX_FILE)
    if os.path.exists(index):
        weight_map = _read_json(index).get("weight_map")
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
        with safe_open(single, framework="flax") as f:
            return {name: single for name in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers.
        raise WeightsError(f"{single}: cannot read safetensors file: {e}") from e


def _strip_prefix(names: list[str]) -> dict[str, str]:
    """Our unprefixed name -> the stored name (the prefix the architecture adds)."""
    for prefix in _PREFIXES:
        if any(n.startswith(prefix + "embed_tokens.") for n in names):
            return {(n.removeprefix(prefix) if n.startswith(prefix) else n): n for n in names}
    return {n: n for n in names}


def _stream(files: Mapping[str, str], wanted: Mapping[str, str]) -> Iterator[tuple[str, str, np.ndarray]]:
    """(our name, file, host array) for each wanted tensor, one open file at a time."""
    import jax
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for ours, stored in wanted.items():
        by_file.setdefault(files[stored], []).append(ours)
    cpu = jax.devices("cpu")[0]
    for path, names in by_file.items():
        try:
            # framework="flax" reads bfloat16 (numpy has no such dtype); pinned to
            # the host so a tensor passes through host memory only.
            with jax.default_device(cpu), safe_open(path, framework="flax") as f:
                for ours in names:
                    yield ours, path, np.asarray(f.get_tensor(wanted[ours]))
        except WeightsError:
            raise
        except Exception as e:
            raise WeightsError(f"{path}: cannot read safetensors file: {e}") from e


def load_llm_params(
    model_dir: str,
    config: transformer.TransformerConfig,
    expected: Mapping[str, Any] | None = None,
    shardings: Mapping[str, Any] | None = None,
    model_type: str | None = None,
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Reads a Gemma 3 / Qwen3 safetensors folder into our encoder parameter tree.

    Args:
      model_dir: folder with config.json and model.safetensors or
        model.safetensors.index.json plus its shards.
      config: the encoder config (e.g. from `config_from_hf`); sizes must match.
      expected: optional tree of our encoder params (arrays or
        ShapeDtypeStructs) to check shapes against; by default derived from config.
      shardings: optional tree of `jax.sharding.Sharding`s, the encoder subtree's
        target shardings; each tensor is placed with its sharding as it is read.
      model_type: "gemma3_text" or "qwen3"; by default config.json's.
      layers: a subset of the folder's layers for a shallower model: our layer i
        is the folder's layer `layers[i]` (`len(layers) == config.num_layers`;
        the config's per-layer attention pattern is the caller's to choose).
        None: layer i is layer i.

    Returns:
      A nested dict, the `encoder` subtree of a DualEncoder's params: numpy
      arrays in config.param_dtype, or jax.Arrays placed with `shardings`.

    Raises:
      WeightsError: a tensor is missing, unexpected or of the wrong shape (the
        message names the tensor, both shapes and the file), or a file is unreadable.
    """
    import jax

    if model_type is None:
        hf = _read_json(os.path.join(model_dir, "config.json"))
        model_type = GEMMA3 if hf.get("model_type") == "gemma3" else hf.get("model_type")
    files = weight_files(model_dir)
    names = _strip_prefix(sorted(files))
    specs = tensor_map(model_type, config.num_layers)
    known = {s.hf_name for s in specs}
    if layers is not None:
        if len(layers) != config.num_layers:
            raise WeightsError(
                f"{model_dir}: layers={tuple(layers)} selects {len(layers)} layers for a "
                f"{config.num_layers}-layer model"
            )
        source_layers = pretrained.count_layers(list(names), "layers.{}.")
        specs = pretrained.select_layers(specs, layers, "layers.{}.", source_layers, model_dir)
        # The layers left out are the folder's own, not unexpected.
        known = {s.hf_name for s in tensor_map(model_type, source_layers)}
    if not config.qk_norm:
        specs = [s for s in specs if not s.hf_name.endswith(("q_norm.weight", "k_norm.weight"))]
        known = {n for n in known if not n.endswith(("q_norm.weight", "k_norm.weight"))}
    missing = [s.hf_name for s in specs if s.hf_name not in names]
    if missing:
        raise WeightsError(
            f"{model_dir}: missing tensor {missing[0]!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + f"; a {config.num_layers}-layer {model_type} needs it"
        )
    unexpected = sorted(n for n in names if n not in known and n not in _IGNORED)
    if unexpected:
        raise WeightsError(
            f"{files[names[unexpected[0]]]}: unexpected tensor {names[unexpected[0]]!r} (the config says "
            f"{config.num_layers} layers; does config.json match the weights?)"
        )
    if expected is None:
        expected = expected_encoder_shapes(config)
    by_name = {s.hf_name: s for s in specs}
    dtype = config.params_dtype
    params: dict[str, Any] = {}
    for hf_name, path, array in _stream(files, {s.hf_name: names[s.hf_name] for s in specs}):
        spec = by_name[hf_name]
        ours_shape = tuple(_get_path(expected, spec.path, model_dir).shape)
        want = expected_hf_shape(spec.layout, ours_shape)
        if tuple(array.shape) != want:
            raise WeightsError(
                f"{path}: tensor {names[hf_name]!r} has shape {tuple(array.shape)} but the config "
                f"needs {want} (our {'/'.join(spec.path)} {ours_shape})"
            )
        value = np.ascontiguousarray(hf_to_ours(array, spec.layout, ours_shape)).astype(dtype)
        if shardings is not None:
            value = jax.device_put(value, _get_path(shardings, spec.path, model_dir))
        _set_path(params, spec.path, value)
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


def load_pretrained(
    model_dir: str, shardings_fn: Callable[[Any], Any] | None = None, **overrides: Any
) -> tuple[transformer.TransformerConfig, dict[str, Any]]:
    """config.json and the weights of a Gemma 3 / Qwen3 folder, in one call.

    Args:
      model_dir: the Hugging Face folder.
      shardings_fn: optional, from the encoder's abstract (boxed) variables to
        the target shardings of its params (e.g. `lambda v:
        partitioning.variable_shardings(v, mesh)["params"]`).
      **overrides: TransformerConfig fields to set (see `config_from_hf`).

    Returns:
      (config, encoder params).
    """
    import jax
    import jax.numpy as jnp

    config = config_from_hf(model_dir, **overrides)
    shardings = None
    if shardings_fn is not None:
        abstract = jax.eval_shape(
            lambda: transformer.Encoder(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
        )
        shardings = shardings_fn(abstract)
    return config, load_llm_params(model_dir, config, shardings=shardings)


# ---------------------------------------------------------------- write


def model_type_of(config: transformer.TransformerConfig) -> str:
    """ "gemma3_text" or "qwen3": the Hugging Face architecture whose block `config` is.

    Raises:
      ExportError: the block mixes the two families' features (or is not llm-family).
    """
    gemma = (config.norm_offset, config.post_norms, config.scale_embeddings)
    if config.family == "llm" and all(gemma) and config.activation == "gelu_tanh":
        return GEMMA3
    if config.family == "llm" and not any(gemma) and config.qk_norm and config.activation == "silu":
        if not config.causal:
            raise ExportError("a Qwen3 model is causal; this encoder is bidirectional (causal=False)")
        return QWEN3
    raise ExportError(
        f"family={config.family!r}, norm_offset={config.norm_offset}, post_norms={config.post_norms}, "
        f"scale_embeddings={config.scale_embeddings}, activation={config.activation!r}: neither a Gemma 3 "
        "nor a Qwen3 block"
    )


def hf_config(config: transformer.TransformerConfig) -> dict[str, Any]:
    """The `config.json` of a Gemma3TextModel or Qwen3Model with this encoder (inverse of `config_from_hf`).

    A bidirectional Gemma 3 stores `use_bidirectional_attention` and its window's
    whole span: our bound |q - k| < w is transformers' span 2 * (w - 1).

    Raises:
      ExportError: the block is neither architecture (see `model_type_of`).
    """
    model_type = model_type_of(config)
    layer_types = list(config.attention_types)
    common = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_size,
        "intermediate_size": config.mlp_dim,
        "rms_norm_eps": config.norm_eps,
        "layer_types": layer_types,
        "pad_token_id": config.pad_id,
        "attention_bias": False,
        "attention_dropout": config.attention_dropout_rate,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }
    if model_type == QWEN3:
        return {
            **common,
            "architectures": ["Qwen3Model"],
            "model_type": QWEN3,
            "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "use_sliding_window": config.sliding_window is not None,
            "sliding_window": config.sliding_window,
            "max_window_layers": config.num_layers,
        }
    window = config.sliding_window
    if window is None:
        window = 4096  # no layer is local (layer_types), so the span is never used.
    elif not config.causal:
        window = 2 * (window - 1)
    local_theta = config.rope_local_theta if config.rope_local_theta is not None else config.rope_theta
    return {
        **common,
        "architectures": ["Gemma3TextModel"],
        "model_type": GEMMA3,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": config.query_pre_attn_scalar or config.head_size,
        "sliding_window": window,
        "use_bidirectional_attention": not config.causal,
        "rope_parameters": {
            transformer.FULL_ATTENTION: {"rope_type": "default", "rope_theta": config.rope_theta},
            transformer.SLIDING_ATTENTION: {"rope_type": "default", "rope_theta": local_theta},
        },
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


def ours_to_hf(array: np.ndarray, layout: str) -> np.ndarray:
    """One tensor of ours in Hugging Face's layout (the inverse of `hf_to_ours`)."""
    if layout == "copy":
        return array
    if layout == "dense":
        return array.T
    if layout == "heads_in":  # [embed, heads, head_dim] -> [heads*head_dim, embed]
        return array.reshape(array.shape[0], -1).T
    if layout == "heads_out":  # [heads, head_dim, embed] -> [embed, heads*head_dim]
        return array.reshape(-1, array.shape[-1]).T
    raise ValueError(f"unknown layout {layout!r}")


def llm_tensors(params: Mapping[str, Any], config: transformer.TransformerConfig) -> dict[str, np.ndarray]:
    """Our encoder's parameters as a Gemma3TextModel / Qwen3Model safetensors dict (float32).

    Args:
      params: the encoder subtree (numpy or jax arrays).
      config: its config.

    Returns:
      Hugging Face tensor name (no prefix, as a bare text model stores them) -> array.
    """
    specs = tensor_map(model_type_of(config), config.num_layers)
    if not config.qk_norm:
        specs = [s for s in specs if not s.hf_name.endswith(("q_norm.weight", "k_norm.weight"))]
    out = {}
    for spec in specs:
        value = np.asarray(_get_path(params, spec.path, "the encoder"), np.float32)
        out[spec.hf_name] = np.ascontiguousarray(ours_to_hf(value, spec.layout))
    return out
