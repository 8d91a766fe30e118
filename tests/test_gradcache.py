"""The gradient cache equals the plain step, and its chunks stay on their devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedder import gradcache, losses, partitioning
from embedder.models import dual_encoder, transformer

CONFIG = transformer.TransformerConfig(
    family="bert", vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=64
)
BATCH, NEGATIVES = 64, 2


def _tokens(rng, shape, length):
    lengths = rng.integers(2, length + 1, size=shape)
    tokens = rng.integers(1, 128, size=(*shape, length)).astype(np.int32)
    tokens[np.arange(length) >= lengths[..., None]] = 0
    return tokens


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    inputs = {
        "query_tokens": _tokens(rng, (BATCH,), 8),
        "positive_tokens": _tokens(rng, (BATCH,), 12),
        "negative_tokens": _tokens(rng, (BATCH, NEGATIVES), 12),
    }
    # Planted duplicates for the mask: examples 3 and 40 share a query, 7 and 20 a positive.
    query_ids = np.arange(BATCH, dtype=np.int32)
    positive_ids = np.arange(BATCH, dtype=np.int32) + 1000
    query_ids[40] = query_ids[3]
    positive_ids[20] = positive_ids[7]
    weights = np.ones(BATCH, np.float32)
    weights[-3:] = 0.0  # a ragged last batch
    module = dual_encoder.DualEncoder(CONFIG, projection_dim=24)
    params = nn.unbox(module.init(jax.random.key(0), inputs["query_tokens"], inputs["positive_tokens"]))[
        "params"
    ]
    loss_config = losses.ContrastiveLossConfig(
        temperature=0.05, same_tower_negatives=True, mask_duplicates=True, matryoshka_dims=(24, 16, 8)
    )

    def embed_fn(p, chunk):
        return module.apply(
            {"params": p}, chunk["query_tokens"], chunk["positive_tokens"], chunk["negative_tokens"]
        )

    def loss_fn(p, emb, ids):
        return losses.matryoshka_contrastive_loss(
            emb["query"],
            emb["positive"],
            emb["negatives"],
            config=loss_config,
            query_ids=ids["query_ids"],
            positive_ids=ids["positive_ids"],
            weights=ids["weights"],
        )

    ids = {"query_ids": query_ids, "positive_ids": positive_ids, "weights": weights}
    return module, params, inputs, ids, embed_fn, loss_fn


@pytest.mark.slow
def test_gradient_cache_equals_the_plain_step_on_8_devices(setup):
    module, params, inputs, ids, embed_fn, loss_fn = setup
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=8))
    assert mesh.devices.size == 8

    def plain(p, x, i):
        return jax.value_and_grad(lambda q: loss_fn(q, embed_fn(q, x), i), has_aux=True)(p)

    def cached(p, x, i):
        return gradcache.cached_value_and_grad(
            embed_fn, lambda q, e: loss_fn(q, e, i), p, x, chunk_size=8, num_shards=8
        )

    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
        shard = lambda x: jax.device_put(x, partitioning.batch_sharding(mesh, x.ndim))  # noqa: E731
        x, i = jax.tree.map(shard, inputs), jax.tree.map(shard, ids)
        (loss_p, aux_p), grads_p = jax.jit(plain)(params, x, i)
        (loss_c, aux_c), grads_c = jax.jit(cached)(params, x, i)
    assert np.isfinite(float(loss_p))
    np.testing.assert_allclose(float(loss_c), float(loss_p), rtol=1e-5)
    for key in aux_p:
        np.testing.assert_allclose(float(aux_c[key]), float(aux_p[key]), rtol=1e-5, atol=1e-6)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grads_p))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=1e-4),
        grads_c,
        grads_p,
    )


def test_chunks_stay_on_the_device_that_holds_the_rows():
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=8))
    sharding = partitioning.batch_sharding(mesh, 1)
    rows = jax.device_put(np.arange(64, dtype=np.int32), sharding)
    held = {s.device: set(np.asarray(s.data).tolist()) for s in rows.addressable_shards}
    with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
        chunks = jax.jit(lambda r: gradcache.split_chunks(r, 4, 8))(rows)  # [4 chunks, 16]
    for shard in chunks.addressable_shards:
        assert set(np.asarray(shard.data).ravel().tolist()) <= held[shard.device]
    # Every chunk draws 2 rows from each of the 8 shards.
    for chunk in np.asarray(chunks):
        assert sorted({r // 8 for r in chunk}) == list(range(8))
    merged = gradcache.merge_chunks(jnp.asarray(np.asarray(chunks)), 8)
    np.testing.assert_array_equal(np.asarray(merged), np.arange(64))


def test_bad_chunking_is_a_clear_error():
    with pytest.raises(ValueError, match="chunk size 12 is not divisible by the 8"):
        gradcache.check_chunking(64, 12, 8)
    with pytest.raises(ValueError, match="global batch 60 is not divisible .* chunk size 8"):
        gradcache.check_chunking(60, 8, 8)
    with pytest.raises(ValueError, match="must be positive"):
        gradcache.check_chunking(64, 0, 8)
