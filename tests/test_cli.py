"""The `embedder` command and the gin model files."""

import glob
import os

import jax
import numpy as np
import pytest

import gin
from embedder import cli, gin_utils
from embedder.models import spec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "gin", "models", "*.gin"))))
def test_every_model_gin_file_builds_abstractly(path):
    gin_utils.parse([path])
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

    gin_utils.parse([run, "models/tiny.gin"], ["TRAIN_FILES = ['x.jsonl']"])
    model = gin_utils.macro("MODEL")
    assert jax.tree.leaves(model.abstract_variables())
    configured = gin_utils.configured(train_loop.train)
    assert callable(configured)
    for key in ("data", "train_steps", "loss", "optimizer"):
        assert gin.query_parameter(f"train_loop.train.{key}") is not None
    for key in ("batch_size", "query_len", "doc_len"):
        assert gin.query_parameter(f"pipeline.DataConfig.{key}") is not None
