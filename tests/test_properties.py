"""Property-based tests: arbitrary Unicode and arbitrary bytes never crash the readers."""

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedder.data import jsonl, prompts

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
