"""The recipe as one command: the noisy pre-finetuning pairs and `scripts/recipe.sh` end to end."""

from __future__ import annotations

import textwrap
from pathlib import Path

from embedder.data import jsonl, stdlib_pairs

REPO = Path(__file__).resolve().parents[1]


def _module_in(split: str) -> str:
    """The first name modNN that `split_of_module` puts in `split`."""
    return next(f"mod{i}" for i in range(1000) if stdlib_pairs.split_of_module(f"mod{i}") == split)


TRAIN_MODULE = '''
def parse(text, strict=True):
    """Parse a config file into sections.

    Each line holds a key and a value, e.g. name = x. With *strict* set, a repeated
    key raises ValueError!  Is it fatal? Yes.

    >>> parse("a = 1")
    {'a': '1'}
    """
    sections = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        sections[key.strip()] = value.strip()
    return sections


def tiny():
    """Too short: no."""
    x = 1
    return x
'''

HELD_OUT_MODULE = '''
def held_out(a, b):
    """Add two numbers together here.

    Never a pre-finetuning query.
    """
    total = a + b
    return total
'''


def test_pretrain_pairs_are_every_docstring_sentence_of_the_train_modules(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    (root / f"{_module_in('train')}.py").write_text(TRAIN_MODULE)
    (root / f"{_module_in('validation')}.py").write_text(HELD_OUT_MODULE)
    (root / f"{_module_in('test')}.py").write_text(HELD_OUT_MODULE.replace("held_out", "other"))

    examples = stdlib_pairs.build_pretrain_pairs(stdlib_dir=str(root))

    parse_code = textwrap.dedent("""\
        def parse(text, strict=True):
            sections = {}
            for line in text.splitlines():
                key, _, value = line.partition("=")
                sections[key.strip()] = value.strip()
            return sections""")
    tiny_code = "def tiny():\n    x = 1\n    return x"
    # By hand: the summary line, then each sentence of each prose paragraph; the
    # doctest paragraph, sentences under three words ("Yes.") and repeats are left out.
    expected = [
        ("Parse a config file into sections.", parse_code),
        ("Each line holds a key and a value, e.g. name = x.", parse_code),
        ("With *strict* set, a repeated key raises ValueError!", parse_code),
        ("Is it fatal?", parse_code),
        ("Too short: no.", tiny_code),
    ]
    assert [(e.query, e.positive, e.task) for e in examples] == [(q, c, "code_search") for q, c in expected]
    # More pairs than the fine-tuning split of the same modules, none from held-out code.
    assert len(examples) > len(stdlib_pairs.build_pairs("train", stdlib_dir=str(root)))
    assert not any("held_out" in e.positive or "other" in e.positive for e in examples)
    # The file the recipe trains on holds the same examples, in the same order, every time.
    path = tmp_path / "pretrain.jsonl"
    assert stdlib_pairs.write_pretrain(path, stdlib_dir=str(root)) == len(expected)
    first = path.read_bytes()
    assert [(e.query, e.positive) for e in jsonl.read_jsonl(str(path))] == expected
    stdlib_pairs.write_pretrain(path, stdlib_dir=str(root))
    assert path.read_bytes() == first
