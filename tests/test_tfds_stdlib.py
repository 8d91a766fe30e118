"""The TFDS dataset `stdlib_code_search`: built offline, split by module, served as seqio tasks.

The dataset is built once, in a fresh process whose sockets refuse to connect and
whose HOME is empty, into a temporary data dir; the tests then read that build.
Expectations come from `stdlib_pairs.build_records` (itself tested against the
md5 split rule in tests/test_data_local.py) and from the split contract.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds

from embedder.data import pipeline, stdlib_pairs, tasks, tfds_stdlib, vocabularies
from embedder.models.pretrained import minilm_l6_v2_path

SPLITS = stdlib_pairs.SPLITS

_BUILD = textwrap.dedent(
    """
    import json, socket, sys

    def refuse(*args, **kwargs):
        raise OSError("network access attempted while building stdlib_code_search")

    socket.socket.connect = refuse
    socket.socket.connect_ex = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse

    from embedder.data import tfds_stdlib

    sizes = {}
    for config in tfds_stdlib.CONFIGS:
        builder = tfds_stdlib.prepare(sys.argv[1], config=config)
        sizes[config] = {split: info.num_examples for split, info in builder.info.splits.items()}
    print(json.dumps(sizes))
    """
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tfds")
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "HOME": str(home), "TFDS_DATA_DIR": str(folder / "unused"), "NO_GCE_CHECK": "true"}
    done = subprocess.run(
        [sys.executable, "-c", _BUILD, str(folder)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sizes = json.loads(done.stdout.strip().splitlines()[-1])
    return folder, sizes


def _read(folder, config, split):
    builder = tfds.builder(f"{tfds_stdlib.NAME}/{config}", data_dir=str(folder), try_gcs=False)
    return [
        {k: (v.decode() if isinstance(v, bytes) else int(v)) for k, v in example.items()}
        for example in tfds.as_numpy(builder.as_dataset(split=split))
    ]


@pytest.fixture(scope="module")
def plain(data_dir):
    folder, _ = data_dir
    return {split: _read(folder, "plain", split) for split in SPLITS}


@pytest.mark.subprocess
@pytest.mark.slow
def test_builds_offline_with_the_expected_sizes(data_dir):
    _, sizes = data_dir
    for config, mask in (("plain", False), ("masked", True)):
        expected = {split: len(stdlib_pairs.build_records(split, mask_names=mask)) for split in SPLITS}
        assert sizes[config] == expected
        assert expected["train"] > 1000 and expected["test"] > 100


@pytest.mark.subprocess
@pytest.mark.slow
def test_examples_equal_the_stdlib_records(plain):
    for split in SPLITS:
        expected = {(r["path"], r["line"]): r for r in stdlib_pairs.build_records(split)}
        got = {(r["path"], r["line"]): r for r in plain[split]}
        assert got == expected


@pytest.mark.subprocess
@pytest.mark.slow
def test_no_module_in_two_splits_and_no_docstring_repeated_across_splits(plain):
    modules = {split: {r["module"] for r in plain[split]} for split in SPLITS}
    queries = {split: {r["query"] for r in plain[split]} for split in SPLITS}
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1 :]:
            assert not modules[first] & modules[second], (first, second)
            assert not queries[first] & queries[second], (first, second)
    for split in SPLITS:
        assert all(stdlib_pairs.split_of_module(module) == split for module in modules[split])
        assert all(r["path"].split("/")[0].removesuffix(".py") == r["module"] for r in plain[split])


@pytest.mark.subprocess
@pytest.mark.slow
def test_masked_variant_hides_each_function_name(data_dir, plain):
    folder, _ = data_dir
    masked = {(r["path"], r["line"]): r for r in _read(folder, "masked", "test")}
    for record in plain["test"]:
        hidden = masked[(record["path"], record["line"])]
        assert hidden["query"] == record["query"]
        assert hidden["positive"] == stdlib_pairs.mask_name(record["positive"], record["name"])
        assert f"def {stdlib_pairs.MASKED_NAME}" in hidden["positive"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_registered_tasks_and_mixture_give_homogeneous_batches(data_dir):
    folder, _ = data_dir
    vocab = vocabularies.WordPieceVocabulary(minilm_l6_v2_path())
    names = tasks.register_stdlib_tasks(vocab, folder, prepare=False)
    assert names == [tasks.STDLIB_TASK, tasks.STDLIB_MASKED_TASK, tasks.STDLIB_MIXTURE]
    # The small splits keep the first shuffle buffer (a whole epoch) cheap.
    source = pipeline.SeqioPairSource(
        tasks.STDLIB_MIXTURE,
        global_batch_size=4,
        query_len=16,
        doc_len=32,
        seed=1,
        split="validation",
        task_homogeneous=True,
    )
    np.testing.assert_allclose(source.rates, [0.75, 0.25])
    tokenizer = vocab.tokenizer
    test_queries = {
        tuple(tokenizer.encode(r["query"], max_length=16)) for r in stdlib_pairs.build_records("test")
    }
    validation_queries = {
        tuple(tokenizer.encode(r["query"], max_length=16)) for r in stdlib_pairs.build_records("validation")
    }
    for step in range(2):
        batch = source.batch(step)
        assert len(set(batch["task_ids"].tolist())) == 1
        rows = [
            tuple(row[mask.astype(bool)])
            for row, mask in zip(batch["query_tokens"], batch["query_mask"], strict=True)
        ]
        assert set(rows) <= validation_queries
    test = pipeline.SeqioPairSource(
        tasks.STDLIB_TASK, global_batch_size=4, query_len=16, doc_len=32, split="test"
    )
    batch = test.batch(0)
    rows = [
        tuple(row[mask.astype(bool)])
        for row, mask in zip(batch["query_tokens"], batch["query_mask"], strict=True)
    ]
    assert set(rows) <= test_queries


def test_unknown_config_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown stdlib_code_search config 'fancy'"):
        tfds_stdlib.prepare(tmp_path, config="fancy")
