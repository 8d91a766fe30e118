"""Scores given in the data: the JSONL `scores` key, the batch's `scores`, and the train step's term.

The step's loss is checked against the contrastive loss plus the given-scores
term written out in numpy (MarginMSE, Hofstätter et al. 2020, eq. 1, and the
listwise KL), on the student's own embeddings of the batch; the gradient-cached
step against the plain one.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

K = 2  # hard negatives per example in the batches here


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _scored_examples(count, seed=0):
    """`count` examples with 0..3 negatives and their scores (positive first)."""
    from embedder.data import jsonl

    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        negatives = tuple(f"def unrelated_{i}_{j}(x): return x * {j}" for j in range(i % 4))
        scores = tuple(float(x) for x in np.round(rng.normal(0, 3, 1 + len(negatives)), 3))
        examples.append(
            jsonl.Example(
                query=f"Return the sum of item {i} and its neighbours.",
                positive=f"def total_{i}(items): return sum(items[{i}:{i + 3}])",
                negatives=negatives,
                scores=scores,
            )
        )
    return examples


@pytest.mark.parametrize(
    "scores, message",
    [
        ([1.0], r"'scores' has 1 entries but the example has 1 positive and 2 negative\(s\)"),
        ([1.0, 2.0, 3.0, 4.0], r"'scores' has 4 entries"),
        ([1.0, "2", 3.0], r"'scores'\[1\] must be a number, got a string"),
        ([1.0, True, 3.0], r"'scores'\[1\] must be a number, got a boolean"),
        ([1.0, None, 3.0], r"'scores'\[1\] must be a number, got null"),
        ("1 2 3", r"'scores' must be a list of numbers, got a string"),
    ],
)
def test_bad_scores_are_refused_naming_file_line_and_key(tmp_path, scores, message):
    from embedder.data import jsonl
    from embedder.errors import DataError

    good = {"query": "q", "positive": "p", "negatives": ["a", "b"], "scores": [3.0, 1.0, 0.5]}
    bad = dict(good, scores=scores)
    path = _write(tmp_path / "train.jsonl", [good, bad])
    with pytest.raises(DataError, match=rf"train\.jsonl:2: {message}"):
        jsonl.read_jsonl(path)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999", "1" + "0" * 400])
def test_non_finite_scores_are_refused(tmp_path, literal):
    from embedder.data import jsonl
    from embedder.errors import DataError

    path = tmp_path / "train.jsonl"
    line = '{"query": "q", "positive": "p", "negatives": ["n"], "scores": [1.0, LITERAL]}\n'
    path.write_text(line.replace("LITERAL", literal))
    with pytest.raises(DataError, match=r"train\.jsonl:1: 'scores'\[1\] is .*; every score must be a finite"):
        jsonl.read_jsonl(str(path))


def test_scores_round_trip_and_a_line_without_them_is_named(tmp_path):
    from embedder.data import jsonl
    from embedder.errors import DataError

    examples = _scored_examples(5)
    path = str(tmp_path / "scored.jsonl")
    jsonl.write_jsonl(path, examples)
    assert jsonl.read_jsonl(path) == examples
    jsonl.require_scores([path])  # every line has them
    records = [json.loads(line) for line in open(path)]
    del records[3]["scores"]
    unscored = _write(tmp_path / "partly.jsonl", records)
    with pytest.raises(DataError, match=r"partly\.jsonl:4: no 'scores' key"):
        jsonl.require_scores([path, unscored])
    # The Example itself holds the same rule as the parser.
    with pytest.raises(TypeError, match="'scores' has 1 entries"):
        jsonl.Example("q", "p", ("n",), scores=(1.0,))


def test_the_batch_scores_are_the_lines_scores_with_missing_negatives_masked():
    from embedder.data import batching, tokenizers
    from embedder.errors import ConfigError, DataError
    from embedder.models import pretrained

    tokenizer = tokenizers.load_tokenizer(pretrained.minilm_l6_v2_path())
    examples = _scored_examples(12)
    common = dict(global_batch_size=4, query_len=8, doc_len=16, num_negatives=K, seed=3, process_count=2)
    plain = batching.PairBatcher(examples, tokenizer, **common, process_index=1)
    scored = plain.with_given_scores()
    assert "scores" not in plain.batch(0) and not plain.given_scores
    for step in range(4):
        batch = scored.batch(step)
        indices = scored.global_indices(step)[2:4]  # process 1 of 2: rows 2 and 3
        np.testing.assert_array_equal(batch["query_tokens"], plain.batch(step)["query_tokens"])
        assert batch["scores"].dtype == np.float32 and batch["scores"].shape == (2, 1 + K)
        for row, index in enumerate(indices):
            example = examples[index]
            present = min(K, len(example.negatives))
            want = np.float32(example.scores[: 1 + present])
            np.testing.assert_array_equal(batch["scores"][row, : 1 + present], want)
            np.testing.assert_array_equal(batch["negative_valid"][row], [1] * present + [0] * (K - present))
    # The same batcher built with given_scores=True gives the same batches.
    built = batching.PairBatcher(examples, tokenizer, **common, process_index=1, given_scores=True)
    np.testing.assert_array_equal(built.batch(2)["scores"], scored.batch(2)["scores"])
    with pytest.raises(ConfigError, match="need hard negatives"):
        batching.PairBatcher(examples, tokenizer, **dict(common, num_negatives=0), given_scores=True)
    unscored = examples[:5] + [examples[5].__class__("a query", "a document")] + examples[6:]
    with pytest.raises(DataError, match=r"training example 5 \(query 'a query'\) has no 'scores'"):
        batching.PairBatcher(unscored, tokenizer, **common, given_scores=True)


def test_given_scores_run_needs_no_teacher_and_refuses_seqio_and_unscored_lines(tmp_path):
    from embedder import losses, partitioning, train_loop, trainer
    from embedder.data import pipeline
    from embedder.errors import ConfigError, DataError
    from tests import training_helpers

    config = losses.TeacherLossConfig(given_scores_weight=1.0)
    runner = trainer.Trainer(
        training_helpers.tiny_spec(),
        training_helpers.TINY_LOSS,
        training_helpers.TINY_OPTIMIZER,
        partitioning.make_mesh(training_helpers.ONE_DEVICE),
        2,
        teacher_loss=config,
    )
    assert runner.teacher is None and runner.teacher_loss == config
    with pytest.raises(ConfigError, match="only the given-scores term is on"):
        trainer.Trainer(
            training_helpers.tiny_spec(),
            training_helpers.TINY_LOSS,
            training_helpers.TINY_OPTIMIZER,
            partitioning.make_mesh(training_helpers.ONE_DEVICE),
            2,
            teacher=training_helpers.tiny_spec().module,
            teacher_loss=config,
        )
    seqio = pipeline.DataConfig(mixture_or_task_name="stdlib_code_search", batch_size=4)
    with pytest.raises(ConfigError, match="seqio task or mixture 'stdlib_code_search', which has no scores"):
        train_loop._with_given_scores(object(), seqio)
    records = [
        {"query": f"q{i}", "positive": f"p{i}", "negatives": ["n"], "scores": [2.0, 1.0]} for i in range(4)
    ]
    del records[2]["scores"]
    path = _write(tmp_path / "train.jsonl", records)
    data = pipeline.DataConfig(train_files=[path], batch_size=4, query_len=8, doc_len=8, num_negatives=1)
    source = train_loop._make_source(training_helpers.tiny_spec(), data)
    with pytest.raises(DataError, match=r"train\.jsonl:3: no 'scores' key"):
        train_loop._with_given_scores(source, data)


# ------------------------------------------------------------------ the train step


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_margin_mse(student, scores, valid, w, dims, tau):
    """MarginMSE (Hofstätter et al. 2020, eq. 1) over each query's (positive, present negative) pairs."""
    total = 0.0
    for d in dims:
        q = _normalize(student["query"][:, :d])
        s_pos = np.sum(q * _normalize(student["positive"][:, :d]), axis=1) / tau  # [B]
        s_neg = np.einsum("bd,bkd->bk", q, _normalize(student["negatives"][..., :d])) / tau  # [B, K]
        error = (s_pos[:, None] - s_neg) - (scores[:, :1] - scores[:, 1:])
        pair_w = w[:, None] * valid
        total += np.sum(pair_w * np.where(valid, error, 0.0) ** 2) / pair_w.sum()
    return total


@pytest.fixture(scope="module")
def scored_steps(tmp_path_factory):
    """One step of a given-scores run (MarginMSE, weight 0.5, no teacher model), plain and gradient-cached.

    Both start from the same initial state on the same batch of 8 examples,
    2 hard-negative slots, some of them missing; the cached step in chunks of 4.
    """
    from embedder import losses, partitioning, trainer
    from embedder.data import batching, jsonl, tokenizers
    from tests import training_helpers

    # One layer: the two steps' compiles are most of this fixture's time.
    model = training_helpers.tiny_spec(dataclasses.replace(training_helpers.TINY, num_layers=1))
    path = str(tmp_path_factory.mktemp("scored") / "train.jsonl")
    jsonl.write_jsonl(path, _scored_examples(8, seed=1))
    source = batching.PairBatcher(
        jsonl.read_jsonl(path),
        tokenizers.load_tokenizer(model.vocab_dir),
        global_batch_size=8,
        query_len=8,
        doc_len=16,
        num_negatives=K,
        given_scores=True,
    )
    batch = source.batch(0)
    assert 0 < batch["negative_valid"].sum() < batch["negative_valid"].size  # some missing, some present
    config = losses.TeacherLossConfig(given_scores_weight=0.5, given_scores_loss="margin_mse")
    out = {"batch": batch, "config": config}
    mesh = partitioning.make_mesh(training_helpers.ONE_DEVICE)
    initial = None  # the state is initialised once (one compile) and copied into each run
    for name, chunk in (("plain", 0), ("cached", 4)):
        runner = trainer.Trainer(
            model,
            training_helpers.TINY_LOSS,
            training_helpers.TINY_OPTIMIZER,
            mesh,
            2,
            grad_cache_chunk=chunk,
            teacher_loss=config,
        )
        if initial is None:
            initial = jax.device_get(runner.init_state(0))
            out["initial"], out["module"] = initial.params, runner.module
        # Copies: the step donates its state, and the key stays a device array in device_get.
        state = jax.device_put(jax.tree.map(lambda x: x.copy(), initial), runner.state_shardings())
        state, metrics = runner.train_step(state, partitioning.global_batch(mesh, batch))
        out[name] = (jax.device_get(metrics), jax.device_get(state.params))
    return out


@pytest.mark.slow
def test_step_loss_is_contrastive_plus_weighted_numpy_margin_mse(scored_steps):
    from embedder import losses
    from tests import training_helpers

    batch = scored_steps["batch"]
    tokens = [jnp.asarray(batch[k]) for k in ("query_tokens", "positive_tokens", "negative_tokens")]
    present = batch["negative_valid"][..., None] != 0
    # A missing negative's slot is encoded as its row's positive (and masked), as the step does.
    tokens[2] = jnp.where(present, tokens[2], tokens[1][:, None])
    module, params = scored_steps["module"], scored_steps["initial"]["model"]
    loss_config = training_helpers.TINY_LOSS

    @jax.jit
    def forward(p):
        out = module.apply({"params": p}, *tokens, deterministic=True)
        contrastive = losses.matryoshka_contrastive_loss(
            out["query"],
            out["positive"],
            out["negatives"],
            config=loss_config,
            query_ids=batch["query_ids"],
            positive_ids=batch["positive_ids"],
            weights=batch["weights"],
            negative_mask=batch["negative_valid"],
            negative_ids=batch["negative_ids"],
        )[0]
        return out, contrastive

    out, contrastive = forward(params)
    student = {k: np.asarray(v, np.float64) for k, v in out.items()}
    valid = batch["negative_valid"] != 0
    margin = _numpy_margin_mse(
        student,
        batch["scores"].astype(np.float64),
        valid,
        batch["weights"].astype(np.float64),
        loss_config.matryoshka_dims,
        loss_config.temperature,
    )
    metrics, _ = scored_steps["plain"]
    np.testing.assert_allclose(metrics["loss/contrastive"], float(contrastive), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/margin_mse"], margin, rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], float(contrastive) + 0.5 * margin, rtol=1e-5)
    assert margin > 1e-3  # the term is on and moves the loss


@pytest.mark.slow
def test_cached_given_scores_step_equals_the_plain_step(scored_steps):
    plain_metrics, plain_params = scored_steps["plain"]
    cached_metrics, cached_params = scored_steps["cached"]
    for key in ("loss", "loss/contrastive", "loss/margin_mse"):
        np.testing.assert_allclose(cached_metrics[key], plain_metrics[key], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), cached_params, plain_params
    )
