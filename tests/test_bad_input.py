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
| `soup` / `export` to an output that exists and is not empty | `OUT already exists; remove it or choose another output`, before any checkpoint loads |
| `soup` of checkpoints of different widths | `parameter PATH has shape (48,) in CKPT but (32,) in CKPT: ...`; no output folder |
| `export --format=sentence-transformers` of an llm-family or two-tower model | `cannot export CKPT (llm-family encoder) as sentence-transformers: ...family='llm'...`; no output folder |
| `eval` on a BEIR folder whose qrels name an unknown query or corpus id | `QRELS:LINE: query id 'q9' is not in queries.jsonl` (or `corpus id`); no results.json |
| training into a model dir holding another architecture's checkpoint | `DIR/STEP holds a checkpoint of another architecture (hidden_size: saved 32, now 64)`: tests/test_training.py::test_checkpoint_of_another_architecture_is_a_clear_error |
| a NaN / inf loss | `non-finite loss (nan) ... at step N; last good checkpoint: ...` (or the update is skipped): tests/test_training.py::test_non_finite_loss_stops_or_skips |
| a read-only model dir | `model dir DIR is not writable: Read-only file system`, before the first step: tests/test_faults.py::test_read_only_model_dir_fails_before_the_first_step |
| `eval` whose report cannot be written (a full disk while plotting) | `error: [Errno 28] No space left on device`; no results.json |
| a disk that fills up mid-run | `... (complete checkpoints, intact: [2, 4]): ... No space left on device`: tests/test_faults.py::test_disk_full_mid_run_keeps_earlier_checkpoints |
| a macro nothing reads (`--gin.LEARNING_RAT=5`) | `gin macro LEARNING_RAT is set but nothing in this run reads it; did you mean LEARNING_RATE?`: tests/test_guards.py::test_run_settings_are_checked_before_anything_starts |
| `TRAIN_STEPS=2.5`, `BATCH_SIZE=4.0`, `QUERY_LEN=16.0`, a quoted number, `SAVE_EVERY=0`, `TRAIN_FILES='x.jsonl'` | `gin macro NAME=VALUE: must be ...`, before the model dir is made: the same test |
| no model gin file | `no model: add --gin_file=models/NAME.gin ...`: tests/test_guards.py::test_a_run_without_a_model_file_names_the_flag |
| `--num_processes=2` alone | `--num_processes needs --coordinator_address and --process_id too`: tests/test_guards.py::test_multi_host_flags_are_all_given_or_none |
| a restart with another batch size, seed, data or schedule | `DIR/STEP was trained by another run: batch_size: saved 16, now 8; ...` (`--allow_changed_run` continues): tests/test_guards.py::test_a_changed_run_is_refused_a_finished_one_is_complete |
| a restart of a finished run | `the run in DIR is complete (step N)`, exit 0: tests/test_guards.py::test_the_command_line_says_a_finished_run_is_complete |
| a second training on a model dir in use | `model dir DIR is being trained by another process (host H, pid P, ...)`: tests/test_guards.py::test_two_trainings_on_one_model_dir |
| a damaged latest checkpoint | `checkpoint DIR/N is damaged (...); skipped, moved to ...`: tests/test_guards.py::test_damaged_latest_checkpoints_are_skipped_and_the_run_ends_as_an_uninterrupted_one |
| a checkpoint file changed after the save (a flipped byte in an array file) | `checkpoint DIR/N is damaged (FILE does not match its sha256 in DIR/N/checksums.json ...); skipped`, the newest intact step used; asked for by number, an error naming FILE: tests/test_guards.py::test_a_damaged_step_is_named_and_every_consumer_takes_the_older_one |
| a NaN `BEST_METRIC` | `BEST_METRIC NAME is nan at step N: it cannot rank checkpoints; ...`, nothing saved: tests/test_guards.py::test_a_nan_best_metric_is_refused_before_saving |
| a meta file that does not parse | `PATH is not valid JSON (a damaged checkpoint?)`: tests/test_guards.py::test_a_meta_file_that_does_not_parse_names_its_path |
| Ctrl-C | `SIGINT: saved step N ...; Run the same command again to resume`, exit 130: tests/test_guards.py::test_sigint_saves_says_how_to_resume_and_exits_130 |
| `soup --eval_limit -38` | `--eval_limit=-38 must be >= 1`: tests/test_guards.py::test_soup_eval_limit_must_be_positive |
| a mining window past the corpus | `the rank window [50, 60) starts past the corpus of 3 documents`: tests/test_guards.py::test_a_mining_window_past_the_corpus_is_an_error |
| STS with constant gold scores, all-zero qrels | `eval task NAME: the gold scores are all equal ...` / `every qrels relevance is 0`: tests/test_guards.py |

A failed `soup` or `export` leaves neither its output folder nor a temporary one
(both write under a temporary name and rename when complete); a failed `eval`
writes no results.json.
"""

import dataclasses
import os
import re

import jax
import numpy as np
import pytest
from flax import linen as nn

from embedder import checkpointing, cli
from embedder.models import dual_encoder, pretrained, spec
from tests.training_helpers import TINY

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
    code, err = _train(tmp_path, capsys, lines)
    assert code == 2
    assert re.search(message, err), err
    assert "Traceback" not in err
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "2")


@pytest.mark.slow
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


# ---------------------------------------------------------------- soup, export, eval

MODELS = {
    "tiny": dual_encoder.DualEncoder(TINY),
    "wider": dual_encoder.DualEncoder(dataclasses.replace(TINY, hidden_size=48, mlp_dim=96)),
    "llm": dual_encoder.DualEncoder(
        dataclasses.replace(TINY, family="llm", num_kv_heads=2, activation="silu")
    ),
    "two-tower": dual_encoder.DualEncoder(TINY, shared_tower=False),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A params-only checkpoint of each model in MODELS, {name: step folder}.

    Random numpy values of the abstract shapes (no jitted init, which costs
    seconds a model): every error here is found from shapes and configs.
    """
    root = tmp_path_factory.mktemp("checkpoints")
    rng = np.random.default_rng(0)
    folders = {}
    for name, module in MODELS.items():
        abstract = nn.unbox(spec.ModelSpec(module).abstract_variables())["params"]
        params = jax.tree.map(lambda x: rng.normal(0, 0.02, x.shape).astype(x.dtype), abstract)
        meta = {
            "model_config": spec.describe_module(module),
            "vocab_dir": pretrained.minilm_l6_v2_path(),
            "step": 1,
        }
        folders[name] = checkpointing.save_model_params(str(root / name), 1, params, meta)
    return folders


def _assert_nothing_written(output):
    """Neither the output nor a temporary folder beside it (.NAME.tmp-PID)."""
    assert not os.path.exists(output), os.listdir(output)
    parent, name = os.path.split(output)
    leftovers = (
        [n for n in os.listdir(parent) if n.startswith(f".{name}.tmp")] if os.path.isdir(parent) else []
    )
    assert not leftovers, leftovers


def test_soup_of_checkpoints_of_different_widths(checkpoints, tmp_path, capsys):
    output = str(tmp_path / "soup")
    code = cli.main(
        ["soup", "--checkpoints", checkpoints["tiny"], checkpoints["wider"], f"--output={output}"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(
        rf"parameter encoder/\S+ has shape \(48,\) in {re.escape(checkpoints['wider'])} "
        rf"but \(32,\) in {re.escape(checkpoints['tiny'])}",
        err,
    ), err
    _assert_nothing_written(output)


@pytest.mark.parametrize("command", ["soup", "export"])
def test_a_taken_output_is_refused_before_any_checkpoint_loads(
    command, checkpoints, tmp_path, capsys, monkeypatch
):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")

    def never(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded")

    monkeypatch.setattr(checkpointing, "load_model_params", never)
    if command == "soup":
        argv = ["soup", "--checkpoints", checkpoints["tiny"], f"--output={output}"]
    else:
        argv = ["export", f"--checkpoint={checkpoints['tiny']}", "--format=bundle", f"--output={output}"]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and f"{output} already exists" in err, err
    assert os.listdir(output) == ["notes.txt"]


@pytest.mark.parametrize(
    "model, message",
    [
        # An llm-family block that is neither Gemma 3 nor Qwen3 has no Hugging Face class to load it.
        ("llm", r"cannot export .*family='llm'.*: neither a Gemma 3 nor a Qwen3 block"),
        ("two-tower", r"\(bert-family encoder\) as sentence-transformers: two towers"),
    ],
    ids=["llm", "two-tower"],
)
def test_export_of_an_architecture_sentence_transformers_cannot_express(
    model, message, checkpoints, tmp_path, capsys, monkeypatch
):
    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    # The configuration alone decides: the weights never load.
    monkeypatch.setattr(checkpointing, "load_model_params", never)
    output = str(tmp_path / "st")
    code = cli.main(
        [
            "export",
            f"--checkpoint={checkpoints[model]}",
            "--format=sentence-transformers",
            f"--output={output}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert checkpoints[model] in err and re.search(message, err), err
    assert "--format=bundle" in err
    _assert_nothing_written(output)


def _beir(folder, qrels):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text('{"_id": "d1", "text": "a cat"}\n{"_id": "d2", "text": "a dog"}\n')
    (folder / "queries.jsonl").write_text('{"_id": "q1", "text": "cat"}\n{"_id": "q2", "text": "dog"}\n')
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)


@pytest.mark.parametrize(
    "qrels, message",
    [
        ("q1\td1\t1\nq9\td2\t1\n", "test.tsv:3: query id 'q9' is not in queries.jsonl"),
        ("q1\td1\t1\nq2\td2\t1\nq2\td7\t1\n", "test.tsv:4: corpus id 'd7' is not in corpus.jsonl"),
    ],
    ids=["query-id", "corpus-id"],
)
def test_eval_folder_whose_qrels_name_missing_ids(qrels, message, tmp_path, capsys):
    folder = tmp_path / "toy"
    _beir(folder, qrels)
    output = tmp_path / "report"
    code = cli.main(["eval", "--model=all-MiniLM-L6-v2", f"--task={folder}", f"--output_dir={output}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(folder / "qrels" / "test.tsv") in err and message in err, err
    assert not output.exists()


def test_eval_that_fails_while_plotting_writes_no_results_json(checkpoints, tmp_path, monkeypatch, capsys):
    from embedder import plots

    folder = tmp_path / "toy"
    _beir(folder, "q1\td1\t1\nq2\td2\t1\n")

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "plot_matryoshka", fail)
    output = tmp_path / "report"
    argv = ["eval", f"--model={checkpoints['tiny']}", f"--task={folder}", f"--output_dir={output}"]
    code = cli.main([*argv, "--dims", "32", "--k", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "No space left on device" in err and "Traceback" not in err, err
    assert not (output / "results.json").exists()
