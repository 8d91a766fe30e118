"""The Transformer encoder and the dual encoder: numerics, masking, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from embedder import partitioning
from embedder.models import dual_encoder, transformer

TINY_BERT = transformer.TransformerConfig(
    family="bert", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=64
)
TINY_LLM = transformer.TransformerConfig(
    family="llm",
    vocab_size=128,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=64,
    activation="silu",
    norm_eps=1e-6,
)


def _tokens(rng, batch, length, vocab=128, min_len=2):
    """Random right-padded token ids (pad id 0) with random real lengths."""
    lengths = rng.integers(min_len, length + 1, size=batch)
    tokens = rng.integers(1, vocab, size=(batch, length)).astype(np.int32)
    tokens[np.arange(length)[None, :] >= lengths[:, None]] = 0
    return tokens


def _init(module, tokens, seed=0):
    return nn.unbox(module.init(jax.random.key(seed), tokens, method=module.encode))["params"]


# ---------------------------------------------------------------- pooling


@pytest.mark.parametrize("method", ["mean", "first", "last"])
def test_pool_matches_numpy(method):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    expected = []
    for h, m in zip(hidden, mask, strict=True):
        real = h[m]
        expected.append({"mean": real.mean(0), "first": h[0], "last": real[-1]}[method])
    got = dual_encoder.pool(jnp.asarray(hidden), jnp.asarray(mask), method)
    np.testing.assert_allclose(np.asarray(got), np.stack(expected), rtol=1e-6, atol=1e-6)


def test_unknown_pooling_is_a_clear_error():
    with pytest.raises(ValueError, match="pooling='max'.*mean"):
        module = dual_encoder.DualEncoder(TINY_BERT, pooling="max")
        _init(module, jnp.ones((1, 4), jnp.int32))


def test_l2_normalize_matches_numpy():
    x = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    got = dual_encoder.l2_normalize(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), x / np.linalg.norm(x, axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(dual_encoder.l2_normalize(jnp.zeros((1, 3)))), 0.0)


# ---------------------------------------------------------------- encoder behaviour


@pytest.mark.parametrize("config", [TINY_BERT, TINY_LLM], ids=["bert", "llm"])
@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.slow
def test_padding_does_not_change_embeddings(config, pooling):
    """Appending padding must leave every embedding unchanged (padding is masked)."""
    module = dual_encoder.DualEncoder(config, pooling=pooling)
    tokens = _tokens(np.random.default_rng(2), 4, 8)
    params = _init(module, tokens)
    short = module.apply({"params": params}, tokens, method=module.encode)
    padded = np.concatenate([tokens, np.zeros((4, 8), np.int32)], axis=1)
    long = module.apply({"params": params}, padded, method=module.encode)
    np.testing.assert_allclose(np.asarray(short), np.asarray(long), atol=2e-6)


def test_llm_family_attention_is_bidirectional():
    """A decoder turned encoder: the first token must see the last one."""
    encoder = transformer.Encoder(TINY_LLM)
    tokens = jnp.array([[5, 6, 7, 8]], jnp.int32)
    params = encoder.init(jax.random.key(0), tokens)
    a = encoder.apply(params, tokens)
    b = encoder.apply(params, tokens.at[0, 3].set(9))
    assert float(jnp.abs(a[0, 0] - b[0, 0]).max()) > 1e-4


def test_rotary_matches_numpy_and_is_relative():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 6, 2, 8)).astype(np.float32)
    pos = np.arange(6)[None]
    got = np.asarray(transformer.apply_rotary(jnp.asarray(x), jnp.asarray(pos), 10000.0))
    # Reference: pairs (i, i + half) rotated by angle pos * theta^(-i/half).
    half = 4
    expected = np.empty_like(x)
    for t in range(6):
        for i in range(half):
            a = t * 10000.0 ** (-i / half)
            x1, x2 = x[0, t, :, i], x[0, t, :, i + half]
            expected[0, t, :, i] = x1 * np.cos(a) - x2 * np.sin(a)
            expected[0, t, :, i + half] = x2 * np.cos(a) + x1 * np.sin(a)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # Same vectors at positions shifted by the same offset give the same dot product.
    q = np.broadcast_to(x[:, :1], x.shape)
    k = np.broadcast_to(x[:, 1:2], x.shape)
    rq = np.asarray(transformer.apply_rotary(jnp.asarray(q), jnp.asarray(pos), 10000.0))
    rk = np.asarray(transformer.apply_rotary(jnp.asarray(k), jnp.asarray(pos), 10000.0))
    np.testing.assert_allclose((rq[0, 1] * rk[0, 0]).sum(-1), (rq[0, 4] * rk[0, 3]).sum(-1), rtol=1e-4)


def test_two_towers_have_separate_parameters():
    module = dual_encoder.DualEncoder(TINY_BERT, shared_tower=False, projection_dim=16)
    tokens = _tokens(np.random.default_rng(4), 2, 8)
    variables = module.init(jax.random.key(0), tokens, tokens)
    params = nn.unbox(variables)["params"]
    assert set(params) == {"query_encoder", "document_encoder", "projection"}
    out = module.apply({"params": params}, tokens, tokens)
    assert out["query"].shape == (2, 16)
    # Same text, different towers: different embeddings.
    assert float(jnp.abs(out["query"] - out["positive"]).max()) > 1e-3
    np.testing.assert_allclose(np.linalg.norm(np.asarray(out["query"]), axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow
def test_negatives_stay_with_their_example():
    module = dual_encoder.DualEncoder(TINY_BERT)
    rng = np.random.default_rng(5)
    q, p = _tokens(rng, 3, 8), _tokens(rng, 3, 10)
    negs = np.stack([_tokens(rng, 2, 10) for _ in range(3)])  # [3, 2, 10]
    variables = module.init(jax.random.key(0), q, p, negs)
    out = module.apply(variables, q, p, negs)
    assert out["negatives"].shape == (3, 2, 32)
    direct = module.apply(variables, negs[1], "document", method=module.encode)
    np.testing.assert_allclose(np.asarray(out["negatives"][1]), np.asarray(direct), atol=1e-6)


@pytest.mark.slow
def test_remat_gives_the_same_gradients():
    tokens = _tokens(np.random.default_rng(6), 4, 8)
    grads = []
    for remat in (False, True):
        config = transformer.TransformerConfig(**{**TINY_BERT.__dict__, "remat": remat})
        module = dual_encoder.DualEncoder(config)
        params = _init(module, tokens)

        def loss(p, module=module):
            return jnp.sum(module.apply({"params": p}, tokens, method=module.encode) ** 3)

        grads.append(jax.grad(loss)(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)


def test_bf16_compute_keeps_fp32_params():
    config = transformer.TransformerConfig(**{**TINY_LLM.__dict__, "dtype": "bfloat16"})
    module = dual_encoder.DualEncoder(config)
    tokens = _tokens(np.random.default_rng(7), 4, 8)
    params = _init(module, tokens)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    low = module.apply({"params": params}, tokens, method=module.encode)
    full = dual_encoder.DualEncoder(TINY_LLM).apply({"params": params}, tokens, method=module.encode)
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low), np.asarray(full), atol=3e-2)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="family='gpt'"):
        transformer.TransformerConfig(family="gpt")
    with pytest.raises(ValueError, match="num_kv_heads=5"):
        transformer.TransformerConfig(num_heads=12, num_kv_heads=5)
    with pytest.raises(ValueError, match="dtype='fp8'"):
        transformer.TransformerConfig(dtype="fp8")


# ---------------------------------------------------------------- sharding


def _loss_fn(module):
    """A contrastive-style scalar of the embeddings, enough to exercise every parameter."""

    def loss(params, q, p):
        out = module.apply({"params": params}, q, p)
        logits = out["query"] @ out["positive"].T / 0.05
        return -jnp.mean(jax.nn.log_softmax(logits, axis=-1).diagonal())

    return loss


@pytest.mark.parametrize("config", [TINY_BERT, TINY_LLM], ids=["bert", "llm"])
@pytest.mark.slow
def test_forward_backward_sharded_by_logical_names(config):
    """On 8 fake devices (data 2 x fsdp 2 x model 2) the sharded step equals one device's."""
    assert jax.device_count() == 8
    module = dual_encoder.DualEncoder(config, projection_dim=16)
    rng = np.random.default_rng(8)
    q, p = _tokens(rng, 8, 8), _tokens(rng, 8, 12)
    loss = _loss_fn(module)

    # Reference: one device, no sharding.
    params = nn.unbox(module.init(jax.random.key(0), q, p))["params"]
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params, q, p)

    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, model=2))
    rules = partitioning.DEFAULT_RULES
    abstract = jax.eval_shape(module.init, jax.random.key(0), q, p)
    shardings = partitioning.variable_shardings(abstract, mesh, rules)["params"]
    # The names really drive the layout: the MLP input kernel is [embed, mlp] -> (fsdp, model).
    wi = "wi_gate" if config.family == "llm" else "wi"
    assert shardings["encoder"]["layer_0"]["mlp"][wi]["kernel"].spec == PartitionSpec("fsdp", "model")
    assert shardings["encoder"]["layer_0"]["attention"]["query"]["kernel"].spec == PartitionSpec(
        "fsdp", "model", None
    )
    batch = partitioning.batch_sharding(mesh, 2, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        sharded_params = jax.device_put(params, shardings)
        step = jax.jit(
            jax.value_and_grad(loss), in_shardings=(shardings, batch, batch), out_shardings=(None, shardings)
        )
        got_loss, got_grads = step(sharded_params, jax.device_put(q, batch), jax.device_put(p, batch))
    kernel = got_grads["encoder"]["layer_0"]["mlp"][wi]["kernel"]
    assert len(kernel.sharding.device_set) == 8
    assert kernel.addressable_shards[0].data.shape == (config.hidden_size // 2, config.mlp_dim // 2)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-5)
    # Sums over the batch run in another order across devices, so entries differ by
    # fp32 round-off relative to the gradient's scale (the key bias's true gradient
    # is 0, softmax being shift-invariant, and both sides hold only noise there).
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5 * scale),
        got_grads,
        ref_grads,
    )


def test_mesh_config_errors():
    with pytest.raises(ValueError, match="do not divide"):
        partitioning.MeshConfig(data=-1, model=3).shape(8)
    with pytest.raises(ValueError, match="needs 12 devices but 8"):
        partitioning.MeshConfig(data=3, fsdp=2, model=2).shape(8)
    assert partitioning.MeshConfig(data=-1, model=2).shape(8) == (4, 1, 2)


@pytest.mark.parametrize("equation", ["bld,dhk->blhk", "blhk,hkd->bld", "bld,dm->blm"])
def test_mixed_einsum_gradients_match_float32(equation):
    """bf16 operands, f32 accumulation both ways: gradients equal the f32 ones to bf16 precision."""
    rng = np.random.default_rng(9)
    lhs, rhs = equation.split("->")[0].split(",")
    sizes = {"b": 2, "l": 5, "d": 8, "h": 2, "k": 4, "m": 6}
    x = rng.normal(size=[sizes[c] for c in lhs]).astype(np.float32)
    y = rng.normal(size=[sizes[c] for c in rhs]).astype(np.float32)
    out_shape = [sizes[c] for c in equation.split("->")[1]]
    w = jnp.asarray(rng.normal(size=out_shape).astype(np.float32))

    def mixed(a, b):
        return jnp.sum(transformer.mixed_einsum(equation, a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)) * w)

    def full(a, b):
        return jnp.sum(jnp.einsum(equation, a, b) * w)

    got = jax.grad(mixed, argnums=(0, 1))(x, y)
    want = jax.grad(full, argnums=(0, 1))(x, y)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == jnp.float32 and g.shape == r.shape
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(r), rtol=3e-2, atol=3e-2 * float(np.abs(r).max())
        )


def _gemma3_params(vocab, d, layers, heads, kv_heads, head_dim, mlp):
    """Gemma 3's parameter count by hand: embedding, per layer q/k/v/o, a gated MLP,
    four width norms and two head norms, the final norm (no biases)."""
    attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
    return vocab * d + layers * (attention + 3 * d * mlp + 4 * d + 2 * head_dim) + d


def _qwen3_params(vocab, d, layers, heads, kv_heads, head_dim, mlp):
    """Qwen3's: as Gemma 3 but two width norms per layer."""
    attention = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim
    return vocab * d + layers * (attention + 3 * d * mlp + 2 * d + 2 * head_dim) + d


@pytest.mark.parametrize(
    "gin_file, vocab, num_params, bindings",
    [
        # Published sizes: Gemma 3 1B 999,885,952; EmbeddingGemma's encoder; Qwen3-Embedding-0.6B 595,776,512.
        ("gemma3_1b.gin", 262144, _gemma3_params(262144, 1152, 26, 4, 1, 256, 6912), ["PRETRAINED_DIR='/w'"]),
        (
            "embeddinggemma_300m.gin",
            262144,
            _gemma3_params(262144, 768, 24, 3, 1, 256, 1152) + 2 * 768 * 3072,
            ["PRETRAINED_DIR='/w'"],
        ),
        (
            "qwen3_0p6b.gin",
            151669,
            _qwen3_params(151669, 1024, 28, 16, 8, 128, 3072),
            ["PRETRAINED_DIR='/w'"],
        ),
        ("gecko_1b.gin", 262144, _gemma3_params(262144, 1152, 26, 4, 1, 256, 6912) + 1152 * 768, []),
    ],
)
@pytest.mark.slow
def test_llm_gin_files_build_abstractly_at_their_real_size(gin_file, vocab, num_params, bindings):
    import gin
    from embedder import gin_utils

    gin_utils.parse([f"gin/models/{gin_file}"], bindings)
    try:
        model = gin_utils.macro("MODEL")
    finally:
        gin.clear_config()
    config = model.module.config
    assert config.vocab_size == vocab
    shapes = nn.unbox(model.abstract_variables())["params"]
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == num_params
    assert num_params in (999_885_952, 302_863_104 + 2 * 768 * 3072, 595_776_512, 999_885_952 + 1152 * 768)
    if gin_file != "qwen3_0p6b.gin":
        # Gemma 3's 5:1 pattern: every sixth layer is global.
        globals_ = [i for i, t in enumerate(config.attention_types) if t == transformer.FULL_ATTENTION]
        assert globals_ == list(range(5, config.num_layers, 6))
    if bindings:
        assert model.init_from == "/w" and model.vocab_dir == "/w"


@pytest.mark.parametrize("gin_file", ["gemma3_1b.gin", "embeddinggemma_300m.gin", "qwen3_0p6b.gin"])
def test_pretrained_gin_files_name_their_missing_folder(gin_file):
    import gin
    from embedder import gin_utils

    try:
        with pytest.raises(ValueError, match="PRETRAINED_DIR"):
            gin_utils.parse([f"gin/models/{gin_file}"])
    finally:
        gin.clear_config()


def test_attention_mask_matches_numpy():
    """Causal, sliding (both directions) and padding rules against a loop over pairs."""
    rng = np.random.default_rng(4)
    mask = rng.random((3, 9)) > 0.3
    for causal in (False, True):
        for window in (None, 1, 3):
            got = np.asarray(transformer.attention_mask(jnp.asarray(mask), causal, window))
            want = np.zeros((3, 9, 9), bool)
            for b, q, k in np.ndindex(3, 9, 9):
                ok = mask[b, k] and (not causal or k <= q)
                ok = ok and (window is None or (abs(q - k) < window if not causal else q - k < window))
                want[b, q, k] = ok
            np.testing.assert_array_equal(got, want)


def test_gemma_rms_norm_scales_by_one_plus_w():
    x = np.random.default_rng(5).normal(size=(2, 6)).astype(np.float32)
    w = np.linspace(-0.5, 0.5, 6).astype(np.float32)
    ref = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6)
    got = transformer.RMSNorm(1e-6, offset=True).apply({"params": {"scale": w}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), ref * (1 + w), rtol=1e-5)
    init = transformer.RMSNorm(1e-6, offset=True).init(jax.random.key(0), jnp.asarray(x))
    assert np.all(nn.unbox(init)["params"]["scale"] == 0)  # identity at init


def test_layer_types_follow_the_pattern_or_the_list():
    base = dict(TINY_LLM.__dict__, num_layers=7, sliding_window=4)
    assert transformer.TransformerConfig(**dict(base, sliding_window_pattern=3)).attention_types == (
        "sliding_attention",
        "sliding_attention",
        "full_attention",
    ) * 2 + ("sliding_attention",)
    listed = ("full_attention",) * 6 + ("sliding_attention",)
    assert transformer.TransformerConfig(**dict(base, layer_types=list(listed))).attention_types == listed
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        transformer.TransformerConfig(**dict(base, layer_types=["full_attention"] * 2))
    with pytest.raises(ValueError, match="llm-family options"):
        transformer.TransformerConfig(**dict(TINY_BERT.__dict__, causal=True))
