"""The seqio input side: vocabulary, preprocessors, feature converter, JSONL tasks, batches.

Expected token ids come from the peer's own tokenizer (HF `tokenizers`, reading the
model's tokenizer.json: what sentence-transformers runs) or from the Python
tokenizer where the peer is already checked against it; prompt strings from the
Python `prompts` functions; task frequencies from the binomial distribution.
"""

import json
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import seqio
import tensorflow as tf
import tokenizers

from embedder.data import (
    batching,
    feature_converters,
    jsonl,
    pipeline,
    preprocessors,
    prompts,
    sources,
    tasks,
    vocabularies,
)
from embedder.data.jsonl import DataError
from embedder.models.pretrained import minilm_l6_v2_path

sys.path.insert(0, str(Path(__file__).parent))
from parity_inputs import PARITY_INPUTS  # noqa: E402

MAX_LENGTH = 256  # the peer's max_seq_length
SENTENCEPIECE_MODEL = Path(seqio.__file__).parent / "test_data" / "sentencepiece" / "sentencepiece.model"


@pytest.fixture(scope="module")
def vocab():
    return vocabularies.WordPieceVocabulary(minilm_l6_v2_path())


@pytest.fixture(scope="module")
def peer_ids():
    """The peer's ids of every parity input, truncated to 256 as sentence-transformers does."""
    peer = tokenizers.Tokenizer.from_file(str(Path(minilm_l6_v2_path()) / "tokenizer.json"))
    peer.enable_truncation(MAX_LENGTH)
    peer.no_padding()
    return [encoding.ids for encoding in peer.encode_batch(PARITY_INPUTS)]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _unpadded(tokens, mask):
    return [row[m.astype(bool)].tolist() for row, m in zip(tokens, mask, strict=True)]


# ------------------------------------------------------------------ vocabulary


def test_parity_inputs_through_the_seqio_task_equal_the_peer(tmp_path, vocab, peer_ids):
    # The whole seqio path: JSONL source -> tokenize (in-graph) -> truncate and wrap -> converter.
    records = [{"query": text, "positive": text} for text in PARITY_INPUTS]
    path = _write_jsonl(tmp_path / "parity.jsonl", records)
    task = tasks.register_jsonl_task("test_parity", {"train": [path]}, vocab)
    lengths = {"query": MAX_LENGTH, "positive": MAX_LENGTH, "negatives": MAX_LENGTH}
    ds = task.get_dataset(lengths, split="train", shuffle=False, trim_output_features=False)
    converter = feature_converters.PairFeatureConverter(0, vocab.pad_id)
    ds = converter(ds, {"query": MAX_LENGTH, "positive": MAX_LENGTH})
    rows = list(ds.as_numpy_iterator())
    assert len(rows) == len(PARITY_INPUTS)
    assert sum(len(ids) == MAX_LENGTH for ids in peer_ids) >= 3  # truncation is exercised
    for index, (row, expected) in enumerate(zip(rows, peer_ids, strict=True)):
        text = PARITY_INPUTS[index]
        assert _unpadded(row["query_tokens"][None], row["query_mask"][None])[0] == expected, repr(text)
        assert _unpadded(row["positive_tokens"][None], row["positive_mask"][None])[0] == expected, repr(text)


def test_encode_tf_and_encode_equal_the_peer(vocab, peer_ids):
    ragged = vocab.encode_tf(tf.constant(PARITY_INPUTS)).to_list()
    for text, ids, expected in zip(PARITY_INPUTS, ragged, peer_ids, strict=True):
        bare = expected[1:-1]
        if len(expected) < MAX_LENGTH:  # untruncated: the bare ids are the whole text
            assert ids == bare, repr(text)
            assert vocab.encode(text) == bare, repr(text)
        else:
            assert ids[: len(bare)] == bare, repr(text)
    assert vocab.encode_tf(tf.constant("Hello [MASK] world")).numpy().tolist() == vocab.encode(
        "Hello [MASK] world"
    )


def test_encode_tf_equals_python_tokenizer_on_every_assigned_code_point(vocab):
    # Each character between two letters (dropped, stripped, split off or kept); the
    # Python tokenizer equals the peer on these (tests/test_wordpiece.py).
    code_points = [
        c
        for c in range(0x110000)
        if not 0xD800 <= c <= 0xDFFF and unicodedata.category(chr(c)) not in ("Cn", "Co")
    ]
    code_points += [0xE000, 0xF0000, 0x0378, 0x1FB93, 0x9FFF, 0x2B81F]  # private, unassigned, CJK edges
    texts = [f"a{chr(c)}b" for c in code_points]
    got = []
    for start in range(0, len(texts), 1 << 16):
        got.extend(vocab.encode_tf(tf.constant(texts[start : start + (1 << 16)])).to_list())
    mismatches = [
        f"U+{c:04X}"
        for c, text, ids in zip(code_points, texts, got, strict=True)
        if ids != vocab.encode(text)
    ]
    assert not mismatches, f"{len(mismatches)} characters differ: {mismatches[:20]}"


@pytest.mark.parametrize(
    "text",
    [
        "x" * 100,
        "x" * 101,
        "é" * 100,
        "é" * 101,
        "a\x00[MASK]\x00b",
        "[MA\x00SK]",
        "[UNK][PAD]",
        "",
        "  \t\n ",
    ],
    ids=[
        "100-chars",
        "101-chars",
        "100-accented",
        "101-accented",
        "nul-around-special",
        "nul-inside",
        "specials",
        "empty",
        "blank",
    ],
)
def test_encode_tf_edge_cases(vocab, text):
    assert vocab.encode_tf(tf.constant(text)).numpy().tolist() == vocab.encode(text)


def test_vocabulary_ids_decode_and_equality(vocab):
    tokenizer = vocab.tokenizer
    assert (vocab.pad_id, vocab.unk_id, vocab.bos_id, vocab.eos_id) == (
        tokenizer.pad_id,
        tokenizer.unk_id,
        tokenizer.cls_id,
        tokenizer.sep_id,
    )
    assert vocab.vocab_size == 30522
    ids = vocab.encode("hello world")
    assert vocab.decode(ids) == "hello world"
    decoded = vocab.decode_tf(tf.constant([ids + [0, 0], ids[:1] + [0, 0, 0]]))
    assert decoded.numpy().tolist() == [b"hello world", b"hello"]
    assert vocab == vocabularies.WordPieceVocabulary(minilm_l6_v2_path())
    assert vocabularies.sequence_specials(vocab) == ([tokenizer.cls_id], [tokenizer.sep_id])


# ------------------------------------------------------------------ preprocessors


def _one(features):
    return tf.data.Dataset.from_tensors(
        {
            k: tf.constant(v, dtype=tf.string, shape=[len(v)] if isinstance(v, list) else [])
            for k, v in features.items()
        }
    )


def _first(ds):
    return next(iter(ds.as_numpy_iterator()))


def test_add_prompts_matches_the_python_formats():
    config = prompts.PromptConfig(enabled=True)
    example = {
        "query": "how to sort",
        "positive": "sorted(x)",
        "negatives": ["x.sort()", "len(x)"],
        "task": "",
    }
    out = _first(preprocessors.add_prompts(_one(example), config, task_text="code retrieval"))
    assert out["query"].decode() == prompts.format_query("how to sort", "code retrieval", config)
    assert out["positive"].decode() == prompts.format_document("sorted(x)", None, config)
    assert [n.decode() for n in out["negatives"]] == [
        prompts.format_document(n, None, config) for n in example["negatives"]
    ]
    # The example's own task wins; no task anywhere means the default.
    out = _first(
        preprocessors.add_prompts(_one({**example, "task": "question answering"}), config, "code retrieval")
    )
    assert out["query"].decode() == "task: question answering | query: how to sort"
    out = _first(preprocessors.add_prompts(_one({**example, "negatives": []}), config))
    assert out["query"].decode() == "task: search result | query: how to sort"
    assert out["negatives"].shape == (0,)
    # Disabled prompts leave the text alone.
    out = _first(preprocessors.add_prompts(_one(example), prompts.PromptConfig(), "code retrieval"))
    assert out["query"].decode() == "how to sort" and out["positive"].decode() == "sorted(x)"


def test_task_dropout_rate_and_determinism():
    config = prompts.PromptConfig(enabled=True, task_dropout=0.3)
    n = 2000
    ds = tf.data.Dataset.from_tensor_slices(
        {"query": [f"q{i}" for i in range(n)], "positive": ["p"] * n, "task": ["t"] * n}
    )

    def dropped(seed):
        with seqio.utils.map_seed_manager(seed):
            out = preprocessors.add_prompts(ds, config)
        queries = [x["query"].decode() for x in out.as_numpy_iterator()]
        for i, query in enumerate(queries):
            assert query in (f"query: q{i}", f"task: t | query: q{i}")
        return np.array([q.startswith("query: ") for q in queries])

    first, again, other = dropped(7), dropped(7), dropped(8)
    # Binomial(2000, 0.3): sd ~ 20.5; 5 sd either way.
    assert abs(first.sum() - 0.3 * n) < 5 * np.sqrt(n * 0.3 * 0.7)
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_format_query_drop_task_and_template_segments():
    config = prompts.PromptConfig(enabled=True, no_task_query_template="q: {text}")
    assert prompts.format_query("x", "t", config, drop_task=True) == "q: x"
    segments = prompts.template_segments("a {{b}} {text}!")
    assert "".join(literal + ("X" if field else "") for literal, field in segments) == "a {b} X!"
    with pytest.raises(ValueError, match="format spec"):
        prompts.template_segments("{text!r}")
    with pytest.raises(ValueError, match="task_dropout"):
        prompts.PromptConfig(task_dropout=1.5)
    with pytest.raises(ValueError, match="no_task_query_template"):
        prompts.PromptConfig(no_task_query_template="{task} {text}")


def _tokenized(vocab, features, lengths):
    output_features = tasks.output_features(vocab)
    return _first(preprocessors.tokenize_and_truncate(_one(features), output_features, lengths))


def test_truncation_keeps_cls_and_sep_like_the_python_tokenizer(vocab):
    long = "word " * 300
    features = {"query": long, "positive": "", "negatives": [long, "short one", ""]}
    out = _tokenized(vocab, features, {"query": 9, "positive": 16, "negatives": 7})
    tokenizer = vocab.tokenizer
    assert out["query"].tolist() == tokenizer.encode(long, max_length=9)
    assert out["positive"].tolist() == [tokenizer.cls_id, tokenizer.sep_id]  # empty text
    assert [row.tolist() for row in out["negatives"]] == [
        tokenizer.encode(text, max_length=7) for text in features["negatives"]
    ]
    with pytest.raises(ValueError, match="'query'.*=1 cannot hold"):
        _tokenized(vocab, features, {"query": 1, "positive": 16, "negatives": 7})


def test_sentencepiece_vocabulary_ends_sequences_with_eos():
    vocab = seqio.SentencePieceVocabulary(str(SENTENCEPIECE_MODEL))
    text = "this is a sentence that is longer than eight pieces, certainly"
    out = _tokenized(
        vocab, {"query": text, "positive": "hi", "negatives": []}, {"query": 8, "positive": 8, "negatives": 8}
    )
    assert out["query"].tolist() == vocab.encode(text)[:7] + [vocab.eos_id]
    assert out["positive"].tolist() == vocab.encode("hi") + [vocab.eos_id]
    assert vocabularies.sequence_specials(vocab) == ([], [vocab.eos_id])


# ------------------------------------------------------------------ feature converter


def _convert(rows, num_negatives, lengths, pad_id=0):
    spec = {
        "query": tf.TensorSpec([None], tf.int32),
        "positive": tf.TensorSpec([None], tf.int32),
        "negatives": tf.RaggedTensorSpec([None, None], tf.int32),
    }

    def generate():
        for row in rows:
            yield {
                "query": np.array(row["query"], np.int32),
                "positive": np.array(row["positive"], np.int32),
                "negatives": tf.ragged.constant(row["negatives"], dtype=tf.int32, ragged_rank=1)
                if row["negatives"]
                else tf.RaggedTensor.from_row_lengths(tf.zeros([0], tf.int32), tf.zeros([0], tf.int64)),
            }

    ds = tf.data.Dataset.from_generator(generate, output_signature=spec)
    converter = feature_converters.PairFeatureConverter(num_negatives, pad_id)
    return list(converter(ds, lengths).as_numpy_iterator())


def test_feature_converter_shapes_masks_and_negative_rows():
    rows = [
        {
            "query": [101, 0, 102],
            "positive": [101, 7, 8, 102],
            "negatives": [[101, 5, 102], [101, 102], [101, 9, 102]],
        },
        {"query": [101, 102], "positive": [101, 7, 8, 102], "negatives": []},
    ]
    out = _convert(rows, 2, {"query": 4, "positive": 6, "negatives": 6})
    first, second = out
    np.testing.assert_array_equal(first["query_tokens"], [101, 0, 102, 0])
    # The mask follows the length: the literal id 0 inside the query is a token.
    np.testing.assert_array_equal(first["query_mask"], [1, 1, 1, 0])
    np.testing.assert_array_equal(first["positive_mask"], [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(first["negative_tokens"], [[101, 5, 102, 0, 0, 0], [101, 102, 0, 0, 0, 0]])
    np.testing.assert_array_equal(first["negative_mask"], [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(first["negative_valid"], [1, 1])
    np.testing.assert_array_equal(second["negative_tokens"], np.zeros((2, 6)))
    np.testing.assert_array_equal(second["negative_valid"], [0, 0])
    # Equal token rows share an id, different rows (almost surely) do not.
    assert first["positive_ids"] == second["positive_ids"]
    assert first["query_ids"] != second["query_ids"]
    assert first["query_ids"].dtype == np.int32 and first["query_ids"] >= 0
    assert set(first) == set(feature_converters.PairFeatureConverter(2).MODEL_FEATURES)


def test_feature_converter_without_negatives_and_length_errors():
    rows = [{"query": [101, 102], "positive": [101, 3, 102], "negatives": [[101, 102]]}]
    out = _convert(rows, 0, {"query": 4, "positive": 4})
    assert "negative_tokens" not in out[0]
    with pytest.raises(ValueError, match="missing features"):
        _convert(rows, 1, {"query": 4, "positive": 4})
    too_long = [{"query": [101, 1, 2, 3, 102], "positive": [101, 102], "negatives": []}]
    with pytest.raises(tf.errors.InvalidArgumentError, match="query"):
        _convert(too_long, 0, {"query": 4, "positive": 4})


# ------------------------------------------------------------------ JSONL source and bad input


BAD_FILES = [
    (b'{"query": "q", "positive": "p"}\n{"query": "q", "positive": \n', 2, "malformed JSON"),
    (b'{"query": "q", "positive": "p"}\n{"positive": "p"}\n', 2, "missing required key(s) 'query'"),
    (b'{"query": "q"}\n', 1, "missing required key(s) 'positive'"),
    (b'{"query": "q", "positive": 3}\n', 1, "'positive' must be a string"),
    (b'{"query": "caf\xe9", "positive": "p"}\n', 1, "invalid UTF-8"),
]


@pytest.mark.parametrize(
    "data,line,words", BAD_FILES, ids=["json", "no-query", "no-positive", "not-string", "utf8"]
)
def test_bad_jsonl_line_names_file_and_line_when_the_pipeline_starts(tmp_path, vocab, data, line, words):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(data)
    tasks.register_jsonl_task("test_bad", {"train": [path]}, vocab)
    source = pipeline.SeqioPairSource("test_bad", global_batch_size=2, query_len=8, doc_len=8)
    with pytest.raises(DataError) as error:
        source.batch(0)
    assert f"{path}:{line}:" in str(error.value) and words in str(error.value)


def test_empty_jsonl_file_is_an_error(tmp_path, vocab):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(b"")
    tasks.register_jsonl_task("test_empty", {"train": [path]}, vocab)
    with pytest.raises(DataError, match=f"{path}: no examples"):
        pipeline.SeqioPairSource("test_empty", global_batch_size=2, query_len=8, doc_len=8).batch(0)


def test_empty_and_over_long_texts_make_batches(tmp_path, vocab):
    long = "a very long document " * 2000
    records = [
        {"query": "", "positive": ""},
        {"query": long, "positive": long, "negatives": ["", long]},
        {"query": "q", "positive": "p"},
    ]
    path = _write_jsonl(tmp_path / "edge.jsonl", records)
    tasks.register_jsonl_task("test_edge", {"train": [path]}, vocab)
    source = pipeline.SeqioPairSource(
        "test_edge", global_batch_size=3, query_len=8, doc_len=16, num_negatives=2
    )
    batch = source.batch(0)
    tokenizer = vocab.tokenizer
    queries = _unpadded(batch["query_tokens"], batch["query_mask"])
    expected = {tuple(tokenizer.encode(r["query"], max_length=8)) for r in records}
    assert set(map(tuple, queries)) == expected
    assert batch["negative_tokens"].shape == (3, 2, 16)
    assert batch["query_mask"].sum(axis=1).max() == 8


def test_both_data_paths_give_the_same_duplicate_ids(tmp_path, vocab):
    """The seqio converter and the JSONL batcher give each example the same query and
    positive ids: equal texts, and texts equal after truncation, share one."""
    records = [
        {"query": "same query", "positive": "doc a"},
        {"query": "same query", "positive": "doc b"},
        {"query": "one two three four five six seven", "positive": "doc a"},
        {"query": "one two three four five six eight", "positive": "doc c"},
    ]
    path = _write_jsonl(tmp_path / "dups.jsonl", records)
    tasks.register_jsonl_task("test_dups", {"train": [path]}, vocab)
    lengths = dict(global_batch_size=4, query_len=5, doc_len=8)
    from_seqio = pipeline.SeqioPairSource("test_dups", **lengths).batch(0)
    examples = jsonl.read_jsonl(str(path))
    batcher = batching.PairBatcher(examples, vocab.tokenizer, **lengths)
    from_jsonl = batcher.batch(0)
    for side, length in (("query", 5), ("positive", 8)):
        # Rows come in other orders: key each row by its (unpadded) tokens.
        seqio_ids = {
            tuple(row): int(i)
            for row, i in zip(
                _unpadded(from_seqio[f"{side}_tokens"], from_seqio[f"{side}_mask"]),
                from_seqio[f"{side}_ids"],
                strict=True,
            )
        }
        jsonl_ids = {
            tuple(vocab.tokenizer.encode(getattr(examples[i], side), max_length=length)): int(row_id)
            for i, row_id in zip(batcher.global_indices(0), from_jsonl[f"{side}_ids"], strict=True)
        }
        assert seqio_ids == jsonl_ids, side
        assert all(value == batching.duplicate_id(list(row)) for row, value in seqio_ids.items())
    assert len(set(from_seqio["query_ids"].tolist())) == 2  # "same query" twice; the two truncated alike
    assert len(set(from_seqio["positive_ids"].tolist())) == 3


def test_jsonl_source_shards_by_file_or_by_example(tmp_path):
    files = [
        _write_jsonl(tmp_path / f"{i}.jsonl", [{"query": f"q{i}{j}", "positive": "p"} for j in range(3)])
        for i in range(3)
    ]
    source = sources.JsonlDataSource({"train": files})
    by_file = [[e.query for e in source.examples("train", seqio.ShardInfo(i, 3))] for i in range(3)]
    assert by_file == [["q00", "q01", "q02"], ["q10", "q11", "q12"], ["q20", "q21", "q22"]]
    one_file = sources.JsonlDataSource({"train": files[0]})
    by_example = [[e.query for e in one_file.examples("train", seqio.ShardInfo(i, 2))] for i in range(2)]
    assert by_example == [["q00", "q02"], ["q01"]]
    with pytest.raises(ValueError, match="no split 'test'"):
        source.examples("test")


# ------------------------------------------------------------------ batches: resume, processes, mixtures


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, vocab):
    """Two JSONL tasks of 30 and 50 examples whose texts name their task, mixed 1:3."""
    folder = tmp_path_factory.mktemp("mix")
    names = []
    for name, size in (("test_alpha", 30), ("test_beta", 50)):
        records = [
            {
                "query": f"{name} query {i}",
                "positive": f"{name} document {i}",
                "negatives": [f"{name} neg {i}"] * (i % 3),
            }
            for i in range(size)
        ]
        tasks.register_jsonl_task(name, {"train": [_write_jsonl(folder / f"{name}.jsonl", records)]}, vocab)
        names.append(name)
    tasks.register_mixture("test_mix", [("test_alpha", 1.0), ("test_beta", 3.0)])
    return "test_mix"


def _source(name, **kwargs):
    config = dict(global_batch_size=8, query_len=8, doc_len=10, num_negatives=1, seed=3)
    config.update(kwargs)
    return pipeline.SeqioPairSource(name, **config)


def _equal(a, b):
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


STEPS = 14  # 14 steps of 8 rows cross an epoch of both tasks (30 and 50 examples)


@pytest.fixture(scope="module")
def straight(mixture):
    """homogeneous -> the batches of steps 0..13 read in order by one source (made on first use)."""
    runs = {}

    def batches(homogeneous: bool) -> list[dict[str, np.ndarray]]:
        if homogeneous not in runs:
            source = _source(mixture, task_homogeneous=homogeneous)
            runs[homogeneous] = [source.batch(step) for step in range(STEPS)]
        return runs[homogeneous]

    return batches


MODES = pytest.mark.parametrize("homogeneous", [False, True], ids=["mixed", "homogeneous"])


@MODES
@pytest.mark.slow
def test_resume_from_a_saved_position_continues_exactly(mixture, straight, homogeneous):
    expected = straight(homogeneous)
    state = json.loads(json.dumps({"step": 9}))  # as stored in the checkpoint's JSON meta
    resumed = _source(mixture, task_homogeneous=homogeneous)
    resumed.set_state(state)
    for step in range(9, STEPS):
        _equal(resumed.batch(step), expected[step])
    assert resumed.get_state() == {"step": STEPS}


@pytest.mark.slow
def test_resume_with_two_processes(mixture):
    # One task of 50 examples: each process's shard of 25 ends after 6.25 steps of 4 rows,
    # so the resumed step 7 starts inside the second epoch.
    shares = {}
    for index in range(2):
        straight = _source("test_beta", process_index=index, process_count=2)
        expected = [straight.batch(step) for step in range(9)]
        resumed = _source("test_beta", process_index=index, process_count=2)
        for step in range(7, 9):
            _equal(resumed.batch(step), expected[step])
        shares[index] = expected
    assert shares[0][0]["query_tokens"].shape == (4, 8)
    # Each process reads its own shard: the first epochs share no query, and together hold all 50.
    seen = [{tuple(row) for batch in shares[i] for row in batch["query_tokens"]} for i in range(2)]
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 50


@MODES
@pytest.mark.slow
def test_the_same_seed_gives_the_same_batches_and_another_seed_others(mixture, straight, homogeneous):
    expected = straight(homogeneous)
    _equal(_source(mixture, task_homogeneous=homogeneous).batch(3), expected[3])
    other = _source(mixture, task_homogeneous=homogeneous, seed=4).batch(3)
    assert not np.array_equal(other["query_tokens"], expected[3]["query_tokens"])


def test_every_epoch_visits_each_example_once(tmp_path, vocab):
    records = [{"query": f"query {i}", "positive": f"doc {i}"} for i in range(12)]
    tasks.register_jsonl_task("test_epochs", {"train": [_write_jsonl(tmp_path / "e.jsonl", records)]}, vocab)
    source = _source("test_epochs", global_batch_size=4, num_negatives=0)
    tokenizer = vocab.tokenizer
    ids = {tuple(tokenizer.encode(r["query"], max_length=8)): i for i, r in enumerate(records)}
    epochs = []
    for epoch in range(2):
        rows = [
            tuple(row)
            for step in range(3 * epoch, 3 * epoch + 3)
            for row in _unpadded(*_batch_queries(source, step))
        ]
        epochs.append([ids[row] for row in rows])
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
    assert epochs[0] != epochs[1]  # reshuffled


def _batch_queries(source, step):
    batch = source.batch(step)
    return batch["query_tokens"], batch["query_mask"]


def test_homogeneous_batches_have_one_task_and_follow_the_rates(mixture, straight, vocab):
    batches = straight(True)
    alpha = vocab.tokenizer.encode("test_alpha")[1:-1]
    for batch in batches:
        assert len(set(batch["task_ids"].tolist())) == 1
        # The rows' text names the task the batch claims.
        is_alpha = {row[1 : 1 + len(alpha)].tolist() == alpha for row in batch["query_tokens"]}
        assert is_alpha == {batch["task_ids"][0] == 0}
    source = _source(mixture, task_homogeneous=True)
    assert source.task_names == ["test_alpha", "test_beta"]
    np.testing.assert_allclose(source.rates, [0.25, 0.75])
    # Over 4000 steps, alpha's share ~ Binomial(4000, 0.25) / 4000: within 5 sd.
    steps = 4000
    tasks_of_steps = [source.step_tasks(step) for step in range(steps)]
    assert all(len(set(t)) == 1 for t in tasks_of_steps)
    share = np.mean([t[0] == 0 for t in tasks_of_steps])
    assert abs(share - 0.25) < 5 * np.sqrt(0.25 * 0.75 / steps)


def test_mixed_batches_follow_the_rates_per_row(mixture):
    source = _source(mixture)
    rows = np.concatenate([source.step_tasks(step) for step in range(500)])
    assert len(set(source.step_tasks(0))) == 2 or len(set(source.step_tasks(1))) == 2
    assert abs((rows == 0).mean() - 0.25) < 5 * np.sqrt(0.25 * 0.75 / len(rows))


@pytest.mark.slow
@MODES
def test_missing_negatives_are_marked_missing_not_filled(straight, homogeneous):
    # A third of the examples have no negative: their row is padding, marked missing.
    seen_missing = seen_present = False
    for batch in straight(homogeneous):
        for row in range(len(batch["positive_tokens"])):
            tokens, mask = batch["negative_tokens"][row, 0], batch["negative_mask"][row, 0]
            if batch["negative_valid"][row, 0]:
                seen_present = True
                assert mask.sum() > 2
                assert batch["negative_ids"][row, 0] == batching.duplicate_id(tokens[mask.astype(bool)])
            else:
                seen_missing = True
                assert not mask.any() and batch["negative_ids"][row, 0] == -1
    assert seen_missing and seen_present


def test_make_train_source_chooses_files_or_a_task(tmp_path, mixture):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"query": f"q{i}", "positive": f"p{i}"} for i in range(8)])
    common = dict(global_batch_size=4, query_len=8, doc_len=8, vocab_dir=minilm_l6_v2_path())
    assert isinstance(pipeline.make_train_source(train_files=[str(path)], **common), batching.PairBatcher)
    assert isinstance(
        pipeline.make_train_source(mixture_or_task_name=mixture, **common), pipeline.SeqioPairSource
    )
    with pytest.raises(ValueError, match="exactly one of TRAIN_FILES"):
        pipeline.make_train_source(train_files=[str(path)], mixture_or_task_name=mixture, **common)
    other = tmp_path / "vocab"
    other.mkdir()
    (other / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nq\n", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenises with"):
        pipeline.make_train_source(mixture_or_task_name=mixture, **{**common, "vocab_dir": str(other)})


def test_source_configuration_errors(mixture):
    with pytest.raises(ValueError, match="not divisible by process_count"):
        _source(mixture, global_batch_size=7, process_count=2)
    with pytest.raises(ValueError, match="not in \\[0, process_count"):
        _source(mixture, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="non-negative integer"):
        _source(mixture).batch(-1)
    with pytest.raises(ValueError, match="rates"):
        tasks.register_mixture("test_zero", [("test_alpha", 0.0)])
