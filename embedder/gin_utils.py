"""Gin at the edges: parse T5X-style flags and build what the files describe."""

from __future__ import annotations

import contextlib
import difflib
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
        if "'MODEL/gin.macro'" in reason:
            raise ConfigError(
                "no model: add --gin_file=models/NAME.gin (e.g. models/tiny.gin; the files are in gin/models/)"
            ) from e
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


# ---------------------------------------------------------------- run settings checked before a run
#
# gin accepts a binding of any macro, read or not, and any Python value for it:
# a typo trains the default, and `TRAIN_STEPS=2.5` fails (or worse, runs) later.

_MACRO = "gin.macro"


def _walk_references(value: Any):
    """The ConfigurableReferences inside a bound value (lists, tuples, dicts)."""
    if isinstance(value, gin.config.ConfigurableReference):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _walk_references(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _walk_references(item)


def given_macros() -> list[str]:
    """The macros the parsed gin files and bindings set, sorted."""
    return sorted(name for name, selector in gin.config._CONFIG if selector == _MACRO)


def read_macros() -> set[str]:
    """The macros that some binding refers to (`%NAME`), directly or through another macro."""
    read = set()
    for params in gin.config._CONFIG.values():
        for value in params.values():
            for ref in _walk_references(value):
                if ref.configurable.name == _MACRO or ref.configurable.selector == _MACRO:
                    read.add(ref.scoped_selector.split("/")[0])
    return read


def check_macros_read(also_read: Sequence[str] = ()) -> None:
    """Every macro given in a gin file or on the command line must be read by the run.

    Args:
      also_read: macros the caller reads itself (`macro(NAME)`).

    Raises:
      ConfigError: naming the first unread macro and the closest name that is read.
    """
    read = read_macros() | set(also_read)
    for name in given_macros():
        if name in read:
            continue
        close = difflib.get_close_matches(name, sorted(read), n=1)
        hint = f"; did you mean {close[0]}?" if close else f"; the macros this run reads: {sorted(read)}"
        raise ConfigError(f"gin macro {name} is set but nothing in this run reads it{hint}")


def _integer(minimum: int | None) -> Any:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, got {_kind(value)}"
        if minimum is not None and value < minimum:
            return f"must be >= {minimum}"
        return None

    return check


def _number(positive: bool) -> Any:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {_kind(value)}"
        if value != value or (positive and value <= 0):
            return "must be a positive number"
        return None

    return check


def _list_of(item_kind: type, minimum: int | None = None) -> Any:
    def check(value: Any) -> str | None:
        if not isinstance(value, (list, tuple)):
            return f"must be a list (e.g. ['a', 'b']), got {_kind(value)}"
        for item in value:
            if isinstance(item, bool) or not isinstance(item, item_kind):
                return f"must be a list of {item_kind.__name__}, got an item {item!r}"
            if minimum is not None and item < minimum:
                return f"items must be >= {minimum}, got {item!r}"
        return None

    return check


def _optional_str(value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        return f"must be a string or None, got {_kind(value)}"
    return None


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be True or False, got {_kind(value)}"


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r} (write numbers without quotes)"
    return f"{type(value).__name__} {value!r}"


# The run macros (DESIGN.md, "Run macros") and what each must hold.
RUN_MACROS: dict[str, Any] = {
    "TRAIN_STEPS": _integer(1),
    "BATCH_SIZE": _integer(1),
    "QUERY_LEN": _integer(1),
    "DOC_LEN": _integer(1),
    "NUM_NEGATIVES": _integer(0),
    "WARMUP_STEPS": _integer(0),
    "SAVE_EVERY": _integer(1),
    "EVAL_EVERY": _integer(0),
    "GRAD_CACHE_CHUNK": _integer(0),
    "SEED": _integer(None),
    "LEARNING_RATE": _number(positive=True),
    "TEMPERATURE": _number(positive=True),
    "TRAIN_FILES": _list_of(str),
    "EVAL_TASKS": _list_of(str),
    "MRL_DIMS": _list_of(int, 1),
    "LENGTH_BUCKETS": _list_of(int, 1),
    "MIXTURE_OR_TASK_NAME": _optional_str,
    "BEST_METRIC": _optional_str,
    "TASK_HOMOGENEOUS": _boolean,
    "PACKING": _boolean,
}


def check_run_macros() -> None:
    """Types and ranges of the run macros that are set (see `RUN_MACROS`).

    Raises:
      ConfigError: naming the macro, its value and what it must be.
    """
    for name in given_macros():
        check = RUN_MACROS.get(name)
        if check is None:
            continue
        value = gin.config._CONFIG[(name, _MACRO)]["value"]
        if isinstance(value, gin.config.ConfigurableReference):
            continue  # built by a configurable (e.g. a function call): checked where it is used
        problem = check(value)
        if problem:
            raise ConfigError(f"gin macro {name}={value!r}: {problem}")
