"""Packed training: packed rows embed as unpadded texts do, and a packed run trains as an unpacked one.

The reference of every comparison is the unpacked path: each text alone in a
right-padded row of its own (`DualEncoder.encode`, the step without packing).
"""

import dataclasses
import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from embedder import partitioning, summaries
from embedder.data import packing
from embedder.models import dual_encoder, transformer
from tests import training_helpers

LENGTH = 16
BERT = transformer.TransformerConfig(
    vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, mlp_dim=32, max_len=LENGTH
)
_LLM = dict(
    family="llm", vocab_size=64, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)
# Gemma 3-like: bidirectional, one sliding-window layer and one global one.
GEMMA = transformer.TransformerConfig(
    **_LLM,
    mlp_dim=32,
    activation="gelu_tanh",
    norm_eps=1e-6,
    norm_offset=True,
    qk_norm=True,
    post_norms=True,
    scale_embeddings=True,
    query_pre_attn_scalar=8.0,
    sliding_window=3,
    sliding_window_pattern=2,
    rope_local_theta=100.0,
)
# Qwen3-like: causal, SwiGLU.
QWEN = transformer.TransformerConfig(
    **_LLM, mlp_dim=32, activation="silu", norm_eps=1e-6, qk_norm=True, causal=True
)
CONFIGS = {"bert": BERT, "gemma": GEMMA, "qwen": QWEN}
POOLINGS = ("mean", "first", "last")


def _texts(count: int, seed: int = 0) -> np.ndarray:
    """`count` texts of 1..LENGTH tokens (ids >= 1; 0 pads), long-tailed, right-padded: [count, LENGTH]."""
    rng = np.random.default_rng(seed)
    lengths = np.minimum(rng.geometric(0.2, count), LENGTH)
    lengths[0] = LENGTH  # a full row too
    rows = np.zeros((count, LENGTH), np.int32)
    for i, n in enumerate(lengths):
        rows[i, :n] = rng.integers(1, 64, n)
    return rows


@pytest.fixture(scope="module")
def params():
    """Each tiny model's parameters: random normal values of the model's shapes (no init run)."""
    tokens = jax.ShapeDtypeStruct((1, LENGTH), jnp.int32)
    rng = np.random.default_rng(1)
    out = {}
    for name, config in CONFIGS.items():
        model = dual_encoder.DualEncoder(config)
        shapes = jax.eval_shape(
            lambda t, m=model: nn.unbox(m.init(jax.random.key(0), t, t)["params"]), tokens
        )
        out[name] = jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(np.float32), shapes)
    return out


def _packed_and_unpacked(config, params, texts, mesh=None):
    """{name: (packed, unpacked)}: each text's vector both ways, [texts, dim] twice.

    The names: each pooling of the encoder's states (`pool_segments` of the
    packed rows, `pool` of the padded texts) and, on one device, the whole
    `encode_packed` against `encode` (projection and normalisation included).
    """
    packed = packing.Packer(pad_id=0, num_groups=1)({"query_tokens": texts})
    tokens, segments = packed["query_tokens"][0], packed["query_segment_ids"][0]
    if mesh is not None:  # rows a multiple of the devices: padding rows
        extra = -len(tokens) % mesh.size
        tokens = np.concatenate([tokens, np.zeros((extra, LENGTH), np.int32)])
        segments = np.concatenate([segments, np.zeros((extra, LENGTH), np.int32)])
    assert len(tokens) < len(texts)  # the texts were packed

    def run(params, tokens, segments, texts):
        encoder = transformer.Encoder(config)
        mask = tokens != 0
        rows = encoder.apply({"params": params["encoder"]}, tokens, mask=mask, segment_ids=segments)
        alone = encoder.apply({"params": params["encoder"]}, texts)
        out = {}
        for pooling in POOLINGS:
            pooled, valid = dual_encoder.pool_segments(rows, mask, segments, pooling)
            out[pooling] = (pooled, valid, dual_encoder.pool(alone, texts != 0, pooling))
        if mesh is None:
            model = dual_encoder.DualEncoder(config, pooling="last" if config.causal else "mean")
            embedded, valid = model.apply({"params": params}, tokens, segments, method="encode_packed")
            out["encode"] = (embedded, valid, model.apply({"params": params}, texts, method="encode"))
        return out

    if mesh is None:
        results = jax.jit(run)(params, tokens, segments, texts)
    else:
        rows = partitioning.batch_sharding(mesh, 2)
        with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.DEFAULT_RULES):
            results = jax.jit(run, in_shardings=(None, rows, rows, rows))(params, tokens, segments, texts)
    slots = packed["query_slots"]
    out = {}
    for name, (embedded, valid, unpacked) in results.items():
        assert np.asarray(valid)[slots].all() and np.asarray(valid).sum() == len(texts)
        out[name] = (np.asarray(embedded)[slots], np.asarray(unpacked))
    return out


@pytest.mark.parametrize("devices", [1, 8])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_packed_embeddings_equal_unpacked_ones(params, family, devices):
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=8)) if devices == 8 else None
    results = _packed_and_unpacked(CONFIGS[family], params[family], _texts(40), mesh)
    assert set(results) == {*POOLINGS, *(["encode"] if devices == 1 else [])}
    for name, (packed, unpacked) in results.items():
        np.testing.assert_allclose(packed, unpacked, atol=1e-5, err_msg=name)


def test_positions_restart_and_attention_is_block_diagonal():
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 3, 3]])
    np.testing.assert_array_equal(transformer.segment_positions(segments), [[0, 1, 2, 0, 1, 0, 0, 1]])
    mask = transformer.attention_mask(
        segments != 0,
        causal=True,
        sliding_window=2,
        positions=transformer.segment_positions(segments),
        segment_ids=segments,
    )[0]
    # Reference: token i sees token j iff same text, j real, 0 <= i - j < 2.
    seg = np.asarray(segments[0])
    expected = np.array([[seg[i] == seg[j] != 0 and 0 <= i - j < 2 for j in range(8)] for i in range(8)])
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("grouped", [False, True])
def test_dot_product_attention_equals_the_einsums(grouped):
    rng = np.random.default_rng(0)
    kv_heads = 2 if grouped else 4
    q = jnp.asarray(rng.standard_normal((3, 8, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 8, kv_heads, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((3, 8, kv_heads, 8)), jnp.float32)
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 0, 0], [1, 2, 2, 2, 2, 2, 3, 3], [1] * 8])
    mask = transformer.attention_mask(segments != 0, False, None, segment_ids=segments)
    both = jax.jit(
        lambda q, k, v: [
            transformer.attend(q, k, v, mask, 8**-0.5, jnp.float32, impl)
            for impl in ("einsum", "dot_product")
        ]
    )
    outs = both(q, k, v)
    real = np.asarray(segments != 0)
    np.testing.assert_allclose(np.asarray(outs[0])[real], np.asarray(outs[1])[real], atol=1e-5)


def test_first_fit_decreasing_packs_like_a_reference():
    lengths = [5, 9, 3, 7, 2, 2, 8, 1]
    row, offset, rows = packing.first_fit_decreasing(lengths, 10)
    # By hand: 9 -> r0, 8 -> r1, 7 -> r2, 5 -> r3, 3 -> r2, 2 -> r1, 2 -> r3, 1 -> r0.
    np.testing.assert_array_equal(row, [3, 0, 2, 2, 1, 3, 1, 0])
    np.testing.assert_array_equal(offset, [0, 0, 7, 0, 8, 5, 0, 9])
    assert rows == 4
    with pytest.raises(packing.DataError, match="11 tokens cannot be packed into rows of 10"):
        packing.first_fit_decreasing([11], 10)


def test_packer_keeps_every_text_whole_and_is_deterministic():
    rng = np.random.default_rng(0)
    batch = {
        "query_tokens": _texts(16, seed=1),
        "positive_tokens": _texts(16, seed=2),
        "negative_tokens": _texts(32, seed=3).reshape(16, 2, LENGTH),
        "negative_valid": (rng.random((16, 2)) < 0.7).astype(np.int32),
    }
    packer = packing.Packer(pad_id=0, num_groups=2)
    packed = packer(batch)
    assert packing.is_packed(packed)
    again = packer(batch)
    for key in packed:
        np.testing.assert_array_equal(packed[key], again[key])
    for key, side in packing.SIDES:
        tokens, segments = packed[key], packed[f"{side}_segment_ids"]
        assert tokens.shape[0] == 2 and tokens.shape[1] <= 8 * (2 if side == "negative" else 1)
        texts = batch[key].reshape(2, -1, LENGTH)
        slots = packed[f"{side}_slots"].reshape(2, -1)
        valid = batch["negative_valid"].reshape(2, -1) if side == "negative" else np.ones_like(slots)
        for g in range(2):
            for text, slot in enumerate(slots[g]):
                if not valid[g, text]:
                    continue
                row, segment = divmod(int(slot), LENGTH)
                got = tokens[g, row][segments[g, row] == segment + 1]
                want = texts[g, text][: packing.text_lengths(texts[g, text], 0)]
                np.testing.assert_array_equal(got, want)
    utilisation = packing.token_utilisation(packed, 0)
    plain = packing.token_utilisation(batch, 0)
    assert plain["token_utilisation/query"] < utilisation["token_utilisation/query"] <= 1


# ---------------------------------------------------------------------- training

STEPS = 20
CHUNK = 8


# One layer: the step compiles twice (packed and not), and compiling is most of the test's time.
ONE_LAYER = training_helpers.tiny_spec(dataclasses.replace(training_helpers.TINY, num_layers=1))


@pytest.fixture(scope="module")
def negatives_file(stdlib_splits, tmp_path_factory):
    """Stdlib pairs with a hard negative (the next pair's code), missing on one row of 16.

    Few missing negatives keep the packed shapes few (each is compiled once).
    """
    from embedder.data import jsonl

    pairs = stdlib_splits["train"][:200]
    rows = [
        dataclasses.replace(p, negatives=() if i % 16 == 15 else (pairs[(i + 1) % len(pairs)].positive,))
        for i, p in enumerate(pairs)
    ]
    path = str(tmp_path_factory.mktemp("packing") / "negatives.jsonl")
    jsonl.write_jsonl(path, rows)
    return path


def _run(model_dir, train_file, packed: bool):
    data = training_helpers.pipeline.DataConfig(
        train_files=[train_file], batch_size=16, query_len=16, doc_len=32, num_negatives=1
    )
    return training_helpers.train_tiny(
        model_dir,
        train_file,
        steps=STEPS,
        model=ONE_LAYER,
        data=data,
        grad_cache_chunk=CHUNK,
        packing=packed,
        log_every=1,
    )


def _packed_batches(train_file):
    """The packed batches of the run, built from the batcher and packer directly."""
    from embedder.data import batching, jsonl, wordpiece
    from embedder.models import pretrained

    tok = wordpiece.WordPieceTokenizer.from_pretrained_dir(pretrained.minilm_l6_v2_path())
    batcher = batching.PairBatcher(
        jsonl.read_jsonl(train_file), tok, global_batch_size=16, query_len=16, doc_len=32, num_negatives=1
    )
    # One device, two gradient-cache chunks: two groups.
    packer = packing.Packer(tok.pad_id, num_groups=16 // CHUNK)
    return [packer(batcher.batch(step)) for step in range(STEPS)]


@pytest.mark.slow
def test_packed_training_equals_unpacked_and_compiles_once_per_shape(negatives_file, tmp_path, caplog):
    """Gradient cache (two chunks), Matryoshka (32, 16) and hard negatives (some missing) on."""
    train_file = negatives_file
    unpacked = _run(tmp_path / "unpacked", train_file, packed=False)
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        packed = _run(tmp_path / "packed", train_file, packed=True)
    np.testing.assert_allclose(packed.losses, unpacked.losses, rtol=2e-5, atol=2e-5)
    metrics = summaries.read_metrics(str(tmp_path / "packed"))
    shapes = {
        tuple(packed_batch[k].shape for k, _ in packing.SIDES) for packed_batch in _packed_batches(train_file)
    }
    compiles = [
        r.getMessage() for r in caplog.records if re.search(r"Compiling jit\(_step\)", r.getMessage())
    ]
    assert len(compiles) == len(shapes), (compiles, shapes)
    assert all(m["token_utilisation/query"] > 0 for m in metrics)
    plain = summaries.read_metrics(str(tmp_path / "unpacked"))
    mean = lambda rows, key: np.mean([m[key] for m in rows])  # noqa: E731
    assert mean(metrics, "token_utilisation/document") > mean(plain, "token_utilisation/document")


def test_packed_rows_per_group_follow_the_ladder():
    assert packing.row_ladder(16, 8) == (2, 4, 6, 8, 10, 12, 14, 16)
    assert packing.row_ladder(3, 8) == (1, 2, 3)
    batch = {"query_tokens": _texts(16)}
    packed = packing.Packer(0, 1)(batch)
    needed = packing.Packer(0, 1).rows_needed(batch)[0]
    assert packed["query_tokens"].shape[1] == next(r for r in packing.row_ladder(16, 8) if r >= needed)
    # Another process needing more rows: every process takes the larger count.
    combined = packing.Packer(0, 1)(batch, combine=lambda n: n + 5)
    assert combined["query_tokens"].shape[1] >= needed + 5
