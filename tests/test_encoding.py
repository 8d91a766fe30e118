"""The encoding plan (tight length buckets, a token budget per pass, a partial
last batch) and the loop that runs it: the embeddings of the plan before it
(batch_size rows, padded to a full batch and a power-of-two length) in input
order, on one device and on an 8-device mesh, from a bounded set of compiles."""

import dataclasses
import logging
import math
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from embedder import encoding, errors, inference, partitioning
from embedder.data import tokenizers
from embedder.models import dual_encoder, pretrained
from tests.training_helpers import TINY

LENGTH = 64
# A model of this file's own (so no other test has compiled its shapes).
CONFIG = dataclasses.replace(TINY, hidden_size=16, num_heads=2, mlp_dim=32, num_layers=1)


def test_length_buckets_are_the_tight_ladder():
    assert encoding.length_buckets(256) == (
        *(8, 12, 16, 20, 24, 28, 32),
        *(40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256),
    )
    assert encoding.length_buckets(100)[-2:] == (96, 100)
    assert encoding.length_buckets(5) == (5,)
    # Four per doubling to any limit: at most 25% longer than a text of 32 tokens or more.
    ladder = encoding.length_buckets(8192)
    assert len(ladder) == 39 and ladder[6] == 32
    assert max(b / a for a, b in zip(ladder[6:], ladder[7:], strict=False)) == 1.25
    with pytest.raises(errors.ConfigError, match="max_length=0"):
        encoding.length_buckets(0)


def test_encoding_plan_covers_every_text_once_in_padded_buckets():
    lengths = [3, 40, 17, 5, 200, 16, 9]
    batches = encoding.plan(lengths, batch_size=3, max_length=128, multiple=2)
    # A budget of 3 * 128 tokens: one row of 128 rounded to a multiple of 2 is 2.
    assert [b.size for b in batches] == [2, 2, 2, 2]
    assert sorted(np.concatenate([b.rows for b in batches]).tolist()) == list(range(7))
    # Shortest first; each bucket the smallest rung holding its longest text, capped
    # at 128; a partial batch's spare row takes the next shorter text (40 with 200).
    assert [sorted(lengths[r] for r in b.rows) for b in batches] == [[3], [5, 9], [16, 17], [40, 200]]
    assert [b.length for b in batches] == [8, 12, 20, 128]
    tokens, mask = encoding.pad([[1, 2, 0]] * 7, batches[0], pad_id=0)
    assert tokens.shape == mask.shape == (2, 8)
    assert mask[0, :3].all() and not mask[0, 3:].any()  # the literal 0 is a token: the mask follows lengths
    assert not mask[1].any()  # the empty row
    with pytest.raises(ValueError, match="batch_size=0"):
        encoding.plan(lengths, 0, 128)
    with pytest.raises(errors.ConfigError, match="tokens_per_batch=0"):
        encoding.plan(lengths, 3, 128, tokens_per_batch=0)
    assert encoding.plan([], 3, 128) == []


def test_a_token_budget_puts_many_short_texts_in_a_pass_and_pads_the_last_only_a_little():
    lengths = [10] * 100 + [250] * 9
    batches = encoding.plan(lengths, batch_size=4, max_length=256)  # 1024 tokens a pass
    # 4 rows of 256, 85 of 12; each bucket's leftovers padded to a power of two of rows.
    assert [(b.size, b.length, len(b.rows)) for b in batches] == [
        (16, 12, 15),
        (85, 12, 85),
        (1, 256, 1),
        (4, 256, 4),
        (4, 256, 4),
    ]
    computed = 16 * 12 + 85 * 12 + 256 + 2 * 4 * 256
    assert encoding.utilisation(lengths, batches) == pytest.approx((100 * 10 + 9 * 250) / computed)
    # The old plan: 28 batches of 4 rows, 25 of them [4, 16] and 3 [4, 256] (70%).
    assert encoding.utilisation(lengths, batches) > 1.3 * (100 * 10 + 9 * 250) / (25 * 4 * 16 + 3 * 4 * 256)
    tight = encoding.plan(lengths, batch_size=4, max_length=256, tokens_per_batch=120)
    # 10 rows of 12; a row of 256 is over the budget and still runs, one a pass.
    assert [(b.size, b.length) for b in tight] == [(10, 12)] * 10 + [(1, 256)] * 9


def test_compiled_shapes_stay_bounded_over_corpora_of_any_size():
    rng = np.random.default_rng(0)
    budget, multiple = 32 * 256, 8
    buckets = encoding.length_buckets(256)
    shapes = set()
    for count in range(1, 400, 7):
        lengths = np.minimum(rng.geometric(1 / 40, count) + 2, 256)  # long-tailed
        batches = encoding.plan(lengths, 32, 256, multiple)
        plan_shapes = {(b.size, b.length) for b in batches}
        # Per pass: a full and a partial shape per bucket at most.
        assert len(plan_shapes) <= 2 * len({b.length for b in batches})
        for b in batches:
            assert b.size % multiple == 0 and len(b.rows) <= b.size
            assert max(lengths[b.rows]) <= b.length and b.length in buckets
        shapes |= plan_shapes
    # Over every pass: a full batch per bucket and power-of-two partial ones.
    bound = sum(2 + int(math.log2(encoding.rows_per_batch(n, budget, multiple) // multiple)) for n in buckets)
    assert len(shapes) <= bound < 120


@pytest.fixture(scope="module")
def tiny():
    module = dual_encoder.DualEncoder(CONFIG)
    # Random values from numpy in the parameters' shapes: compiling the model's
    # own initialiser would take longer than every encode here.
    shapes = jax.eval_shape(
        lambda key: module.init(key, np.ones((1, 8), np.int32), "query", method=module.encode),
        jax.random.key(0),
    )
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.2 * rng.standard_normal(x.shape)).astype(x.dtype), shapes)
    tokenizer = tokenizers.load_tokenizer(pretrained.minilm_l6_v2_path())
    return inference.Embedder(module, params["params"], tokenizer, LENGTH)


@pytest.fixture(scope="module")
def texts():
    words = "how do I read a file line by line and sort the lines by their length in python".split()
    code = "def f(x, y):\n    return sorted(open(x).read().splitlines(), key=len)[y] # [CLS] ünïcode"
    texts = [" ".join(words[i % len(words)] for i in range(n)) for n in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89)]
    return [*texts, *(code[: 5 * n] for n in (3, 7, 11, 20)), "", "[PAD] [PAD]", code * 5]


def _old_plan(embedder: inference.Embedder, texts, kind: str, batch_size: int) -> np.ndarray:
    """The plan before this one, written out: batches of `batch_size` rows of the
    length-sorted texts, each padded to a full batch and a power of two >= 16."""
    ids = embedder.tokenize(texts, kind)
    module = embedder.module
    apply = jax.jit(lambda p, t, m: module.apply({"params": p}, t, kind, mask=m, method=module.encode))
    order = np.argsort([len(x) for x in ids], kind="stable")
    out = np.zeros((len(ids), module.embedding_dim), np.float32)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        length = min(max(16, 1 << (max(len(ids[r]) for r in rows) - 1).bit_length()), LENGTH)
        tokens = np.full((batch_size, length), module.config.pad_id, np.int32)
        mask = np.zeros((batch_size, length), bool)
        for j, r in enumerate(rows):
            tokens[j, : len(ids[r])], mask[j, : len(ids[r])] = ids[r], True
        out[rows] = np.asarray(apply(jax.device_get(embedder.params), tokens, mask))[: len(rows)]
    return out


@pytest.fixture(scope="module")
def reference(tiny, texts):
    return _old_plan(tiny, texts, "document", 8)


@pytest.mark.slow  # 7.6 s measured at a load of 4 on 2 cores
def test_embeddings_equal_the_old_plan_in_input_order_from_one_compile_per_shape(
    tiny, texts, reference, caplog
):
    _, batches = tiny.encoding_plan(texts, "document", batch_size=3)
    shapes = {(b.size, b.length) for b in batches}
    assert len(shapes) > 3  # several buckets, full and partial batches
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        np.testing.assert_allclose(tiny.encode(texts, "document", batch_size=3), reference, atol=1e-5)
        # The same lengths in another order: the same shapes, nothing compiled.
        again = tiny.encode(texts[::-1], "document", batch_size=3)
    np.testing.assert_allclose(again[::-1], reference, atol=1e-5)
    compiles = [
        r.getMessage() for r in caplog.records if re.search(r"Compiling jit\(_apply\)", r.getMessage())
    ]
    assert len(compiles) == len(shapes), compiles
    assert tiny.encode([], "query").shape == (0, CONFIG.hidden_size)


def test_embeddings_on_an_8_device_mesh_equal_the_old_plan(tiny, texts, reference):
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=4, fsdp=2))
    params = jax.device_put(tiny.params, NamedSharding(mesh, PartitionSpec()))
    on_mesh = inference.Embedder(tiny.module, params, tiny.tokenizer, LENGTH, mesh=mesh)
    _, batches = on_mesh.encoding_plan(texts, "document", batch_size=2)
    assert len(batches) > 1 and all(b.size % 8 == 0 for b in batches)
    np.testing.assert_allclose(on_mesh.encode(texts, "document", batch_size=2), reference, atol=1e-5)
