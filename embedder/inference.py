"""`Embedder`: encode text with a trained, souped, exported or pretrained model.

Texts get the model's prompts (Gecko / EmbeddingGemma format, when the model
uses them), then are sorted by length and batched by `encoding.plan`: tight
length buckets, a token budget per batch (many short queries per pass, few long
documents), each bucket's last batch padded to a few rows, not to a full batch;
so a corpus of any size compiles a bounded set of shapes. A batch is padded on
the host while the previous one runs, and its embeddings are fetched after the
next one is dispatched. The same loop encodes on one device or on a mesh (the
parameters of a running training job: batches split over the data-parallel
axes). A Matryoshka size is the embedding's prefix, re-normalised
(`matryoshka.prefix`).

`Embedder.load(path)` reads any of: a bundle written by `embedder export
--format=bundle` (no gin files, no checkpoint), a sentence-transformers or Hugging
Face BERT folder, or a checkpoint (model dir, checkpoints/ or a step folder).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from embedder import encoding, fileio, matryoshka, partitioning, quantization
from embedder.data import prompts as prompts_lib
from embedder.data import tokenizers
from embedder.errors import ConfigError
from embedder.formats import LoadedModel, bundle, huggingface
from embedder.formats import default_max_length as default_max_length
from embedder.formats import prompts_from_dict as prompts_from_dict
from embedder.models import dual_encoder

# The batch plan's names, where they were first defined.
MIN_BUCKET = encoding.MIN_BUCKET
bucket_length = encoding.bucket_length


class Embedder:
    """A model, its parameters, its tokenizer and its prompts, ready to encode text.

    Args:
      module: the DualEncoder.
      params: its parameters (the "params" collection, unboxed; sharded or not).
      tokenizer: turns text into token ids.
      max_length: texts are truncated to this many tokens (specials included):
        one number, or one per kind ({"query": 64, "document": 256}).
      prompts: the task / title templates the model was trained with (off by default).
      mesh: None: encode on the parameters' device (one device). A mesh: the
        parameters are global arrays on it (e.g. a training state); each batch is
        a global array split over its data-parallel axes, the batch size rounded
        up to a multiple of the data-parallel size, and the embeddings come back
        whole on every process (each process must encode the same texts).
      rules: logical axis rules that name the batch axis's mesh axes (with a mesh).
    """

    def __init__(
        self,
        module: dual_encoder.DualEncoder,
        params: Any,
        tokenizer: tokenizers.Tokenizer,
        max_length: int | Mapping[str, int] = 512,
        prompts: prompts_lib.PromptConfig | None = None,
        mesh: Mesh | None = None,
        rules: Sequence[tuple[str, Any]] = partitioning.DEFAULT_RULES,
    ):
        self.module = module
        self.params = params
        self.tokenizer = tokenizer
        self.max_length = dict(max_length) if isinstance(max_length, Mapping) else max_length
        self.prompts = prompts or prompts_lib.PromptConfig()
        self.mesh = mesh
        self._batch_sharding = None if mesh is None else partitioning.batch_sharding(mesh, 2, rules)
        self._data_parallel = 1 if mesh is None else partitioning.data_parallel_size(mesh)

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
            raise ConfigError(
                f"{path}: an exported model is read from local disk; copy it down first "
                "(gcloud storage cp -r); checkpoints are read from gs:// directly"
            )
        if (is_bundle or is_hf) and step is not None:
            raise ConfigError(f"{path} is an exported model, not a checkpoint: it has no steps (step={step})")
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
    def from_pretrained(cls, model: str, step: int | None = None) -> Embedder:
        """`load`, plus the built-in names ("all-MiniLM-L6-v2": the packaged real weights).

        Args:
          model: a built-in name, or a bundle, sentence-transformers / Hugging Face
            folder or checkpoint (model dir or step folder).
          step: for a checkpoint, which step (None: the latest).
        """
        from embedder import api

        if model in api.BUILTIN_MODELS:
            from embedder.models import pretrained

            return cls.from_sentence_transformers(pretrained.minilm_l6_v2_path())
        return cls.load(model, step)

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
            raise ConfigError(f"{path}: the checkpoint names no vocab_dir, so there is no tokenizer for it")
        tokenizer = tokenizers.load_tokenizer(vocab_dir)
        limit = default_max_length(module, vocab_dir)
        max_length = limit if max_length is None else min(max_length, limit)
        return cls(module, params, tokenizer, max_length=max_length, prompts=meta.prompts)

    def length_limit(self, kind: str = "query") -> int:
        """Tokens a text of this kind is truncated to (specials included)."""
        if kind not in dual_encoder.TOWERS:
            raise ConfigError(f"kind={kind!r}: expected one of {dual_encoder.TOWERS}")
        if isinstance(self.max_length, Mapping):
            if kind not in self.max_length:
                raise ConfigError(f"max_length {self.max_length} names no length for kind={kind!r}")
            return int(self.max_length[kind])
        return int(self.max_length)

    def tokenize(self, texts: Sequence[str], kind: str = "query") -> list[list[int]]:
        """Token ids of each text (as given: no prompt added), truncated to the kind's max length."""
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        limit = self.length_limit(kind)
        return [self.tokenizer.encode(t, max_length=limit) for t in texts]

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
            raise ConfigError(f"kind={kind!r}: expected one of {dual_encoder.TOWERS}")
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        if kind == "query":
            if titles is not None:
                raise ConfigError("titles are for documents (kind='document')")
            return [prompts_lib.format_query(t, task, self.prompts) for t in texts]
        if task is not None:
            raise ConfigError("a task is for queries (kind='query'); documents take titles")
        if titles is not None and len(titles) != len(texts):
            raise ConfigError(f"{len(titles)} titles for {len(texts)} texts")
        titles = titles if titles is not None else [None] * len(texts)
        return [
            prompts_lib.format_document(t, title, self.prompts)
            for t, title in zip(texts, titles, strict=True)
        ]

    def encoding_plan(
        self,
        texts: Sequence[str],
        kind: str = "query",
        task: str | None = None,
        titles: Sequence[str | None] | None = None,
        batch_size: int = 32,
        tokens_per_batch: int | None = None,
    ) -> tuple[list[list[int]], list[encoding.Batch]]:
        """The token ids `encode` computes and its batches (`encoding.plan`).

        Args:
          texts, kind, task, titles, batch_size, tokens_per_batch: as `encode`.

        Returns:
          (token ids of each prompted text, the batches);
          `encoding.utilisation([len(x) for x in ids], batches)` is the fraction
          of computed tokens that are real.
        """
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be positive")
        if tokens_per_batch is not None and tokens_per_batch < 1:
            raise ConfigError(f"tokens_per_batch={tokens_per_batch} must be positive")
        ids = self.tokenize(self.prompted(texts, kind, task, titles), kind)
        batches = encoding.plan(
            [len(x) for x in ids],
            batch_size,
            self.length_limit(kind),
            self._data_parallel,
            tokens_per_batch=tokens_per_batch,
        )
        return ids, batches

    def encode(
        self,
        texts: Sequence[str],
        kind: str = "query",
        task: str | None = None,
        dim: int | None = None,
        batch_size: int = 32,
        titles: Sequence[str | None] | None = None,
        tokens_per_batch: int | None = None,
    ) -> np.ndarray:
        """Embeds texts.

        Args:
          texts: the strings.
          kind: "query" or "document": which prompt, and which tower when there are two.
          task: the queries' task (Gecko-style prompt); None: the default task.
            Ignored by models trained without prompts.
          dim: a Matryoshka size: the first `dim` components, re-normalised (when
            the model normalises); None: the full embedding.
          batch_size: texts per forward pass at the kind's length limit; shorter
            texts go more per pass, to the same token count.
          titles: the documents' titles, one per text (or None).
          tokens_per_batch: the token budget of a forward pass (rows * padded
            length); None: batch_size * the kind's length limit.

        Returns:
          [len(texts), dim or embedding_dim] float32, in input order.
        """
        full = self.module.embedding_dim
        if dim is not None:
            try:
                matryoshka.check_dims([dim], full)
            except ConfigError as e:
                raise ConfigError(f"dim={dim}: {e}") from e
        ids, batches = self.encoding_plan(texts, kind, task, titles, batch_size, tokens_per_batch)
        out = np.zeros((len(ids), full), np.float32)
        pending = None
        for batch in batches:
            tokens, mask = encoding.pad(ids, batch, self.module.config.pad_id)
            # Dispatched, not waited for: the next batch is padded while this one runs.
            embeddings = self._forward(tokens, mask, kind)
            embeddings.copy_to_host_async()
            if pending is not None:
                _collect(out, *pending)
            pending = (batch, embeddings)
        if pending is not None:
            _collect(out, *pending)
        if dim is not None and dim < full:
            out = matryoshka.prefix(out, dim, self.module.normalize)
        return out

    def _forward(self, tokens: np.ndarray, mask: np.ndarray, kind: str) -> jax.Array:
        """[size, dim] embeddings of one padded batch, on the first device or over the mesh."""
        if self.mesh is None:
            return _encode(self.module, self.params, tokens, mask, kind)
        tokens, mask = (_global(x, self._batch_sharding) for x in (tokens, mask))
        return _mesh_encode_fn(self.mesh)(self.module, self.params, tokens, mask, kind)

    def index(
        self,
        documents: Sequence[str],
        precision: str = "int8",
        *,
        titles: Sequence[str | None] | None = None,
        dim: int | None = None,
        batch_size: int = 32,
        keep_full_precision: bool = True,
    ) -> quantization.QuantizedIndex:
        """Encodes documents into a search index of one precision.

        Args:
          documents: the corpus.
          precision: "float32", "int8" (per-dimension ranges calibrated on these
            documents) or "binary" (sign bits, searched by Hamming distance).
          titles: one title (or None) per document.
          dim: a Matryoshka size (None: the full embedding).
          batch_size: as in `encode`.
          keep_full_precision: keep the float32 embeddings to rescore candidates
            (False: rescore against the quantised vectors).

        Returns:
          The `quantization.QuantizedIndex`; `index.nbytes` is its memory.
        """
        embeddings = self.encode(documents, kind="document", dim=dim, batch_size=batch_size, titles=titles)
        return quantization.QuantizedIndex.build(
            embeddings, precision, keep_full_precision=keep_full_precision
        )

    def search(
        self,
        queries: Sequence[str],
        index: quantization.QuantizedIndex,
        k: int = 10,
        *,
        task: str | None = None,
        rescore_multiplier: int = 4,
        batch_size: int = 32,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top-k documents of `index` for each query, rescored in full precision.

        Args:
          queries: the query strings.
          index: from `Embedder.index` (its size decides the queries' Matryoshka size).
          k: results per query.
          task: the queries' prompt task (None: the default).
          rescore_multiplier: candidates per result rescored in float32 (see
            `quantization.quantized_search`).
          batch_size: as in `encode`.

        Returns:
          ``(scores, ids)``: [len(queries), k] float32 scores, best first, and the
          documents' positions in the indexed corpus (int64).
        """
        dim = None if index.dim == self.module.embedding_dim else index.dim
        embeddings = self.encode(queries, kind="query", task=task, dim=dim, batch_size=batch_size)
        return index.search(embeddings, k, rescore_multiplier=rescore_multiplier)


def _collect(out: np.ndarray, batch: encoding.Batch, embeddings: jax.Array) -> None:
    """Writes a batch's embeddings (its real rows) into their places in `out`."""
    out[batch.rows] = np.asarray(embeddings)[: len(batch.rows)]


def _global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _on_first_device(params: Any) -> Any:
    """Placed as checkpoints restore (committed to the first local device), so that
    Embedders of one architecture, however loaded, hit the same compiled `_encode`."""
    return jax.device_put(params, jax.local_devices()[0])


def _apply(module: dual_encoder.DualEncoder, params: Any, tokens: jax.Array, mask: jax.Array, tower: str):
    return module.apply({"params": params}, tokens, tower, mask=mask, method=module.encode)


# One compiled function per (module, tower, shape) for the whole process: Embedders
# of the same architecture (a soup's candidates, reloaded exports) share compiles.
_encode = jax.jit(_apply, static_argnums=(0, 4))


@functools.cache
def _mesh_encode_fn(mesh: Mesh):
    """`_encode` on a mesh, one per mesh for the process (so per (module, tower, shape) too).

    The output is replicated: every process can read every embedding.
    """
    return jax.jit(_apply, static_argnums=(0, 4), out_shardings=NamedSharding(mesh, PartitionSpec()))
