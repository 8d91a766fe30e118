"""Distillation in training: a student started from a subset of its teacher's layers
(gin/models/minilm_l3.gin, the BERT and LLM loaders' `layers=`), and a frozen
teacher's terms in the train step (gin/runs/distill.gin).

References are independent: the layer test reads the folder's tensors itself; the
loss test recomputes the teacher terms in numpy from the two models' embeddings.
"""

import dataclasses

import jax
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
    # What ModelSpec.init_params puts into the encoder (its random initialisation, 10 s
    # at this width, is left out).
    student = pretrained.load_bert_params(folder, model.module.config, layers=model.init_layers)
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
    shapes = hf_llm.expected_encoder_shapes(four)
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
