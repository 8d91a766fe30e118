"""The `embedder` command and the gin model files."""

import glob
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import gin
from embedder import cli, gin_utils
from embedder.models import spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Tracing a 1B model's 26 layers takes several seconds.
_LARGE_MODELS = ("gecko_1b.gin", "gemma3_1b.gin")


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(path, marks=[pytest.mark.slow] if os.path.basename(path) in _LARGE_MODELS else [])
        for path in sorted(glob.glob(os.path.join(REPO, "gin", "models", "*.gin")))
    ],
)
def test_every_model_gin_file_builds_abstractly(path):
    # Folders a model file requires (its weights, its tokenizer) are not read to build it abstractly.
    with open(path, encoding="utf-8") as f:
        required = re.findall(r"^([A-Z_]+) = %gin.REQUIRED", f.read(), re.M)
    gin_utils.parse([path], [f"{name} = '/folder/of/{name.lower()}'" for name in required])
    model = gin_utils.macro("MODEL")
    assert isinstance(model, spec.ModelSpec)
    shapes = jax.tree.leaves(model.abstract_variables())
    assert shapes and all(isinstance(s.shape, tuple) for s in shapes)


def test_gin_binding_overrides_and_errors():
    gin_utils.parse(["models/tiny.gin"], ["transformer.TransformerConfig.num_layers = 3"])
    assert gin_utils.macro("MODEL").module.config.num_layers == 3
    with pytest.raises(ValueError, match="nonexistent.gin"):
        gin_utils.parse(["models/nonexistent.gin"])
    with pytest.raises(ValueError, match="transformer.TransformerConfig.num_layerz"):
        gin_utils.parse(["models/tiny.gin"], ["transformer.TransformerConfig.num_layerz = 3"])


def test_every_subcommand_has_help():
    for name in cli.SUBCOMMANDS:
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0


# The commands run in-process: `python -m embedder` itself is run by the training tests.


@pytest.mark.slow
def test_encode_end_to_end_matches_the_library(tmp_path, monkeypatch, capsys):
    texts = ["Hello world.", "def f(x):\n    return x", "Ångström ünïcödé", ""]
    (tmp_path / "in.txt").write_text("Hello world.\ndef f(x):\n    return x\nÅngström ünïcödé\n\n", "utf-8")
    out = tmp_path / "emb.npy"
    monkeypatch.chdir(REPO)
    code = cli.main(
        ["encode", "--gin_file=gin/models/tiny.gin", f"--input={tmp_path / 'in.txt'}", f"--output={out}"]
    )
    assert code == 0, capsys.readouterr().err
    got = np.load(out)
    # The file's lines, not the Python strings: "def f(x):" and "    return x" are two lines.
    lines = (tmp_path / "in.txt").read_text("utf-8").splitlines()
    assert got.shape == (len(lines), 32) and len(lines) == len(texts) + 1
    gin_utils.parse(["models/tiny.gin"])
    model = gin_utils.macro("MODEL")
    from embedder import inference
    from embedder.data import wordpiece

    embedder = inference.Embedder(
        model.module,
        model.init_params(jax.random.key(0)),
        wordpiece.WordPieceTokenizer.from_pretrained_dir(model.vocab_dir),
    )
    np.testing.assert_allclose(got, embedder.encode(lines), atol=1e-6)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_encode_bad_utf8_names_the_line(tmp_path, capsys):
    (tmp_path / "in.txt").write_bytes(b"fine\nalso fine\nbroken \xff here\n")
    code = cli.main(
        [
            "encode",
            "--model=all-MiniLM-L6-v2",
            f"--input={tmp_path / 'in.txt'}",
            f"--output={tmp_path / 'o.npy'}",
        ]
    )
    assert code == 2
    assert "in.txt:3: not valid UTF-8" in capsys.readouterr().err
    assert not (tmp_path / "o.npy").exists()


@pytest.mark.subprocess
def test_encode_with_a_missing_input_is_one_line_without_tensorflow(tmp_path):
    """The console command itself; `-X importtime` lists every module it loaded."""
    proc = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "embedder",
            "encode",
            "--input=/nonexistent/in.txt",
            f"--output={tmp_path / 'x.npy'}",
            "--model=all-MiniLM-L6-v2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    imports = [line for line in proc.stderr.splitlines() if line.startswith("import time:")]
    message = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert message == [
        "embedder encode: error: /nonexistent/in.txt: cannot read input: No such file or directory"
    ]
    imported = {line.rsplit("|", 1)[1].strip() for line in imports}
    assert "embedder.cli" in imported
    heavy = {m for m in imported if m.split(".")[0] in ("tensorflow", "jax", "seqio", "numpy")}
    assert not heavy and "embedder.train_loop" not in imported, sorted(heavy)


def test_a_bug_shows_its_traceback(monkeypatch, tmp_path):
    """Only user errors (EmbedderError, OSError) become one line; a bare ValueError propagates."""

    def bug(path):
        raise ValueError("an internal mistake")

    monkeypatch.setattr(cli, "_read_lines", bug)
    with pytest.raises(ValueError, match="an internal mistake"):
        cli.main(["encode", "--model=x", "--input=in.txt", f"--output={tmp_path / 'o.npy'}"])


# (subcommand, new argv, the same with old names): each old name parses to the same value.
RENAMED = [
    ("encode", ["--dims=16", "--prompt_task=t"], ["--dim=16", "--task=t"]),
    (
        "eval",
        ["--model=m", "--tasks", "a", "b", "--output=o"],
        ["--checkpoint=m", "--task=a", "--task", "b", "--output_dir=o"],
    ),
    ("export", ["--model=m", "--dims", "8", "4"], ["--checkpoint=m", "--matryoshka_dims", "8", "4"]),
    ("check", ["--gin_file=models/tiny.gin"], ["--model=models/tiny.gin"]),
]
REQUIRED = {
    "encode": ["--input=i", "--output=o"],
    "eval": [],
    "export": ["--format=bundle", "--output=o"],
    "check": [],
}


@pytest.mark.parametrize("command, new, old", RENAMED, ids=[r[0] for r in RENAMED])
def test_old_flag_names_parse_as_the_new_ones(command, new, old):
    parser = cli.build_parser([command])
    assert parser.parse_args([command, *REQUIRED[command], *old]) == parser.parse_args(
        [command, *REQUIRED[command], *new]
    )
    # Every renamed flag is covered here.
    assert {a.split("=")[0] for a in old if a.startswith("--")} == set(cli.RENAMED_FLAGS[command])


@pytest.mark.slow
def test_an_old_flag_name_still_works_with_a_deprecation_message(tmp_path, monkeypatch, capsys):
    (tmp_path / "in.txt").write_text("Hello world.\nhow to sort a list\n", "utf-8")
    monkeypatch.chdir(REPO)
    argv = ["encode", "--gin_file=gin/models/tiny.gin", f"--input={tmp_path / 'in.txt'}"]
    assert cli.main([*argv, f"--output={tmp_path / 'old.npy'}", "--dim=16"]) == 0
    err = capsys.readouterr().err
    assert "embedder encode: warning: --dim is deprecated; use --dims" in err, err
    assert cli.main([*argv, f"--output={tmp_path / 'new.npy'}", "--dims=16"]) == 0
    assert "deprecated" not in capsys.readouterr().err
    old, new = np.load(tmp_path / "old.npy"), np.load(tmp_path / "new.npy")
    assert old.shape == (2, 16)
    np.testing.assert_array_equal(old, new)
    # A Matryoshka prefix of the full embedding, re-normalised (numpy reference).
    assert cli.main([*argv, f"--output={tmp_path / 'full.npy'}"]) == 0
    full = np.load(tmp_path / "full.npy")[:, :16]
    np.testing.assert_allclose(new, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-6)


def test_mine_without_its_flags_names_them(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["mine"])
    assert exit_info.value.code == 2
    assert "--input" in capsys.readouterr().err


# Devices a slice's JAX process group sees (chips, not TensorCores).
MESH_DEVICES = {"cpu": 8, "v4-8": 4, "v4-32": 16, "v5e-16": 16, "v5e-256": 256, "v5p-128": 64}


@pytest.mark.parametrize("name", sorted(MESH_DEVICES))
def test_every_mesh_gin_file_fits_its_slice(name):
    from embedder import partitioning

    assert sorted(
        os.path.basename(p)[:-4] for p in glob.glob(os.path.join(REPO, "gin", "mesh", "*.gin"))
    ) == sorted(MESH_DEVICES)
    gin_utils.parse([f"mesh/{name}.gin"])
    mesh = gin_utils.configured(partitioning.MeshConfig)()
    data, fsdp, model = mesh.shape(MESH_DEVICES[name])
    assert data * fsdp * model == MESH_DEVICES[name]


@pytest.mark.parametrize("run", sorted(glob.glob(os.path.join(REPO, "gin", "runs", "*.gin"))))
def test_every_run_gin_file_parses_with_a_model(run):
    from embedder import train_loop

    bindings = ["TRAIN_FILES = ['x.jsonl']"]
    if os.path.basename(run) == "distill.gin":  # the one run that needs a teacher named
        bindings.append("TEACHER = '/teacher'")
    gin_utils.parse([run, "models/tiny.gin"], bindings)
    model = gin_utils.macro("MODEL")
    assert jax.tree.leaves(model.abstract_variables())
    configured = gin_utils.configured(train_loop.train)
    assert callable(configured)
    for key in ("data", "train_steps", "loss", "optimizer"):
        assert gin.query_parameter(f"train_loop.train.{key}") is not None
    for key in ("batch_size", "query_len", "doc_len"):
        assert gin.query_parameter(f"pipeline.DataConfig.{key}") is not None


def test_distill_settings_register_after_a_run_has_locked_gin():
    """A `distill` job after a training run in the same process (gin finalized, so locked)."""
    import argparse

    gin_utils.parse(["models/tiny.gin"])
    try:
        assert gin.config_is_locked()
        generate, rerank, filter_ = cli._distill_configs(
            argparse.Namespace(gin_file=[], action="generate"), []
        )
        assert (
            generate().seed == 0 and rerank().rrf_k == 60 and filter_(keep_fraction=0.5).keep_fraction == 0.5
        )
    finally:
        gin.clear_config()
