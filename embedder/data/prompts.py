"""Task prompts in the Gecko / EmbeddingGemma format.

Queries carry the task, documents a title (Lee et al. 2024, Gecko; Vera et al.
2025, EmbeddingGemma):

    query:    "task: {task} | query: {text}"
    document: "title: {title or 'none'} | text: {text}"

One shared tower tells queries from documents, and one task from another, by
these prefixes alone.
"""

from __future__ import annotations

import dataclasses

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
    """

    enabled: bool = False
    query_template: str = "task: {task} | query: {text}"
    document_template: str = "title: {title} | text: {text}"
    default_task: str = DEFAULT_TASK
    empty_title: str = "none"

    def __post_init__(self):
        for name, fields in (("query_template", ("task", "text")), ("document_template", ("title", "text"))):
            template = getattr(self, name)
            try:
                template.format(**{f: "" for f in fields})
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"PromptConfig.{name}={template!r} must use only the fields {fields}: {e}"
                ) from e


def format_query(text: str, task: str | None, config: PromptConfig) -> str:
    """The query as the model sees it."""
    if not config.enabled:
        return text
    return config.query_template.format(task=task or config.default_task, text=text)


def format_document(text: str, title: str | None, config: PromptConfig) -> str:
    """The document as the model sees it."""
    if not config.enabled:
        return text
    return config.document_template.format(title=title or config.empty_title, text=text)
