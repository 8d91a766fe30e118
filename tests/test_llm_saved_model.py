"""The SavedModel of an LLM-family model tokenised by SentencePiece equals `Embedder.encode`.

The model is the tiny LLM-family encoder (a Gemma 3 block, as gin/models/tiny_llm.gin)
at random init, with its norm scales moved away from their init so a missed
(1 + w) shows; its tokenizer is the SentencePiece unigram `.model` the LLM
training tests train from local docstrings (<bos> text <eos>). The reference is
`Embedder` in Python: `sentencepiece` tokenises there, tensorflow-text's
`SentencepieceTokenizer` inside the graph.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from embedder import errors, inference
from embedder.data import prompts
from embedder.formats import LoadedModel, saved_model
from embedder.models import dual_encoder, transformer
from tests.parity_inputs import PARITY_INPUTS
from tests.test_llm_train import _docstrings, train_sentencepiece_folder

pytestmark = [pytest.mark.slow]

MAX_LENGTH = 48  # shorter than the longer texts (truncation shows), longer than the window
DIM = 16
TOLERANCE = 1e-5
TASK = "code search"
CONFIG = transformer.TransformerConfig(
    family="llm",
    vocab_size=400,
    hidden_size=32,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=16,
    mlp_dim=64,
    activation="gelu_tanh",
    norm_offset=True,
    qk_norm=True,
    post_norms=True,
    causal=False,
    sliding_window=5,
    sliding_window_pattern=2,
    rope_theta=1e6,
    rope_local_theta=1e4,
    scale_embeddings=True,
    pad_id=0,
)


def _random_params(module: dual_encoder.DualEncoder) -> dict:
    tokens = np.ones((1, 8), np.int32)
    params = jax.tree.map(np.asarray, nn.unbox(module.init(jax.random.key(0), tokens, tokens))["params"])
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: (
            x + 0.3 * rng.standard_normal(x.shape).astype(x.dtype)
            if "scale" in jax.tree_util.keystr(path)
            else x
        ),
        params,
    )


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "docstrings.txt"
    corpus.write_text("\n".join(_docstrings()))
    folder = train_sentencepiece_folder(str(corpus), str(tmp_path_factory.mktemp("sp")))
    module = dual_encoder.DualEncoder(CONFIG, pooling="mean")
    return LoadedModel(
        module=module,
        params=_random_params(module),
        vocab_dir=folder,
        max_length=MAX_LENGTH,
        prompts=prompts.PromptConfig(enabled=True, tasks=(TASK,)),
    )


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (registers the tokenizer's ops)

    path = saved_model.write(loaded, str(tmp_path_factory.mktemp("export") / "saved"), [DIM])
    return tf.saved_model.load(path)


# Set by the test below for the fresh interpreter it starts.
ISOLATED = os.environ.get("EMBEDDER_TEST_FRESH_INTERPRETER") == "1"


@pytest.mark.subprocess
def test_the_sentencepiece_saved_model_comparison_in_a_fresh_interpreter():
    """The comparison below, in a fresh interpreter (as `embedder export` runs).

    Known, not yet explained: in a process that had imported the parity tests'
    modules first (torch, transformers), one punctuation-only input (parity input
    10) embedded differently through the SavedModel than through `Embedder`, while
    the same test alone, or after the tokenizer tests, passes.
    """
    name = "test_sentencepiece_saved_model_equals_embedder_encode_on_mixed_length_texts"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"{__file__}::{name}"],
        env={**os.environ, "EMBEDDER_TEST_FRESH_INTERPRETER": "1"},
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-5000:] + proc.stderr[-2000:]


@pytest.mark.skipif(not ISOLATED, reason="run in a fresh interpreter by the test above")
def test_sentencepiece_saved_model_equals_embedder_encode_on_mixed_length_texts(loaded, exported):
    import tensorflow as tf

    embedder = inference.Embedder.from_loaded(loaded)
    lengths = [len(ids) for ids in embedder.tokenize(embedder.prompted(PARITY_INPUTS))]
    assert min(lengths) < MAX_LENGTH // 2 and max(lengths) == MAX_LENGTH  # short texts and truncated ones
    texts = tf.constant(PARITY_INPUTS)
    cases = {
        "serving_default": embedder.encode(PARITY_INPUTS, kind="query"),
        "document": embedder.encode(PARITY_INPUTS, kind="document"),
        saved_model.task_signature(TASK): embedder.encode(PARITY_INPUTS, kind="query", task=TASK),
    }
    assert not np.allclose(cases["serving_default"], cases["document"], atol=1e-3)  # prompts differ
    for name, want in cases.items():
        got = exported.signatures[name](texts=texts)
        np.testing.assert_allclose(got["embeddings"].numpy(), want, atol=TOLERANCE, err_msg=name)
    dim = exported.signatures["query"](texts=texts)[f"embeddings_{DIM}"].numpy()
    np.testing.assert_allclose(dim, embedder.encode(PARITY_INPUTS, kind="query", dim=DIM), atol=TOLERANCE)
    empty = exported.signatures["query"](texts=tf.constant([], tf.string))["embeddings"]
    assert empty.shape == (0, CONFIG.hidden_size)


def test_a_tokenizer_json_model_is_refused_naming_the_file_and_the_sentence_transformers_export(
    loaded, tmp_path
):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(PARITY_INPUTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    bpe = LoadedModel(loaded.module, loaded.params, str(tmp_path), MAX_LENGTH, loaded.prompts)
    with pytest.raises(errors.ExportError, match=r"tokenizer\.json: .*--format=sentence-transformers"):
        saved_model.write(bpe, str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists()
