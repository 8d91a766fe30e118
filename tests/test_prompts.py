"""Prompt templates: the Gecko / EmbeddingGemma strings, exactly."""

import pytest

from embedder.data import prompts


def test_gecko_format():
    config = prompts.PromptConfig(enabled=True)
    assert (
        prompts.format_query("how to sort", "code retrieval", config)
        == "task: code retrieval | query: how to sort"
    )
    assert prompts.format_query("x", None, config) == "task: search result | query: x"
    assert prompts.format_document("def f(): pass", None, config) == "title: none | text: def f(): pass"
    assert prompts.format_document("body", "Title", config) == "title: Title | text: body"


def test_disabled_prompts_leave_text_alone():
    config = prompts.PromptConfig()
    assert prompts.format_query("q", "task", config) == "q"
    assert prompts.format_document("d", "t", config) == "d"


def test_bad_template_names_the_field():
    with pytest.raises(ValueError, match="query_template.*{query}"):
        prompts.PromptConfig(query_template="{query}")
