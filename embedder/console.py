"""A quiet console: the framework's lines, the progress bar and real warnings.

TensorFlow, XLA and jax print start-up lines that say nothing about the run on
a CPU machine: "Could not find cuda drivers", "E0000 ... failed call to cuInit",
oneDNN and CPU-feature notices, "All log messages before absl::InitializeLog()",
jax's "An NVIDIA GPU may be present". The C++ ones go straight to file
descriptor 2 before any logging is configured (TensorFlow 2.21 prints them
whatever TF_CPP_MIN_LOG_LEVEL says), so `quiet_stderr` filters that descriptor
itself: every other byte, the progress bar's carriage returns included, passes
through unchanged. `embedder --verbosity=1 ...` shows everything.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

# Start-up lines of other libraries, dropped at verbosity 0.
NOISE = (
    re.compile(rb"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"),
    # absl / glog INFO and WARNING lines of the C++ runtimes (TensorFlow, XLA, gRPC).
    re.compile(rb"^[IW]\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] "),
    # The failed CUDA probes on a machine without a GPU (absl ERROR lines).
    re.compile(rb"^E\d{4} [\d:.]+\s+\d+ [\w./-]+:\d+\] .*(cuInit|cuda|CUDA|GPU)"),
    re.compile(rb"^To enable the following instructions: .* rebuild TensorFlow"),
)
# Python loggers whose start-up warnings are noise on a CPU machine.
NOISY_LOGGERS = ("jax._src.xla_bridge",)


def is_noise(line: bytes) -> bool:
    """Whether a stderr line (without its newline) is another library's start-up noise."""
    return any(pattern.search(line) for pattern in NOISE)


def _pump(source: int, destination: int) -> None:
    """Copies `source` to `destination` until EOF, dropping whole lines that are noise.

    A partial line is held back only while it may still become noise (it starts
    with a letter that a noise line starts with); anything else, such as the
    progress bar's "\\r..." updates, is written at once.
    """
    pending = b""
    while True:
        chunk = os.read(source, 65536)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        kept = b"".join(line + b"\n" for line in lines if not is_noise(line))
        if pending and pending[:1] not in b"IWET":
            kept, pending = kept + pending, b""
        if kept:
            os.write(destination, kept)
    if pending and not is_noise(pending):
        os.write(destination, pending)
    os.close(source)


@contextlib.contextmanager
def quiet_stderr(verbosity: int = 0) -> Iterator[None]:
    """Drops other libraries' start-up noise from stderr for the block (verbosity 0).

    Args:
      verbosity: 0 filters the native start-up lines (see NOISE) and raises the
        noisy Python loggers to ERROR; 1 or more leaves the console untouched.
    """
    if verbosity > 0:
        yield
        return
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    sys.stderr.flush()
    original = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, original), daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(original, 2)  # the pipe's last writer closes: the pump reads EOF
        pump.join(timeout=10)
        if not pump.is_alive():  # a child process may still hold the pipe: the pump keeps its fd
            os.close(original)
