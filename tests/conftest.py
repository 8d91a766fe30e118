"""Test set-up and shared fixtures.

8 fake CPU devices, set before jax is imported anywhere; one compile cache per
session; the stdlib docstring -> code pairs built once per session and written
as JSONL files; the tiny-model train helper (`training_helpers.train_tiny`).

Tiers (markers registered in pyproject.toml): `subprocess` marks tests that start
other processes (the `embedder` command, two-process runs, shell scripts), `slow`
marks the rest of the tests over ~5 s. The fast tier is
`pytest -m "not slow and not subprocess"`.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Training runs and CLI commands build their jitted functions afresh on every call,
# so the same program is compiled again and again across tests, and again in every
# `embedder` subprocess a test starts. XLA's persistent cache, in a folder of this
# session only (empty at the start, removed at the end) and named in the environment
# so the subprocesses share it, hands back the executable already compiled for an
# identical program; tracing and lowering still happen, so compile logs and
# per-shape counts are unchanged.
_COMPILE_CACHE = tempfile.mkdtemp(prefix="embedder-tests-xla-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _COMPILE_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

import jax  # noqa: E402, F401  (after the flags above)


@pytest.fixture(scope="session")
def stdlib_splits() -> dict:
    """The real stdlib docstring -> code pairs of every split, built once per session."""
    from embedder.data import stdlib_pairs

    return {split: stdlib_pairs.build_pairs(split) for split in stdlib_pairs.SPLITS}


@pytest.fixture(scope="session")
def stdlib_jsonl(stdlib_splits, tmp_path_factory):
    """`stdlib_jsonl(split, count)`: the path of a JSONL file of the split's first `count` pairs.

    Each file is written once per session into one folder and shared by every test that asks.
    """
    from embedder.data import jsonl

    folder = tmp_path_factory.mktemp("stdlib_pairs")

    def write(split: str, count: int) -> str:
        path = folder / f"{split}_{count}.jsonl"
        if not path.exists():
            jsonl.write_jsonl(str(path), stdlib_splits[split][:count])
        return str(path)

    return write


@pytest.fixture(scope="session")
def train_file(stdlib_jsonl) -> str:
    """Real docstring -> code pairs: the first 400 of the stdlib train split."""
    return stdlib_jsonl("train", 400)


@pytest.fixture(scope="session")
def train_tiny():
    """The tiny-model train helper (`training_helpers.train_tiny`)."""
    from tests import training_helpers

    return training_helpers.train_tiny


def pytest_collection_modifyitems(config, items):
    """Files with the most slow / subprocess tests run first; the order inside a file is kept.

    scripts/test.sh spreads whole files over two workers (`-n 2 --dist loadfile`), which
    hand out files in collection order: starting the longest ones first keeps one worker
    from being left with a long file at the end while the other idles.
    """

    def heavy(item) -> bool:
        return (
            item.get_closest_marker("slow") is not None or item.get_closest_marker("subprocess") is not None
        )

    weight: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        path = str(item.path)
        weight[path] = weight.get(path, 0) + heavy(item)
        first.setdefault(path, index)
    items.sort(key=lambda item: (-weight[str(item.path)], first[str(item.path)]))
