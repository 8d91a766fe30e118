"""The tokenizer interface: tokenizer.json and SentencePiece folders agree with their references.

Tokenizers are trained here from local text (the standard library's docstrings):
a byte-level BPE and a Metaspace Unigram `tokenizer.json` (compared with
transformers' `AutoTokenizer`), and a BPE and a unigram SentencePiece `.model`
(compared with `sentencepiece` itself), on the parity inputs.
"""

import collections
import inspect
import json
import os

import pytest
import sentencepiece
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from embedder import errors
from embedder.data import tokenizers, wordpiece
from tests.parity_inputs import PARITY_INPUTS

transformers = pytest.importorskip("transformers")

MAX_LENGTHS = (None, 16, 3)


def _docstrings() -> list[str]:
    """Docstrings of a few standard-library modules and their members."""
    import argparse
    import functools
    import json as json_module
    import os as os_module
    import re

    texts = []
    for module in (collections, inspect, json_module, os_module, re, argparse, functools):
        texts.append(module.__doc__ or "")
        for _, member in inspect.getmembers(module):
            doc = getattr(member, "__doc__", None)
            if isinstance(doc, str):
                texts.append(doc)
    return [t for t in texts if t.strip()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docstrings.txt"
    path.write_text("\n".join(line for text in _docstrings() for line in text.splitlines() if line.strip()))
    return str(path)


def _save_hf(folder, tokenizer, config):
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
    return str(folder)


@pytest.fixture(scope="module")
def bpe_folder(corpus, tmp_path_factory):
    """A byte-level BPE (as Qwen's) that appends <|endoftext|>, as Qwen3-Embedding does."""
    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train([corpus], trainer)
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eot)]
    )
    config = {"pad_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "model_max_length": 32768}
    return _save_hf(tmp_path_factory.mktemp("bpe"), tok, config)


@pytest.fixture(scope="module")
def unigram_folder(corpus, tmp_path_factory):
    """A Metaspace Unigram (as Gemma's) that starts every sequence with <bos>."""
    tok = RustTokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=500, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"], unk_token="<unk>"
    )
    tok.train([corpus], trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    config = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
    return _save_hf(tmp_path_factory.mktemp("unigram"), tok, config)


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_json_ids_equal_auto_tokenizer(kind, bpe_folder, unigram_folder):
    folder = {"bpe": bpe_folder, "unigram": unigram_folder}[kind]
    ours = tokenizers.load_tokenizer(folder)
    assert isinstance(ours, tokenizers.HuggingFaceTokenizer)
    peer = transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.pad_id == peer.pad_token_id
    assert ours.vocab_size == len(peer)
    for max_length in MAX_LENGTHS:
        for text in PARITY_INPUTS:
            kwargs = {} if max_length is None else {"truncation": True, "max_length": max_length}
            want = peer(text, **kwargs)["input_ids"]
            assert ours.encode(text, max_length) == want, (text, max_length)


def test_tokenizer_json_keeps_its_specials(bpe_folder, unigram_folder):
    bpe, unigram = tokenizers.load_tokenizer(bpe_folder), tokenizers.load_tokenizer(unigram_folder)
    eot = bpe.encode("x")[-1]
    assert eot == bpe.pad_id and all(bpe.encode(t, 5)[-1] == eot for t in PARITY_INPUTS if t)
    bos = unigram.encode("x")[0]
    assert all(unigram.encode(t, 4)[0] == bos and len(unigram.encode(t, 4)) <= 4 for t in PARITY_INPUTS)


def _train_sentencepiece(corpus, folder, model_type):
    prefix = os.path.join(folder, "tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        input=corpus,
        model_prefix=prefix,
        model_type=model_type,
        vocab_size=400,
        character_coverage=1.0,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,  # Gemma's ids
        num_threads=1,
        minloglevel=2,
    )
    return prefix + ".model"


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_ids_equal_sentencepiece(model_type, corpus, tmp_path):
    model = _train_sentencepiece(corpus, str(tmp_path), model_type)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "add_eos_token": True})
    )
    ours = tokenizers.load_tokenizer(str(tmp_path))
    assert isinstance(ours, tokenizers.SentencePieceTokenizer)
    reference = sentencepiece.SentencePieceProcessor(model_file=model)
    assert (ours.pad_id, ours.vocab_size) == (0, 400)
    for text in PARITY_INPUTS:
        pieces = reference.encode(text, out_type=int)
        assert ours.encode(text) == [2, *pieces, 1], text
        assert ours.encode(text, 8) == [2, *pieces[:6], 1], text
        assert reference.encode(text, add_bos=True, add_eos=True) == ours.encode(text)


def test_sentencepiece_without_config_adds_nothing(corpus, tmp_path):
    model = _train_sentencepiece(corpus, str(tmp_path), "unigram")
    ours = tokenizers.load_tokenizer(str(tmp_path))
    reference = sentencepiece.SentencePieceProcessor(model_file=model)
    assert all(ours.encode(t) == reference.encode(t) for t in PARITY_INPUTS)


def test_load_tokenizer_picks_wordpiece_for_a_bert_folder():
    from embedder.models import pretrained

    folder = pretrained.minilm_l6_v2_path()
    ours = tokenizers.load_tokenizer(folder)
    assert isinstance(ours, wordpiece.WordPieceTokenizer)
    assert isinstance(ours, tokenizers.Tokenizer)
    peer = transformers.AutoTokenizer.from_pretrained(folder)
    for text in PARITY_INPUTS[:10]:
        assert ours.encode(text, 12) == peer(text, truncation=True, max_length=12)["input_ids"]


def test_every_kind_satisfies_the_protocol(bpe_folder, corpus, tmp_path):
    _train_sentencepiece(corpus, str(tmp_path), "bpe")
    for folder in (bpe_folder, str(tmp_path)):
        assert isinstance(tokenizers.load_tokenizer(folder), tokenizers.Tokenizer)


def test_folder_without_a_tokenizer_is_a_data_error(tmp_path):
    with pytest.raises(errors.DataError, match="no tokenizer"):
        tokenizers.load_tokenizer(str(tmp_path))
    with pytest.raises(errors.DataError, match="not found"):
        tokenizers.load_tokenizer(str(tmp_path / "missing"))


def test_pad_token_missing_from_the_vocabulary_is_named(bpe_folder, tmp_path):
    tok = RustTokenizer.from_file(os.path.join(bpe_folder, "tokenizer.json"))
    folder = _save_hf(tmp_path / "bad", tok, {"pad_token": "<nope>"})
    with pytest.raises(errors.ConfigError, match="pad_token='<nope>'"):
        tokenizers.load_tokenizer(folder)


def test_folder_length_limit_and_truncation_side_follow_auto_tokenizer(unigram_folder, tmp_path):
    tok = RustTokenizer.from_file(os.path.join(unigram_folder, "tokenizer.json"))
    config = json.load(open(os.path.join(unigram_folder, "tokenizer_config.json")))
    folder = _save_hf(tmp_path / "limited", tok, {**config, "model_max_length": 6, "truncation_side": "left"})
    ours = tokenizers.load_tokenizer(folder)
    peer = transformers.AutoTokenizer.from_pretrained(folder)
    for text in PARITY_INPUTS:
        assert ours.encode(text) == peer(text, truncation=True)["input_ids"], text
        assert ours.encode(text, 4) == peer(text, truncation=True, max_length=4)["input_ids"], text
