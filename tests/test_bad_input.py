"""Bad input, one row each: the command ends non-zero with a message naming the culprit.

| input | what the user gets |
| --- | --- |
| malformed JSON line | `FILE:LINE: malformed JSON: ... at column N` |
| missing `query` / `positive` | `FILE:LINE: missing required key(s) 'query'` |
| non-string field | `FILE:LINE: 'positive' must be a string, got number` |
| invalid UTF-8 | `FILE:LINE: invalid UTF-8 at byte N of the line (...)` |
| empty file | `FILE: empty file ...` |
| unknown gin binding | the binding and gin's reason |
| typo in a gin file | the file, and gin's reason with the line |
| mesh that doesn't divide the devices | the mesh sizes and the device count |
| empty strings, texts far over the length limit | not errors: they train (truncated) |

Rows for checkpoints of another architecture, non-finite losses, unwritable model
dirs and a full disk are in tests/test_training.py and tests/test_faults.py.
"""

import os

import pytest

from embedder import cli

BASE = [
    "train",
    "--gin_file=runs/finetune.gin",
    "--gin_file=models/tiny.gin",
    "--gin_file=mesh/cpu.gin",
    "--gin.BATCH_SIZE=8",
    "--gin.QUERY_LEN=16",
    "--gin.DOC_LEN=32",
    "--gin.NUM_NEGATIVES=0",
    "--gin.TRAIN_STEPS=2",
]
GOOD = '{"query": "how to sort a list", "positive": "def sort(xs): return sorted(xs)"}\n'


def _train(tmp_path, capsys, lines: bytes | None = None, *extra):
    data = tmp_path / "train.jsonl"
    if lines is not None:
        data.write_bytes(lines)
    code = cli.main([*BASE, f"--gin.TRAIN_FILES=['{data}']", f"--model_dir={tmp_path / 'run'}", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "lines,message",
    [
        (GOOD.encode() * 2 + b'{"query": "x", "positive": \n', r"train.jsonl:3: malformed JSON"),
        (GOOD.encode() + b'{"positive": "p"}\n', r"train.jsonl:2: missing required key\(s\) 'query'"),
        (GOOD.encode() + b'{"query": "q", "positive": 7}\n', r"train.jsonl:2: 'positive' must be a string"),
        (
            GOOD.encode() + b'{"query": "caf\xe9", "positive": "p"}\n',
            r"train.jsonl:2: invalid UTF-8 at byte 14",
        ),
        (b"", r"train.jsonl.*empty"),
        (b"\n\n", r"train.jsonl.*empty"),
    ],
    ids=["malformed-json", "missing-query", "non-string", "invalid-utf8", "empty-file", "blank-lines"],
)
def test_bad_jsonl(lines, message, tmp_path, capsys):
    import re

    code, err = _train(tmp_path, capsys, lines)
    assert code == 2
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "2")


def test_empty_and_overlong_texts_are_not_errors(tmp_path, capsys):
    rows = [GOOD, '{"query": "", "positive": "def f(): pass"}\n', '{"query": "q", "positive": ""}\n']
    long_row = '{"query": "' + "word " * 3000 + '", "positive": "' + "token " * 5000 + '"}\n'
    rows += [long_row] * 5
    code, err = _train(tmp_path, capsys, "".join(rows).encode())
    assert code == 0, err[-2000:]
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "2")


def test_unknown_gin_binding(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, GOOD.encode() * 8, "--gin.trainer.OptimizerConfig.learning_rat=1")
    assert code == 2 and "learning_rat" in err and "Traceback" not in err


def test_typo_in_a_gin_file(tmp_path, capsys):
    bad = tmp_path / "typo.gin"
    bad.write_text(
        "from __gin__ import dynamic_registration\nfrom embedder import trainer\n\ntrainer.OptimizerConfig.learning_rate = = 3\n"
    )
    code, err = _train(tmp_path, capsys, GOOD.encode() * 8, f"--gin_file={bad}")
    assert code == 2 and str(bad) in err and "line 4" in err.lower(), err


def test_mesh_that_does_not_divide_the_devices(tmp_path, capsys):
    code, err = _train(tmp_path, capsys, GOOD.encode() * 8, "--gin.partitioning.MeshConfig.model=3")
    assert code == 2 and "do not divide the 8 available devices" in err, err


def test_no_training_data_named(tmp_path, capsys):
    code = cli.main([*BASE, f"--model_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "give exactly one of TRAIN_FILES" in err and "MIXTURE_OR_TASK_NAME" in err
