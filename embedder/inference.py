"""`Embedder`: encode text with a trained, souped, exported or pretrained model.

Texts get the model's prompts (Gecko / EmbeddingGemma format, when the model
uses them), then are sorted by length and padded to a few bucket lengths (powers
of two), so a corpus of any size compiles at most a handful of shapes. A
Matryoshka size is the embedding's prefix, re-normalised.

`Embedder.load(path)` reads any of: a bundle written by `embedder export
--format=bundle` (no gin files, no checkpoint), a sentence-transformers or Hugging
Face BERT folder, or a checkpoint (model dir, checkpoints/ or a step folder).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from embedder import fileio
from embedder.data import prompts as prompts_lib
from embedder.data import wordpiece
from embedder.models import dual_encoder, pretrained

MIN_BUCKET = 16
# A bundle: BUNDLE_CONFIG (model config, max length, prompts), BUNDLE_PARAMS
# (safetensors, one tensor per parameter path) and BUNDLE_TOKENIZER/ (vocab.txt,
# tokenizer_config.json).
BUNDLE_FORMAT = "embedder-bundle"
BUNDLE_VERSION = 1
BUNDLE_CONFIG = "embedder_bundle.json"
BUNDLE_PARAMS = "params.safetensors"
BUNDLE_TOKENIZER = "tokenizer"


def bucket_length(length: int, max_length: int) -> int:
    """The smallest power of two >= length (at least MIN_BUCKET), capped at max_length."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_length)


def prompts_from_dict(fields: dict[str, Any] | None) -> prompts_lib.PromptConfig:
    """A PromptConfig from its JSON form (checkpoint meta or bundle); None: prompts off."""
    if not fields:
        return prompts_lib.PromptConfig()
    known = {f.name for f in dataclasses.fields(prompts_lib.PromptConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"prompt config has unknown fields {unknown}")
    return prompts_lib.PromptConfig(**fields)


def default_max_length(module: dual_encoder.DualEncoder, vocab_dir: str | None) -> int:
    """Texts are truncated to the length the tokenizer's folder says (sentence-transformers'
    max_seq_length, e.g. 256 for all-MiniLM-L6-v2), else to the model's positions (512 at most
    for the llm family, which has none)."""
    limit = module.config.max_len if module.config.family == "bert" else 512
    if vocab_dir:
        path = os.path.join(vocab_dir, "sentence_bert_config.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return min(int(json.load(f).get("max_seq_length", limit)), limit)
    return limit


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


class Embedder:
    """A model, its parameters, its tokenizer and its prompts, ready to encode text.

    Args:
      module: the DualEncoder.
      params: its parameters (the "params" collection, unboxed; sharded or not).
      tokenizer: turns text into token ids.
      max_length: texts are truncated to this many tokens (specials included).
      prompts: the task / title templates the model was trained with (off by default).
    """

    def __init__(
        self,
        module: dual_encoder.DualEncoder,
        params: Any,
        tokenizer: wordpiece.WordPieceTokenizer,
        max_length: int = 512,
        prompts: prompts_lib.PromptConfig | None = None,
    ):
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.prompts = prompts or prompts_lib.PromptConfig()

    @classmethod
    def load(cls, path: str, step: int | None = None) -> Embedder:
        """Loads a bundle, a sentence-transformers / Hugging Face folder or a checkpoint.

        Args:
          path: the folder.
          step: for a checkpoint, which step (None: the latest); must be None otherwise.

        Returns:
          The Embedder.

        Raises:
          FileNotFoundError: `path` is none of these.
        """
        if not fileio.isdir(path):
            raise FileNotFoundError(f"{path}: no such model folder")
        is_bundle = fileio.exists(os.path.join(path, BUNDLE_CONFIG))
        is_hf = fileio.exists(os.path.join(path, "config.json")) and fileio.exists(
            os.path.join(path, "model.safetensors")
        )
        if (is_bundle or is_hf) and fileio.is_url(path):
            raise ValueError(
                f"{path}: an exported model is read from local disk; copy it down first "
                "(gcloud storage cp -r); checkpoints are read from gs:// directly"
            )
        if (is_bundle or is_hf) and step is not None:
            raise ValueError(f"{path} is an exported model, not a checkpoint: it has no steps (step={step})")
        if is_bundle:
            return cls.from_bundle(path)
        if is_hf:
            return cls.from_sentence_transformers(path)
        from embedder import checkpointing

        try:
            checkpointing.resolve_step_dir(path, step)
        except checkpointing.CheckpointError as e:
            if step is not None:
                raise
            raise FileNotFoundError(
                f"{path}: not a model: no {BUNDLE_CONFIG} (bundle), no config.json + model.safetensors "
                f"(sentence-transformers / Hugging Face) and no checkpoints ({e})"
            ) from e
        return cls.from_checkpoint(path, step)

    @classmethod
    def from_bundle(cls, bundle_dir: str) -> Embedder:
        """Loads a bundle written by `embedder export --format=bundle` (no gin files needed).

        Args:
          bundle_dir: the bundle's folder.

        Returns:
          The Embedder, with the bundle's prompts and max length.
        """
        from safetensors.flax import load_file

        from embedder.models import spec

        config_path = os.path.join(bundle_dir, BUNDLE_CONFIG)
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        if config.get("format") != BUNDLE_FORMAT or config.get("version") != BUNDLE_VERSION:
            raise ValueError(
                f"{config_path}: format {config.get('format')!r} version {config.get('version')!r}; "
                f"this embedder reads {BUNDLE_FORMAT!r} version {BUNDLE_VERSION}"
            )
        module = spec.module_from_description(config["model_config"])
        params = _on_first_device(unflatten_params(load_file(os.path.join(bundle_dir, BUNDLE_PARAMS))))
        tokenizer = wordpiece.WordPieceTokenizer.from_pretrained_dir(
            os.path.join(bundle_dir, BUNDLE_TOKENIZER)
        )
        return cls(module, params, tokenizer, config["max_length"], prompts_from_dict(config.get("prompts")))

    @classmethod
    def from_sentence_transformers(cls, model_dir: str, **config_overrides: Any) -> Embedder:
        """Loads a BERT-family sentence-transformers (or bare Hugging Face) folder.

        Args:
          model_dir: local folder with config.json, model.safetensors, vocab.txt
            and, for sentence-transformers, modules.json, the pooling config, at
            most one Dense module without bias or activation (our projection) and
            prompts that are prefixes (as `embedder export` writes them).
          **config_overrides: TransformerConfig fields to override (e.g. dtype).

        Returns:
          An Embedder that encodes as sentence-transformers does.
        """
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"{model_dir}: not a model folder")
        info = pretrained.read_sentence_transformer_info(model_dir)
        if info.dense_layers > 1:
            raise ValueError(
                f"{model_dir}: {info.dense_layers} Dense modules; at most one (a projection) is supported"
            )
        config = pretrained.config_from_hf(model_dir, **config_overrides)
        params: dict[str, Any] = {"encoder": pretrained.load_bert_params(model_dir, config)}
        projection_dim = None
        if info.dense_dirs:
            kernel = pretrained.load_projection(info.dense_dirs[0])
            if kernel.shape[0] != config.hidden_size:
                raise pretrained.WeightsError(
                    f"{info.dense_dirs[0]}: Dense in_features={kernel.shape[0]}, the encoder's "
                    f"hidden_size is {config.hidden_size}"
                )
            params["projection"] = {"kernel": kernel}
            projection_dim = kernel.shape[1]
        module = dual_encoder.DualEncoder(
            config, pooling=info.pooling, normalize=info.normalize, projection_dim=projection_dim
        )
        params = _on_first_device(params)
        tokenizer = wordpiece.WordPieceTokenizer.from_pretrained_dir(model_dir)
        prompts = _prompts_from_prefixes(info.prompts)
        return cls(
            module, params, tokenizer, max_length=min(info.max_seq_length, config.max_len), prompts=prompts
        )

    @classmethod
    def from_checkpoint(cls, path: str, step: int | None = None, max_length: int | None = None) -> Embedder:
        """Loads a training (or soup) checkpoint: a model dir, its checkpoints/ or a step folder.

        Args:
          path: where the checkpoint is.
          step: which step; None = the latest.
          max_length: truncate texts to this many tokens; None: `default_max_length`
            (what export writes too).

        Returns:
          An Embedder of the checkpoint's model parameters and prompts.
        """
        from embedder import checkpointing
        from embedder.models import spec

        params, meta = checkpointing.load_model_params(path, step)
        module = spec.module_from_description(meta.model_config)
        vocab_dir = meta.vocab_dir
        if not vocab_dir:
            raise ValueError(f"{path}: the checkpoint names no vocab_dir, so there is no tokenizer for it")
        tokenizer = wordpiece.WordPieceTokenizer.from_pretrained_dir(vocab_dir)
        limit = default_max_length(module, vocab_dir)
        max_length = limit if max_length is None else min(max_length, limit)
        return cls(module, params, tokenizer, max_length=max_length, prompts=meta.prompts)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (as given: no prompt added), truncated to max_length."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        return [self.tokenizer.encode(t, max_length=self.max_length) for t in texts]

    def prompted(
        self,
        texts: Sequence[str],
        kind: str = "query",
        task: str | None = None,
        titles: Sequence[str | None] | None = None,
    ) -> list[str]:
        """The texts as the model sees them: with the query (task) or document (title) prompt.

        Args:
          texts: the strings.
          kind: "query" or "document".
          task: the task of the queries; None: the prompts' default task.
          titles: one title (or None) per document.

        Returns:
          The prompted texts (the texts themselves when the model uses no prompts).
        """
        if kind not in dual_encoder.TOWERS:
            raise ValueError(f"kind={kind!r}: expected one of {dual_encoder.TOWERS}")
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        if kind == "query":
            if titles is not None:
                raise ValueError("titles are for documents (kind='document')")
            return [prompts_lib.format_query(t, task, self.prompts) for t in texts]
        if task is not None:
            raise ValueError("a task is for queries (kind='query'); documents take titles")
        if titles is not None and len(titles) != len(texts):
            raise ValueError(f"{len(titles)} titles for {len(texts)} texts")
        titles = titles if titles is not None else [None] * len(texts)
        return [
            prompts_lib.format_document(t, title, self.prompts)
            for t, title in zip(texts, titles, strict=True)
        ]

    def encode(
        self,
        texts: Sequence[str],
        kind: str = "query",
        task: str | None = None,
        dim: int | None = None,
        batch_size: int = 32,
        titles: Sequence[str | None] | None = None,
    ) -> np.ndarray:
        """Embeds texts.

        Args:
          texts: the strings.
          kind: "query" or "document": which prompt, and which tower when there are two.
          task: the queries' task (Gecko-style prompt); None: the default task.
            Ignored by models trained without prompts.
          dim: a Matryoshka size: the first `dim` components, re-normalised (when
            the model normalises); None: the full embedding.
          batch_size: texts per forward pass.
          titles: the documents' titles, one per text (or None).

        Returns:
          [len(texts), dim or embedding_dim] float32, in input order.
        """
        full = self.module.embedding_dim
        if dim is not None and not 0 < dim <= full:
            raise ValueError(f"dim={dim}: a Matryoshka size must be in 1..{full}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be positive")
        ids = self.tokenize(self.prompted(texts, kind, task, titles))
        out = np.zeros((len(ids), full), np.float32)
        order = np.argsort([len(x) for x in ids], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            length = bucket_length(max(len(ids[r]) for r in rows), self.max_length)
            tokens = np.full((batch_size, length), self.module.config.pad_id, np.int32)
            # The mask comes from the lengths, not from pad_id: a text may hold a literal [PAD].
            mask = np.zeros((batch_size, length), bool)
            for j, r in enumerate(rows):
                tokens[j, : len(ids[r])] = ids[r]
                mask[j, : len(ids[r])] = True
            out[rows] = np.asarray(_encode(self.module, self.params, tokens, mask, kind))[: len(rows)]
        if dim is not None and dim < full:
            out = truncate(out, dim, self.module.normalize)
        return out


def _on_first_device(params: Any) -> Any:
    """Placed as checkpoints restore (committed to the first local device), so that
    Embedders of one architecture, however loaded, hit the same compiled `_encode`."""
    return jax.device_put(params, jax.local_devices()[0])


# One compiled function per (module, tower, shape) for the whole process: Embedders
# of the same architecture (a soup's candidates, reloaded exports) share compiles.
@functools.partial(jax.jit, static_argnums=(0, 4))
def _encode(module: dual_encoder.DualEncoder, params: Any, tokens: jax.Array, mask: jax.Array, tower: str):
    return module.apply({"params": params}, tokens, tower, mask=mask, method=module.encode)


def truncate(embeddings: np.ndarray, dim: int, normalize: bool = True) -> np.ndarray:
    """The Matryoshka embedding of size `dim`: the prefix, re-normalised (as the loss trains it).

    Args:
      embeddings: [n, full] float32.
      dim: the size.
      normalize: re-normalise to unit length (torch's x / max(||x||, 1e-12)).

    Returns:
      [n, dim] float32.
    """
    prefix = np.ascontiguousarray(embeddings[:, :dim])
    if not normalize:
        return prefix
    norm = np.sqrt(np.sum(np.square(prefix, dtype=np.float32), axis=1, keepdims=True))
    return prefix / np.maximum(norm, np.float32(1e-12))


def _prompts_from_prefixes(prefixes: dict[str, str]) -> prompts_lib.PromptConfig:
    """sentence-transformers' prefix prompts ("query", "document") as templates."""
    query, document = prefixes.get("query", ""), prefixes.get("document", "")
    if not query and not document:
        return prompts_lib.PromptConfig()

    def escape(text):
        return text.replace("{", "{{").replace("}", "}}")

    return prompts_lib.PromptConfig(
        enabled=True, query_template=escape(query) + "{text}", document_template=escape(document) + "{text}"
    )
