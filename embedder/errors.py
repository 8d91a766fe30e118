"""The errors a user can cause, under one base class.

The command line prints an `EmbedderError` (and an `OSError`: a missing file, a
full or read-only disk) as one line and exits with status 2; anything else is a
bug and shows its traceback. Each class also derives from the builtin its callers
caught before (`ValueError`, `RuntimeError`), so library users' `except` clauses
keep working.

This module imports nothing, so any module (and the command line, before it
loads jax or TensorFlow) can import it.
"""


class EmbedderError(Exception):
    """Something the user can fix: the message names what was wrong and where."""


class ConfigError(EmbedderError, ValueError):
    """A gin file, binding, macro, flag or setting that is wrong or inconsistent."""


class DataError(EmbedderError, ValueError):
    """Bad input data: the message names the file and line (or the example)."""


class WeightsError(EmbedderError, ValueError):
    """Weights that do not fit the model: names the tensor, both shapes and the file."""


class CheckpointError(EmbedderError, RuntimeError):
    """A model dir or checkpoint that is missing, damaged, of another run, or not writable."""


class ExportError(EmbedderError, ValueError):
    """An export that cannot be written: the format cannot express the model, or the output is taken."""


class SoupError(EmbedderError, ValueError):
    """Checkpoints that cannot be averaged (other architectures or initialisations)."""


class NonFiniteLossError(EmbedderError, RuntimeError):
    """The loss or the gradient became NaN/inf; names the step and the last good checkpoint."""
