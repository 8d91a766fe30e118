"""Gin at the edges: parse T5X-style flags and build what the files describe."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import gin

# The repository's gin/ folder, so `--gin_file=models/tiny.gin` works from anywhere.
DEFAULT_SEARCH_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


def parse(
    gin_files: Sequence[str],
    bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
) -> None:
    """Parses gin files and `NAME=VALUE` bindings, searching the given paths.

    Args:
      gin_files: files, absolute or relative to the current folder or to a search path.
      bindings: overrides, e.g. "TRAIN_STEPS=100" or "transformer.TransformerConfig.dtype='bfloat16'".
      search_paths: folders to look for files in (the repository's gin/ is always last).

    Raises:
      ValueError: a file is missing or does not parse, or a binding is wrong;
        the message names the file or binding.
    """
    gin.clear_config()
    for path in [*search_paths, DEFAULT_SEARCH_PATH, os.path.dirname(DEFAULT_SEARCH_PATH)]:
        gin.add_config_file_search_path(path)
    # gin logs an ERROR for every search path that lacks a file before it finds
    # it in the next one; only a file found nowhere is an error here.
    with _quiet_root_logger():
        _parse(gin_files, bindings, search_paths)


def _parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]) -> None:
    for f in gin_files:
        try:
            gin.parse_config_file(f)
        except OSError as e:
            raise ValueError(
                f"gin file {f!r} not found (searched {list(search_paths)} and {DEFAULT_SEARCH_PATH})"
            ) from e
        except Exception as e:  # gin raises several error types; all mean "this file is wrong".
            raise ValueError(f"gin file {f!r}: {e}") from e
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except Exception as e:
            raise ValueError(f"gin binding {binding!r}: {e}") from e
    gin.finalize()


@contextlib.contextmanager
def _quiet_root_logger():
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def macro(name: str) -> Any:
    """The value of macro `name`, with configurable references called."""
    try:
        value = gin.query_parameter(f"%{name}")
    except ValueError as e:
        raise ValueError(f"gin macro {name} is not set by the given gin files: {e}") from e
    if isinstance(value, gin.config.ConfigurableReference):
        value = value.scoped_configurable_fn()
    return value
