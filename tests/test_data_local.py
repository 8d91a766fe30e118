"""The plain-Python input side: JSONL reading/writing, stdlib pairs, the resumable batcher.

Expectations are computed here from the written contracts (md5 split rule, the
epoch permutation formula, BLAKE2b ids, the tokenizer's own `encode`), not by
calling the code under test a second time.
"""

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedder.data import batching, jsonl, stdlib_pairs
from embedder.data.jsonl import DataError, Example
from embedder.data.wordpiece import WordPieceTokenizer
from embedder.models.pretrained import minilm_l6_v2_path

GOOD = b'{"query": "q", "positive": "p"}'

# ---------------------------------------------------------------------------- jsonl


def _write(tmp_path, data: bytes, name="data.jsonl"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


BAD_LINES = [
    # (file content, the line reported, words the message must contain)
    (GOOD + b'\n{"query": "\xff\xfe", "positive": "p"}\n', 2, "invalid UTF-8"),
    (b'{"query": "q", "positive": "p"\n', 1, "malformed JSON"),
    (GOOD + b"\n\n\n{'query': 'q', 'positive': 'p'}\n", 4, "malformed JSON"),
    (b'["q", "p"]\n', 1, "expected a JSON object, got an array"),
    (b'"just a string"\n', 1, "expected a JSON object, got a string"),
    (b"17\n", 1, "expected a JSON object, got a number"),
    (b"null\n", 1, "expected a JSON object, got null"),
    (b'{"positive": "p"}\n', 1, "missing required key(s) 'query'"),
    (GOOD + b'\n{"query": "q"}\n', 2, "missing required key(s) 'positive'"),
    (b"{}\n", 1, "'query', 'positive'"),
    (b'{"query": 3, "positive": "p"}\n', 1, "'query' must be a string, got a number"),
    (b'{"query": "q", "positive": null}\n', 1, "'positive' must be a string, got null"),
    (b'{"query": ["q"], "positive": "p"}\n', 1, "'query' must be a string, got an array"),
    (b'{"query": "q", "positive": "p", "task": 7}\n', 1, "'task' must be a string"),
    (b'{"query": "q", "positive": "p", "task": null}\n', 1, "leave the key out"),
    (b'{"query": "q", "positive": "p", "negatives": "n"}\n', 1, "'negatives' must be a list of strings"),
    (b'{"query": "q", "positive": "p", "negatives": {"a": 1}}\n', 1, "'negatives' must be a list"),
    (b'{"query": "q", "positive": "p", "negatives": ["n", 2]}\n', 1, "'negatives'[1] must be a string"),
    (b'{"query": "q", "positive": "p", "label": 1}\n', 1, "unknown key(s) 'label'"),
    (
        b'{"query": "q", "positive": "p", "Query": "x"}\n',
        1,
        "allowed keys are 'query', 'positive', 'negatives', 'task'",
    ),
    (b'{"query": "q", "positive": "p", "query": "r"}\n', 1, "duplicate key 'query'"),
    (b'{"query": "\\ud800", "positive": "p"}\n', 1, "lone surrogate"),
    (b'{"query": "q", "positive": "p", "negatives": ["\\udfff"]}\n', 1, "lone surrogate"),
    (GOOD + b"\r\n" + GOOD + b"\r\n{bad\r\n", 3, "malformed JSON"),
]


@pytest.mark.parametrize("data, line, words", BAD_LINES)
def test_read_jsonl_bad_line_names_file_and_line(tmp_path, data, line, words):
    path = _write(tmp_path, data)
    with pytest.raises(DataError) as info:
        jsonl.read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message, message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("data", [b"", b"\n", b"  \n\n\t\r\n", b"\xef\xbb\xbf"])
def test_read_jsonl_empty_file_is_an_error(tmp_path, data):
    path = _write(tmp_path, data)
    with pytest.raises(DataError, match=re.escape(f"{path}: no examples")):
        jsonl.read_jsonl(path)


def test_read_jsonl_accepts_empty_and_long_texts_blank_lines_crlf_and_bom(tmp_path):
    long_text = "word " * 50_000
    lines = [
        {"query": "", "positive": ""},
        {"query": long_text, "positive": long_text, "negatives": []},
        {"query": "Grüße 😀", "positive": "p", "negatives": ["", "n2"], "task": "qa"},
    ]
    data = b"\xef\xbb\xbf\n" + b"\r\n\n".join(json.dumps(r).encode() for r in lines) + b"\n\n"
    examples = jsonl.read_jsonl(_write(tmp_path, data))
    assert examples == [
        Example("", ""),
        Example(long_text, long_text),
        Example("Grüße 😀", "p", ("", "n2"), "qa"),
    ]
    assert examples[2].negatives == ("", "n2")
    assert examples[0].task is None


def test_write_then_read_round_trips_and_leaves_no_temporary(tmp_path):
    examples = [
        Example("q1", "p1"),
        Example('q\n2 "quoted"', "p2 ☃", negatives=("n1", "n2"), task="t"),
        Example("", "", task=""),
    ]
    path = tmp_path / "out.jsonl"
    path.write_text("old content\n")
    jsonl.write_jsonl(path, examples)
    assert jsonl.read_jsonl(path) == examples
    assert os.listdir(tmp_path) == ["out.jsonl"]
    # One example a line, UTF-8 not escaped, optional keys only when set.
    lines = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(lines[0]) == {"query": "q1", "positive": "p1"}
    assert "☃" in lines[1]
    assert json.loads(lines[2]) == {"query": "", "positive": "", "task": ""}


def test_write_jsonl_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.jsonl"
    path.write_bytes(GOOD + b"\n")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(jsonl.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        jsonl.write_jsonl(path, [Example("new", "new")])
    assert path.read_bytes() == GOOD + b"\n"
    assert os.listdir(tmp_path) == ["out.jsonl"]


def test_write_jsonl_rejects_empty_and_non_examples(tmp_path):
    with pytest.raises(DataError, match="no examples"):
        jsonl.write_jsonl(tmp_path / "a.jsonl", [])
    with pytest.raises(TypeError, match=r"examples\[1\] is dict"):
        jsonl.write_jsonl(tmp_path / "a.jsonl", [Example("q", "p"), {"query": "q"}])
    assert os.listdir(tmp_path) == []


def test_example_validates_types():
    assert Example("q", "p", ["a"]).negatives == ("a",)
    with pytest.raises(TypeError, match="'query' must be a string"):
        Example(None, "p")
    with pytest.raises(TypeError, match=r"'negatives'\[0\]"):
        Example("q", "p", (1,))


def test_read_jsonl_files_concatenates_in_order_and_names_the_bad_file(tmp_path):
    first = _write(tmp_path, b'{"query": "a", "positive": "1"}\n', "first.jsonl")
    second = _write(
        tmp_path, b'{"query": "b", "positive": "2"}\n{"query": "c", "positive": "3"}\n', "b.jsonl"
    )
    assert [e.query for e in jsonl.read_jsonl_files([second, first])] == ["b", "c", "a"]
    bad = _write(tmp_path, GOOD + b"\n" + GOOD + b"\n[1]\n", "bad.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{bad}:3:")):
        jsonl.read_jsonl_files([first, bad])
    with pytest.raises(DataError, match="no files"):
        jsonl.read_jsonl_files([])
    with pytest.raises(TypeError, match="list of paths"):
        jsonl.read_jsonl_files(str(first))


# ---------------------------------------------------------------------- stdlib pairs


def _md5_split(module: str) -> str:
    """The documented rule, written out independently: md5 -> [0, 1) -> 0.8/0.1/0.1."""
    u = int(hashlib.md5(module.encode()).hexdigest()[:16], 16) / 2**64
    return "train" if u < 0.8 else "validation" if u < 0.9 else "test"


def _module_named(split: str, prefix: str) -> str:
    return next(f"{prefix}{i}" for i in range(10_000) if _md5_split(f"{prefix}{i}") == split)


def test_split_of_module_follows_md5_rule():
    names = [f"module{i}" for i in range(300)] + ["os", "json", "email", "asyncio"]
    assert [stdlib_pairs.split_of_module(n) for n in names] == [_md5_split(n) for n in names]
    counts = {s: sum(_md5_split(n) == s for n in names) for s in stdlib_pairs.SPLITS}
    assert counts["train"] > counts["validation"] > 0 and counts["test"] > 0


@pytest.fixture()
def fake_stdlib(tmp_path):
    """A tiny stdlib folder with one module per split and the cases to skip."""
    train, validation, test = (_module_named(s, "mod") for s in stdlib_pairs.SPLITS)
    root = tmp_path / "lib"
    files = {
        f"{train}.py": '''
            import os

            def fact(n):
                """Compute the factorial of n.

                Second paragraph is not part of the query.
                """
                if n < 2:
                    return 1
                return n * fact(n - 1)  # fact_helper stays

            def short_doc(x):
                """Too short."""
                y = x + 1
                return y

            def short_body(x):
                """This one has a one line body."""
                return x

            def shared(a):
                """Return the shared docstring text."""
                b = a * 2
                return b
            ''',
        f"{validation}/__init__.py": '''
            class Thing:
                async def fetch(self, url):
                    """Fetch   the given
                    url from the network."""
                    data = await get(url)
                    text = """
            not indented
            """
                    return data, text
            ''',
        f"{validation}/sub/deep.py": '''
            def shared(a):
                """Return the shared docstring text."""
                c = a - 1
                return c

            def deep_fn(a):
                """Deep function in a subpackage."""
                c = a - 1
                return c
            ''',
        f"{test}.py": '''
            def held_out(z):
                """A held out test function."""
                w = z ** 2
                return w

            def deep_copy(a):
                """Deep function in a subpackage."""
                d = a + 1
                return d
            ''',
        f"{train}/tests/test_x.py": 'def t():\n    """Tests should be skipped."""\n    a = 1\n    return a\n',
        "site-packages/pkg.py": 'def f():\n    """Third party code skipped."""\n    a = 1\n    return a\n',
        "idlelib/x.py": 'def f():\n    """IDLE code is skipped."""\n    a = 1\n    return a\n',
        "broken.py": "def f(:\n",
        "config-3.11-x86_64/helper.py": 'def f():\n    """Not a package dir."""\n    a = 1\n    return a\n',
    }
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"))
    return str(root), {"train": train, "validation": validation, "test": test}


def test_fake_stdlib_pairs_exact(fake_stdlib):
    root, _ = fake_stdlib
    train = stdlib_pairs.build_pairs("train", stdlib_dir=root)
    assert train == [
        Example(
            "Compute the factorial of n.",
            "def fact(n):\n    if n < 2:\n        return 1\n    return n * fact(n - 1)  # fact_helper stays",
            task="code_search",
        ),
        Example(
            "Return the shared docstring text.",
            "def shared(a):\n    b = a * 2\n    return b",
            task="code_search",
        ),
    ]
    validation = stdlib_pairs.build_pairs("validation", stdlib_dir=root)
    # The method is dedented; the string literal that starts further left keeps its text;
    # `shared` in the subpackage repeats a train docstring and is dropped.
    assert [e.query for e in validation] == [
        "Fetch the given url from the network.",
        "Deep function in a subpackage.",
    ]
    assert validation[0].positive == (
        'async def fetch(self, url):\n    data = await get(url)\n    text = """\nnot indented\n"""\n'
        "    return data, text"
    )
    test = stdlib_pairs.build_pairs("test", stdlib_dir=root)
    # deep_copy repeats a validation docstring: dropped too.
    assert [e.query for e in test] == ["A held out test function."]


def test_mask_names_hides_the_function_name(fake_stdlib):
    root, _ = fake_stdlib
    masked = stdlib_pairs.build_pairs("train", mask_names=True, stdlib_dir=root)
    assert masked[0].positive == (
        "def func(n):\n    if n < 2:\n        return 1\n    return n * func(n - 1)  # fact_helper stays"
    )
    assert masked[0].query == "Compute the factorial of n."


def test_unknown_split_is_an_error():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        stdlib_pairs.build_pairs("dev")


@pytest.fixture(scope="module")
def real_splits(stdlib_splits):
    return stdlib_splits


def test_real_stdlib_splits_are_disjoint_by_module_and_docstring(real_splits):
    sizes = {split: len(examples) for split, examples in real_splits.items()}
    assert sizes["train"] > 2000 and sizes["validation"] > 100 and sizes["test"] > 100, sizes
    queries = {split: {e.query for e in examples} for split, examples in real_splits.items()}
    assert not queries["train"] & queries["validation"]
    assert not queries["train"] & queries["test"]
    assert not queries["validation"] & queries["test"]
    # Module-level split, checked through the records that know their module.
    records = stdlib_pairs._split_pairs(stdlib_pairs.default_stdlib_dir())
    modules = {split: {p.module for p in pairs} for split, pairs in records.items()}
    for split, names in modules.items():
        assert all(_md5_split(name) == split for name in names), split
    assert not modules["train"] & modules["validation"] and not modules["train"] & modules["test"]
    assert not modules["validation"] & modules["test"]
    for pairs in records.values():
        assert not any(
            part in ("test", "tests", "idlelib", "site-packages") for p in pairs for part in p.path.split("/")
        )
    for examples in real_splits.values():
        assert all(e.task == "code_search" and len(e.query.split()) >= 3 for e in examples)
        assert all(re.match(r"(async )?def ", e.positive) for e in examples)


def test_real_stdlib_known_function_lands_in_its_module_split(real_splits):
    # json.dumps, documented "Serialize ``obj`` to a JSON formatted ``str``."
    split = _md5_split("json")
    dumps = [
        e for e in real_splits[split] if e.query.startswith("Serialize ``obj`` to a JSON formatted ``str``")
    ]
    assert dumps and dumps[0].positive.startswith("def dumps(obj, *,")
    assert "Serialize" not in dumps[0].positive and '"""' not in dumps[0].positive


def test_real_stdlib_mask_names(real_splits):
    masked = stdlib_pairs.build_pairs("test", mask_names=True)
    assert len(masked) == len(real_splits["test"])
    for plain, hidden in zip(real_splits["test"], masked, strict=True):
        name = re.match(r"(?:async )?def (\w+)", plain.positive).group(1)
        assert re.match(r"(?:async )?def func\(", hidden.positive)
        assert not re.search(rf"\b{name}\b", hidden.positive) or name == "func"


@pytest.mark.subprocess
def test_cli_writes_the_same_splits_in_another_process(tmp_path, real_splits):
    # A different hash seed in the child: nothing may depend on Python's salted hash().
    env = dict(os.environ, PYTHONHASHSEED="12345")
    result = subprocess.run(
        [sys.executable, "-m", "embedder.data.stdlib_pairs", "--output_dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    for split, examples in real_splits.items():
        assert jsonl.read_jsonl(tmp_path / "out" / f"{split}.jsonl") == examples
        assert re.search(rf"{split}\s+{len(examples)} pairs", result.stdout), result.stdout


# -------------------------------------------------------------------------- batching


@pytest.fixture(scope="module")
def tokenizer():
    return WordPieceTokenizer.from_pretrained_dir(minilm_l6_v2_path())


def _padded(tokenizer, text, length):
    ids = tokenizer.encode(text, max_length=length)
    return np.array(ids + [tokenizer.pad_id] * (length - len(ids)), dtype=np.int32)


def _duplicate_id(tokenizer, text, length):
    """Independent of batching.duplicate_id: BLAKE2b of the truncated ids packed as little-endian int32."""
    ids = tokenizer.encode(text, max_length=length)
    data = struct.pack(f"<{len(ids)}i", *ids)
    return int.from_bytes(hashlib.blake2b(data, digest_size=4).digest(), "big") % 2**31


def _examples(n, negatives=0):
    return [
        Example(
            f"query number {i}",
            f"positive document {i}",
            tuple(f"negative {i} {k}" for k in range(negatives)),
        )
        for i in range(n)
    ]


def _batcher(examples, tokenizer, **kwargs):
    config = dict(global_batch_size=4, query_len=8, doc_len=12)
    config.update(kwargs)
    return batching.PairBatcher(examples, tokenizer, **config)


def test_batch_shapes_dtypes_and_contents(tokenizer):
    long = "a long positive " * 40
    examples = _examples(9, negatives=2) + [Example("short", long, ("n1", "n2", "n3"))]
    batcher = _batcher(examples, tokenizer, global_batch_size=10, num_negatives=2)
    batch = batcher.batch(0)
    assert set(batch) == {
        "query_tokens",
        "positive_tokens",
        "negative_tokens",
        "query_ids",
        "positive_ids",
        "weights",
        "negative_valid",
        "negative_ids",
    }
    assert batch["negative_valid"].shape == (10, 2) and batch["negative_valid"].all()
    assert batch["negative_ids"].shape == (10, 2) and batch["negative_ids"].dtype == np.int32
    assert batch["query_tokens"].shape == (10, 8) and batch["query_tokens"].dtype == np.int32
    assert batch["positive_tokens"].shape == (10, 12) and batch["positive_tokens"].dtype == np.int32
    assert batch["negative_tokens"].shape == (10, 2, 12) and batch["negative_tokens"].dtype == np.int32
    for key in ("query_ids", "positive_ids"):
        assert batch[key].shape == (10,) and batch[key].dtype == np.int32
    assert batch["weights"].dtype == np.float32 and np.array_equal(batch["weights"], np.ones(10))
    order = np.random.default_rng([0, 0]).permutation(10)
    for row, index in enumerate(order):
        example = examples[index]
        np.testing.assert_array_equal(batch["query_tokens"][row], _padded(tokenizer, example.query, 8))
        np.testing.assert_array_equal(batch["positive_tokens"][row], _padded(tokenizer, example.positive, 12))
        for k in range(2):
            np.testing.assert_array_equal(
                batch["negative_tokens"][row, k], _padded(tokenizer, example.negatives[k], 12)
            )
    long_row = batch["positive_tokens"][list(order).index(9)]
    assert (
        long_row[0] == tokenizer.cls_id
        and long_row[-1] == tokenizer.sep_id
        and tokenizer.pad_id not in long_row
    )
    assert "negative_tokens" not in _batcher(examples, tokenizer).batch(0)


def test_epoch_order_follows_the_documented_permutation(tokenizer):
    examples = _examples(23)
    batcher = _batcher(examples, tokenizer, seed=7)
    assert batcher.steps_per_epoch == 5
    id_to_index = {_duplicate_id(tokenizer, e.query, 8): i for i, e in enumerate(examples)}
    for epoch in range(3):
        seen = []
        for step in range(epoch * 5, epoch * 5 + 5):
            seen.extend(id_to_index[int(i)] for i in batcher.batch(step)["query_ids"])
        expected = np.random.default_rng([7, epoch]).permutation(23)[:20]
        assert seen == list(expected)
        assert len(set(seen)) == 20  # every kept example exactly once, the 3 left over dropped


def test_determinism_and_resume(tokenizer):
    examples = _examples(30, negatives=1)
    config = dict(num_negatives=3, seed=5)
    first = _batcher(examples, tokenizer, **config)
    run = [first.batch(step) for step in range(20)]
    # A fresh batcher asked for step 13 directly (a resumed run) gives the same batch.
    resumed = _batcher(examples, tokenizer, **config)
    for step in (13, 2, 19, 13):
        for key, value in run[step].items():
            np.testing.assert_array_equal(resumed.batch(step)[key], value, err_msg=f"{key} step {step}")
    other_seed = _batcher(examples, tokenizer, num_negatives=3, seed=6).batch(0)
    assert not np.array_equal(other_seed["query_ids"], run[0]["query_ids"])


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shares_concatenate_to_the_single_process_batch(tokenizer, process_count):
    examples = _examples(17) + _examples(3, negatives=1)
    config = dict(global_batch_size=8, num_negatives=2, seed=3)
    single = _batcher(examples, tokenizer, **config)
    shares = [
        _batcher(examples, tokenizer, process_index=i, process_count=process_count, **config)
        for i in range(process_count)
    ]
    for step in (0, 1, 4, 9):
        whole = single.batch(step)
        parts = [share.batch(step) for share in shares]
        for key, value in whole.items():
            assert parts[0][key].shape[0] == 8 // process_count
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), value, err_msg=key)


def test_missing_negatives_are_padding_rows_marked_missing(tokenizer):
    # Never filled with other rows' positives (one can be the row's own positive text).
    examples = [Example(f"q{i}", f"doc {i % 5}", ("hard",) if i % 3 == 0 else ()) for i in range(24)]
    batcher = _batcher(examples, tokenizer, global_batch_size=8, num_negatives=3)
    hard_queries = {_duplicate_id(tokenizer, f"q{i}", 8) for i in range(0, 24, 3)}
    hard_id = _duplicate_id(tokenizer, "hard", 12)
    for step in range(9):
        batch = batcher.batch(step)
        for row in range(8):
            negatives = batch["negative_tokens"][row]
            has_hard = batch["query_ids"][row] in hard_queries
            start = 0
            if has_hard:
                np.testing.assert_array_equal(negatives[0], _padded(tokenizer, "hard", 12))
                start = 1
            assert batch["negative_valid"][row].tolist() == [1] * start + [0] * (3 - start)
            assert batch["negative_ids"][row].tolist() == [hard_id] * start + [-1] * (3 - start)
            for negative in negatives[start:]:
                assert not negative.any()  # a padding row (pad id 0)


def test_examples_without_negatives_need_no_other_positive(tokenizer):
    examples = [Example(f"q{i}", "same doc") for i in range(4)]
    batch = _batcher(examples, tokenizer, num_negatives=1).batch(0)
    assert not batch["negative_valid"].any() and (batch["negative_ids"] == -1).all()


def test_duplicate_texts_share_ids(tokenizer):
    examples = [Example("same query", f"p{i % 2}") for i in range(4)] + [Example("other", "p0")]
    batch = _batcher(examples, tokenizer, global_batch_size=5).batch(0)
    order = np.random.default_rng([0, 0]).permutation(5)
    assert list(batch["query_ids"]) == [_duplicate_id(tokenizer, examples[i].query, 8) for i in order]
    assert list(batch["positive_ids"]) == [_duplicate_id(tokenizer, examples[i].positive, 12) for i in order]
    assert len(set(batch["query_ids"].tolist())) == 2 and len(set(batch["positive_ids"].tolist())) == 2
    ids = tokenizer.encode("same query", max_length=8)
    assert batching.duplicate_id(ids) == _duplicate_id(tokenizer, "same query", 8)


def test_texts_equal_after_truncation_share_ids(tokenizer):
    """The model sees the truncated tokens: texts it cannot tell apart are duplicates."""
    examples = [Example("one two three four five six seven", f"p{i}") for i in range(2)]
    examples += [Example("one two three four five six eight", "p2"), Example("other", "p3")]
    batch = _batcher(examples, tokenizer, query_len=5).batch(0)
    order = list(np.random.default_rng([0, 0]).permutation(4))
    rows = [order.index(i) for i in range(3)]
    assert len({int(batch["query_ids"][r]) for r in rows}) == 1  # [CLS] one two three [SEP] each
    assert len(set(batch["query_ids"].tolist())) == 2


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(global_batch_size=11), "10 examples are fewer than one global batch of global_batch_size=11"),
        (
            dict(global_batch_size=6, process_count=4),
            "global_batch_size=6 is not divisible by process_count=4",
        ),
        (dict(process_index=2, process_count=2), "process_index=2 is not in [0, process_count=2)"),
        (dict(query_len=1), "query_len=1"),
        (dict(num_negatives=-1), "num_negatives"),
    ],
)
def test_batcher_configuration_errors(tokenizer, kwargs, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        _batcher(_examples(10), tokenizer, **kwargs)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    pairs=st.lists(
        st.tuples(st.text(max_size=60), st.text(max_size=200)),
        min_size=2,
        max_size=6,
        unique_by=lambda p: p[1],
    ),
    query_len=st.integers(2, 12),
    doc_len=st.integers(2, 20),
    num_negatives=st.integers(0, 2),
    step=st.integers(0, 50),
)
def test_arbitrary_text_always_gives_configured_shapes(
    tokenizer, pairs, query_len, doc_len, num_negatives, step
):
    examples = [Example(q, p) for q, p in pairs]
    batcher = batching.PairBatcher(
        examples,
        tokenizer,
        global_batch_size=2,
        query_len=query_len,
        doc_len=doc_len,
        num_negatives=num_negatives,
    )
    batch = batcher.batch(step)
    assert batch["query_tokens"].shape == (2, query_len)
    assert batch["positive_tokens"].shape == (2, doc_len)
    if num_negatives:
        assert batch["negative_tokens"].shape == (2, num_negatives, doc_len)
    # Pairs equal after truncation share ids; the row's tokens are those of one of them.
    by_ids = {}
    for q, p in pairs:
        key = (_duplicate_id(tokenizer, q, query_len), _duplicate_id(tokenizer, p, doc_len))
        by_ids.setdefault(key, []).append((q, p))
    for row in range(2):
        candidates = by_ids[(int(batch["query_ids"][row]), int(batch["positive_ids"][row]))]
        assert any(
            np.array_equal(batch["query_tokens"][row], _padded(tokenizer, q, query_len))
            and np.array_equal(batch["positive_tokens"][row], _padded(tokenizer, p, doc_len))
            for q, p in candidates
        )
