"""Task prompts in the Gecko / EmbeddingGemma format.

Queries carry the task, documents a title (Lee et al. 2024, Gecko; Vera et al.
2025, EmbeddingGemma):

    query:    "task: {task} | query: {text}"
    document: "title: {title or 'none'} | text: {text}"

One shared tower tells queries from documents, and one task from another, by
these prefixes alone. In training, a query can lose its task text at random
(`task_dropout`, as Gemini Embedding 2 trains): it is then written with
`no_task_query_template` ("query: {text}"), so the model also embeds queries
that come without an instruction.

`PromptConfig.tasks` names the tasks a model was trained with (training
records the JSONL `task` values it read): each export offers one query prompt
per task by name (a sentence-transformers prompt, a SavedModel signature).
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterable

from embedder.errors import ConfigError

DEFAULT_TASK = "search result"


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How texts are prefixed before tokenisation.

    Attributes:
      enabled: apply the templates at all (off: raw text, as all-MiniLM-L6-v2 was trained).
      query_template: format string with {task} and {text}.
      document_template: format string with {title} and {text}.
      default_task: the task of an example or call that names none.
      empty_title: what stands for a missing title.
      task_dropout: probability in [0, 1] that a training query is written without
        its task (applied by the input pipeline, never at inference).
      no_task_query_template: format string with {text}: a query whose task was dropped.
      tasks: the task texts the model was trained with (sorted, distinct); each is
        a valid `task` for `format_query`, and exports name a query prompt after each.
    """

    enabled: bool = False
    query_template: str = "task: {task} | query: {text}"
    document_template: str = "title: {title} | text: {text}"
    default_task: str = DEFAULT_TASK
    empty_title: str = "none"
    task_dropout: float = 0.0
    no_task_query_template: str = "query: {text}"
    tasks: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.tasks, str) or not all(isinstance(t, str) and t for t in self.tasks):
            raise ConfigError(f"PromptConfig.tasks={self.tasks!r} must be a sequence of non-empty strings")
        # Sorted and distinct, whatever order a run read them in or JSON gave them back.
        object.__setattr__(self, "tasks", tuple(sorted(set(self.tasks))))
        if not 0.0 <= self.task_dropout <= 1.0:
            raise ConfigError(f"PromptConfig.task_dropout={self.task_dropout} must be in [0, 1]")
        for name, fields in (
            ("query_template", ("task", "text")),
            ("document_template", ("title", "text")),
            ("no_task_query_template", ("text",)),
        ):
            template = getattr(self, name)
            try:
                template.format(**{f: "" for f in fields})
            except (KeyError, IndexError, ValueError) as e:
                raise ConfigError(
                    f"PromptConfig.{name}={template!r} must use only the fields {fields}: {e}"
                ) from e


def with_tasks(config: PromptConfig, tasks: Iterable[str | None]) -> PromptConfig:
    """`config` knowing `tasks` too (e.g. the `task` values of a run's training examples).

    Args:
        config: the prompts.
        tasks: task texts; None and "" (an example without a task) are left out.

    Returns:
        `config` with its tasks and `tasks` together; `config` itself when prompts
        are disabled (a model without prompts knows no task).
    """
    if not config.enabled:
        return config
    return dataclasses.replace(config, tasks=(*config.tasks, *(t for t in tasks if t)))


def format_query(text: str, task: str | None, config: PromptConfig, drop_task: bool = False) -> str:
    """The query as the model sees it.

    Args:
        text: the query text.
        task: the task description; None or "" means `config.default_task`.
        config: the templates.
        drop_task: write the query without its task (`no_task_query_template`).

    Returns:
        The prompted query, or `text` itself when prompts are disabled.
    """
    if not config.enabled:
        return text
    if drop_task:
        return config.no_task_query_template.format(text=text)
    return config.query_template.format(task=task or config.default_task, text=text)


def format_document(text: str, title: str | None, config: PromptConfig) -> str:
    """The document as the model sees it.

    Args:
        text: the document text.
        title: its title; None or "" means `config.empty_title`.
        config: the templates.

    Returns:
        The prompted document, or `text` itself when prompts are disabled.
    """
    if not config.enabled:
        return text
    return config.document_template.format(title=title or config.empty_title, text=text)


def template_segments(template: str) -> list[tuple[str, str | None]]:
    """Splits a format string into (literal text, field name or None) pairs.

    For templates applied outside Python (e.g. by string ops in a tf.data graph):
    the result joined in order, each field replaced by its value, equals
    `template.format(...)`.

    Args:
        template: a format string whose fields are plain names, e.g. "task: {task} | query: {text}".

    Returns:
        The segments in order; "{{" and "}}" come back as single braces in the literals.

    Raises:
        ConfigError: for a field with a conversion or format spec ("{text!r}", "{text:>9}").
    """
    segments = []
    for literal, field, spec, conversion in string.Formatter().parse(template):
        if field is not None and (spec or conversion):
            raise ConfigError(
                f"template {template!r}: field {{{field}}} has a conversion or format spec, "
                "which only Python's str.format understands; use plain {name} fields"
            )
        segments.append((literal, field))
    return segments
