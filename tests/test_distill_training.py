"""Distillation in training: a student started from a subset of its teacher's layers
(gin/models/minilm_l3.gin, the BERT and LLM loaders' `layers=`), and a frozen
teacher's terms in the train step (gin/runs/distill.gin).

References are independent: the layer test reads the folder's tensors itself; the
loss test recomputes the teacher terms in numpy from the two models' embeddings.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedder.formats import hf_llm
from embedder.models import pretrained, transformer

MINILM_LAYERS = (0, 2, 4)


def test_minilm_l3_gin_starts_each_layer_from_minilm_l6_s_layers_0_2_4():
    from safetensors.numpy import load_file

    import gin
    from embedder import gin_utils

    gin_utils.parse(["gin/models/minilm_l3.gin"])
    try:
        model = gin_utils.macro("MODEL")
    finally:
        gin.clear_config()
    assert model.module.config.num_layers == 3 and model.init_layers == MINILM_LAYERS
    folder = pretrained.minilm_l6_v2_path()
    assert model.init_from == folder
    student = jax.device_get(model.init_params(jax.random.key(0))["encoder"])
    six = dataclasses.replace(model.module.config, num_layers=6)
    teacher = pretrained.load_bert_params(folder, six)
    for i, source in enumerate(MINILM_LAYERS):
        jax.tree.map(np.testing.assert_array_equal, student[f"layer_{i}"], teacher[f"layer_{source}"])
    for name in ("token_embed", "position_embed", "type_embed", "embed_norm"):
        jax.tree.map(np.testing.assert_array_equal, student[name], teacher[name])
    # The folder's own tensor, read here: layer 1's query weight is MiniLM's layer 2's, [out, in].
    raw = load_file(f"{folder}/model.safetensors")["encoder.layer.2.attention.self.query.weight"]
    np.testing.assert_array_equal(
        np.asarray(student["layer_1"]["attention"]["query"]["kernel"]).reshape(384, 384).T, raw
    )


def test_llm_loader_reads_the_chosen_layers_of_a_deeper_folder(tmp_path):
    from safetensors.numpy import save_file

    four = transformer.TransformerConfig(
        family="llm",
        vocab_size=64,
        hidden_size=16,
        num_layers=4,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        mlp_dim=32,
        activation="gelu_tanh",
        norm_offset=True,
        qk_norm=True,
        post_norms=True,
        causal=False,
        sliding_window=5,
        sliding_window_pattern=2,
        rope_local_theta=10000.0,
        scale_embeddings=True,
        pad_id=0,
    )
    rng = np.random.default_rng(0)
    shapes = pretrained.expected_encoder_shapes(four)
    source = jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)
    save_file(hf_llm.llm_tensors(source, four), str(tmp_path / "model.safetensors"))
    two = dataclasses.replace(four, num_layers=2)
    model_type = hf_llm.model_type_of(four)
    loaded = hf_llm.load_llm_params(str(tmp_path), two, model_type=model_type, layers=(1, 3))
    assert sorted(k for k in loaded if k.startswith("layer_")) == ["layer_0", "layer_1"]
    for i, j in enumerate((1, 3)):
        jax.tree.map(np.testing.assert_array_equal, loaded[f"layer_{i}"], source[f"layer_{j}"])
    jax.tree.map(np.testing.assert_array_equal, loaded["token_embed"], source["token_embed"])
    with pytest.raises(ValueError, match=r"layers=\(1, 4\) names layer 4, but the folder has layers 0..3"):
        hf_llm.load_llm_params(str(tmp_path), two, model_type=model_type, layers=(1, 4))
    with pytest.raises(ValueError, match="selects 3 layers for a 2-layer model"):
        hf_llm.load_llm_params(str(tmp_path), two, model_type=model_type, layers=(0, 1, 2))


# ---------------------------------------------------------------- the teacher in the train step

# The student is tests' tiny BERT (width 32); the teacher a wider one (48) of the same
# vocabulary, so embedding matching learns the map [32, 48].
TEACHER_CONFIG = transformer.TransformerConfig(
    vocab_size=30522, hidden_size=48, num_layers=2, num_heads=4, mlp_dim=96, max_len=128
)
DISTILL_FLAGS = [
    "BATCH_SIZE = 16",
    "QUERY_LEN = 16",
    "DOC_LEN = 32",
    "NUM_NEGATIVES = 1",
    "MRL_DIMS = [32, 16]",
    "LEARNING_RATE = 1e-3",
    "WARMUP_STEPS = 2",
    "TRAIN_STEPS = 2",
    "SAVE_EVERY = 1",
    # The run takes the gradient cache on 2 devices; the in-process reference step neither.
    "GRAD_CACHE_CHUNK = 8",
    "EMBEDDING_MATCHING_WEIGHT = 0.7",
    "SCORE_DISTILLATION_WEIGHT = 0.3",
    "TEACHER_TEMPERATURE = 0.1",
    "train_loop.train.log_every = 1",
    "partitioning.MeshConfig.num_devices = 2",
]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, train_file):
    """A params-only checkpoint of a randomly initialised width-48 tiny BERT (as a soup is written)."""
    from embedder import checkpointing, train_loop
    from embedder.data import pipeline
    from tests import training_helpers

    model = training_helpers.tiny_spec(TEACHER_CONFIG)
    data = pipeline.DataConfig(train_files=[train_file], batch_size=16, query_len=16, doc_len=32)
    meta = train_loop.run_meta(
        model, data, 1, training_helpers.TINY_LOSS, training_helpers.TINY_OPTIMIZER, seed=7
    )
    folder = str(tmp_path_factory.mktemp("teacher"))
    tokens = jnp.ones((1, 8), jnp.int32)
    params = jax.jit(lambda key: nn.unbox(model.module.init(key, tokens, tokens))["params"])(
        jax.random.key(7)
    )
    checkpointing.save_model_params(folder, 1, params, dataclasses.replace(meta, step=1))
    return folder


@pytest.fixture(scope="module")
def distill_run(teacher_dir, train_file, tmp_path_factory):
    """gin/runs/distill.gin on the tiny model for 2 steps (gradient cache on), and its settings."""
    import gin
    from embedder import gin_utils, losses, partitioning, train_loop, trainer
    from embedder.data import pipeline

    model_dir = tmp_path_factory.mktemp("distilled")
    gin_utils.parse(
        ["runs/distill.gin", "models/tiny.gin", "mesh/cpu.gin"],
        [f"TEACHER = '{teacher_dir}'", f"TRAIN_FILES = ['{train_file}']", *DISTILL_FLAGS],
    )
    try:
        gin_utils.check_macros_read()
        settings = dict(
            model=gin_utils.macro("MODEL"),
            loss=gin_utils.configured(losses.ContrastiveLossConfig)(),
            teacher_loss=gin_utils.configured(losses.TeacherLossConfig)(),
            optimizer=gin_utils.configured(trainer.OptimizerConfig)(),
            data=gin_utils.configured(pipeline.DataConfig)(),
            mesh=gin_utils.configured(partitioning.MeshConfig)(),
        )
        result = gin_utils.configured(train_loop.train)(model_dir=str(model_dir))
    finally:
        gin.clear_config()
    return model_dir, result, settings


@pytest.fixture(scope="module")
def plain_step(distill_run, teacher_dir):
    """Steps 1 and 2 of the same run in this process, on one device, without the gradient cache.

    Returns a dict: the host copies of the initial parameters, of the teacher's
    parameters before and after two steps, the first step's metrics and parameters,
    the batch, the trainer and the last state.
    """
    from embedder import inference, partitioning, train_loop, trainer
    from embedder.data import bucketing
    from tests import training_helpers

    _, _, s = distill_run
    model, data = s["model"], s["data"]
    mesh = partitioning.make_mesh(training_helpers.ONE_DEVICE)
    teacher = inference.Embedder.load(teacher_dir)
    runner = trainer.Trainer(
        model, s["loss"], s["optimizer"], mesh, 2, teacher=teacher.module, teacher_loss=s["teacher_loss"]
    )
    teacher_params = runner.place_teacher_params(teacher.params)
    teacher_before = jax.device_get(teacher_params)
    state = runner.init_state(0)
    initial = jax.device_get(state.params)
    source = train_loop._make_source(model, data)
    buckets = bucketing.LengthBuckets(data.length_buckets, data.query_len, data.doc_len, 0)
    batches = [buckets(source.batch(step)) for step in range(2)]
    state, metrics = runner.train_step(state, partitioning.global_batch(mesh, batches[0]), teacher_params)
    after_one = jax.device_get(state.params)
    state, _ = runner.train_step(state, partitioning.global_batch(mesh, batches[1]), teacher_params)
    return dict(
        runner=runner,
        teacher_module=teacher.module,
        teacher_before=teacher_before,
        teacher_after=jax.device_get(teacher_params),
        initial=initial,
        metrics=jax.device_get(metrics),
        after_one=after_one,
        batch=batches[0],
        state=state,
    )


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _log_softmax(logits, keep):
    logits = np.where(keep, logits, -np.inf)
    top = logits.max(axis=1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))


def _numpy_teacher_terms(student, teacher, projection, batch, dims, tau, tau_t):
    """Embedding matching (cosine, through the map) and in-batch score KL, written out in numpy.

    student / teacher: {"query": [B, D], "positive": [B, D], "negatives": [B, K, D]} float64.
    """
    w = batch["weights"].astype(np.float64)
    valid = batch["negative_valid"] != 0  # [B, K]
    b, k = valid.shape
    rows_s = np.concatenate([student["query"], student["positive"], student["negatives"].reshape(b * k, -1)])
    rows_t = np.concatenate([teacher["query"], teacher["positive"], teacher["negatives"].reshape(b * k, -1)])
    rows_w = np.concatenate([w, w, (w[:, None] * valid).reshape(-1)])
    matching = 0.0
    for d in dims:
        cos = np.sum(_normalize(rows_s[:, :d] @ projection[:d]) * _normalize(rows_t), axis=1)
        matching += np.sum(rows_w * (1 - cos)) / rows_w.sum()
    # Candidates of every query: all positives, then the hard negatives that exist.
    keep = np.concatenate([np.ones((b, b), bool), np.broadcast_to(valid.reshape(1, -1), (b, b * k))], axis=1)

    def log_p(side, d, temperature):
        q = _normalize(side["query"][:, :d])
        candidates = np.concatenate([side["positive"][:, :d], side["negatives"].reshape(b * k, -1)[:, :d]])
        return _log_softmax(q @ _normalize(candidates).T / temperature, keep)

    log_teacher = log_p(teacher, teacher["query"].shape[1], tau_t)
    p_teacher = np.where(keep, np.exp(log_teacher), 0.0)
    distillation = 0.0
    for d in dims:
        log_student = log_p(student, d, tau)
        log_ratio = np.where(keep, log_teacher, 0.0) - np.where(keep, log_student, 0.0)
        kl = np.sum(p_teacher * log_ratio, axis=1)
        distillation += np.sum(w * kl) / w.sum()
    return matching, distillation


@pytest.mark.slow
def test_distilled_step_loss_is_contrastive_plus_weighted_teacher_terms(plain_step, distill_run):
    from embedder import losses

    _, _, s = distill_run
    runner, batch = plain_step["runner"], plain_step["batch"]
    tokens = {k: jnp.asarray(batch[k]) for k in ("query_tokens", "positive_tokens", "negative_tokens")}
    # A missing negative is encoded as its row's positive (and masked), as the step does.
    present = batch["negative_valid"][..., None] != 0
    tokens["negative_tokens"] = jnp.where(
        present, tokens["negative_tokens"], tokens["positive_tokens"][:, None]
    )

    def embed(module, params):
        out = jax.jit(lambda p: module.apply({"params": p}, *tokens.values(), deterministic=True))(params)
        return {name: np.asarray(v, np.float64) for name, v in out.items()}

    student = embed(runner.module, plain_step["initial"]["model"])
    teacher = embed(plain_step["teacher_module"], plain_step["teacher_before"])
    assert teacher["query"].shape == (16, 48) and student["query"].shape == (16, 32)
    projection = np.asarray(plain_step["initial"]["loss"]["teacher_projection"], np.float64)
    config = s["teacher_loss"]
    matching, distillation = _numpy_teacher_terms(
        student, teacher, projection, batch, (32, 16), s["loss"].temperature, config.teacher_temperature
    )
    contrastive = jax.jit(
        lambda q, p, n: losses.matryoshka_contrastive_loss(
            q,
            p,
            n,
            config=s["loss"],
            query_ids=batch["query_ids"],
            positive_ids=batch["positive_ids"],
            weights=batch["weights"],
            negative_mask=batch["negative_valid"],
            negative_ids=batch.get("negative_ids"),
        )[0]
    )(*(jnp.asarray(student[k], jnp.float32) for k in ("query", "positive", "negatives")))
    metrics = plain_step["metrics"]
    np.testing.assert_allclose(metrics["loss/contrastive"], float(contrastive), rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/embedding_matching"], matching, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss/score_distillation"], distillation, rtol=1e-4, atol=1e-6)
    want = float(contrastive) + 0.7 * matching + 0.3 * distillation
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)


@pytest.mark.slow
def test_teacher_is_frozen_outside_the_optimizer_and_the_checkpoint(plain_step, distill_run):
    import orbax.checkpoint as ocp

    # Bit-identical after two steps (the step reads them, never donates or updates them).
    jax.tree.map(np.testing.assert_array_equal, plain_step["teacher_after"], plain_step["teacher_before"])
    state = plain_step["state"]
    assert set(state.params) == {"model", "loss"} and set(state.params["loss"]) == {"teacher_projection"}
    # Adam's two moments of every trained parameter, and nothing else of any size.
    param_size = sum(x.size for x in jax.tree.leaves(state.params))
    moments = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == 2 * param_size
    model_dir, result, _ = distill_run
    saved = ocp.PyTreeCheckpointer().metadata(f"{result.checkpoint_dir}/state").item_metadata.tree
    saved_leaves = jax.tree_util.tree_flatten_with_path(saved)[0]
    state_leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    assert len(saved_leaves) == len(state_leaves)
    assert not [
        p for p, leaf in saved_leaves if 48 in tuple(leaf.shape) and "teacher_projection" not in str(p)
    ]


@pytest.mark.slow
def test_distill_gin_run_trains_and_its_cached_step_equals_the_plain_step(distill_run, plain_step):
    from embedder import checkpointing, summaries

    model_dir, result, _ = distill_run
    assert result.step == 2 and all(np.isfinite(result.losses))
    rows = summaries.read_metrics(str(model_dir))
    assert {"loss/contrastive", "loss/embedding_matching", "loss/score_distillation"} <= set(rows[0])
    # Step 1 of the run (gradient cache, batch split over 2 devices) is the plain one-device step.
    np.testing.assert_allclose(result.losses[0], plain_step["metrics"]["loss"], rtol=1e-5)
    params, _ = checkpointing.load_model_params(str(model_dir), step=1)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        jax.device_get(params),
        plain_step["after_one"]["model"],
    )


@pytest.mark.slow
def test_a_teacher_with_another_tokenizer_is_refused_naming_both(teacher_dir, train_file, tmp_path):
    from embedder import checkpointing, train_loop
    from embedder.data import pipeline
    from embedder.errors import ConfigError
    from tests import training_helpers

    vocab = tmp_path / "vocab"
    vocab.mkdir()
    (vocab / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefgh"]) + "\n"
    )
    params, meta = checkpointing.load_model_params(teacher_dir)
    other = str(tmp_path / "other")
    checkpointing.save_model_params(other, 1, params, dataclasses.replace(meta, vocab_dir=str(vocab)))
    data = pipeline.DataConfig(train_files=[train_file], batch_size=16, query_len=16, doc_len=32)
    student = training_helpers.tiny_spec()
    with pytest.raises(
        ConfigError, match=r"its tokenizer \(.*13 ids\) differs from the student's \(.*30522 ids\)"
    ):
        train_loop._load_teacher(other, student, data)


def test_teacher_settings_that_would_do_nothing_or_cannot_work_are_refused():
    from embedder import losses, partitioning, trainer
    from embedder.errors import ConfigError
    from tests import training_helpers

    student = training_helpers.tiny_spec()
    teacher = training_helpers.tiny_spec(TEACHER_CONFIG).module
    mesh = partitioning.make_mesh(training_helpers.ONE_DEVICE)

    def build(teacher_module, **weights):
        config = losses.TeacherLossConfig(**weights) if weights else None
        return trainer.Trainer(
            student,
            training_helpers.TINY_LOSS,
            training_helpers.TINY_OPTIMIZER,
            mesh,
            2,
            teacher=teacher_module,
            teacher_loss=config,
        )

    with pytest.raises(ConfigError, match="no teacher is given: set TEACHER"):
        build(None, embedding_matching_weight=1.0)
    with pytest.raises(ConfigError, match="every teacher term's weight is 0"):
        build(teacher, score_distillation_weight=0.0)
    with pytest.raises(ConfigError, match="only the given-scores term is on"):
        build(teacher, given_scores_weight=1.0)
    other_vocab = dataclasses.replace(TEACHER_CONFIG, vocab_size=1000)
    with pytest.raises(ConfigError, match="its vocabulary has 1000 ids .* the student's 30522"):
        build(training_helpers.tiny_spec(other_vocab).module, embedding_matching_weight=1.0)
    # Same width, no map: the loss learns nothing of its own.
    same = build(training_helpers.tiny_spec().module, embedding_matching_weight=1.0)
    assert not same.learns_teacher_projection
    with pytest.raises(ConfigError, match="teacher_params must be given exactly when"):
        same.train_step(None, {}, None)


# ---------------------------------------------------------------- quantisation-aware training


def _numpy_int8_fake_quant(params):
    """Every kernel, per output channel: clip(round(w / s), -127, 127) * s with s = max|w| / 127."""

    def visit(path, w):
        names = [str(getattr(k, "key", k)) for k in path]
        w = np.asarray(w, np.float32)
        if names[-1] != "kernel" or any("norm" in n for n in names):
            return w
        # The attention output [heads, head_dim, embed] contracts two axes; the rest axis 0.
        axes = (0, 1) if w.ndim == 3 and names[-2] == "out" else (0,)
        absmax = np.abs(w).max(axis=axes, keepdims=True)
        scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
        return (np.clip(np.round(w / scale), -127, 127) * scale).astype(np.float32)

    return jax.tree_util.tree_map_with_path(visit, params)


@pytest.mark.slow
def test_quantization_aware_forward_pass_is_the_numpy_int8_fake_quant_of_the_kernels():
    from embedder import partitioning, trainer
    from tests import training_helpers

    model = training_helpers.tiny_spec()
    runner = trainer.Trainer(
        model,
        training_helpers.TINY_LOSS,
        training_helpers.TINY_OPTIMIZER,
        partitioning.make_mesh(training_helpers.ONE_DEVICE),
        2,
        quantization_aware=trainer.QuantizationAwareConfig(bits=8),
    )
    dummy = jnp.ones((1, 8), jnp.int32)
    params = jax.jit(lambda key: nn.unbox(model.module.init(key, dummy, dummy))["params"])(jax.random.key(3))
    rng = np.random.default_rng(0)
    tokens = {
        "query_tokens": rng.integers(1000, 2000, (2, 8)).astype(np.int32),
        "positive_tokens": rng.integers(1000, 2000, (2, 12)).astype(np.int32),
    }
    tokens["positive_tokens"][1, 9:] = 0  # padding
    with runner._context():
        got = jax.jit(lambda p: runner._embed({"model": p}, tokens, jax.random.key(0), False))(params)
    forward = jax.jit(lambda p: model.module.apply({"params": p}, *tokens.values(), deterministic=True))
    want = forward(_numpy_int8_fake_quant(jax.device_get(params)))
    plain = forward(params)
    for name in ("query", "positive"):
        error = np.abs(np.asarray(got[name]) - np.asarray(want[name])).max()
        # int8 moves these unit vectors by ~1e-5..1e-4: the float pass is 10x farther than allowed.
        assert error <= 1e-6
        assert np.abs(np.asarray(got[name]) - np.asarray(plain[name])).max() > 1e-5
