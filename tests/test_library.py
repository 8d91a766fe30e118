"""embedder as a library: package gin files, no TensorFlow on the JSONL path, portable
model dirs, a quiet console, the Python API and a non-editable install (issue 20)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from embedder import api, checkpointing, cli, console, gin_utils, portable
from embedder.errors import ConfigError
from embedder.models import pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_DIR = os.path.join(REPO, "gin")
# The environment of a command-line run: offline, and no TF_CPP_MIN_LOG_LEVEL (the console quiets itself).
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONPATH")},
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
# Start-up lines of TensorFlow / XLA / jax that must not reach the console by default.
STARTUP_NOISE = re.compile(
    r"Could not find cuda drivers|cuInit|absl::InitializeLog|oneDNN custom operations|"
    r"An NVIDIA GPU may be present|cpu_feature_guard"
)


def _pairs(path, n=16):
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(
                json.dumps({"query": f"what is item {i}?", "positive": f"item {i} is thing number {i}"})
                + "\n"
            )
    return str(path)


def _gin_files(folder: str) -> set[str]:
    return {
        os.path.relpath(os.path.join(root, name), folder)
        for root, _, names in os.walk(folder)
        for name in names
        if name.endswith(".gin")
    }


# ---------------------------------------------------------------- gin files


def test_package_gin_files_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for relative in sorted(_gin_files(GIN_DIR)):
        found = gin_utils._resolve(relative, [])
        with open(found, encoding="utf-8") as a, open(os.path.join(GIN_DIR, relative), encoding="utf-8") as b:
            assert a.read() == b.read(), relative
    # A repository path works from the repository too.
    monkeypatch.chdir(REPO)
    assert gin_utils._resolve("gin/models/tiny.gin", []) == os.path.join(GIN_DIR, "models", "tiny.gin")
    monkeypatch.chdir(tmp_path)
    gin_utils.parse(["runs/finetune.gin", "models/tiny.gin", "mesh/cpu.gin"], ["TRAIN_FILES = ['x.jsonl']"])
    assert gin_utils.macro("TRAIN_FILES") == ["x.jsonl"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_wheel_ships_every_gin_file(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            REPO,
        ],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as z:
        shipped = {n[len("embedder/gin/") :] for n in z.namelist() if n.startswith("embedder/gin/")}
    assert shipped == _gin_files(GIN_DIR)


# ---------------------------------------------------------------- flags


def test_t5x_gin_flags_parse_as_bindings_and_model_dir():
    rest, bindings = cli._split_gin_bindings(
        [
            "train",
            "--gin.TRAIN_STEPS=5",
            "--gin_bindings=BATCH_SIZE = 4",
            "--gin_bindings",
            "SEED=3",
            "--gin.MODEL_DIR='/runs/a'",
            "--gin_file=models/tiny.gin",
        ]
    )
    assert rest == ["train", "--model_dir=/runs/a", "--gin_file=models/tiny.gin"]
    assert bindings == ["TRAIN_STEPS = 5", "BATCH_SIZE = 4", "SEED=3"]
    assert cli._split_gin_bindings(["--gin.MODEL_DIR=/runs/b"])[0] == ["--model_dir=/runs/b"]


def test_verbosity_flag_is_taken_from_any_position():
    assert cli._split_verbosity(["train", "--verbosity=1", "--model_dir=x"]) == (
        ["train", "--model_dir=x"],
        1,
    )
    assert cli._split_verbosity(["encode", "--verbosity", "2"]) == (["encode"], 2)
    assert cli._split_verbosity(["encode"]) == (["encode"], 0)
    with pytest.raises(SystemExit, match="--verbosity takes an integer"):
        cli._split_verbosity(["encode", "--verbosity=loud"])


# ---------------------------------------------------------------- console


_NOISY_SCRIPT = """
import os, sys
from embedder import console
with console.quiet_stderr(int(sys.argv[1])):
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\\n")
    os.write(2, b"I0000 00:00:1796248656.547837    2521 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\\n")
    os.write(2, b"E0000 00:00:1796248667.725401    2521 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\\n")
    os.write(2, b"\\rtrain:  50%|#####     | 1/2")
    os.write(2, b"\\rtrain: 100%|##########| 2/2\\n")
    print("Warning: a real one", file=sys.stderr, flush=True)
    os.write(2, b"E0000 00:00:1.0    1 checkpoint.cc:10] disk full\\n")
print("done")
"""


def test_quiet_stderr_drops_only_the_startup_lines():
    env = {**ENV, "PYTHONPATH": REPO}
    # Bytes, not text: universal newlines would turn the progress bar's "\r" into "\n".
    quiet = subprocess.run(
        [sys.executable, "-c", _NOISY_SCRIPT, "0"], capture_output=True, env=env, check=True
    )
    assert quiet.stdout == b"done\n"
    assert quiet.stderr.decode() == (
        "\rtrain:  50%|#####     | 1/2\rtrain: 100%|##########| 2/2\n"
        "Warning: a real one\n"
        "E0000 00:00:1.0    1 checkpoint.cc:10] disk full\n"
    )
    loud = subprocess.run(
        [sys.executable, "-c", _NOISY_SCRIPT, "1"], capture_output=True, text=True, env=env, check=True
    )
    assert len(STARTUP_NOISE.findall(loud.stderr)) == 3 and "disk full" in loud.stderr


def test_noise_patterns_match_the_real_lines_and_nothing_else():
    assert console.is_noise(
        b"I0000 00:00:1796248656.546806    2521 port.cc:153] oneDNN custom operations are on."
    )
    assert console.is_noise(
        b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags."
    )
    assert not console.is_noise(b"embedder train: error: gin file 'x.gin' not found")
    assert not console.is_noise(b"trained to step 2; checkpoint: /tmp/run/checkpoints/2")


@pytest.mark.slow
@pytest.mark.subprocess
def test_tensorflow_start_up_lines_are_hidden_unless_verbose():
    script = "import sys\nfrom embedder import console\nwith console.quiet_stderr(int(sys.argv[1])):\n    import tensorflow as tf\n    tf.constant(1.0) + 1\n"
    env = {**ENV, "PYTHONPATH": REPO}
    quiet = subprocess.run(
        [sys.executable, "-c", script, "0"], capture_output=True, text=True, env=env, check=True
    )
    assert not STARTUP_NOISE.search(quiet.stderr), quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-c", script, "1"], capture_output=True, text=True, env=env, check=True
    )
    assert STARTUP_NOISE.search(loud.stderr), loud.stderr


# ---------------------------------------------------------------- Python API


def test_api_rejects_unknown_settings_and_models(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) \['temprature'\].*'temperature'"):
        api.train("tiny", [str(tmp_path / "x.jsonl")], model_dir=str(tmp_path / "run"), temprature=0.1)
    with pytest.raises(ConfigError, match="not a built-in name"):
        api.train(str(tmp_path), [str(tmp_path / "x.jsonl")], model_dir=str(tmp_path / "run"))


def _readme_python_example() -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)


@pytest.mark.subprocess
def test_readme_python_example_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _readme_python_example()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": REPO},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-2:] == [f"2 {tmp_path}/runs/tiny/checkpoints/2", "(1, 32)"]


# ---------------------------------------------------------------- portable model dirs


@pytest.mark.slow
def test_a_moved_model_dir_without_its_tokenizer_folder_still_works(tmp_path, monkeypatch, capsys):
    vocab = tmp_path / "vocab"
    shutil.copytree(
        pretrained.minilm_l6_v2_path(),
        vocab,
        ignore=shutil.ignore_patterns(
            "*.safetensors", "*.bin", "onnx", "openvino", "1_Pooling", "2_Normalize"
        ),
    )
    model_file = tmp_path / "model.gin"
    model_file.write_text(f"include 'models/tiny.gin'\nspec.ModelSpec.vocab_dir = '{vocab}'\n")
    monkeypatch.chdir(tmp_path)
    result = api.train(
        str(model_file),
        [_pairs(tmp_path / "train.jsonl")],
        model_dir="run",
        steps=2,
        batch_size=8,
        query_len=16,
        doc_len=16,
        num_negatives=0,
        mesh="cpu",
    )
    assert result.step == 2
    assert sorted(os.listdir(tmp_path / "run" / "tokenizer")) == sorted(
        n for n in os.listdir(vocab) if n in portable.TOKENIZER_FILES
    )
    from embedder import inference

    texts = ["what is item 3?", "item 7 is thing number 7"]
    before = inference.Embedder.from_pretrained("run").encode(texts, kind="query")
    shutil.rmtree(vocab)
    shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    meta = checkpointing.read_meta(checkpointing.resolve_step_dir(str(tmp_path / "moved")))
    assert meta.vocab_dir == str(tmp_path / "moved" / "tokenizer")

    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    with open(tmp_path / "scored.jsonl", "w") as f:
        for i in range(4):
            f.write(
                json.dumps({"sentence1": f"item {i}", "sentence2": f"thing {i}", "score": float(i)}) + "\n"
            )
    for argv in (
        ["encode", "--model=moved", "--input=texts.txt", "--output=moved.npy"],
        ["eval", "--model=moved", "--tasks=scored.jsonl", "--output=eval"],
        ["soup", "--checkpoints", "moved", "--method=uniform", "--output=soup"],
        ["export", "--model=soup", "--format=sentence-transformers", "--output=st"],
    ):
        assert cli.main(argv) == 0, (argv, capsys.readouterr().err)
    np.testing.assert_allclose(np.load(tmp_path / "moved.npy"), before, atol=1e-6)
    assert os.path.exists(tmp_path / "soup" / "tokenizer" / "vocab.txt")
    with open(tmp_path / "soup" / "checkpoints" / "2" / "meta" / "metadata") as f:
        assert json.load(f)["vocab_dir"] == "tokenizer"
    exported = inference.Embedder.from_pretrained(str(tmp_path / "st")).encode(texts, kind="query")
    np.testing.assert_allclose(exported, before, atol=1e-5)  # a soup of one checkpoint is that checkpoint


# ---------------------------------------------------------------- a non-editable install


_JSONL_PATH_SCRIPT = """
import sys
from embedder import cli
for argv in (
    ["train", "--gin_file=runs/finetune.gin", "--gin_file=models/tiny.gin", "--gin_file=mesh/cpu.gin",
     "--gin.TRAIN_FILES=['train.jsonl']", "--gin.TRAIN_STEPS=2", "--gin.BATCH_SIZE=8", "--gin.QUERY_LEN=16",
     "--gin.DOC_LEN=16", "--gin.NUM_NEGATIVES=0", "--model_dir=run2"],
    ["soup", "--checkpoints", "run2", "--method=uniform", "--output=soup"],
    ["export", "--model=soup", "--format=sentence-transformers", "--output=st2"],
    ["encode", "--model=st2", "--input=texts.txt", "--output=st2.npy"],
):
    assert cli.main(argv) == 0, argv
print("tensorflow loaded:", "tensorflow" in sys.modules)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh virtual environment over this one's packages, embedder installed into it non-editable."""
    import sysconfig

    root = tmp_path_factory.mktemp("venv")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=ENV)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        env=ENV,
        cwd=root,
    ).stdout.strip()
    # This environment's packages, after the new one's own (so its embedder is the installed copy).
    with open(os.path.join(site, "shared_packages.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*pip, "--no-build-isolation", REPO], check=True, capture_output=True, cwd=root, env=ENV)
    if subprocess.run([python, "-c", "import tensorboardX"], capture_output=True, env=ENV).returncode:
        subprocess.run([*pip, "tensorboardX==2.6.5"], check=True, capture_output=True, env=ENV)
    where = subprocess.run(
        [python, "-c", "import embedder; print(embedder.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        env=ENV,
        cwd=root,
    ).stdout
    assert where.startswith(site), where
    return venv


@pytest.mark.slow
@pytest.mark.subprocess
def test_installed_package_trains_exports_and_encodes_from_an_empty_directory(installed, tmp_path):
    work = tmp_path / "empty"
    work.mkdir()
    _pairs(work / "train.jsonl")
    (work / "texts.txt").write_text("what is item 3?\nitem 7 is thing number 7\n")
    embedder_cmd = str(installed / "bin" / "embedder")

    def run(*argv):
        proc = subprocess.run([embedder_cmd, *argv], cwd=work, capture_output=True, text=True, env=ENV)
        assert proc.returncode == 0, (argv, proc.stderr[-3000:])
        return proc

    train = run(
        "train",
        "--gin_file=runs/finetune.gin",
        "--gin_file=models/tiny.gin",
        "--gin_file=mesh/cpu.gin",
        "--gin.TRAIN_FILES=['train.jsonl']",
        "--gin.TRAIN_STEPS=2",
        "--gin.BATCH_SIZE=8",
        "--gin.QUERY_LEN=16",
        "--gin.DOC_LEN=16",
        "--gin.NUM_NEGATIVES=0",
        "--gin.MODEL_DIR='run'",
    )
    assert train.stdout.strip() == f"trained to step 2; checkpoint: {work}/run/checkpoints/2"
    assert "2/2" in train.stderr and not STARTUP_NOISE.search(train.stderr), train.stderr
    run("export", "--model=run", "--format=sentence-transformers", "--output=st")
    run("encode", "--model=run", "--input=texts.txt", "--output=run.npy")
    run("encode", "--model=st", "--input=texts.txt", "--output=st.npy")
    np.testing.assert_allclose(np.load(work / "st.npy"), np.load(work / "run.npy"), atol=1e-5)

    # The JSONL path never imports TensorFlow: train, soup, export and encode in one process.
    proc = subprocess.run(
        [installed / "bin" / "python", "-c", _JSONL_PATH_SCRIPT],
        cwd=work,
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "tensorflow loaded: False"
    assert not STARTUP_NOISE.search(proc.stderr), proc.stderr


# ---------------------------------------------------------------- object stores without TensorFlow


def test_urls_outside_tensorflow_go_through_fsspec():
    from embedder import fileio

    run = "memory://bucket/run"
    fileio.makedirs(run)
    fileio.write_json(f"{run}/results.json", {"ndcg@10": 0.5})
    with fileio.open_file(f"{run}/metrics.jsonl", "w") as f:
        f.write('{"step": 1}\n')
    assert sorted(fileio.listdir(run)) == ["metrics.jsonl", "results.json"]
    with fileio.open_file(f"{run}/results.json") as f:
        assert json.load(f) == {"ndcg@10": 0.5}
    fileio.remove(f"{run}/metrics.jsonl")
    assert not fileio.exists(f"{run}/metrics.jsonl") and fileio.isdir(run)
    with pytest.raises(FileNotFoundError):
        fileio.open_file(f"{run}/missing.json").read()


def test_gs_paths_without_tensorflow_or_gcsfs_name_the_extras():
    script = (
        "import sys\nsys.modules['tensorflow'] = None\nsys.modules['gcsfs'] = None\n"
        "from embedder import fileio\n"
        "try:\n    fileio.exists('gs://bucket/run')\nexcept OSError as e:\n    print(e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**ENV, "PYTHONPATH": REPO},
        check=True,
    )
    assert proc.stdout.startswith("gs://bucket/run: no filesystem for gs:// paths")
    assert "embedder[tf]" in proc.stdout and "embedder[gcs]" in proc.stdout
