"""Gin at the edges: parse T5X-style flags and build what the files describe."""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
from collections.abc import Sequence
from typing import Any

import gin
from embedder.errors import ConfigError


def _package_gin_dir() -> str:
    """The gin files shipped in the wheel (`embedder/gin/`), else the checkout's `gin/` folder."""
    installed = importlib.resources.files("embedder").joinpath("gin")
    if installed.is_dir():
        return str(installed)
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "gin")


# The package's gin files, so `--gin_file=models/tiny.gin` works from any working directory.
DEFAULT_SEARCH_PATH = _package_gin_dir()


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
      ConfigError: a file is missing or does not parse, a binding is wrong, or
        a macro is used and never set; the message names the file or binding.
    """
    gin.clear_config()
    for path in [*search_paths, DEFAULT_SEARCH_PATH, os.path.dirname(DEFAULT_SEARCH_PATH)]:
        gin.add_config_file_search_path(path)
    # gin logs an ERROR for every search path that lacks a file before it finds
    # it in the next one; only a file found nowhere is an error here.
    with _quiet_root_logger():
        _parse(gin_files, bindings, search_paths)


def _resolve(path: str, search_paths: Sequence[str]) -> str:
    """The file itself, or the first search path holding it (absolute, so gin reads it directly)."""
    if os.path.isfile(path):
        return os.path.abspath(path)
    for folder in [*search_paths, DEFAULT_SEARCH_PATH, os.path.dirname(DEFAULT_SEARCH_PATH)]:
        candidate = os.path.join(folder, path)
        if os.path.isfile(candidate):
            return os.path.abspath(candidate)
    raise ConfigError(f"gin file {path!r} not found (searched {[*search_paths, DEFAULT_SEARCH_PATH]})")


def _parse(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]) -> None:
    for f in gin_files:
        path = _resolve(f, search_paths)
        try:
            gin.parse_config_file(path)
        except Exception as e:  # gin raises several error types; all mean "this file is wrong".
            raise ConfigError(f"gin file {path}: {e}") from e
    for binding in bindings:
        try:
            gin.parse_config(binding)
        except Exception as e:
            raise ConfigError(f"gin binding {binding!r}: {e}") from e
    try:
        gin.finalize()
    except ValueError as e:
        # gin appends the whole operative config to the reason: one line is what names the mistake.
        reason = str(e).split(" in config string", 1)[0].strip()
        raise ConfigError(f"gin config: {reason}") from e


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
        raise ConfigError(f"gin macro {name} is not set by the given gin files: {e}") from e
    if isinstance(value, gin.config.ConfigurableReference):
        value = value.scoped_configurable_fn()
    return value


def configured(fn: Any) -> Any:
    """Gin's configured version of `fn` (registered by a gin file's dynamic registration)."""
    try:
        return gin.get_configurable(fn)
    except (KeyError, ValueError) as e:
        raise ConfigError(
            f"the gin files configure nothing for {fn.__module__}.{fn.__name__}; give a gin/runs/*.gin file"
        ) from e
