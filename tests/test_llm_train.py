"""The LLM family end to end: its tokenizers on every path, training, resuming, eval, soup, export.

Tokenizers are trained here from local text (the standard library's
docstrings): a SentencePiece unigram `.model` with a `tokenizer_config.json`
asking for `<bos>` / `<eos>` (as Gemma's folders do), and a byte-level BPE
`tokenizer.json` appending `<|endoftext|>` (as Qwen3-Embedding's). The
reference for the seqio path is the `sentencepiece` / `tokenizers` package run
directly.
"""

import inspect
import json
import os
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import tensorflow as tf
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from embedder.data import batching, preprocessors, tasks, tokenizers, vocabularies
from tests.parity_inputs import PARITY_INPUTS

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

QUERY_LEN, DOC_LEN = 12, 20


def _docstrings() -> list[str]:
    import argparse
    import collections
    import functools
    import re

    texts = []
    for module in (collections, json, os, re, argparse, functools, inspect):
        texts.append(module.__doc__ or "")
        for _, member in inspect.getmembers(module):
            doc = getattr(member, "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return [line for text in texts for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docstrings.txt"
    path.write_text("\n".join(_docstrings()))
    return str(path)


def train_sentencepiece_folder(corpus: str, folder: str) -> str:
    """A Gemma-like SentencePiece folder: ids pad 0, eos 1, bos 2, unk 3; <bos> and <eos> added."""
    os.makedirs(folder, exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=os.path.join(folder, "tokenizer"),
        model_type="unigram",
        vocab_size=400,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        num_threads=1,
        minloglevel=2,
    )
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": True, "pad_token": "<pad>"}, f)
    return folder


@pytest.fixture(scope="module")
def sp_folder(corpus, tmp_path_factory):
    return train_sentencepiece_folder(corpus, str(tmp_path_factory.mktemp("sp")))


@pytest.fixture(scope="module")
def bpe_folder(corpus, tmp_path_factory):
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|im_start|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([corpus], trainer)
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eot)]
    )
    folder = tmp_path_factory.mktemp("bpe")
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}))
    return str(folder)


def _seqio_ids(vocabulary, texts: list[str], length: int) -> list[list[int]]:
    """Ids of `texts` through the seqio preprocessor (in the tf.data graph), cut to `length`."""
    features = tasks.output_features(vocabulary)
    data = tf.data.Dataset.from_tensor_slices({"query": texts, "positive": texts})
    out = preprocessors.tokenize_and_truncate(data, features, {"query": length, "positive": length})
    return [[int(i) for i in example["query"]] for example in out.as_numpy_iterator()]


@pytest.mark.parametrize("kind", ["sentencepiece", "tokenizer.json"])
def test_python_and_seqio_paths_give_the_reference_ids(kind, sp_folder, bpe_folder):
    folder = {"sentencepiece": sp_folder, "tokenizer.json": bpe_folder}[kind]
    tokenizer = tokenizers.load_tokenizer(folder)
    vocabulary = vocabularies.for_folder(folder)
    if kind == "sentencepiece":
        assert isinstance(vocabulary, vocabularies.SentencePieceFolderVocabulary)
        reference = sentencepiece.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))

        def want(text, length):
            return [2, *reference.encode(text)[: length - 2], 1]
    else:
        assert isinstance(vocabulary, vocabularies.HuggingFaceVocabulary)
        reference = RustTokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        eot = reference.token_to_id("<|endoftext|>")

        def want(text, length):
            return [*reference.encode(text, add_special_tokens=False).ids[: length - 1], eot]

    assert vocabulary.pad_id == tokenizer.pad_id == (0 if kind == "sentencepiece" else eot)
    for length in (QUERY_LEN, 512):
        expected = [want(t, length) for t in PARITY_INPUTS]
        assert [tokenizer.encode(t, length) for t in PARITY_INPUTS] == expected
        assert _seqio_ids(vocabulary, PARITY_INPUTS, length) == expected


def test_batcher_pads_with_the_tokenizer_s_pad_id(bpe_folder):
    from embedder.data import jsonl

    tokenizer = tokenizers.load_tokenizer(bpe_folder)
    examples = [
        jsonl.Example(query=f"query {i}", positive=f"a longer positive text {i} " * 3) for i in range(4)
    ]
    batcher = batching.PairBatcher(
        examples, tokenizer, global_batch_size=4, query_len=QUERY_LEN, doc_len=DOC_LEN
    )
    rows = batcher.batch(0)["query_tokens"]
    padded = set()
    for example in examples:
        ids = tokenizer.encode(example.query, QUERY_LEN)
        padded.add(tuple(ids + [tokenizer.pad_id] * (rows.shape[1] - len(ids))))
    assert tokenizer.pad_id != 0 and all(tuple(row) in padded for row in rows.tolist())


# ---------------------------------------------------------------- training end to end

LLM_GIN_FLAGS = [
    "--gin_file=runs/finetune.gin",
    "--gin_file=models/tiny_llm.gin",
    "--gin_file=mesh/cpu.gin",
    "--gin.BATCH_SIZE=16",
    "--gin.QUERY_LEN=16",
    "--gin.DOC_LEN=32",
    "--gin.NUM_NEGATIVES=1",
    "--gin.LEARNING_RATE=1e-3",
    "--gin.WARMUP_STEPS=2",
    "--gin.SAVE_EVERY=4",
    "--gin.train_loop.train.log_every=1",
    "--gin.checkpointing.CheckpointConfig.keep=10",
]
STEPS = 16


def _cli_train(model_dir, *flags):
    import subprocess
    import sys

    from tests.training_helpers import REPO

    cmd = [sys.executable, "-m", "embedder", "train", *LLM_GIN_FLAGS, *flags, f"--model_dir={model_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def llm_run(sp_folder, tmp_path_factory):
    """(train flags, an uninterrupted in-process run's model dir) of the tiny LLM gin."""
    from embedder import gin_utils, train_loop
    from embedder.data import jsonl, stdlib_pairs

    root = tmp_path_factory.mktemp("llm")
    train_file = str(root / "train.jsonl")
    jsonl.write_jsonl(train_file, stdlib_pairs.build_pairs("train")[:300])
    flags = [
        f"--gin.TOKENIZER_DIR='{sp_folder}'",
        f"--gin.TRAIN_FILES=['{train_file}']",
        f"--gin.TRAIN_STEPS={STEPS}",
    ]
    every = LLM_GIN_FLAGS + flags
    gin_utils.parse(
        [f.split("=", 1)[1] for f in every if f.startswith("--gin_file")],
        [f[len("--gin.") :].replace("=", " = ", 1) for f in every if f.startswith("--gin.")],
    )
    model_dir = root / "reference"
    gin_utils.configured(train_loop.train)(model_dir=str(model_dir))
    return flags, model_dir


def test_llm_family_trains_is_killed_resumes_evaluates_soups_and_exports(llm_run, sp_folder, tmp_path):
    import signal

    import jax

    from embedder import checkpointing, cli, inference
    from embedder.data import jsonl, stdlib_pairs
    from tests.training_helpers import losses_by_step, safe_losses, wait_for

    flags, reference = llm_run
    want = losses_by_step(reference)
    assert sorted(want) == list(range(1, STEPS + 1)) and want[STEPS] < want[1]

    # Killed after its step-8 checkpoint, restarted: the same losses as the uninterrupted run.
    run = tmp_path / "run"
    proc = _cli_train(run, *flags)
    wait_for(lambda: os.path.isdir(run / "checkpoints" / "8") and len(safe_losses(run)) >= 10, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(safe_losses(run)) < STEPS
    proc = _cli_train(run, *flags)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    got = losses_by_step(run)
    assert sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-6)
    _, meta = checkpointing.load_model_params(str(run))
    # The SentencePiece model travelled into the model dir, byte for byte.
    assert meta.vocab_dir == str(run / "tokenizer")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        assert (run / "tokenizer" / name).read_bytes() == (Path(sp_folder) / name).read_bytes()

    # Evaluation through the command line, with the folder's SentencePiece tokenizer.
    sts = tmp_path / "sts.jsonl"
    pairs = stdlib_pairs.build_pairs("validation")[:40]
    rows = [
        {"sentence1": p.query, "sentence2": p.positive, "score": float(i % 5)} for i, p in enumerate(pairs)
    ]
    sts.write_text("\n".join(json.dumps(r) for r in rows))
    assert (
        cli.main(
            ["eval", f"--model={run}", "--tasks", str(sts), f"--output={tmp_path / 'eval'}", "--dims", "32"]
        )
        == 0
    )
    assert (tmp_path / "eval" / "results.json").exists()

    # A soup of two steps of the run: the mean of their parameters, and it encodes.
    held_out = str(tmp_path / "held_out.jsonl")
    jsonl.write_jsonl(held_out, pairs)
    ckpts = [str(run / "checkpoints" / str(s)) for s in (8, STEPS)]
    soup_dir = tmp_path / "soup"
    assert cli.main(["soup", "--checkpoints", *ckpts, f"--eval_task={held_out}", f"--output={soup_dir}"]) == 0
    souped, _ = checkpointing.load_model_params(str(soup_dir))
    first, _ = checkpointing.load_model_params(ckpts[0])
    last, _ = checkpointing.load_model_params(ckpts[1])
    for s, a, b in zip(jax.tree.leaves(souped), jax.tree.leaves(first), jax.tree.leaves(last), strict=True):
        np.testing.assert_allclose(s, (np.asarray(a) + np.asarray(b)) / 2, rtol=1e-6, atol=1e-7)

    # The bundle carries the SentencePiece files and encodes as the checkpoint does.
    bundle = tmp_path / "bundle"
    assert cli.main(["export", f"--model={run}", "--format=bundle", f"--output={bundle}"]) == 0
    texts = PARITY_INPUTS[:12]
    from_checkpoint = inference.Embedder.from_checkpoint(str(run))
    from_bundle = inference.Embedder.load(str(bundle))
    assert isinstance(from_bundle.tokenizer, tokenizers.SentencePieceTokenizer)
    assert [from_bundle.tokenizer.encode(t, 32) for t in texts] == [
        tokenizers.load_tokenizer(sp_folder).encode(t, 32) for t in texts
    ]
    np.testing.assert_allclose(from_bundle.encode(texts), from_checkpoint.encode(texts), atol=1e-6)


def test_missing_tokenizer_macro_is_one_line_naming_it(tmp_path, capsys):
    from embedder import cli

    argv = ["train", *LLM_GIN_FLAGS, "--gin.TRAIN_FILES=['x.jsonl']", f"--model_dir={tmp_path}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "TOKENIZER_DIR" in err and len(err.splitlines()) == 1, err


def test_gecko_1b_without_its_tokenizer_macro_names_it(tmp_path, capsys):
    from embedder import cli

    argv = [
        "train",
        "--gin_file=runs/finetune.gin",
        "--gin_file=models/gecko_1b.gin",
        "--gin_file=mesh/cpu.gin",
        "--gin.TRAIN_FILES=['x.jsonl']",
        f"--model_dir={tmp_path}",
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "TOKENIZER_DIR" in err and len(err.splitlines()) == 1, err
