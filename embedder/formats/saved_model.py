"""A TF SavedModel for TF Serving: raw strings in, embeddings out (jax2tf).

The graph does all of `Embedder.encode`: the prompt (a task, empty title),
tokenisation, truncation, the specials around the text, padding to a
power-of-two bucket (few XLA compiles, as in `Embedder`), the attention mask
from the lengths, and the model itself, converted by jax2tf with a symbolic
batch and length and lowered for CPU, GPU and TPU. The parameters are
tf.Variables, so the graph stays small.

Tokenisers the graph runs (each equal to our Python tokenizer):

* WordPiece (the BERT family): `data.wordpiece_tf`, [CLS] ... [SEP];
* a SentencePiece `.model` (the LLM family, e.g. Gemma's): tensorflow-text's
  `SentencepieceTokenizer` on the model's bytes (stored in the graph), with the
  folder's <bos> / <eos> as `SentencePieceTokenizer.specials` says.

A `tokenizer.json` (the `tokenizers` package: byte-level BPE and others) has no
in-graph equivalent: such a model is refused; export it with
`--format=sentence-transformers` or `--format=bundle`.

Signatures (each takes `texts`, a tf.string vector):

* `serving_default` and `query`: the query prompt of the default task, the
  query tower;
* `query_<task>` for each task the model was trained with
  (`PromptConfig.tasks`; `task_signature` names it: "code retrieval" ->
  `query_code_retrieval`): the query prompt of that task, the query tower;
* `document`: the document prompt, the document tower.

Each returns `embeddings` [n, dim] float32 and, for every Matryoshka size d
given at export, `embeddings_<d>` (the prefix, re-normalised).

Load with `import tensorflow_text` first (its ops tokenise); TF Serving needs a
build with the tensorflow_text ops.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence

import jax
import numpy as np

from embedder import fileio, inference
from embedder.data import prompts as prompts_lib
from embedder.errors import ExportError
from embedder.formats import LoadedModel, prompt_affixes
from embedder.formats.bundle import flatten_params

PLATFORMS = ("cpu", "cuda", "tpu")
EXPORT_INFO = "embedder_export.json"


def task_signature(task: str) -> str:
    """The name of a task's query signature: `query_` and the task's ASCII letters and
    digits, each other run of characters one "_" ("code retrieval" -> "query_code_retrieval").

    Raises:
      ExportError: the task has no ASCII letter or digit.
    """
    slug = re.sub(r"[^A-Za-z0-9]+", "_", task).strip("_")
    if not slug:
        raise ExportError(f"task {task!r} has no ASCII letter or digit to name its SavedModel signature")
    return f"query_{slug}"


def signatures(prompts: prompts_lib.PromptConfig) -> dict[str, tuple[str, str | None]]:
    """Signature name -> (kind, task) of the SavedModel of a model with these prompts.

    Raises:
      ExportError: two tasks would share a signature name, naming both.
    """
    named: dict[str, tuple[str, str | None]] = {
        "serving_default": ("query", None),
        "query": ("query", None),
        "document": ("document", None),
    }
    for task in prompts.tasks if prompts.enabled else ():
        name = task_signature(task)
        if name in named:
            raise ExportError(
                f"tasks {named[name][1]!r} and {task!r} would both be SavedModel signature {name!r}; "
                "rename one"
            )
        named[name] = ("query", task)
    return named


def bucket_lengths(max_length: int) -> list[int]:
    """Every length `inference.bucket_length` can return, ascending."""
    buckets, length = [], inference.MIN_BUCKET
    while length < max_length:
        buckets.append(length)
        length *= 2
    return [*buckets, max_length]


def write(source: LoadedModel, output: str, matryoshka_dims: Sequence[int] = ()) -> str:
    """Writes the SavedModel, into a temporary folder renamed to `output` when complete.

    Args:
      source: the model.
      output: the folder to create (must not exist, or be empty).
      matryoshka_dims: extra outputs `embeddings_<d>`: sizes in 1..embedding_dim
        (`embedder.export` checks them).

    Returns:
      The output folder.
    """
    import tensorflow as tf
    from jax.experimental import jax2tf

    module, max_length = source.module, source.max_length
    make_tokenizer, prefix_ids, suffix_ids, limit = _graph_tokenizer(source.tokenizer, source, max_length)
    named = signatures(source.prompts)
    dims = tuple(matryoshka_dims)
    leaves, treedef = jax.tree.flatten(source.params)
    names = list(flatten_params(source.params))

    def encode(leaves, tokens, mask, tower):
        params = jax.tree.unflatten(treedef, leaves)
        return module.apply({"params": params}, tokens, tower, mask=mask, method=module.encode)

    def convert(tower):
        return jax2tf.convert(
            functools.partial(encode, tower=tower),
            polymorphic_shapes=[["..."] * len(leaves), "(b, l)", "(b, l)"],
            polymorphic_constraints=[f"l <= {max_length}"],
            with_gradient=False,
            native_serialization_platforms=PLATFORMS,
        )

    class Serving(tf.Module):
        def __init__(self):
            super().__init__(name="embedder")
            self.variables_list = [
                tf.Variable(np.asarray(leaf), trainable=False, name=name.replace("/", "."))
                for leaf, name in zip(leaves, names, strict=True)
            ]
            # The tokenizer is an attribute, so its tables and resources are saved.
            self.tokenizer, self.tokenize = make_tokenizer()
            self.encoders = {tower: convert(tower) for tower in ("query", "document")}
            self.buckets = tf.constant(bucket_lengths(max_length), tf.int64)

        def embed(self, prompted, kind):
            # [batch, (pieces)] int32, the text's tail cut to leave room for the specials.
            pieces = self.tokenize(prompted)[:, : limit - len(prefix_ids) - len(suffix_ids)]
            edge = tf.ones_like(prompted, tf.int32)[:, None]  # [batch, 1]
            ids = tf.concat(
                [
                    *[tf.RaggedTensor.from_tensor(edge * token) for token in prefix_ids],
                    pieces,
                    *[tf.RaggedTensor.from_tensor(edge * token) for token in suffix_ids],
                ],
                axis=1,
            )
            count = tf.size(prompted, tf.int64)
            # The converted model wants at least one row: an empty batch runs one
            # all-padding row, sliced off again.
            rows = tf.maximum(count, 1)
            lengths = tf.pad(ids.row_lengths(), [[0, rows - count]])
            bucket = tf.gather(self.buckets, tf.searchsorted(self.buckets, tf.reduce_max(lengths)[None]))[0]
            tokens = ids.to_tensor(default_value=module.config.pad_id, shape=tf.stack([rows, bucket]))
            mask = tf.sequence_mask(lengths, bucket)
            embeddings = self.encoders[kind](self.variables_list, tokens, mask)[:count]
            outputs = {"embeddings": embeddings}
            for dim in dims:
                prefix_part = embeddings[:, :dim]
                if module.normalize:
                    norm = tf.sqrt(tf.reduce_sum(tf.square(prefix_part), axis=1, keepdims=True))
                    prefix_part = prefix_part / tf.maximum(norm, 1e-12)
                outputs[f"embeddings_{dim}"] = prefix_part
            return outputs

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
        def embed_query(self, prompted):
            return self.embed(prompted, "query")

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)
        def embed_document(self, prompted):
            return self.embed(prompted, "document")

        def signature(self, kind, task):
            """A signature: the prompt of (kind, task) around the texts, then that tower.

            Every signature of a tower calls that tower's one function, so the model
            is converted and stored once per tower, not once per task.
            """
            prefix, suffix = prompt_affixes(source.prompts, kind, task)
            tower = self.embed_query if kind == "query" else self.embed_document

            @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="texts")], autograph=False)
            def call(texts):
                prompted = tf.strings.join(
                    [tf.fill(tf.shape(texts), prefix), texts, tf.fill(tf.shape(texts), suffix)]
                )
                return tower(prompted)

            return call

    serving = Serving()
    # Kept on the module, so the saved object graph tracks each signature's function.
    serving.signature_functions = {
        name: serving.signature(kind, task) for name, (kind, task) in named.items()
    }
    with fileio.atomic_directory(output) as tmp:
        tf.saved_model.save(serving, tmp, signatures=dict(serving.signature_functions))
        fileio.write_json(
            os.path.join(tmp, EXPORT_INFO),
            {
                "note": "import tensorflow_text before tf.saved_model.load (its ops tokenise)",
                "signatures": list(named),
                "task_signatures": {name: task for name, (_, task) in named.items() if task is not None},
                "max_length": max_length,
                "matryoshka_dims": list(dims),
                "origin": source.origin,
            },
        )
    return os.path.abspath(output)


def _graph_tokenizer(tokenizer, source: LoadedModel, max_length: int):
    """How the graph tokenises like `tokenizer`.

    Returns:
      (a function making the in-graph tokenizer: (the object to track, a function
      from a tf.string vector to its [batch, (pieces)] int32 ids without
      specials); the ids put before each text; the ids put after it; the most
      ids a text has, specials included).

    Raises:
      ExportError: the tokenizer has no in-graph equivalent (a tokenizer.json),
        naming its file and the formats that take it.
    """
    from embedder.data import tokenizers, wordpiece

    if isinstance(tokenizer, wordpiece.WordPieceTokenizer):
        from embedder.data import wordpiece_tf

        def wordpiece_tf_tokenizer():
            graph_tokenizer = wordpiece_tf.TFWordPieceTokenizer(tokenizer)
            return graph_tokenizer, graph_tokenizer.encode

        return (
            wordpiece_tf_tokenizer,
            [tokenizer.cls_id],
            [tokenizer.sep_id],
            max_length,
        )
    if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
        prefix, suffix = tokenizer.specials()
        limit = min(max_length, tokenizer.model_max_length or max_length)
        if limit < len(prefix) + len(suffix):
            raise ExportError(f"{tokenizer.source}: max_length={limit} cannot hold the special tokens")
        return functools.partial(_tf_sentencepiece, tokenizer.model_path), prefix, suffix, limit
    where = getattr(tokenizer, "source", source.vocab_dir)
    raise ExportError(
        f"{where}: the SavedModel tokenises in the graph with WordPiece or a SentencePiece .model, and "
        f"this model's tokenizer is a {type(tokenizer).__name__} (a tokenizer.json, which has no in-graph "
        "equivalent); export it with --format=sentence-transformers (or --format=bundle)"
    )


def _tf_sentencepiece(model_path: str):
    """(tensorflow-text's SentencepieceTokenizer on a `.model` file's bytes, its tokenize):
    ids of the pieces only (no bos / eos of its own), as `sentencepiece`'s encode."""
    import tensorflow as tf
    import tensorflow_text as tf_text

    with fileio.open_file(model_path, "rb") as f:
        model = f.read()
    # Made eagerly, so every traced function captures the same (tracked) resource.
    with tf.init_scope():
        tokenizer = tf_text.SentencepieceTokenizer(model=model, out_type=tf.int32)
    return tokenizer, tokenizer.tokenize
