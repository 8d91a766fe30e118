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

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from embedder import fileio
from embedder.data import prompts as prompts_lib
from embedder.data import wordpiece
from embedder.formats import LoadedModel, bundle, huggingface
from embedder.formats import default_max_length as default_max_length
from embedder.formats import prompts_from_dict as prompts_from_dict
from embedder.models import dual_encoder

MIN_BUCKET = 16


def bucket_length(length: int, max_length: int) -> int:
    """The smallest power of two >= length (at least MIN_BUCKET), capped at max_length."""
    bucket = MIN_BUCKET
    while bucket < length:
        bucket *= 2
    return min(bucket, max_length)


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
        is_bundle, is_hf = bundle.is_bundle(path), huggingface.is_folder(path)
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
                f"{path}: not a model: no {bundle.CONFIG} (bundle), no config.json + model.safetensors "
                f"(sentence-transformers / Hugging Face) and no checkpoints ({e})"
            ) from e
        return cls.from_checkpoint(path, step)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> Embedder:
        """An Embedder of what a `formats` reader returned, its parameters on the first local device."""
        return cls(
            loaded.module,
            _on_first_device(loaded.params),
            loaded.tokenizer,
            loaded.max_length,
            loaded.prompts,
        )

    @classmethod
    def from_bundle(cls, bundle_dir: str) -> Embedder:
        """Loads a bundle written by `embedder export --format=bundle` (no gin files needed).

        Args:
          bundle_dir: the bundle's folder.

        Returns:
          The Embedder, with the bundle's prompts and max length (see `formats.bundle.read`).
        """
        return cls.from_loaded(bundle.read(bundle_dir))

    @classmethod
    def from_sentence_transformers(cls, model_dir: str, **config_overrides: Any) -> Embedder:
        """Loads a BERT-family sentence-transformers (or bare Hugging Face) folder.

        Args:
          model_dir: local folder (see `formats.huggingface.read` for what it may hold).
          **config_overrides: TransformerConfig fields to override (e.g. dtype).

        Returns:
          An Embedder that encodes as sentence-transformers does.
        """
        return cls.from_loaded(huggingface.read(model_dir, **config_overrides))

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
