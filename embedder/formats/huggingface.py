"""Hugging Face BERT folders and sentence-transformers folders, read and written.

A Hugging Face BERT folder holds `config.json`, `model.safetensors` and the
tokenizer files (`vocab.txt`, `tokenizer_config.json`, ...). A
sentence-transformers folder adds `modules.json` naming its pipeline
(Transformer, Pooling, Dense, Normalize, each module's config in its own
sub-folder), `sentence_bert_config.json` (the truncation length) and
`config_sentence_transformers.json` (prefix prompts: "query", "document" and
one query prompt per task the model was trained with, named by the task).

Reading (`read`) gives a `LoadedModel` that encodes as sentence-transformers
does; writing (`write`) gives a folder that `SentenceTransformer(path)` loads
with no code of ours and that encodes as we do. `config.json` is translated
here (`config_from_hf` / `hf_config`); the tensors by the BERT family's name
table in `models.pretrained`, which training's initialisation shares.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from embedder import fileio
from embedder.data import prompts as prompts_lib
from embedder.errors import ExportError, WeightsError
from embedder.formats import SENTENCE_BERT_CONFIG, LoadedModel, copy_tokenizer, prompt_affixes
from embedder.models import dual_encoder, pretrained, transformer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
MODULES = "modules.json"
QUANTIZATION = "quantization.json"
PROMPTS_CONFIG = "config_sentence_transformers.json"

_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
# Our pooling names <-> sentence-transformers' Pooling config: the classic boolean
# keys (every version reads them) and ST 5+'s single "pooling_mode" value.
ST_POOLING_KEYS = {
    "mean": "pooling_mode_mean_tokens",
    "first": "pooling_mode_cls_token",
    "last": "pooling_mode_lasttoken",
}
_ST_POOLING_MODES = {"mean": "mean", "cls": "first", "lasttoken": "last"}
ST_IDENTITY = "torch.nn.modules.linear.Identity"


def is_folder(path: str) -> bool:
    """Whether `path` looks like a Hugging Face / sentence-transformers folder (config.json + weights)."""
    return fileio.exists(os.path.join(path, CONFIG)) and fileio.exists(os.path.join(path, WEIGHTS))


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from e


# ---------------------------------------------------------------- config.json


def config_from_hf(model_dir: str, **overrides: Any) -> transformer.TransformerConfig:
    """A bert-family TransformerConfig from a Hugging Face `config.json`.

    Args:
      model_dir: folder holding config.json.
      **overrides: fields to set on top (e.g. dtype="bfloat16", remat=True).

    Returns:
      The TransformerConfig.

    Raises:
      FileNotFoundError: no config.json.
      WeightsError: not valid JSON, not a BERT-family model, or a setting we do
        not support (naming the file and the key).
    """
    path = os.path.join(model_dir, CONFIG)
    try:
        hf = _read_json(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no Hugging Face config.json in {model_dir}") from e
    model_type = hf.get("model_type")
    if model_type not in ("bert", "roberta", "xlm-roberta") and "BertModel" not in hf.get(
        "architectures", []
    ):
        raise WeightsError(f"{path}: model_type={model_type!r} is not a BERT-family model")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise WeightsError(
            f"{path}: position_embedding_type={hf['position_embedding_type']!r} is not supported"
        )
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_ACTIVATIONS:
        raise WeightsError(f"{path}: hidden_act={act!r} is not supported ({sorted(_HF_ACTIVATIONS)})")
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
        raise WeightsError(f"{path}: missing key {e.args[0]!r}") from e
    fields.update(overrides)
    return transformer.TransformerConfig(**fields)


def hf_config(config: transformer.TransformerConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` of a BertModel with this encoder (the inverse of config_from_hf).

    Raises:
      ExportError: naming each field that a Hugging Face BertModel cannot express.
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
        raise ExportError("a Hugging Face BertModel cannot express " + "; ".join(problems))
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


# ---------------------------------------------------------------- sentence-transformers modules


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


def _pooling_of(config: dict[str, Any], path: str) -> str:
    mode = config.get("pooling_mode")
    if mode is not None:
        modes = [mode] if isinstance(mode, str) else list(mode)
        if len(modes) != 1 or modes[0] not in _ST_POOLING_MODES:
            raise WeightsError(f"{path}: unsupported pooling {modes}")
        return _ST_POOLING_MODES[modes[0]]
    modes = [k for k, v in config.items() if k.startswith("pooling_mode_") and v]
    names = {key: ours for ours, key in ST_POOLING_KEYS.items()}
    if len(modes) != 1 or modes[0] not in names:
        raise WeightsError(f"{path}: unsupported pooling {modes}")
    return names[modes[0]]


def read_sentence_transformer_info(model_dir: str) -> SentenceTransformerInfo:
    """Pooling, normalisation, max length, Dense modules and prompts of a sentence-transformers folder.

    A bare Hugging Face folder (no modules.json) reads as mean pooling, no
    normalisation, no Dense module and no prompts.

    Raises:
      WeightsError: a module type or pooling mode we cannot express, naming the file.
    """
    modules_path = os.path.join(model_dir, MODULES)
    if not os.path.exists(modules_path):
        return SentenceTransformerInfo()
    pooling, normalize, dense = "mean", False, []
    for module in _read_json(modules_path):
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Pooling":
            config_path = os.path.join(model_dir, module["path"], CONFIG)
            pooling = _pooling_of(_read_json(config_path), config_path)
        elif kind == "Normalize":
            normalize = True
        elif kind == "Dense":
            dense.append(os.path.join(model_dir, module["path"]))
        elif kind != "Transformer":
            raise WeightsError(f"{modules_path}: unsupported module type {module.get('type')!r}")
    max_len = 512
    st_config = os.path.join(model_dir, SENTENCE_BERT_CONFIG)
    if os.path.exists(st_config):
        max_len = _read_json(st_config).get("max_seq_length", max_len)
    prompts = {}
    prompts_path = os.path.join(model_dir, PROMPTS_CONFIG)
    if os.path.exists(prompts_path):
        prompts = dict(_read_json(prompts_path).get("prompts") or {})
    return SentenceTransformerInfo(pooling, normalize, max_len, tuple(dense), prompts)


def load_dense(dense_dir: str) -> dict[str, np.ndarray]:
    """A sentence-transformers Dense module as our projection layer's params.

    Returns:
      {"kernel": [in, out]} and, if the module has one, {"bias": [out]}.

    Raises:
      WeightsError: the module has an activation (our projection has none), or
        its weights are missing or of another shape than its config.
    """
    config_path = os.path.join(dense_dir, CONFIG)
    config = _read_json(config_path)
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation != ST_IDENTITY:
        raise WeightsError(
            f"{config_path}: a Dense module with activation {activation!r}; only {ST_IDENTITY} "
            "maps onto our projection"
        )
    tensors = pretrained.read_safetensors(os.path.join(dense_dir, WEIGHTS))
    if "linear.weight" not in tensors:
        raise WeightsError(f"{dense_dir}/{WEIGHTS}: no tensor 'linear.weight'")
    weight = tensors["linear.weight"]  # [out, in], torch's layout
    want = (config["out_features"], config["in_features"])
    if tuple(weight.shape) != want:
        raise WeightsError(
            f"{dense_dir}/{WEIGHTS}: 'linear.weight' has shape {tuple(weight.shape)}, config.json says {want}"
        )
    params = {"kernel": np.ascontiguousarray(weight.T)}
    if config.get("bias", True):
        if tuple(np.shape(tensors.get("linear.bias"))) != (want[0],):
            raise WeightsError(f"{dense_dir}/{WEIGHTS}: 'linear.bias' missing or not of shape ({want[0]},)")
        params["bias"] = np.asarray(tensors["linear.bias"])
    return params


def load_projection(dense_dir: str) -> np.ndarray:
    """The kernel [in, out] of a Dense module without bias (see `load_dense`).

    Raises:
      WeightsError: the module has a bias or an activation.
    """
    params = load_dense(dense_dir)
    if "bias" in params:
        raise WeightsError(
            f"{os.path.join(dense_dir, CONFIG)}: a Dense module with a bias; expected bias=false"
        )
    return params["kernel"]


def head_from_dense(
    dense_dirs: tuple[str, ...], width: int, model_dir: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The projection head that 0, 1 or 2 Dense modules after pooling describe.

    Args:
      dense_dirs: the Dense modules' folders, in pipeline order.
      width: the pooled vector's width (the encoder's hidden size).
      model_dir: the sentence-transformers folder, for messages.

    Returns:
      (params: {"projection_hidden"?, "projection"?: {"kernel", "bias"?}},
       DualEncoder fields: projection_dim, projection_hidden_dim, projection_bias).

    Raises:
      WeightsError: more than two Dense modules, an activation, mixed biases, or
        widths that do not chain (naming the module's folder).
    """
    if len(dense_dirs) > 2:
        raise WeightsError(
            f"{model_dir}: {len(dense_dirs)} Dense modules; at most two (a projection head) are supported"
        )
    layers = [load_dense(d) for d in dense_dirs]
    if len({"bias" in layer for layer in layers}) > 1:
        raise WeightsError(f"{model_dir}: one Dense module has a bias and another none; expected the same")
    for path, layer in zip(dense_dirs, layers, strict=True):
        if layer["kernel"].shape[0] != width:
            raise WeightsError(
                f"{path}: Dense in_features={layer['kernel'].shape[0]}, but its input is {width} wide"
            )
        width = layer["kernel"].shape[1]
    names = ["projection_hidden", "projection"][-len(layers) :] if layers else []
    params = dict(zip(names, layers, strict=True))
    head: dict[str, Any] = {}
    if layers:
        head["projection_dim"] = int(layers[-1]["kernel"].shape[1])
        head["projection_bias"] = "bias" in layers[0]
    if len(layers) == 2:
        head["projection_hidden_dim"] = int(layers[0]["kernel"].shape[1])
    return params, head


def _escape(text: str) -> str:
    """`text` as the literal part of a format string."""
    return text.replace("{", "{{").replace("}", "}}")


def _task_template(query: str, named: dict[str, str]) -> tuple[str, str, str] | None:
    """(before, after, default task) with query == before + default + after and
    every named prefix == before + name + after; None when no split fits them all.

    The name is found in its own prefix, so task texts that share letters
    (e.g. "search result" and "sentence similarity") split where the task is.
    """
    name, prefix = next(iter(named.items()))
    start = prefix.find(name)
    while start >= 0:
        before, after = prefix[:start], prefix[start + len(name) :]
        if (
            all(p == before + n + after for n, p in named.items())
            and len(query) > len(before) + len(after)
            and query.startswith(before)
            and query.endswith(after)
        ):
            return before, after, query[len(before) : len(query) - len(after)]
        start = prefix.find(name, start + 1)
    return None


def prompts_from_prefixes(prefixes: dict[str, str]) -> prompts_lib.PromptConfig:
    """sentence-transformers' prefix prompts as our templates (the inverse of `prompt_prefixes`).

    "query" and "document" are the default query and document prompts. Any
    other prompt whose name is its task text (as `prompt_prefixes` writes them:
    "code retrieval" -> "task: code retrieval | query: ") makes the query
    template's task a field again, so every task (named or not) encodes as in
    training; the names become `PromptConfig.tasks`. Prompts that fit no such
    template are ignored (the query template is then the "query" prefix).

    Args:
      prefixes: prompt name -> prefix, from config_sentence_transformers.json.

    Returns:
      The PromptConfig (disabled when there is no query or document prompt).
    """
    query, document = prefixes.get("query", ""), prefixes.get("document", "")
    if not query and not document:
        return prompts_lib.PromptConfig()
    named = {name: p for name, p in prefixes.items() if name not in ("query", "document") and name}
    split = _task_template(query, named) if named else None
    if split is None:
        return prompts_lib.PromptConfig(
            enabled=True,
            query_template=_escape(query) + "{text}",
            document_template=_escape(document) + "{text}",
        )
    before, after, default_task = split
    return prompts_lib.PromptConfig(
        enabled=True,
        query_template=_escape(before) + "{task}" + _escape(after) + "{text}",
        document_template=_escape(document) + "{text}",
        default_task=default_task,
        tasks=tuple(named),
    )


def prompt_prefixes(prompts: prompts_lib.PromptConfig) -> dict[str, str]:
    """The prompts as sentence-transformers prefixes: "query", "document" and one per task.

    "query" has the default task and "document" the empty title, as
    `Embedder.encode` uses when none is given; each of `prompts.tasks` is the
    query prompt of that task, named by it, so that
    `SentenceTransformer(path).encode_query(texts, prompt_name=task)` equals
    `Embedder.encode(texts, task=task)`.

    Raises:
      ExportError: a template puts text after {text} (prefixes cannot express
        it), or a task is named "query" or "document" with another prompt.
    """
    if not prompts.enabled:
        return {}
    prefixes = {}
    named = [("query", "query", None), ("document", "document", None)]
    named += [(task, "query", task) for task in prompts.tasks]
    for name, kind, task in named:
        prefix, suffix = prompt_affixes(prompts, kind, task)
        if suffix:
            raise ExportError(
                f"the {kind} prompt {prefix + '{text}' + suffix!r} does not end with the "
                "text; sentence-transformers prompts are prefixes"
            )
        if prefixes.get(name, prefix) != prefix:
            raise ExportError(
                f"the task {name!r} would replace the {name!r} prompt {prefixes[name]!r} with "
                f"{prefix!r}; rename the task"
            )
        prefixes[name] = prefix
    return prefixes


# ---------------------------------------------------------------- read


def _is_llm_folder(model_dir: str) -> bool:
    """Whether the folder's config.json is a Gemma 3 / Qwen3 model (else BERT family)."""
    from embedder.formats import hf_llm

    path = os.path.join(model_dir, CONFIG)
    if not os.path.exists(path):
        return False
    model_type = _read_json(path).get("model_type")
    return model_type in (*hf_llm.MODEL_TYPES, "gemma3")


def read(model_dir: str, **config_overrides: Any) -> LoadedModel:
    """Reads a sentence-transformers (or bare Hugging Face) folder: BERT, Gemma 3 or Qwen3.

    Args:
      model_dir: local folder with config.json, model.safetensors (or an index
        and its shards), the tokenizer files (vocab.txt, tokenizer.json or a
        SentencePiece model) and, for sentence-transformers, modules.json, the
        pooling config, at most two Dense modules without activation (our
        projection head; two as EmbeddingGemma's) and prompts that are prefixes.
      **config_overrides: TransformerConfig fields to override (e.g. dtype).

    Returns:
      The model (parameters as numpy arrays), encoding as sentence-transformers does.

    Raises:
      FileNotFoundError: `model_dir` is not a folder.
      WeightsError: the folder holds something we cannot express or weights
        that do not fit its config (naming the file, the tensor and the shapes).
    """
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"{model_dir}: not a model folder")
    info = read_sentence_transformer_info(model_dir)
    if _is_llm_folder(model_dir):
        from embedder.formats import hf_llm

        config = hf_llm.config_from_hf(model_dir, **config_overrides)
        encoder = hf_llm.load_llm_params(model_dir, config)
        max_length = info.max_seq_length
    else:
        config = config_from_hf(model_dir, **config_overrides)
        encoder = pretrained.load_bert_params(model_dir, config)
        max_length = min(info.max_seq_length, config.max_len)
    head_params, head = head_from_dense(info.dense_dirs, config.hidden_size, model_dir)
    params: dict[str, Any] = {"encoder": encoder, **head_params}
    module = dual_encoder.DualEncoder(config, pooling=info.pooling, normalize=info.normalize, **head)
    return LoadedModel(
        module=module,
        params=params,
        vocab_dir=model_dir,
        max_length=max_length,
        prompts=prompts_from_prefixes(info.prompts),
        origin={"sentence_transformers": os.path.abspath(model_dir)},
    )


# ---------------------------------------------------------------- write


def _encoder_config(config: transformer.TransformerConfig) -> dict[str, Any]:
    """The Transformer module's config.json: a BertModel, or a Gemma3TextModel / Qwen3Model."""
    if config.family == "llm":
        from embedder.formats import hf_llm

        return hf_llm.hf_config(config)
    return hf_config(config)


def _encoder_tensors(params: Any, config: transformer.TransformerConfig) -> dict[str, np.ndarray]:
    if config.family == "llm":
        from embedder.formats import hf_llm

        return hf_llm.llm_tensors(params, config)
    return pretrained.bert_tensors(params, config)


def _write_dense(dense_dir: str, layer: dict[str, Any]) -> None:
    """One projection layer ({"kernel": [in, out], "bias"?: [out]}) as a sentence-transformers Dense."""
    from safetensors.numpy import save_file

    kernel = np.asarray(layer["kernel"], np.float32)
    fileio.write_json(
        os.path.join(dense_dir, CONFIG),
        {
            "in_features": int(kernel.shape[0]),
            "out_features": int(kernel.shape[1]),
            "bias": "bias" in layer,
            "activation_function": ST_IDENTITY,
        },
    )
    tensors = {"linear.weight": np.ascontiguousarray(kernel.T)}
    if "bias" in layer:
        tensors["linear.bias"] = np.asarray(layer["bias"], np.float32)
    save_file(tensors, os.path.join(dense_dir, WEIGHTS), metadata={"format": "pt"})


def check_expressible(module: dual_encoder.DualEncoder, where: str) -> None:
    """Refuses, before any weight is read, a model that a sentence-transformers folder cannot hold.

    Args:
      module: the DualEncoder.
      where: the model's name in the message (e.g. its checkpoint folder).

    Raises:
      ExportError: naming every reason (two towers, the pooling, each config field).
    """
    problems = []
    if not module.shared_tower:
        problems.append("two towers (sentence-transformers' Transformer module is one encoder)")
    if module.pooling not in ST_POOLING_KEYS:
        problems.append(f"pooling={module.pooling!r}")
    try:
        _encoder_config(module.config)
    except ExportError as e:
        problems.append(str(e))
    if problems:
        raise ExportError(
            f"cannot export {where} ({module.config.family}-family encoder) as sentence-transformers: "
            + "; ".join(problems)
            + "; --format=bundle takes any architecture"
        )


def write(source: LoadedModel, output: str) -> str:
    """Writes a folder that `SentenceTransformer(output)` loads and that encodes as we do.

    The pipeline is Transformer (a Hugging Face BertModel, or for the llm family
    a Gemma3TextModel (bidirectional or causal) or a causal Qwen3Model:
    config.json, model.safetensors with HF names and layouts, the tokenizer
    files), Pooling, one Dense (identity activation) per projection layer (two
    for a two-layer head, as EmbeddingGemma's) and Normalize when the model
    normalises; the prompts become prefix prompts ("query", "document" and one
    per task, see `prompt_prefixes`). Written into a temporary folder renamed to
    `output` when complete.

    Args:
      source: the model.
      output: the folder to create (must not exist, or be empty).

    Returns:
      The output folder (absolute).

    Raises:
      ExportError: the architecture has no sentence-transformers form (two
        towers, a block that is neither BERT, Gemma 3 nor Qwen3, ...) or a
        prompt is not a prefix, naming what.
    """
    from safetensors.numpy import save_file

    module = source.module
    check_expressible(module, source.origin.get("checkpoint", "the model"))
    prefixes = prompt_prefixes(source.prompts)
    with fileio.atomic_directory(output) as tmp:
        fileio.write_json(os.path.join(tmp, CONFIG), _encoder_config(module.config))
        save_file(
            _encoder_tensors(source.params["encoder"], module.config),
            os.path.join(tmp, WEIGHTS),
            metadata={"format": "pt"},
        )
        copy_tokenizer(source.vocab_dir, tmp)
        fileio.write_json(
            os.path.join(tmp, SENTENCE_BERT_CONFIG),
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

        pooling = {key: False for key in ST_POOLING_KEYS.values()}
        pooling.update({"pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False})
        pooling[ST_POOLING_KEYS[module.pooling]] = True
        fileio.write_json(
            os.path.join(add("Pooling"), CONFIG),
            {"word_embedding_dimension": module.config.hidden_size, **pooling},
        )
        if module.projection_hidden_dim:
            _write_dense(add("Dense"), source.params["projection_hidden"])
        if module.projection_dim:
            _write_dense(add("Dense"), source.params["projection"])
        if module.normalize:
            add("Normalize")
        fileio.write_json(os.path.join(tmp, MODULES), modules)
        fileio.write_json(
            os.path.join(tmp, PROMPTS_CONFIG),
            {"prompts": prefixes, "default_prompt_name": None, "similarity_fn_name": "cosine"},
        )
        if source.origin.get("quantization"):
            # The weights are dequantised integers (`export --quantize`): which ones, and how.
            fileio.write_json(os.path.join(tmp, QUANTIZATION), source.origin["quantization"])
    return os.path.abspath(output)
