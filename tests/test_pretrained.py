"""Real all-MiniLM-L6-v2 weights: parity with sentence-transformers, and clear errors."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from embedder import inference
from embedder.formats import huggingface
from embedder.models import dual_encoder, pretrained, spec
from tests.parity_inputs import PARITY_INPUTS


@pytest.fixture(scope="module")
def model_dir():
    return pretrained.minilm_l6_v2_path()


@pytest.fixture(scope="module")
def peer(model_dir):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_dir, device="cpu")


@pytest.fixture(scope="module")
def embedder(model_dir):
    return inference.Embedder.from_sentence_transformers(model_dir)


@pytest.mark.slow
def test_parity_with_sentence_transformers(peer, embedder):
    """Same token ids and the same embeddings (fp32, 1e-5) on varied inputs."""
    texts = list(PARITY_INPUTS)
    assert len(texts) >= 50
    features = peer.tokenize(texts)
    ids = features["input_ids"].numpy()
    mask = features["attention_mask"].numpy().astype(bool)
    ours = embedder.tokenize(texts)
    for text, row, m, mine in zip(texts, ids, mask, ours, strict=True):
        assert row[m].tolist() == mine, f"token ids differ for {text[:60]!r}"
    assert max(len(x) for x in ours) == 256, "some input must be truncated at 256 tokens"

    expected = peer.encode(texts, batch_size=16, convert_to_numpy=True)
    got = embedder.encode(texts, batch_size=16)
    diff = np.abs(got - expected).max(axis=1)
    worst = int(diff.argmax())
    assert diff[worst] < 1e-5, f"max abs diff {diff[worst]:.2e} for {texts[worst][:60]!r}"


@pytest.mark.slow
def test_model_spec_initialises_from_the_real_weights(model_dir, embedder):
    module = dual_encoder.DualEncoder(embedder.module.config, projection_dim=64)
    params = spec.ModelSpec(module, vocab_dir=model_dir, init_from=model_dir).init_params(jax.random.key(0))
    np.testing.assert_array_equal(
        params["encoder"]["token_embed"]["embedding"],
        embedder.params["encoder"]["token_embed"]["embedding"],
    )
    assert params["projection"]["kernel"].shape == (384, 64)  # random, not from the file


def test_export_layout_round_trips(model_dir):
    """ours_to_hf inverts hf_to_ours for every tensor (export relies on it)."""
    config = huggingface.config_from_hf(model_dir)
    tensors = load_file(os.path.join(model_dir, "model.safetensors"))
    params = pretrained.load_bert_params(model_dir, config)
    for s in pretrained.bert_tensor_map(config.num_layers):
        node = params
        for key in s.path:
            node = node[key]
        np.testing.assert_array_equal(pretrained.ours_to_hf(node, s.layout), tensors[s.hf_name])


def _copy_model(model_dir, dst):
    shutil.copytree(model_dir, dst)
    return str(dst)


def test_missing_tensor_is_named(model_dir, tmp_path):
    broken = _copy_model(model_dir, tmp_path / "m")
    tensors = load_file(os.path.join(broken, "model.safetensors"))
    del tensors["encoder.layer.3.intermediate.dense.weight"]
    save_file(tensors, os.path.join(broken, "model.safetensors"))
    with pytest.raises(
        pretrained.WeightsError, match=r"missing tensor 'encoder\.layer\.3\.intermediate\.dense\.weight'"
    ):
        inference.Embedder.from_sentence_transformers(broken)


def _edit_json(path, **changes):
    with open(path) as f:
        content = json.load(f)
    content.update(changes)
    with open(path, "w") as f:
        json.dump(content, f)


def test_config_that_does_not_match_the_weights(model_dir, tmp_path):
    broken = _copy_model(model_dir, tmp_path / "m")
    _edit_json(os.path.join(broken, "config.json"), intermediate_size=1024)
    with pytest.raises(pretrained.WeightsError) as e:
        inference.Embedder.from_sentence_transformers(broken)
    message = str(e.value)
    assert "encoder.layer.0.intermediate.dense.weight" in message
    assert "(1536, 384)" in message and "(1024, 384)" in message


def test_more_layers_in_weights_than_config(model_dir, tmp_path):
    broken = _copy_model(model_dir, tmp_path / "m")
    _edit_json(os.path.join(broken, "config.json"), num_hidden_layers=4)
    with pytest.raises(pretrained.WeightsError, match=r"unexpected tensor 'encoder\.layer\.4\..*4 layers"):
        inference.Embedder.from_sentence_transformers(broken)


def test_unknown_pooling_in_sentence_transformers_folder(model_dir, tmp_path):
    broken = _copy_model(model_dir, tmp_path / "m")
    _edit_json(
        os.path.join(broken, "1_Pooling", "config.json"),
        pooling_mode_mean_tokens=False,
        pooling_mode_max_tokens=True,
    )
    with pytest.raises(ValueError, match="unsupported pooling.*pooling_mode_max_tokens"):
        inference.Embedder.from_sentence_transformers(broken)


def test_not_a_bert_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match="model_type='t5' is not a BERT-family model"):
        huggingface.config_from_hf(str(tmp_path))
