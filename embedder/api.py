"""The Python API: train a model without writing gin files.

    import embedder

    result = embedder.train(
        model="all-MiniLM-L6-v2",          # a built-in name, a gin model file or a model folder
        train_files=["pairs.jsonl"],
        model_dir="runs/minilm",
        steps=100,
        batch_size=32,
        learning_rate=2e-5,
        mrl_dims=[384, 128, 64],           # any macro of the run file, in lower case
    )
    model = embedder.Embedder.from_pretrained("runs/minilm")
    vectors = model.encode(["how do I sort a list?"], kind="query")

`train` is the command line's `embedder train` with the same gin files
(`runs/finetune.gin` and the model's file from the package), its settings given
as keyword arguments; the operative config is saved in the model dir as the
command line saves it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from embedder.errors import ConfigError

# Names `model` may take, and the gin model file each one stands for.
BUILTIN_MODELS = {
    "all-MiniLM-L6-v2": "models/minilm_l6.gin",
    "sentence-transformers/all-MiniLM-L6-v2": "models/minilm_l6.gin",
}
_MACRO_LINE = re.compile(r"^([A-Z][A-Z0-9_]*)\s*=", re.MULTILINE)
_INCLUDE_LINE = re.compile(r"^include\s+'([^']+)'", re.MULTILINE)


def _gin_file(name: str) -> str | None:
    """The package gin file `name` stands for: a built-in name, "tiny" (models/tiny.gin), or a path."""
    from embedder import gin_utils

    if name in BUILTIN_MODELS:
        return os.path.join(gin_utils.DEFAULT_SEARCH_PATH, BUILTIN_MODELS[name])
    if name.endswith(".gin"):
        for candidate in (name, os.path.join(gin_utils.DEFAULT_SEARCH_PATH, name)):
            if os.path.isfile(candidate):
                return os.path.abspath(candidate)
        raise ConfigError(f"model gin file {name!r} not found (nor under {gin_utils.DEFAULT_SEARCH_PATH})")
    packaged = os.path.join(gin_utils.DEFAULT_SEARCH_PATH, "models", f"{name}.gin")
    if not os.path.isdir(name) and os.path.isfile(packaged):
        return packaged
    return None


def _macros(path: str) -> set[str]:
    """The macros a gin file (and the files it includes) sets."""
    from embedder import gin_utils

    with open(path, encoding="utf-8") as f:
        text = f.read()
    names = set(_MACRO_LINE.findall(text))
    for included in _INCLUDE_LINE.findall(text):
        names |= _macros(os.path.join(gin_utils.DEFAULT_SEARCH_PATH, included))
    return names


def _folder_spec(folder: str):
    """A ModelSpec initialised from a sentence-transformers / Hugging Face BERT folder."""
    from embedder.formats import huggingface
    from embedder.models import spec

    if not huggingface.is_folder(folder):
        raise ConfigError(
            f"model {folder!r}: not a built-in name ({', '.join(BUILTIN_MODELS)}, or a gin/models "
            "file's name such as 'tiny'), a gin model file, nor a folder with config.json and "
            "model.safetensors"
        )
    loaded = huggingface.read(folder)
    return spec.ModelSpec(
        module=loaded.module,
        vocab_dir=os.path.abspath(folder),
        init_from=os.path.abspath(folder),
        prompts=loaded.prompts,
    )


def train(
    model: str = "all-MiniLM-L6-v2",
    train_files: Sequence[str] = (),
    *,
    model_dir: str,
    steps: int = 1000,
    batch_size: int = 32,
    learning_rate: float = 2e-5,
    run: str = "runs/finetune.gin",
    mesh: str | None = None,
    **settings: Any,
):
    """Trains (or resumes) a dual encoder, as `embedder train` with the package's gin files.

    Args:
      model: "all-MiniLM-L6-v2" (the packaged real weights), the name of a
        package model file ("tiny", "bert_base", ...), a gin model file, or a
        sentence-transformers / Hugging Face BERT folder whose weights start the run.
      train_files: JSONL files of {"query", "positive", "negatives"?, "task"?}.
      model_dir: where checkpoints, metrics and the operative config go; a
        model dir that holds checkpoints is resumed.
      steps, batch_size, learning_rate: the run's TRAIN_STEPS, BATCH_SIZE
        (global pairs) and LEARNING_RATE.
      run: the run gin file (package path or file): "runs/finetune.gin" or
        "runs/pretrain.gin".
      mesh: a package mesh file's name ("cpu", "v4-8", ...); None: every device
        on the data axis.
      **settings: any other macro of the run or model file, in lower case:
        warmup_steps, query_len, doc_len, num_negatives, mrl_dims, temperature,
        seed, save_every, eval_every, eval_tasks, mixture_or_task_name (instead
        of train_files), pretrained_dir, ...

    Returns:
      The `train_loop.TrainResult` (final step, checkpoint folder, losses).

    Raises:
      ConfigError: an unknown model or setting (the message lists the valid
        settings), or what the gin files reject.
    """
    from embedder import gin_utils, train_loop

    run_file = _gin_file(run)
    model_file = _gin_file(model)
    files = [run_file] + ([model_file] if model_file else [])
    if mesh is not None:
        files.append(os.path.join(gin_utils.DEFAULT_SEARCH_PATH, "mesh", f"{mesh}.gin"))
    known = set().union(*(_macros(f) for f in files))
    values = {
        "TRAIN_FILES": [os.path.abspath(f) for f in train_files],
        "TRAIN_STEPS": steps,
        "BATCH_SIZE": batch_size,
        "LEARNING_RATE": learning_rate,
        **{name.upper(): value for name, value in settings.items()},
    }
    unknown = sorted(name.lower() for name in values if name not in known)
    if unknown:
        raise ConfigError(
            f"unknown setting(s) {unknown}; {run} and the model file take: {sorted(n.lower() for n in known)}"
        )
    bindings = [f"{name} = {value!r}" for name, value in values.items()]
    explicit: dict[str, Any] = {}
    if model_file is None:
        explicit["model"] = _folder_spec(model)
        bindings.append("MODEL = None")  # the run file reads %MODEL; the folder's spec is passed directly
    gin_utils.parse(files, bindings)
    return gin_utils.configured(train_loop.train)(model_dir=model_dir, **explicit)
