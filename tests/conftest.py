"""Test set-up and shared fixtures.

8 fake CPU devices, set before jax is imported anywhere; the stdlib docstring ->
code pairs built once per session and written as JSONL files; the tiny-model
train helper (`training_helpers.train_tiny`). No persistent XLA compile cache:
with it, in-process training runs aborted inside XLA now and then.

XLA's backend (LLVM) runs at optimisation level 0 (`TEST_XLA_FLAGS`): the
suite's programs are tiny, so compiling them is most of their time, and level 0
compiles a tiny train step about 3x faster (23 s -> 8 s on the 2-core machine).
HLO optimisation and every numeric rule are unchanged; processes the tests start
inherit the flags, so in-process and subprocess results come from the same code.

Tiers (markers registered in pyproject.toml): `subprocess` marks tests that start
other processes (the `embedder` command, two-process runs, shell scripts), `slow`
marks the rest of the tests over ~5 s, and every test that asks for one of its
module's `SLOW_FIXTURES` (a module-scoped trained model or export that takes
longer than the tests using it). The fast tier is
`pytest -m "not slow and not subprocess"`.
"""

import os

import pytest

TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS, "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Tests needing a module's `SLOW_FIXTURES` are marked slow; files with the most
    slow / subprocess tests run first; the order inside a file is kept.

    scripts/test.sh spreads whole files over two workers (`-n 2 --dist loadfile`), which
    hand out files in collection order: starting the longest ones first keeps one worker
    from being left with a long file at the end while the other idles.
    """

    def heavy(item) -> bool:
        return (
            item.get_closest_marker("slow") is not None or item.get_closest_marker("subprocess") is not None
        )

    for item in items:
        slow_fixtures = getattr(item.module, "SLOW_FIXTURES", ())
        if any(name in slow_fixtures for name in getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    weight: dict[str, int] = {}
    first: dict[str, int] = {}
    for index, item in enumerate(items):
        path = str(item.path)
        weight[path] = weight.get(path, 0) + heavy(item)
        first.setdefault(path, index)
    items.sort(key=lambda item: (-weight[str(item.path)], first[str(item.path)]))
