"""Files on local disk or in an object store (gs://), behind one small API.

A pod run writes its model dir to GCS (`--model_dir=gs://bucket/run`): orbax
writes the checkpoints there itself, and everything else the framework writes
or reads beside them (metrics.jsonl, config.gin, the checkpoint meta, the
writability probe) goes through this module. Local paths use the builtins,
so a full disk or a read-only folder surfaces as the operating system's
OSError; URLs (`scheme://...`) use `tf.io.gfile` (what T5X uses) where
TensorFlow is installed and the scheme is one of its own (gs://, ram://), and
fsspec otherwise (gs:// through gcsfs, `pip install 'embedder[gcs]'`), so a
JSONL run writing to GCS needs no TensorFlow. Either layer's errors are
re-raised as OSError with the path in the message, so callers catch one type.

Object stores have no atomic rename: orbax marks a finished checkpoint on
GCS with a `commit_success.txt` file instead of renaming a temporary folder,
and `checkpoint_finalized` checks for it.

Exports and soups are written as whole folders: `atomic_directory` builds one
under a temporary name beside the target and renames it when complete (local
disk only).

A folder's checksums (`write_checksums`, `checksum_problem`): a JSON manifest of
every file's size and sha256, read in chunks through this module (so a gs://
checkpoint is checked like a local one), for damage nothing else detects, such
as a flipped byte inside an array file.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any

# Orbax's marker of a complete checkpoint where a folder cannot be renamed atomically.
COMMIT_SUCCESS_FILE = "commit_success.txt"


def is_url(path: str) -> bool:
    """True for `scheme://...` paths (gs://, and TensorFlow's ram:// in tests)."""
    return "://" in str(path)


def absolute(path: str) -> str:
    """An absolute local path, or the URL unchanged (os.path.abspath would mangle it)."""
    path = os.fspath(path)
    return path if is_url(path) else os.path.abspath(path)


# URL schemes tf.io.gfile serves itself; it is used for them where TensorFlow is installed.
_TF_SCHEMES = ("gs", "ram")


def _scheme(path: str) -> str:
    return str(path).split("://", 1)[0]


def _uses_tf(path: str) -> bool:
    """Whether `path` goes through tf.io.gfile (a TensorFlow scheme and TensorFlow installed)."""
    if _scheme(path) not in _TF_SCHEMES:
        return False
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


class _FsspecGfile:
    """The part of tf.io.gfile's API this module uses, on an fsspec filesystem."""

    def __init__(self, path: str):
        import fsspec

        try:
            self._fs = fsspec.filesystem(_scheme(path))
        except (ImportError, ValueError) as e:
            raise OSError(
                f"{path}: no filesystem for {_scheme(path)}:// paths ({e}); install TensorFlow "
                "(pip install 'embedder[tf]') or gcsfs for gs:// (pip install 'embedder[gcs]')"
            ) from e

    def exists(self, path: str) -> bool:
        return self._fs.exists(path)

    def isdir(self, path: str) -> bool:
        return self._fs.isdir(path)

    def listdir(self, path: str) -> list[str]:
        return [os.path.basename(str(entry).rstrip("/")) for entry in self._fs.ls(path, detail=False)]

    def makedirs(self, path: str) -> None:
        self._fs.makedirs(path, exist_ok=True)

    def remove(self, path: str) -> None:
        self._fs.rm(path)

    def rename(self, source: str, destination: str, overwrite: bool = True) -> None:
        del overwrite  # fsspec's move always replaces the destination
        self._fs.mv(source, destination)

    def GFile(self, path: str, mode: str):  # noqa: N802 (tf.io.gfile's name)
        return self._fs.open(path, mode)

    def walk(self, path: str) -> Iterator[tuple[str, list[str], list[str]]]:
        """As tf.io.gfile.walk: (folder URL, subfolder names, file names) for every folder."""
        root = path.rstrip("/")
        bare = self._fs._strip_protocol(root).rstrip("/")
        for folder, subfolders, files in self._fs.walk(root):
            below = str(folder).rstrip("/")[len(bare) :].strip("/")
            yield (f"{root}/{below}" if below else root), list(subfolders), list(files)


def _gfile(path: str):
    """tf.io.gfile for TensorFlow's schemes where it is installed, else the fsspec equivalent."""
    if _uses_tf(path):
        import tensorflow as tf

        return tf.io.gfile
    return _FsspecGfile(path)


@contextlib.contextmanager
def _errors(path: str) -> Iterator[None]:
    """tf.errors from gfile as OSError naming the path (local and fsspec OSErrors pass through)."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:
        if "tensorflow" not in sys.modules:
            raise
        import tensorflow as tf

        if isinstance(e, tf.errors.NotFoundError):
            raise FileNotFoundError(f"{path}: {e.message}") from e
        if isinstance(e, tf.errors.OpError):
            raise OSError(f"{path}: {e.message}") from e
        raise


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    with _errors(path):
        return _gfile(path).exists(path)


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    with _errors(path):
        return _gfile(path).isdir(path)


def listdir(path: str) -> list[str]:
    """Entry names (no trailing slashes); [] when `path` is not a folder."""
    if not isdir(path):
        return []
    if not is_url(path):
        return os.listdir(path)
    with _errors(path):
        return [name.rstrip("/") for name in _gfile(path).listdir(path)]


def makedirs(path: str) -> None:
    if not is_url(path):
        os.makedirs(path, exist_ok=True)
        return
    with _errors(path):
        _gfile(path).makedirs(path)


def remove(path: str) -> None:
    if not is_url(path):
        os.remove(path)
        return
    with _errors(path):
        _gfile(path).remove(path)


def walk_files(root: str) -> list[str]:
    """Every file under the folder `root`, as sorted '/'-separated paths relative to it ([] if none)."""
    root = str(root).rstrip("/")
    if not is_url(root):
        return sorted(
            os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/")
            for folder, _, names in os.walk(root)
            for name in names
        )
    if not isdir(root):
        return []
    with _errors(root):
        return sorted(
            f"{folder.rstrip('/')[len(root) :].strip('/')}/{name}".lstrip("/")
            for folder, _, names in _gfile(root).walk(root)
            for name in names
        )


def replace(source: str, destination: str) -> None:
    """Moves a file over `destination` (atomic locally; copy + delete in an object store)."""
    if not is_url(source):
        os.replace(source, destination)
        return
    with _errors(source):
        _gfile(source).rename(source, destination, overwrite=True)


class _File:
    """A gfile handle whose I/O errors are OSErrors naming the path."""

    def __init__(self, handle: Any, path: str):
        self._handle = handle
        self._path = path

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._handle, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            with _errors(self._path):
                return attr(*args, **kwargs)

        return call

    def __iter__(self):
        with _errors(self._path):
            yield from self._handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_file(path: str, mode: str = "r") -> IO:
    """Opens a local file (utf-8 in text modes) or an object (tf.io.gfile.GFile or fsspec)."""
    if not is_url(path):
        if "b" in mode:
            return open(path, mode)  # noqa: SIM115
        return open(path, mode, encoding="utf-8")  # noqa: SIM115
    with _errors(path):
        return _File(_gfile(path).GFile(path, mode), path)  # type: ignore[return-value]


def write_atomically(path: str, write: Callable[[IO], Any], mode: str = "w") -> None:
    """Calls `write(file)` on a temporary name beside `path`, then moves it into place.

    The folder is created if missing. A failed write leaves no file at `path` (nor
    a half-written one) and removes its temporary file.
    """
    folder, name = os.path.split(absolute(path))
    makedirs(folder)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
    try:
        with open_file(tmp, mode) as f:
            write(f)
        replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            if exists(tmp):
                remove(tmp)
        raise


def write_text_atomically(path: str, text: str) -> None:
    """`text` to `path`, atomically (see `write_atomically`)."""
    write_atomically(path, lambda f: f.write(text))


def write_json(path: str, value: Any) -> None:
    """`value` as pretty JSON (UTF-8, a newline at the end) to `path`, atomically.

    Non-ASCII text is written as is; NaN and infinities as JSON's common
    extension (`NaN`, `Infinity`), which Python's json module reads back.
    """
    write_text_atomically(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def save_npy_atomically(path: str, array: Any) -> None:
    """`array` as a .npy file at `path`, atomically (see `write_atomically`)."""
    import numpy as np

    write_atomically(path, lambda f: np.save(f, array), "wb")


def check_new_output(output: str) -> str:
    """The absolute path of `output`, a local folder still to be written.

    Called before any work, so a taken name is refused at once, not after the
    inputs are loaded.

    Raises:
      FileExistsError: `output` exists and is not an empty folder (nothing is overwritten).
    """
    output = os.path.abspath(output)
    if os.path.exists(output) and not (os.path.isdir(output) and not os.listdir(output)):
        raise FileExistsError(f"{output} already exists; remove it or choose another output")
    return output


@contextlib.contextmanager
def atomic_directory(output: str) -> Iterator[str]:
    """Yields a temporary folder beside `output`; renames it to `output` if the block succeeds.

    A folder named `output` is therefore always complete: a block that fails
    leaves neither it nor the temporary folder (`.NAME.tmp-PID`).

    Raises:
      FileExistsError: `output` exists and is not an empty folder (nothing is overwritten).
    """
    output = check_new_output(output)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output)}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(output):
            os.rmdir(output)  # empty, checked above
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def checkpoint_finalized(step_dir: str) -> bool:
    """Whether orbax finished writing this step folder.

    Locally orbax writes under a temporary name and renames when done, so a
    folder named by its step is complete; in an object store it writes in place
    and adds COMMIT_SUCCESS_FILE last.
    """
    if not is_url(step_dir):
        return True
    return exists(os.path.join(step_dir, COMMIT_SUCCESS_FILE))


# ---------------------------------------------------------------- checksums of a folder

CHECKSUM_ALGORITHM = "sha256"
CHECKSUMS_VERSION = 1
_HASH_CHUNK_BYTES = 4 << 20


def file_digest(path: str, algorithm: str = CHECKSUM_ALGORITHM) -> tuple[int, str]:
    """(size in bytes, hex digest) of a file, read in chunks through `open_file`."""
    digest = hashlib.new(algorithm)
    size = 0
    with open_file(path, "rb") as f:
        while block := f.read(_HASH_CHUNK_BYTES):
            digest.update(block)  # hashlib lets other threads run while it hashes a block
            size += len(block)
    return size, digest.hexdigest()


def _digests(
    folder: str, names: list[str], workers: int, algorithm: str = CHECKSUM_ALGORITHM
) -> list[tuple[int, str] | OSError]:
    """`file_digest` of each `folder/name`, several files at once; an OSError in place of a failed read."""

    def one(name: str) -> tuple[int, str] | OSError:
        try:
            return file_digest(f"{folder}/{name}", algorithm)
        except OSError as e:
            return e

    if workers <= 1 or len(names) <= 1:
        return [one(name) for name in names]
    with concurrent.futures.ThreadPoolExecutor(min(workers, len(names))) as pool:
        return list(pool.map(one, names))


def write_checksums(folder: str, manifest: str, workers: int = 4) -> dict[str, Any]:
    """Writes `folder/manifest`: the size and sha256 of every other file under `folder`, atomically.

    Args:
      folder: a finished folder (local or a URL); nothing may write in it meanwhile.
      manifest: the manifest's file name, e.g. "checksums.json".
      workers: files hashed at once.

    Returns:
      The manifest as written: {"version", "algorithm", "files": {relative path: {"size", "sha256"}}}.

    Raises:
      OSError: `folder` is gone, a file could not be read, or the manifest written.
    """
    folder = str(folder).rstrip("/")
    if not isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder to write checksums of")
    names = [n for n in walk_files(folder) if n != manifest and not n.startswith(f".{manifest}.tmp-")]
    files = {}
    for name, found in zip(names, _digests(folder, names, workers), strict=True):
        if isinstance(found, OSError):
            raise found
        files[name] = {"size": found[0], CHECKSUM_ALGORITHM: found[1]}
    record = {"version": CHECKSUMS_VERSION, "algorithm": CHECKSUM_ALGORITHM, "files": files}
    write_text_atomically(f"{folder}/{manifest}", json.dumps(record, indent=1) + "\n")
    return record


def checksum_problem(folder: str, manifest: str, workers: int = 4) -> str | None:
    """How `folder` differs from its manifest (see `write_checksums`), or None if it matches or has none.

    A folder without a manifest is not checked (None). Files the manifest does
    not list are ignored. Every listed file is read in full.

    Returns:
      One line naming the first damaged file (in path order): missing, of
      another size, or with other contents (and how many more are damaged);
      or naming the manifest when it does not parse.
    """
    folder = str(folder).rstrip("/")
    path = f"{folder}/{manifest}"
    try:
        with open_file(path, "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (UnicodeDecodeError, ValueError) as e:
        return f"{path} does not parse: {e}"
    files = record.get("files") if isinstance(record, dict) else None
    algorithm = record.get("algorithm") if isinstance(record, dict) else None
    if not isinstance(files, dict) or algorithm not in hashlib.algorithms_available:
        return f"{path} is not a checksum manifest (expected 'algorithm' and 'files')"
    names = sorted(files)
    problems = []
    for name, found in zip(names, _digests(folder, names, workers, algorithm), strict=True):
        expected = files[name] if isinstance(files[name], dict) else {}
        if isinstance(found, FileNotFoundError):
            problems.append(f"{folder}/{name} is missing (listed in {path})")
        elif isinstance(found, OSError):
            problems.append(f"{folder}/{name} cannot be read: {found}")
        elif found[0] != expected.get("size"):
            problems.append(f"{folder}/{name} has {found[0]} bytes; {path} lists {expected.get('size')}")
        elif found[1] != expected.get(algorithm):
            problems.append(
                f"{folder}/{name} does not match its {algorithm} in {path} (changed since the save)"
            )
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more damaged files)" if len(problems) > 1 else ""
    return problems[0] + more
