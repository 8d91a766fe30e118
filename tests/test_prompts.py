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


def test_tasks_are_recorded_sorted_and_distinct_and_only_with_prompts_on():
    config = prompts.with_tasks(prompts.PromptConfig(enabled=True), ["qa", None, "", "code retrieval", "qa"])
    assert config.tasks == ("code retrieval", "qa")
    assert prompts.with_tasks(config, ["fact checking"]).tasks == ("code retrieval", "fact checking", "qa")
    assert prompts.with_tasks(prompts.PromptConfig(), ["qa"]).tasks == ()
    with pytest.raises(ValueError, match="tasks"):
        prompts.PromptConfig(tasks=("qa", ""))


def test_task_prompts_round_trip_through_sentence_transformers_prefixes():
    from embedder.errors import ExportError
    from embedder.formats import huggingface, saved_model

    # Task texts that share their first letter with the default task ("s"), and braces.
    tasks = ("code {retrieval}", "search result", "sentence similarity")
    config = prompts.PromptConfig(enabled=True, tasks=tasks)
    prefixes = huggingface.prompt_prefixes(config)
    assert prefixes == {
        "query": "task: search result | query: ",
        "document": "title: none | text: ",
        "code {retrieval}": "task: code {retrieval} | query: ",
        "search result": "task: search result | query: ",
        "sentence similarity": "task: sentence similarity | query: ",
    }
    back = huggingface.prompts_from_prefixes(prefixes)
    assert back.tasks == tasks and back.default_task == "search result"
    for task in (None, *tasks, "a task never named"):
        assert prompts.format_query("q", task, back) == prompts.format_query("q", task, config), task
    # Named prompts that are not a task's own text keep the plain query prefix.
    foreign = {"query": "q: ", "document": "d: ", "Clustering": "task: clustering | query: "}
    assert huggingface.prompts_from_prefixes(foreign) == prompts.PromptConfig(
        enabled=True, query_template="q: {text}", document_template="d: {text}"
    )
    with pytest.raises(ExportError, match="'query' prompt"):
        huggingface.prompt_prefixes(prompts.PromptConfig(enabled=True, tasks=("query",)))
    # One SavedModel signature per task, named from its ASCII letters and digits.
    assert saved_model.signatures(config) == {
        "serving_default": ("query", None),
        "query": ("query", None),
        "document": ("document", None),
        "query_code_retrieval": ("query", "code {retrieval}"),
        "query_search_result": ("query", "search result"),
        "query_sentence_similarity": ("query", "sentence similarity"),
    }
    with pytest.raises(ExportError, match="'code search' and 'code-search'"):
        saved_model.signatures(prompts.PromptConfig(enabled=True, tasks=("code search", "code-search")))
    with pytest.raises(ExportError, match="no ASCII letter"):
        saved_model.task_signature("?!")
