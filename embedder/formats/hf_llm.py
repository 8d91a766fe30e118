"""Hugging Face Gemma 3 and Qwen3 checkpoints -> our LLM-family encoder.

A Hugging Face folder holds `config.json` and the weights as one
`model.safetensors` or as shards listed by `model.safetensors.index.json`
(names like `model.layers.0.self_attn.q_proj.weight`, dense weights stored
[out, in], often in bfloat16). The tables here name every Gemma 3 / Qwen3
tensor's place in our tree; `embedder.models.pretrained.load_tensors` streams
them tensor by tensor, each device's block read on its own and placed straight
on the mesh with its parameter's sharding, so the host never holds the model
twice.

Supported: `Gemma3TextModel` / `Gemma3ForCausalLM` (model_type "gemma3_text";
the LM head is tied to the embedding or ignored) and `Qwen3Model` /
`Qwen3ForCausalLM` (model_type "qwen3").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from embedder.errors import ConfigError, ExportError, WeightsError
from embedder.models import pretrained, transformer
from embedder.models.pretrained import INDEX_FILE as INDEX_FILE
from embedder.models.pretrained import SINGLE_FILE as SINGLE_FILE
from embedder.models.pretrained import TensorSpec

GEMMA3, QWEN3 = "gemma3_text", "qwen3"
MODEL_TYPES = (GEMMA3, QWEN3)
# Name prefixes of the decoder stack inside the architectures we read.
_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
# Tensors a causal-LM checkpoint carries that an encoder does not use.
_IGNORED = ("lm_head.weight",)
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu", "silu": "silu"}


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
    hf = pretrained.read_json(path)
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
        None: layer i from layer i.

    Returns:
      A nested dict, the `encoder` subtree of a DualEncoder's params: numpy
      arrays in config.param_dtype, or jax.Arrays placed with `shardings`.

    Raises:
      WeightsError: a tensor is missing, unexpected or of the wrong shape (the
        message names the tensor, both shapes and the file), or a file is unreadable.
    """
    if model_type is None:
        hf = pretrained.read_json(os.path.join(model_dir, "config.json"))
        model_type = GEMMA3 if hf.get("model_type") == "gemma3" else hf.get("model_type")
    specs = tensor_map(model_type, config.num_layers)
    if not config.qk_norm:
        specs = [s for s in specs if not s.hf_name.endswith(("q_norm.weight", "k_norm.weight"))]
    ignored = tuple(_IGNORED)
    if layers is not None:
        specs, left_out = pretrained.select_layers(
            model_dir, specs, layers, "layers.{}.", lambda n: tensor_map(model_type, n)
        )
        ignored = (*ignored, *left_out)
    sources = pretrained.tensor_sources(
        model_dir, specs, model_type, config.num_layers, prefixes=_PREFIXES, ignored=ignored
    )
    if expected is None:
        expected = pretrained.expected_encoder_shapes(config)
    return pretrained.load_tensors(specs, sources, expected, config.params_dtype, shardings)


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
        value = np.asarray(pretrained.get_path(params, spec.path, "the encoder"), np.float32)
        out[spec.hf_name] = np.ascontiguousarray(pretrained.ours_to_hf(value, spec.layout))
    return out


# ---------------------------------------------------------------- the LM head (causal LMs)

LM_HEAD = "lm_head.weight"
_LM_HEAD_NAMES = (LM_HEAD, "language_model.lm_head.weight")


def lm_head_config(model_dir: str) -> tuple[bool, float | None]:
    """(tied, final_logit_softcapping) of a Gemma 3 / Qwen3 causal-LM folder.

    `tie_word_embeddings` defaults as transformers' configs do: True for
    Gemma 3, False for Qwen3.
    """
    hf = pretrained.read_json(os.path.join(model_dir, "config.json"))
    text = hf.get("text_config", hf) if hf.get("model_type") == "gemma3" else hf
    gemma = text.get("model_type", GEMMA3) == GEMMA3 or hf.get("model_type") == "gemma3"
    tied = hf.get("tie_word_embeddings", text.get("tie_word_embeddings", gemma))
    softcap = text.get("final_logit_softcapping")
    return bool(tied), (float(softcap) if softcap is not None else None)


def load_lm_head(model_dir: str, config: transformer.TransformerConfig, sharding: Any | None = None) -> Any:
    """The untied LM head of a causal-LM folder, as our [embed, vocab] kernel.

    Args:
      model_dir: the Hugging Face folder.
      config: its encoder config (sizes and parameter dtype).
      sharding: optional `jax.sharding.Sharding` to place it with as it is read.

    Returns:
      A numpy array in config.param_dtype, or a jax.Array placed with `sharding`.

    Raises:
      WeightsError: the folder has no `lm_head.weight` or its shape is wrong.
    """
    import jax

    files = pretrained.weight_files(model_dir)
    stored = next((name for name in _LM_HEAD_NAMES if name in files), None)
    if stored is None:
        shards = sorted(set(files.values()))
        where = shards[0] if len(shards) == 1 else os.path.join(model_dir, INDEX_FILE)
        raise WeightsError(
            f"{where}: missing tensor {LM_HEAD!r}; config.json says the LM head is not tied to the "
            "embedding (tie_word_embeddings=false)"
        )
    spec = TensorSpec(LM_HEAD, ("lm_head",), "dense")
    expected = {"lm_head": jax.ShapeDtypeStruct((config.hidden_size, config.vocab_size), config.params_dtype)}
    shardings = None if sharding is None else {"lm_head": sharding}
    loaded = pretrained.load_tensors(
        [spec], {LM_HEAD: (files[stored], stored)}, expected, config.params_dtype, shardings
    )
    return loaded["lm_head"]
