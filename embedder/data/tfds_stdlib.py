"""TFDS builder `stdlib_code_search`: docstring -> code pairs from the local Python standard library.

The examples are those of `stdlib_pairs.build_records` (split by top-level module,
so the test modules are never seen in training; docstrings deduplicated across
splits). Nothing is downloaded: the builder reads the running interpreter's
standard library, so it prepares on a machine with no network at all.

Configs: `plain`, and `masked` (the harder variant: each function's own name in
its code is replaced by `func`). Each example has `query`, `positive`, `module`,
`path`, `line` and `name`.

    builder = prepare("/data/tfds", config="plain")   # builds once, then reuses
    ds = builder.as_dataset(split="train")

The pairs depend on the interpreter's version (its standard library); the
dataset's description records the version that built it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import platform

import numpy as np
import tensorflow_datasets as tfds

from embedder.data import stdlib_pairs
from embedder.errors import ConfigError

NAME = "stdlib_code_search"
CONFIGS = ("plain", "masked")


@dataclasses.dataclass
class StdlibCodeSearchConfig(tfds.core.BuilderConfig):
    """A `stdlib_code_search` variant.

    Attributes:
        mask_names: replace each function's name in its code by `func`.
    """

    mask_names: bool = False


class StdlibCodeSearch(tfds.core.GeneratorBasedBuilder):
    """Docstring -> code retrieval pairs from this interpreter's standard library.

    Args:
        stdlib_dir: the standard library folder; default: the running interpreter's.
        **kwargs: `tfds.core.GeneratorBasedBuilder` arguments (`data_dir`, `config`, ...).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Split by top-level module (md5 of its name), docstrings deduplicated."}
    BUILDER_CONFIGS = [
        StdlibCodeSearchConfig(name="plain", description="Code as written."),
        StdlibCodeSearchConfig(
            name="masked", mask_names=True, description="The function's own name in its code is `func`."
        ),
    ]
    DEFAULT_CONFIG_NAME = "plain"

    def __init__(self, *, stdlib_dir: str | None = None, **kwargs):
        self._stdlib_dir = stdlib_dir or stdlib_pairs.default_stdlib_dir()
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "Docstring -> code pairs from the Python standard library "
                f"(built with Python {platform.python_version()} from {self._stdlib_dir}); "
                "split by top-level module."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "query": tfds.features.Text(),
                    "positive": tfds.features.Text(),
                    "module": tfds.features.Text(),
                    "path": tfds.features.Text(),
                    "line": tfds.features.Scalar(dtype=np.int32),
                    "name": tfds.features.Text(),
                }
            ),
            supervised_keys=("query", "positive"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in stdlib_pairs.SPLITS}

    def _generate_examples(self, split: str):
        records = stdlib_pairs.build_records(
            split, mask_names=self.builder_config.mask_names, stdlib_dir=self._stdlib_dir
        )
        for record in records:
            yield f"{record['path']}:{record['line']}:{record['name']}", record


def prepare(
    data_dir: str | os.PathLike,
    config: str = "plain",
    stdlib_dir: str | None = None,
    num_shards: int | None = None,
) -> StdlibCodeSearch:
    """Builds `stdlib_code_search/<config>` into `data_dir` (if not there yet), offline.

    Args:
        data_dir: the TFDS data folder (created if missing).
        config: "plain" or "masked".
        stdlib_dir: the standard library to read; default: the running interpreter's.
        num_shards: files per split (more files let processes read disjoint files);
            default: TFDS's choice (one file for this small dataset).

    Returns:
        The prepared builder; `builder.as_dataset(split=...)` reads it.

    Raises:
        ValueError: for an unknown config.
    """
    if config not in CONFIGS:
        raise ConfigError(f"unknown {NAME} config {config!r}; choose one of {', '.join(CONFIGS)}")
    data_dir = os.fspath(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    # Several processes of one machine (multi-process training) may prepare at once:
    # the first builds, the others wait and then find the dataset there.
    with open(os.path.join(data_dir, f".{NAME}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        builder = StdlibCodeSearch(config=config, data_dir=data_dir, stdlib_dir=stdlib_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False, num_shards=num_shards)
        )
    return builder
