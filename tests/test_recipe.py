"""The recipe as one command: the noisy pre-finetuning pairs and `scripts/recipe.sh` end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from embedder import checkpointing
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


STAGES = [
    "base (random)",
    "pre-finetuned",
    "fine-tune finetune_1",
    "fine-tune finetune_2",
    "greedy soup",
    "soup, exported (sentence-transformers)",
]
METRICS = ["ndcg@10", "mrr@10", "recall@10", "ndcg@10 dim 16"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_recipe_script_runs_every_stage_and_tabulates_them(tmp_path):
    out = tmp_path / "recipe"
    # One CPU device, as the script runs on the 2-core machine: conftest's 8 emulated
    # devices would make every stage compile for an 8-way mesh (about 3x the CPU time).
    xla_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable, PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags)
    proc = subprocess.run(
        ["bash", "scripts/recipe.sh", "--tiny"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    # The table: a row per stage, in order, every metric a finite number in [0, 1].
    table = (out / "recipe.md").read_text()
    lines = [
        [c.strip() for c in line.strip("|").split("|")] for line in table.splitlines() if line.startswith("|")
    ]
    assert lines[0] == ["stage", "step", *METRICS]
    cells = lines[2:]  # after the | --- | line
    assert [c[0] for c in cells] == STAGES
    for c in cells:
        values = [float(v) for v in c[2:]]
        assert len(values) == len(METRICS) and all(math.isfinite(v) and 0 <= v <= 1 for v in values), c
    assert (out / "recipe.png").stat().st_size > 0

    # The chain: each fine-tune started from the pre-finetuned checkpoint; the soup's
    # ingredients are exactly the fine-tunes, scored on the validation split.
    pretrained = checkpointing.resolve_step_dir(str(out / "pretrain"))
    finetunes = [checkpointing.resolve_step_dir(str(out / f"finetune_{i}")) for i in (1, 2)]
    for step_dir in finetunes:
        origin = checkpointing.read_meta(step_dir).origin
        assert (origin.kind, os.path.realpath(origin.path)) == ("checkpoint", os.path.realpath(pretrained))
    soup = json.loads((out / "soup" / "soup.json").read_text())
    assert [os.path.realpath(i["checkpoint"]) for i in soup["ingredients"]] == [
        os.path.realpath(f) for f in finetunes
    ]
    assert all(math.isfinite(i["metric"]) for i in soup["ingredients"]) and soup["metric"] == "mrr@10"
    soup_origin = checkpointing.read_meta(checkpointing.resolve_step_dir(str(out / "soup"))).origin
    assert soup_origin.kind == "soup"
    assert [os.path.realpath(p) for p in soup_origin.sources] == [os.path.realpath(f) for f in finetunes]
    # The exported soup encodes as the soup checkpoint: the same row of metrics.
    report = json.loads((out / "recipe.json").read_text())["rows"]
    assert [r["stage"] for r in report] == STAGES
    assert report[-1]["step"] is None and report[-2]["step"] == int(os.path.basename(finetunes[0]))
    for metric in METRICS:
        assert report[-1][metric] == pytest.approx(report[-2][metric], abs=1e-6)
