"""Property-based tests: arbitrary Unicode and arbitrary bytes never crash the readers.

The input pipeline's preprocessors (prompts, in-graph tokenisation and truncation)
and the pair feature converter take arbitrary Unicode too, and always give the
configured shapes; their ids equal the pure-Python WordPiece tokenizer's.
"""

import functools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedder.data import feature_converters, jsonl, preprocessors, prompts, sources, tasks, vocabularies
from embedder.models.pretrained import minilm_l6_v2_path

# Valid text: any code point but lone surrogates (which no UTF-8 file can hold).
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@SETTINGS
@given(
    rows=st.lists(
        st.tuples(TEXT, TEXT, st.lists(TEXT, max_size=3), st.one_of(st.none(), TEXT)), min_size=1, max_size=5
    )
)
def test_jsonl_round_trips_any_text(rows, tmp_path):
    examples = [jsonl.Example(q, p, tuple(n), t) for q, p, n, t in rows]
    path = tmp_path / "rt.jsonl"
    jsonl.write_jsonl(str(path), examples)
    assert jsonl.read_jsonl(str(path)) == examples


@SETTINGS
@given(data=st.binary(max_size=300))
def test_jsonl_reader_on_arbitrary_bytes_reads_or_names_the_line(data, tmp_path):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    try:
        examples = jsonl.read_jsonl(str(path))
    except jsonl.DataError as e:
        assert str(path) in str(e)
        return
    assert all(isinstance(x.query, str) and isinstance(x.positive, str) for x in examples)


@SETTINGS
@given(
    obj=st.recursive(
        st.none() | st.booleans() | st.integers() | TEXT,
        lambda c: st.lists(c) | st.dictionaries(TEXT, c),
        max_leaves=8,
    )
)
def test_jsonl_reader_on_arbitrary_json_values(obj, tmp_path):
    path = tmp_path / "values.jsonl"
    path.write_text(json.dumps(obj) + "\n", encoding="utf-8")
    try:
        jsonl.read_jsonl(str(path))
    except jsonl.DataError as e:
        assert f"{path}:1:" in str(e)


@SETTINGS
@given(text=TEXT, task=st.one_of(st.none(), TEXT), title=st.one_of(st.none(), TEXT))
def test_prompts_keep_the_text_whatever_it_holds(text, task, title):
    config = prompts.PromptConfig(enabled=True)
    query = prompts.format_query(text, task, config)
    document = prompts.format_document(text, title, config)
    assert query.startswith("task: ") and query.endswith(f" | query: {text}")
    assert document.startswith("title: ") and document.endswith(f" | text: {text}")


# ---------------------------------------------------------------- preprocessors and feature converter

# A tf.data pipeline costs about 0.3 s to build and start (the tokenizer's graph),
# so each drawn case is a few examples in one dataset; lengths come from a fixed
# set, as each new triple traces the tokenizer again (about a second).
# Each drawn case builds and traces a tf.data pipeline (seconds), so the TF properties
# draw fewer cases of more examples each: 10 x up to 12 examples, not 25 x up to 5.
TF_SETTINGS = settings(max_examples=10, deadline=None)
# (query, positive, negatives) lengths, specials included: only [CLS] [SEP]; short; long.
LENGTHS = [(2, 2, 2), (8, 16, 12), (64, 128, 64)]
PIECE = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
    st.sampled_from(["[PAD]", "[SEP]", "[CLS]", "[UNK]", "[MASK]", "[pad]", "[SEP", "##ing", " ", "\u00a0"]),
    st.characters(whitelist_categories=("Mn", "Mc", "Me")),  # combining marks
    st.characters(whitelist_categories=("Cc", "Cf", "Zl", "Zp")),  # control and format chars
)
SHORT_TEXT = st.lists(PIECE, max_size=8).map("".join)
# 500 to 5000 characters: one short text repeated.
LONG_TEXT = st.builds(
    lambda text, size: (text * (size // len(text) + 1))[:size],
    SHORT_TEXT.filter(bool),
    st.integers(500, 5000),
)
ANY_TEXT = st.one_of(st.just(""), SHORT_TEXT, SHORT_TEXT, LONG_TEXT)
NO_PROMPTS = prompts.PromptConfig()
EXAMPLES = st.lists(
    st.builds(
        jsonl.Example,
        query=ANY_TEXT,
        positive=ANY_TEXT,
        negatives=st.lists(ANY_TEXT, max_size=4).map(tuple),
        task=st.one_of(st.none(), SHORT_TEXT),
    ),
    min_size=1,
    max_size=12,
)


@functools.cache
def _vocabulary():
    return vocabularies.WordPieceVocabulary(minilm_l6_v2_path())


@functools.cache
def _converter(num_negatives):
    # One per size, so its traced function is reused by every drawn case.
    return feature_converters.PairFeatureConverter(num_negatives, _vocabulary().pad_id)


def _tokenized(examples, lengths, config=NO_PROMPTS):
    """The examples through the real source, `add_prompts` and `tokenize_and_truncate`."""
    ds = preprocessors.add_prompts(sources.examples_to_dataset(examples), config)
    lengths = dict(zip(("query", "positive", "negatives"), lengths, strict=True))
    return preprocessors.tokenize_and_truncate(ds, tasks.output_features(_vocabulary()), lengths)


@pytest.mark.slow
@TF_SETTINGS
@given(examples=EXAMPLES, lengths=st.sampled_from(LENGTHS), prompted=st.booleans())
def test_prompts_and_tokenisation_of_any_text_equal_the_python_tokenizer(examples, lengths, prompted):
    config = prompts.PromptConfig(enabled=prompted)
    rows = list(_tokenized(examples, lengths, config).as_numpy_iterator())
    assert len(rows) == len(examples)
    # The reference: Python prompts, then the pure-Python WordPiece tokenizer.
    tokenizer = _vocabulary().tokenizer
    query_len, doc_len, negative_len = lengths
    for example, out in zip(examples, rows, strict=True):
        query = prompts.format_query(example.query, example.task, config)
        assert out["query"].tolist() == tokenizer.encode(query, query_len)
        positive = prompts.format_document(example.positive, None, config)
        assert out["positive"].tolist() == tokenizer.encode(positive, doc_len)
        assert [row.tolist() for row in out["negatives"]] == [
            tokenizer.encode(prompts.format_document(n, None, config), negative_len)
            for n in example.negatives
        ]


def _padded(ids, length, pad_id):
    """(tokens, mask) of `ids` right-padded to `length`, in numpy."""
    tokens = np.full(length, pad_id, np.int32)
    tokens[: len(ids)] = ids
    return tokens, (np.arange(length) < len(ids)).astype(np.int32)


@pytest.mark.slow
@TF_SETTINGS
@given(examples=EXAMPLES, lengths=st.sampled_from(LENGTHS), num_negatives=st.sampled_from([0, 1, 3]))
def test_feature_converter_gives_the_configured_shapes_for_any_text(examples, lengths, num_negatives):
    query_len, doc_len, negative_len = lengths
    feature_lengths = {"query": query_len, "positive": doc_len}
    if num_negatives:
        feature_lengths["negatives"] = negative_len
    converter = _converter(num_negatives)
    rows = list(converter(_tokenized(examples, lengths), feature_lengths).as_numpy_iterator())
    assert len(rows) == len(examples)
    tokenizer = _vocabulary().tokenizer
    pad = tokenizer.pad_id
    for example, out in zip(examples, rows, strict=True):
        assert set(out) == set(converter.MODEL_FEATURES)
        assert all(value.dtype == np.int32 for value in out.values())
        assert out["query_ids"].shape == out["positive_ids"].shape == ()
        # The Python tokenizer's ids, then [PAD]; the mask covers exactly the ids,
        # whatever they spell (a literal "[PAD]" in the text is a token, not padding).
        for key, text, length in (
            ("query", example.query, query_len),
            ("positive", example.positive, doc_len),
        ):
            tokens, mask = _padded(tokenizer.encode(text, length), length, pad)
            np.testing.assert_array_equal(out[f"{key}_tokens"], tokens)
            np.testing.assert_array_equal(out[f"{key}_mask"], mask)
        if not num_negatives:
            continue
        assert out["negative_tokens"].shape == out["negative_mask"].shape == (num_negatives, negative_len)
        kept = min(len(example.negatives), num_negatives)
        np.testing.assert_array_equal(out["negative_valid"], [1] * kept + [0] * (num_negatives - kept))
        for row in range(num_negatives):
            ids = tokenizer.encode(example.negatives[row], negative_len) if row < kept else []
            tokens, mask = _padded(ids, negative_len, pad)
            np.testing.assert_array_equal(out["negative_tokens"][row], tokens)
            np.testing.assert_array_equal(out["negative_mask"][row], mask)
