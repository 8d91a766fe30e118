"""The tpu/ scripts and scripts/device_check.sh: the commands they would run, and how they fail.

Nothing here reaches Google Cloud. Dry runs print each command shell-quoted on a
line; a fake `gcloud` on PATH records every call and plays back slice states and
run exit statuses, so the preemption loop runs for real against it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# The scripts run as bash processes (against a fake gcloud).
pytestmark = pytest.mark.subprocess

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "tpu"
TRAIN_FILES = "--gin.TRAIN_FILES=['/tmp/embedder-data/train.jsonl']"
TINY_RUN = ["--gin_file=gin/runs/finetune.gin", "--gin_file=gin/models/tiny.gin", TRAIN_FILES]
REMOTE_RUN = "$HOME/embedder/tpu/worker_run.sh"

FAKE_GCLOUD = """\
#!{python}
import json, os, sys

state_dir = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(state_dir, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")


def pop(name, default):
    path = os.path.join(state_dir, name)
    lines = open(path).read().split() if os.path.exists(path) else []
    if not lines:
        return default
    with open(path, "w") as f:
        f.write("\\n".join(lines[1:]))
    return lines[0]


if "describe" in args:
    state = pop("states", "READY")
    if state == "NOT_FOUND":
        print("ERROR: (gcloud) NOT_FOUND: Resource 'nodes/x' was not found", file=sys.stderr)
        sys.exit(1)
    print(state)
elif "ssh" in args and any("worker_run.sh" in a for a in args):
    sys.exit(int(pop("run_status", "0")))
"""


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp_path))
    env.update(extra)
    return env


def _run(script: Path, *args: str, env: dict[str, str], cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def _dry(name: str, *args: str, tmp_path: Path, **env: str) -> list[list[str]]:
    """The commands a tpu/ script prints under --dry-run, each split as a shell would."""
    proc = _run(TPU / name, "--dry-run", *args, env=_env(tmp_path, **env))
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines()]


def _remote(command: list[str]) -> list[str]:
    """The remote command of a `gcloud ... ssh --command=...` line, split as the worker's shell would."""
    (value,) = [a.split("=", 1)[1] for a in command if a.startswith("--command=")]
    return shlex.split(value)


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` first on PATH that records its calls; states / run statuses are queued in files."""
    bin_dir, state_dir = tmp_path / "bin", tmp_path / "gcloud-state"
    bin_dir.mkdir()
    state_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)

    class Fake:
        env = _env(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_GCLOUD_DIR=str(state_dir))

        @staticmethod
        def queue(name: str, *values: str) -> None:
            (state_dir / name).write_text("\n".join(values))

        @staticmethod
        def calls() -> list[list[str]]:
            path = state_dir / "calls.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    return Fake


@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory):
    """A small committed git checkout holding tpu/, gin/ and the embedder package (for setup and the loop)."""
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(TPU, root / "tpu")
    shutil.copytree(REPO / "gin", root / "gin")
    shutil.copytree(REPO / "embedder", root / "embedder", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "setup.py", root / "setup.py")
    shutil.copy(REPO / "constraints.txt", root / "constraints.txt")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(root)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "scratch"], check=True)
    sha = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    return root, sha


# ------------------------------------------------------------------ lint


def test_shellcheck_passes_on_every_script():
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI"):
            pytest.fail("shellcheck is not installed (.ci/run installs it from Debian's packages)")
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    scripts = sorted(str(p.relative_to(REPO)) for p in [*TPU.glob("*.sh"), *(REPO / "scripts").glob("*.sh")])
    scripts.append(".ci/run")
    assert "tpu/run_until_done.sh" in scripts and "scripts/device_check.sh" in scripts
    proc = subprocess.run(["shellcheck", "-x", *scripts], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ every script has --dry-run

DRY_RUN_ARGS = {
    "create.sh": ["--accelerator=v4-32"],
    "setup.sh": ["--bucket=bk", "--allow-dirty"],
    "run.sh": ["--bucket=bk", "--skip-check", "--", *TINY_RUN],
    "run_until_done.sh": ["--bucket=bk", "--allow-dirty", "--skip-check", "--", *TINY_RUN],
    "ssh.sh": [],
    "logs.sh": [],
    "tensorboard.sh": ["--bucket=bk"],
    "stop.sh": [],
    "delete.sh": [],
    "status.sh": [],
    "worker_setup.sh": [],
    "worker_run.sh": ["--run=r", "--model-dir=gs://bk/r", "--", *TINY_RUN],
}


def test_every_tpu_script_is_covered_here():
    assert sorted(p.name for p in TPU.glob("*.sh") if not p.name.startswith("_")) == sorted(DRY_RUN_ARGS)


@pytest.mark.parametrize("name", sorted(DRY_RUN_ARGS))
def test_dry_run_prints_commands_and_runs_nothing(name, fake_gcloud):
    env = {**fake_gcloud.env, "TPU_WORKER_ID": "0", "HOME": str(Path(fake_gcloud.env["TMPDIR"]) / "home")}
    proc = _run(TPU / name, "--dry-run", *DRY_RUN_ARGS[name], env=env)
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(line) for line in proc.stdout.splitlines()]
    assert commands, "a dry run prints the commands it would run"
    known = {"gcloud", "git", "mkdir", "python3", "$HOME/.local/bin/uv", f"{env['HOME']}/.local/bin/uv"}
    for command in commands:
        assert command[0] in known or command[0].endswith(("/python", "/embedder", "/uv")), command
    assert fake_gcloud.calls() == []
    if name == "worker_setup.sh":  # every host installs the jax the suite is tested with
        (pin,) = [
            line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("jax==")
        ]
        assert f"jax[tpu]=={pin.split('==')[1]}" in [arg for command in commands for arg in command]
    usage = _run(TPU / name, "--help", env=env)
    assert usage.returncode == 0 and ("--dry-run" in usage.stdout or "tpu/_lib.sh" in usage.stdout)


# ------------------------------------------------------------------ create


def test_create_commands(tmp_path):
    (create,) = _dry("create.sh", "--accelerator=v4-32", "--spot", "--project=proj", tmp_path=tmp_path)
    assert create == [
        *"gcloud compute tpus tpu-vm create embedder-v4-32".split(),
        "--zone=us-central2-b",
        "--project=proj",
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--spot",
    ]
    # v5e is v5litepod in gcloud; a queued resource names its node.
    (queued,) = _dry(
        "create.sh", "--accelerator=v5e-16", "--queued", "--spot", "--name=pod", tmp_path=tmp_path
    )
    assert queued == [
        *"gcloud compute tpus queued-resources create pod".split(),
        "--zone=us-west4-a",
        "--node-id=pod",
        "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
        "--spot",
    ]
    # Settings from the environment; a flag wins over its variable.
    (from_env,) = _dry(
        "create.sh",
        "--zone=europe-west4-a",
        tmp_path=tmp_path,
        TPU_ACCELERATOR="v5p-128",
        TPU_ZONE="us-east5-a",
        TPU_PROJECT="p2",
        TPU_NAME="big",
        TPU_PREEMPTIBLE="1",
        TPU_RESERVED="1",
        TPU_RUNTIME_VERSION="v2-alpha-tpuv5-custom",
    )
    assert from_env == [
        *"gcloud compute tpus tpu-vm create big".split(),
        "--zone=europe-west4-a",
        "--project=p2",
        "--accelerator-type=v5p-128",
        "--version=v2-alpha-tpuv5-custom",
        "--preemptible",
        "--reserved",
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--accelerator=v5e-12"], "unknown accelerator type 'v5e-12': v5e slices come in sizes"),
        (["--accelerator=v9-8"], "unknown accelerator type 'v9-8'"),
        (["--accelerator=tpu"], "unknown accelerator type 'tpu'"),
        (["--spot", "--preemptible"], "--spot and --preemptible exclude each other"),
        (["--queued", "--preemptible"], "a queued resource takes --spot"),
        (["--name=My_TPU"], "--name=My_TPU: a TPU name is lowercase"),
        (["--zone"], "--zone needs a value"),
        (["--frobnicate"], "unknown flag --frobnicate"),
        (
            ["--accelerator=v4-32", "--", *TINY_RUN, "--gin.partitioning.MeshConfig.fsdp=3"],
            "does not fit v4-32: v4-32 (16 chips): MeshConfig(-1, 3, 1): the fixed axes (3 devices) "
            "do not divide the 16 available devices",
        ),
    ],
    ids=[
        "size",
        "generation",
        "garbage",
        "spot-preemptible",
        "queued-preemptible",
        "name",
        "no-value",
        "flag",
        "mesh",
    ],
)
@pytest.mark.slow
def test_misconfiguration_is_an_error_before_anything_is_created(args, message, fake_gcloud):
    proc = _run(TPU / "create.sh", *args, env=fake_gcloud.env)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stderr.startswith("create.sh: error: ")
    assert fake_gcloud.calls() == []


# ------------------------------------------------------------------ setup and run


def test_setup_ships_the_commit_to_every_worker(scratch_repo, fake_gcloud, tmp_path):
    root, sha = scratch_repo
    proc = _run(
        root / "tpu/setup.sh", "--dry-run", "--accelerator=v4-32", "--bucket=gs://bk/", env=fake_gcloud.env
    )
    assert proc.returncode == 0, proc.stderr
    archive, upload, ssh = (shlex.split(line) for line in proc.stdout.splitlines())
    tarball = f"{tmp_path}/embedder-{sha}.tar.gz"
    assert archive == ["git", "-C", str(root), "archive", "--format=tar.gz", f"--output={tarball}", sha]
    assert upload == ["gcloud", "storage", "cp", tarball, f"gs://bk/embedder/code/embedder-{sha}.tar.gz"]
    assert ssh[:6] == "gcloud compute tpus tpu-vm ssh".split() + ["embedder-v4-32"]
    assert "--worker=all" in ssh and "--zone=us-central2-b" in ssh
    remote = " ".join(_remote(ssh))
    assert f"gcloud storage cp gs://bk/embedder/code/embedder-{sha}.tar.gz /tmp/embedder.tar.gz;" in remote
    assert f"echo {sha} > $HOME/embedder.new/COMMIT;" in remote
    assert remote.endswith("bash $HOME/embedder/tpu/worker_setup.sh")

    # A changed tracked file: refused (the workers run a commit) unless --allow-dirty.
    (root / "gin/mesh/cpu.gin").write_text("# changed\n")
    try:
        refused = _run(root / "tpu/setup.sh", "--bucket=bk", env=fake_gcloud.env)
        assert refused.returncode == 2 and "uncommitted changes" in refused.stderr
        assert fake_gcloud.calls() == []
        allowed = _run(
            root / "tpu/setup.sh", "--dry-run", "--bucket=bk", "--allow-dirty", env=fake_gcloud.env
        )
        assert allowed.returncode == 0 and sha in allowed.stdout and "not shipped" in allowed.stderr
    finally:
        subprocess.run(["git", "-C", str(root), "checkout", "-q", "--", "gin/mesh/cpu.gin"], check=True)


def test_run_starts_the_experiment_on_all_workers(tmp_path):
    sha = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    (ssh,) = _dry(
        "run.sh",
        "--accelerator=v5e-16",
        "--bucket=bk",
        "--run=r1",
        "--data=gs://bk/data",
        "--skip-check",
        "--",
        *TINY_RUN,
        tmp_path=tmp_path,
    )
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "embedder-v5e-16"]
    assert "--worker=all" in ssh and "--zone=us-west4-a" in ssh
    assert _remote(ssh) == [
        "bash",
        REMOTE_RUN,
        "--run=r1",
        "--model-dir=gs://bk/embedder/runs/r1",
        f"--expect-commit={sha}",
        "--data=gs://bk/data",
        "--detach",
        "--",
        *TINY_RUN,
        "--gin_file=gin/mesh/v5e-16.gin",  # the slice's mesh file, last
    ]
    # --foreground waits for the run; a run naming its own mesh file keeps it.
    (ssh,) = _dry(
        "run.sh",
        "--bucket=bk",
        "--foreground",
        "--skip-check",
        "--",
        *TINY_RUN,
        "--gin_file=gin/mesh/cpu.gin",
        tmp_path=tmp_path,
    )
    remote = _remote(ssh)
    assert "--detach" not in remote and remote[-1] == "--gin_file=gin/mesh/cpu.gin"
    assert "--model-dir=gs://bk/embedder/runs/embedder-v4-8" in remote


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "no bucket"),
        (["--bucket=bk"], "no training flags"),
        (["--bucket=bk", "--", *TINY_RUN, "--model_dir=/tmp/x"], "give --run=RUN"),
        (["--bucket=bk", "--", *TINY_RUN, "--num_processes=4"], "leave the multi-host flags out"),
        (
            ["--bucket=bk", "--mesh=gin/mesh/nope.gin", "--", *TINY_RUN],
            "--mesh=gin/mesh/nope.gin: no such file",
        ),
        (["--bucket=bk", "--mesh", "--", *TINY_RUN], "--mesh needs a value"),
        (["--bucket=bk", "--data=/home/me/data", "--", *TINY_RUN], "--data=/home/me/data: a gs:// folder"),
    ],
)
def test_run_refuses_bad_settings(args, message, fake_gcloud):
    proc = _run(TPU / "run.sh", *args, env=fake_gcloud.env)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert fake_gcloud.calls() == []


@pytest.mark.slow
def test_run_checks_the_batch_against_the_slice_first(fake_gcloud):
    proc = _run(
        TPU / "run.sh",
        "--accelerator=v5e-16",
        "--bucket=bk",
        "--",
        *TINY_RUN,
        "--gin.BATCH_SIZE=24",
        env=fake_gcloud.env,
    )
    assert proc.returncode == 2
    assert (
        "run.sh: error: the run does not fit v5e-16: v5e-16: global batch 24 is not divisible by the data-parallel size 16"
        in proc.stderr
    )
    assert fake_gcloud.calls() == []


def test_other_commands(tmp_path):
    common = ["--name=pod", "--zone=z1", "--bucket=bk", "--run=r1"]
    (ssh,) = _dry("ssh.sh", *common, "--worker=2", tmp_path=tmp_path)
    assert ssh == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "pod",
        "--zone=z1",
        "--worker=2",
        "--strict-host-key-checking=no",
    ]
    (ssh,) = _dry("ssh.sh", *common, "--worker=all", "--", "tail -n 3 ~/r/*.log", "| wc", tmp_path=tmp_path)
    assert "--worker=all" in ssh and ssh[-1] == "--command=tail -n 3 ~/r/*.log | wc"  # joined, as ssh does
    (tail,) = _dry("logs.sh", *common, "--worker=3", "--lines=50", tmp_path=tmp_path)
    assert "--worker=3" in tail and _remote(tail) == [
        "tail",
        "-n",
        "50",
        "-F",
        "embedder-runs/r1/worker-*.log",
    ]
    mkdir, scp = _dry("logs.sh", *common, "--gather", tmp_path=tmp_path)
    assert mkdir == ["mkdir", "-p", "logs/r1"]
    assert scp == [
        *"gcloud compute tpus tpu-vm scp pod:embedder-runs/r1/worker-*.log logs/r1/".split(),
        "--zone=z1",
        "--worker=all",
        "--strict-host-key-checking=no",
    ]
    _, from_gcs = _dry("logs.sh", *common, "--gather=out", "--from-gcs", tmp_path=tmp_path)
    assert from_gcs == ["gcloud", "storage", "cp", "gs://bk/embedder/runs/r1/logs/*", "out/"]
    (board,) = _dry("tensorboard.sh", *common, "--port=7007", tmp_path=tmp_path)
    assert "--worker=0" in board and "--ssh-flag=-L 7007:localhost:7007" in board
    assert _remote(board) == [
        "$HOME/embedder-venv/bin/tensorboard",
        "--logdir=gs://bk/embedder/runs/r1/tensorboard",
        "--port=7007",
        "--host=localhost",
    ]
    (stop,) = _dry("stop.sh", *common, tmp_path=tmp_path)
    assert "--worker=all" in stop and _remote(stop) == ["bash", REMOTE_RUN, "--run=r1", "--stop"]
    (delete,) = _dry("delete.sh", *common, "--yes", tmp_path=tmp_path)
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", "--zone=z1", "--quiet"]
    (delete,) = _dry("delete.sh", *common, "--queued", tmp_path=tmp_path)
    assert delete == [
        "gcloud",
        "compute",
        "tpus",
        "queued-resources",
        "delete",
        "pod",
        "--zone=z1",
        "--force",
    ]


# ------------------------------------------------------------------ the preemption loop


def _verbs(calls: list[list[str]]) -> list[str]:
    """Each gcloud call as one word: describe, delete, create, upload, setup, run."""
    verbs = []
    for call in calls:
        if call[:2] == ["storage", "cp"]:
            verbs.append("upload")
        elif "ssh" in call:
            verbs.append("run" if any("worker_run.sh" in a for a in call) else "setup")
        else:
            verbs.append(call[3])
    return verbs


def _loop(root: Path, fake, *args: str) -> subprocess.CompletedProcess:
    return _run(
        root / "tpu/run_until_done.sh",
        "--bucket=bk",
        "--run=r1",
        "--poll-seconds=0",
        "--skip-check",
        *args,
        "--",
        *TINY_RUN,
        env=fake.env,
        cwd=root,
    )


def test_loop_recreates_a_preempted_slice_and_runs_again(scratch_repo, fake_gcloud):
    root, sha = scratch_repo
    # READY; the run's ssh dies (255) as the slice is preempted; PREEMPTED; after
    # recreation READY again; the rerun trains to the end.
    fake_gcloud.queue("states", "READY", "PREEMPTED", "READY")
    fake_gcloud.queue("run_status", "255", "0")
    proc = _loop(root, fake_gcloud, "--accelerator=v4-32", "--spot")
    assert proc.returncode == 0, proc.stderr
    calls = fake_gcloud.calls()
    assert _verbs(calls) == [
        "describe", "upload", "setup", "run",  # first pass
        "describe", "delete", "create",  # preempted: recreate
        "describe", "upload", "setup", "run",  # install again, run again
    ]  # fmt: skip
    describe, delete, create = calls[0], calls[5], calls[6]
    assert describe == [
        *"compute tpus tpu-vm describe embedder-v4-32 --zone=us-central2-b".split(),
        "--format=value(state)",
    ]
    assert delete == [*"compute tpus tpu-vm delete embedder-v4-32 --zone=us-central2-b --quiet".split()]
    assert create == [
        *"compute tpus tpu-vm create embedder-v4-32 --zone=us-central2-b".split(),
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--spot",
    ]
    first_run, second_run = calls[3], calls[10]
    assert "--worker=all" in first_run
    # The same command both times: same model dir on GCS, so the rerun resumes from its checkpoint.
    assert first_run == second_run
    remote = _remote(first_run)
    assert remote[:5] == [
        "bash",
        REMOTE_RUN,
        "--run=r1",
        "--model-dir=gs://bk/embedder/runs/r1",
        f"--expect-commit={sha}",
    ]
    assert "--detach" not in remote
    assert "is PREEMPTED: deleting it and creating it again" in proc.stderr


def test_loop_with_a_queued_resource(scratch_repo, fake_gcloud):
    root, _ = scratch_repo
    fake_gcloud.queue("states", "ACTIVE", "SUSPENDED", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE")
    fake_gcloud.queue("run_status", "75", "0")  # SIGTERM'd by the preemption: saved, exited 75
    proc = _loop(root, fake_gcloud, "--accelerator=v5e-16", "--queued", "--spot")
    assert proc.returncode == 0, proc.stderr
    calls = fake_gcloud.calls()
    assert _verbs(calls) == [
        "describe", "upload", "setup", "run",
        "describe", "delete", "create",
        "describe", "describe",  # waiting for capacity
        "describe", "upload", "setup", "run",
    ]  # fmt: skip
    assert calls[0][:4] == ["compute", "tpus", "queued-resources", "describe"]
    assert "--format=value(state.state)" in calls[0]
    assert calls[5] == [
        *"compute tpus queued-resources delete embedder-v5e-16 --zone=us-west4-a --force --quiet".split()
    ]
    assert calls[6] == [
        *"compute tpus queued-resources create embedder-v5e-16 --zone=us-west4-a --node-id=embedder-v5e-16".split(),
        "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
        "--spot",
    ]


def test_loop_creates_a_missing_slice(scratch_repo, fake_gcloud):
    root, _ = scratch_repo
    fake_gcloud.queue("states", "NOT_FOUND", "CREATING", "READY")
    proc = _loop(root, fake_gcloud, "--no-setup")
    assert proc.returncode == 0, proc.stderr
    # Created, so installed even with --no-setup (a new slice holds no code).
    assert _verbs(fake_gcloud.calls()) == [
        "describe",
        "create",
        "describe",
        "describe",
        "upload",
        "setup",
        "run",
    ]


def test_loop_gives_up_after_failures_on_a_healthy_slice(scratch_repo, fake_gcloud):
    root, _ = scratch_repo
    fake_gcloud.queue("states", *["READY"] * 10)
    fake_gcloud.queue("run_status", "1", "1", "1")
    proc = _loop(root, fake_gcloud, "--max-failures=2", "--no-setup")
    assert proc.returncode == 2
    assert "failed 2 times in a row" in proc.stderr
    assert _verbs(fake_gcloud.calls()) == ["describe", "run", "describe", "run", "describe"]


def test_loop_ends_when_the_run_is_stopped(scratch_repo, fake_gcloud):
    root, _ = scratch_repo
    fake_gcloud.queue("states", "READY")
    fake_gcloud.queue("run_status", "76")
    proc = _loop(root, fake_gcloud, "--no-setup")
    assert proc.returncode == 76 and "was stopped" in proc.stderr
    assert _verbs(fake_gcloud.calls()) == ["describe", "run"]


def test_loop_dry_run_prints_one_pass(tmp_path):
    commands = _dry(
        "run_until_done.sh",
        "--accelerator=v4-8",
        "--bucket=bk",
        "--allow-dirty",
        "--skip-check",
        "--",
        *TINY_RUN,
        tmp_path=tmp_path,
    )
    assert [c[:5] for c in commands] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create"],
        ["git", "-C", str(REPO), "archive", "--format=tar.gz"],
        ["gcloud", "storage", "cp", commands[1][5].split("=", 1)[1], commands[2][4]],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
    ]
    assert _remote(commands[4])[-1] == "--gin_file=gin/mesh/v4-8.gin"


# ------------------------------------------------------------------ on the worker


@pytest.fixture
def worker(tmp_path):
    """A worker's home: ~/embedder (tpu/ and COMMIT), a fake trainer, a fake gcloud."""
    home = tmp_path / "home"
    shutil.copytree(TPU, home / "embedder" / "tpu")
    (home / "embedder" / "COMMIT").write_text("abc\n")
    trainer = home / "embedder-venv" / "bin" / "embedder"
    trainer.parent.mkdir(parents=True)
    trainer.write_text(
        textwrap.dedent(
            """\
            #!/usr/bin/env bash
            echo "args: $*"
            trap 'echo "stopped by SIGTERM at step 1; checkpoint: c/1"; exit 0' TERM
            for i in $(seq 1 "${FAKE_STEPS:-2}"); do echo "step $i"; sleep 0.1 & wait $!; done
            echo "trained to step ${FAKE_STEPS:-2}; checkpoint: c/2"
            """
        )
    )
    trainer.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text('#!/usr/bin/env bash\necho "gcloud $*" >> "$HOME/gcloud.log"\n')
    (bin_dir / "gcloud").chmod(0o755)
    env = _env(
        tmp_path,
        HOME=str(home),
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        TPU_WORKER_ID="0",
        WORKER_POLL_SECONDS="0.1",
    )
    script = home / "embedder" / "tpu" / "worker_run.sh"
    args = ["--run=r1", "--model-dir=gs://bk/r1", "--expect-commit=abc", "--", "--gin_file=x"]

    def start(*extra: str, steps: int = 2) -> subprocess.Popen:
        return subprocess.Popen(
            ["bash", str(script), *extra, *args],
            env={**env, "FAKE_STEPS": str(steps)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_for_trainer() -> None:
        for _ in range(100):
            if (home / "embedder-runs/r1/trainer.pid").exists():
                return
            time.sleep(0.05)
        raise AssertionError("the trainer did not start")

    start.home, start.env, start.script, start.wait_for_trainer = home, env, script, wait_for_trainer
    return start


def test_worker_run_trains_and_logs(worker):
    proc = worker(steps=5)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "args: train --gin_file=x --model_dir=gs://bk/r1" in out  # worker 0 streams the log
    log = (worker.home / "embedder-runs/r1/worker-0.log").read_text()
    assert "trained to step 5" in log and "commit abc" in log
    assert "gcloud storage cp" in (worker.home / "gcloud.log").read_text()
    assert "logs/worker-0.log" in (worker.home / "gcloud.log").read_text()


def test_worker_run_stop_and_preemption_statuses(worker):
    first = worker(steps=200)
    worker.wait_for_trainer()
    # Started again while alive: attaches to the same run, no second trainer.
    second = worker(steps=200)
    time.sleep(0.3)
    stop = subprocess.run(
        ["bash", str(worker.script), "--run=r1", "--stop"], env=worker.env, capture_output=True, text=True
    )
    assert stop.returncode == 0 and "sent SIGTERM" in stop.stderr
    assert first.wait(timeout=30) == 76 and second.wait(timeout=30) == 76
    second_out = second.stdout.read()
    assert "already running" in second_out
    log = (worker.home / "embedder-runs/r1/worker-0.log").read_text()
    assert log.count("args: train") == 1

    # SIGTERM from outside (the VM shutting down): saved, status 75.
    third = worker(steps=200)
    worker.wait_for_trainer()
    time.sleep(0.2)
    os.kill(int((worker.home / "embedder-runs/r1/runner.pid").read_text()), signal.SIGTERM)
    assert third.wait(timeout=30) == 75


def test_worker_run_refuses_another_commit(worker):
    (worker.home / "embedder" / "COMMIT").write_text("def\n")
    proc = worker()
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3 and "holds commit def, not abc: run tpu/setup.sh" in out


# ------------------------------------------------------------------ GPU device check

DEVICE_CHECK = REPO / "scripts" / "device_check.sh"


def test_device_check_dry_run(tmp_path):
    proc = _run(
        DEVICE_CHECK, "--dry-run", "--work-dir=/w", "--steps=60", "--batch-size=128", env=_env(tmp_path)
    )
    assert proc.returncode == 0, proc.stderr
    smi, jax_check, tests, data, train = (shlex.split(line) for line in proc.stdout.splitlines())
    assert smi[0] == "nvidia-smi"
    assert "jax.devices()" in jax_check[-1]
    assert tests[:2] == ["env", "JAX_DEFAULT_MATMUL_PRECISION=highest"]
    assert tests[-3:] == ["tests/test_models.py", "tests/test_losses.py", "tests/test_gradcache.py"]
    assert data[1:] == ["-m", "embedder.data.stdlib_pairs", "--output_dir", "/w/data"]
    assert train[1:5] == ["-m", "embedder", "train", "--gin_file=gin/runs/quickstart.gin"]
    for flag in [
        "--gin.TRAIN_STEPS=60",
        "--gin.BATCH_SIZE=128",
        "--gin.train_loop.train.log_every=20",
        "--gin.transformer.TransformerConfig.dtype='bfloat16'",
        "--model_dir=/w/model",
    ]:
        assert flag in train


def test_device_check_cpu_jax_stage_prints_the_table(tmp_path):
    proc = _run(
        DEVICE_CHECK, "--platform=cpu", "--stages=gpu,jax", f"--work-dir={tmp_path}", env=_env(tmp_path)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[1].startswith("stage  result") and lines[-1].startswith("total")
    (jax_row,) = [line for line in lines if line.startswith("jax ")]
    assert jax_row.split()[1] == "ok" and "cpu device(s)" in jax_row


def test_device_check_reports_a_backend_jax_cannot_see(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("a machine with a GPU: run the device check itself")
    proc = _run(
        DEVICE_CHECK, "--platform=cuda", "--stages=jax,tests", f"--work-dir={tmp_path}", env=_env(tmp_path)
    )
    assert proc.returncode == 1
    rows = {line.split()[0]: line for line in proc.stdout.splitlines() if line.split()}
    assert rows["jax"].split()[1] == "FAIL" and "JAX_PLATFORMS=cuda" in rows["jax"]
    assert rows["tests"].split()[1] == "skipped"


@pytest.mark.parametrize(
    "arg", ["--steps=2", "--batch-size=0", "--stages=bench", "--peak-tflops=lots", "--x"]
)
def test_device_check_bad_arguments(arg, tmp_path):
    proc = _run(DEVICE_CHECK, arg, env=_env(tmp_path))
    assert proc.returncode == 2 and "device_check.sh: error:" in proc.stderr
