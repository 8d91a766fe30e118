"""Registered seqio tasks and mixtures of (query, positive, negatives) pairs.

A pair task is a source of string examples plus the same preprocessors
(`pair_preprocessors`): task prompt, then tokenisation with truncation and
special tokens. Its output features are `query`, `positive` and `negatives` (rank 2).

* `register_jsonl_task`: the user's own JSONL files (format in `jsonl`).
* `register_stdlib_tasks`: the local TFDS dataset `stdlib_code_search` (built
  offline from this interpreter's standard library): tasks
  `stdlib_code_search` and `stdlib_code_search_masked`, and the mixture
  `stdlib_code_search_mix` of both (rates 3:1).
* `register_mixture`: any tasks with rates; `pipeline.SeqioPairSource` draws
  them per example or, with `task_homogeneous`, per global batch.

Tasks carry their vocabulary, so they are registered for a model's vocabulary
(`register_defaults` does the stdlib ones for the model being trained).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence

import seqio
import tensorflow as tf

from embedder.data import preprocessors, prompts, sources, tfds_stdlib, vocabularies
from embedder.errors import ConfigError

STDLIB_TASK = "stdlib_code_search"
STDLIB_MASKED_TASK = "stdlib_code_search_masked"
STDLIB_MIXTURE = "stdlib_code_search_mix"
# A third of the stdlib train split: enough to reorder each epoch, small enough
# that filling it does not stall the first batch of an epoch for long.
STDLIB_SHUFFLE_BUFFER = 1000
# EmbeddingGemma's task description for code retrieval.
CODE_RETRIEVAL = "code retrieval"
# Where the stdlib TFDS data goes unless told otherwise.
TFDS_DIR_ENV = "EMBEDDER_TFDS_DIR"
# Frozen, so one shared default instance is safe.
_NO_PROMPTS = prompts.PromptConfig()


def default_tfds_dir() -> str:
    """$EMBEDDER_TFDS_DIR, else ~/tensorflow_datasets (TFDS's own default)."""
    return os.environ.get(TFDS_DIR_ENV) or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """The output features of a pair task.

    Args:
        vocabulary: the model's vocabulary.

    Returns:
        `query` and `positive` (int32 [None]) and `negatives` (int32 [n, None]); no
        EOS is added by seqio (the specials come from `tokenize_and_truncate`).
    """
    return {
        "query": seqio.Feature(vocabulary, add_eos=False),
        "positive": seqio.Feature(vocabulary, add_eos=False),
        "negatives": seqio.Feature(vocabulary, add_eos=False, rank=2),
    }


def pair_preprocessors(prompt: prompts.PromptConfig, task_text: str | None = None) -> list:
    """The preprocessors every pair task runs, after its source-specific ones.

    Args:
        prompt: the prompt templates (disabled: raw text).
        task_text: the task description used for examples that name none.

    Returns:
        [add_prompts, tokenize_and_truncate].
    """
    return [
        functools.partial(preprocessors.add_prompts, config=prompt, task_text=task_text),
        preprocessors.tokenize_and_truncate,
    ]


def _add(name: str, replace: bool, **kwargs) -> seqio.Task:
    if replace:
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(name, **kwargs)


def register_jsonl_task(
    name: str,
    split_to_files: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
    vocabulary: seqio.Vocabulary,
    prompt: prompts.PromptConfig = _NO_PROMPTS,
    task_text: str | None = None,
    shuffle_buffer_size: int | None = None,
    replace: bool = True,
) -> seqio.Task:
    """Registers JSONL files as a pair task.

    Args:
        name: the task name.
        split_to_files: split -> JSONL file(s), e.g. {"train": ["a.jsonl", "b.jsonl"]}.
        vocabulary: the model's vocabulary.
        prompt: prompt templates for this task (an example's own `task` wins over `task_text`).
        task_text: the task description for examples without a `task`.
        shuffle_buffer_size: a seqio shuffle buffer after preprocessing; None (the
            default) needs none, since the source permutes each epoch fully itself
            (and a buffer would hold up the first batch of every epoch while it fills).
        replace: replace a task of the same name.

    Returns:
        The registered task. Files are read (and checked) when a dataset is built.
    """
    return _add(
        name,
        replace,
        source=sources.JsonlDataSource(split_to_files),
        output_features=output_features(vocabulary),
        preprocessors=pair_preprocessors(prompt, task_text),
        shuffle_buffer_size=shuffle_buffer_size,
    )


@seqio.map_over_dataset
def _stdlib_to_pair(features):
    """TFDS stdlib example -> the pair features (no negatives, no per-example task)."""
    return {
        "query": features["query"],
        "positive": features["positive"],
        "negatives": tf.zeros([0], tf.string),
        "task": tf.constant(""),
    }


def register_stdlib_tasks(
    vocabulary: seqio.Vocabulary,
    data_dir: str | os.PathLike | None = None,
    prompt: prompts.PromptConfig = _NO_PROMPTS,
    prepare: bool = True,
    replace: bool = True,
) -> list[str]:
    """Registers the stdlib docstring -> code tasks and their mixture.

    Args:
        vocabulary: the model's vocabulary.
        data_dir: the TFDS data folder (default: `default_tfds_dir()`).
        prompt: prompt templates (the task text is "code retrieval").
        prepare: build the TFDS dataset there now if it is not built yet (offline).
        replace: replace tasks of the same names.

    Returns:
        The registered names: the two tasks, then the mixture.
    """
    data_dir = os.fspath(data_dir or default_tfds_dir())
    names = []
    for task_name, config in ((STDLIB_TASK, "plain"), (STDLIB_MASKED_TASK, "masked")):
        if prepare:
            tfds_stdlib.prepare(data_dir, config=config)
        source = seqio.TfdsDataSource(
            tfds_name=f"{tfds_stdlib.NAME}/{config}:{tfds_stdlib.StdlibCodeSearch.VERSION}",
            tfds_data_dir=data_dir,
            # Read only: never download, never look on GCS.
            read_only=True,
            tfds_builder_kwargs={"try_gcs": False},
        )
        _add(
            task_name,
            replace,
            source=source,
            output_features=output_features(vocabulary),
            preprocessors=[_stdlib_to_pair, *pair_preprocessors(prompt, CODE_RETRIEVAL)],
            # TFDS keeps the examples in one fixed order; the buffer reorders each epoch.
            shuffle_buffer_size=STDLIB_SHUFFLE_BUFFER,
        )
        names.append(task_name)
    register_mixture(STDLIB_MIXTURE, [(STDLIB_TASK, 3.0), (STDLIB_MASKED_TASK, 1.0)], replace=replace)
    return [*names, STDLIB_MIXTURE]


def register_mixture(
    name: str, tasks_and_rates: Sequence[tuple[str, float]], replace: bool = True
) -> seqio.Mixture:
    """Registers a mixture of pair tasks with sampling rates.

    Args:
        name: the mixture name.
        tasks_and_rates: (task name, rate) pairs; rates are relative weights.
        replace: replace a mixture of the same name.

    Returns:
        The registered mixture.

    Raises:
        ValueError: for a negative rate or rates that sum to zero, naming them.
    """
    for task_name, rate in tasks_and_rates:
        if rate < 0:
            raise ConfigError(f"mixture {name!r}: task {task_name!r} has a negative rate {rate}")
    if not sum(rate for _, rate in tasks_and_rates) > 0:
        raise ConfigError(f"mixture {name!r}: the rates {list(tasks_and_rates)} sum to zero")
    if replace:
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, list(tasks_and_rates))


def register_defaults(
    vocab_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    prompt: prompts.PromptConfig = _NO_PROMPTS,
) -> list[str]:
    """Registers the built-in tasks for the model whose vocabulary is in `vocab_dir`.

    Args:
        vocab_dir: the model's tokenizer folder (any kind `vocabularies.for_folder` reads).
        data_dir: the TFDS data folder (default: `default_tfds_dir()`).
        prompt: prompt templates.

    Returns:
        The registered task and mixture names.
    """
    return register_stdlib_tasks(vocabularies.for_folder(vocab_dir), data_dir, prompt)
