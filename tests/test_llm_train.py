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

import pytest
import sentencepiece
import tensorflow as tf
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from embedder.data import batching, preprocessors, tasks, tokenizers, vocabularies
from tests.parity_inputs import PARITY_INPUTS

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
