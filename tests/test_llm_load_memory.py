"""A ~200 MB Gemma 3 checkpoint loads onto the mesh tensor by tensor: bounded host memory, the rules' shardings.

The folder is written here directly with safetensors: the tensor names and
shapes `Gemma3ForCausalLM.save_pretrained` writes (tied LM head, so none stored),
random float32 values, a wide but shallow model so that building it takes a
second. It is then loaded in a fresh process (so the resident memory measured is
the loader's, not this test session's) on the 8 fake CPU devices, through the
trainer's own path (`ModelSpec.init_params` with the training state's parameter
shardings) on a mesh that splits every large tensor 8 ways. On fake CPU devices
the devices' memory is the process's memory, so the loaded model itself counts:
1.0x the checkpoint. The peak resident set beyond the imports must stay under
1.5x the checkpoint's bytes, which a loader that held the whole file, or the
whole model a second time, would exceed.

The expected sharding of every parameter is computed here from its logical axis
names and `partitioning.DEFAULT_RULES` (first matching rule whose mesh axes are
still free, as in flax), not taken from the loader; the values of a few tensors
are compared, device block by device block, with the stored arrays read by
safetensors' numpy reader and laid out by hand.
"""

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

# ~200 MB of float32: wide and shallow, a small vocabulary.
SIZES = {"vocab": 4096, "width": 1024, "mlp": 4096, "layers": 3, "heads": 8, "kv_heads": 4, "head_dim": 128}
TINY = {"vocab": 64, "width": 16, "mlp": 24, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 8}
MESH = {"data": -1, "fsdp": 4, "model": 2}

_LOADER = r"""
import json, sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import flax.linen as nn
from embedder import partitioning
from embedder.formats import hf_llm
from embedder.models import dual_encoder, spec


def status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


folder, mesh_sizes = sys.argv[1], json.loads(sys.argv[2])
config = hf_llm.config_from_hf(folder)
model = spec.ModelSpec(dual_encoder.DualEncoder(config), init_from=folder)
mesh = partitioning.make_mesh(partitioning.MeshConfig(**mesh_sizes))
boxed = model.abstract_variables()["params"]
shardings = partitioning.variable_shardings(boxed, mesh)
rng = jax.random.key(0)  # the caller's key (its compile is the runtime's, not the load's)

# Reset the high-water mark (Linux: 5 > clear_refs), so the peak is the load's own.
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
baseline = status_kib("VmRSS")
params = model.init_params(rng, shardings=shardings)
jax.block_until_ready(params)
peak = status_kib("VmHWM")


def rule_sharding(logical):
    axes, used = [], set()
    for name in logical:
        chosen = None
        for rule_name, mesh_axes in partitioning.DEFAULT_RULES:
            names = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
            if rule_name == name and not used & set(names):
                chosen = mesh_axes
                used |= set(names)
                break
        axes.append(chosen)
    return NamedSharding(mesh, PartitionSpec(*axes))


logical = nn.get_partition_spec(boxed)
flat = jax.tree_util.tree_flatten_with_path(params)[0]
wrong_shardings = []
for path, array in flat:
    keys = [k.key for k in path]
    node = logical
    for k in keys:
        node = node[k]
    want = rule_sharding(node)
    if not array.sharding.is_equivalent_to(want, array.ndim):
        wrong_shardings.append(f"{'/'.join(keys)}: {array.sharding.spec} != rules {want.spec}")

from safetensors import safe_open


def stored(name):
    with safe_open(f"{folder}/model.safetensors", framework="numpy") as f:
        return f.get_tensor("model." + name)


E, H, K, D = config.hidden_size, config.num_heads, config.kv_heads, config.head_size
references = {
    ("token_embed", "embedding"): stored("embed_tokens.weight"),
    ("layer_0", "attention", "query", "kernel"): stored("layers.0.self_attn.q_proj.weight").T.reshape(E, H, D),
    ("layer_1", "attention", "value", "kernel"): stored("layers.1.self_attn.v_proj.weight").T.reshape(E, K, D),
    ("layer_2", "attention", "out", "kernel"): stored("layers.2.self_attn.o_proj.weight").T.reshape(H, D, E),
    ("layer_1", "mlp", "wi_gate", "kernel"): stored("layers.1.mlp.gate_proj.weight").T,
    ("layer_2", "mlp", "wo", "kernel"): stored("layers.2.mlp.down_proj.weight").T,
    ("layer_0", "attention", "key_norm", "scale"): stored("layers.0.self_attn.k_norm.weight"),
    ("final_norm", "scale"): stored("norm.weight"),
}
wrong_values, blocks = [], 0
for keys, want in references.items():
    array = params["encoder"]
    for k in keys:
        array = array[k]
    for shard in array.addressable_shards:
        blocks += 1
        if not np.array_equal(np.asarray(shard.data), want[shard.index]):
            wrong_values.append(f"{'/'.join(keys)} on {shard.device} at {shard.index}")

mlp = params["encoder"]["layer_0"]["mlp"]["wi_gate"]["kernel"]
print(json.dumps({
    "baseline_kib": baseline,
    "peak_kib": peak,
    "reset": reset,
    "parameters": len(flat),
    "wrong_shardings": wrong_shardings,
    "wrong_values": wrong_values,
    "blocks_compared": blocks,
    "mlp_devices": len({s.device for s in mlp.addressable_shards}),
    "mlp_shard_shape": list(mlp.addressable_shards[0].data.shape),
}))
"""


def _gemma3_checkpoint(folder: str, sizes: dict) -> int:
    """Writes a Gemma3ForCausalLM-style folder of random float32 weights; returns its weights' bytes."""
    from safetensors.numpy import save_file

    width, heads, kv_heads, head_dim, mlp = (
        sizes[k] for k in ("width", "heads", "kv_heads", "head_dim", "mlp")
    )
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (sizes["vocab"], width), "model.norm.weight": (width,)}
    for i in range(sizes["layers"]):
        layer = f"model.layers.{i}."
        shapes |= {
            f"{layer}self_attn.q_proj.weight": (heads * head_dim, width),
            f"{layer}self_attn.k_proj.weight": (kv_heads * head_dim, width),
            f"{layer}self_attn.v_proj.weight": (kv_heads * head_dim, width),
            f"{layer}self_attn.o_proj.weight": (width, heads * head_dim),
            f"{layer}self_attn.q_norm.weight": (head_dim,),
            f"{layer}self_attn.k_norm.weight": (head_dim,),
            f"{layer}mlp.gate_proj.weight": (mlp, width),
            f"{layer}mlp.up_proj.weight": (mlp, width),
            f"{layer}mlp.down_proj.weight": (width, mlp),
            f"{layer}input_layernorm.weight": (width,),
            f"{layer}post_attention_layernorm.weight": (width,),
            f"{layer}pre_feedforward_layernorm.weight": (width,),
            f"{layer}post_feedforward_layernorm.weight": (width,),
        }
    os.makedirs(folder)
    save_file(
        {name: rng.random(shape, dtype=np.float32) - 0.5 for name, shape in shapes.items()},
        os.path.join(folder, "model.safetensors"),
    )
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": sizes["vocab"],
        "hidden_size": width,
        "intermediate_size": mlp,
        "num_hidden_layers": sizes["layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": head_dim,
        "sliding_window": 512,
        "layer_types": ["sliding_attention"] * (sizes["layers"] - 1) + ["full_attention"],
        "rope_parameters": {
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "use_bidirectional_attention": True,
        "pad_token_id": 0,
        "tie_word_embeddings": True,
    }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return os.path.getsize(os.path.join(folder, "model.safetensors"))


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_200mb_checkpoint_loads_with_bounded_memory_and_the_rules_shardings(tmp_path):
    folder = str(tmp_path / "gemma3")
    checkpoint_bytes = _gemma3_checkpoint(folder, SIZES)
    assert 190e6 < checkpoint_bytes < 230e6

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": repo, "JAX_PLATFORMS": "cpu"}
    assert "--xla_force_host_platform_device_count=8" in env["XLA_FLAGS"]
    proc = subprocess.run(
        [sys.executable, "-c", _LOADER, folder, json.dumps(MESH)],
        env=env,
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])

    growth = (report["peak_kib"] - report["baseline_kib"]) * 1024
    assert growth < 1.5 * checkpoint_bytes, (
        f"loading a {checkpoint_bytes / 1e6:.0f} MB checkpoint raised the peak resident set by "
        f"{growth / 1e6:.0f} MB ({growth / checkpoint_bytes:.2f}x; bound 1.5x; peak reset: {report['reset']})"
    )
    # The loaded model itself is resident (CPU devices), so a real load shows at least ~1x.
    assert growth > 0.9 * checkpoint_bytes

    assert report["parameters"] == 2 + 13 * SIZES["layers"]
    assert report["wrong_shardings"] == []
    # The mesh really splits the weights: an MLP kernel [embed, mlp] is cut 4 x 2 over 8 devices.
    assert report["mlp_devices"] == 8
    assert report["mlp_shard_shape"] == [SIZES["width"] // 4, SIZES["mlp"] // 2]
    assert report["wrong_values"] == []
    assert report["blocks_compared"] == 8 * 8


@pytest.mark.parametrize(
    "layout, ours_shape",
    [
        ("copy", (6, 8)),
        ("dense", (6, 8)),
        ("heads_in", (6, 4, 3)),
        ("heads_bias", (4, 3)),
        ("heads_out", (4, 3, 6)),
    ],
)
def test_every_block_of_every_layout_is_the_whole_tensor_s_block(layout, ours_shape):
    """A device's block, read from the HF tensor on its own, equals that block of the whole conversion."""
    from embedder.models import pretrained

    # The whole conversions, written out with numpy (HF stores [out, in]).
    whole = {
        "copy": lambda hf: hf,
        "dense": lambda hf: hf.T,
        "heads_in": lambda hf: hf.T.reshape(
            ours_shape
        ),  # [heads*head_dim, embed] -> [embed, heads, head_dim]
        "heads_bias": lambda hf: hf.reshape(ours_shape),
        "heads_out": lambda hf: hf.T.reshape(
            ours_shape
        ),  # [embed, heads*head_dim] -> [heads, head_dim, embed]
    }[layout]
    hf = np.arange(np.prod(ours_shape), dtype=np.float32).reshape(
        pretrained.expected_hf_shape(layout, ours_shape)
    )
    ours = whole(hf)
    assert ours.shape == ours_shape
    np.testing.assert_array_equal(pretrained.hf_to_ours(hf, layout, ours_shape), ours)
    np.testing.assert_array_equal(pretrained.ours_to_hf(ours, layout), hf)
    # Every axis cut in two (heads and head_dim too), all combinations of halves.
    halves = [(slice(0, n // 2), slice(n // 2, n)) for n in ours_shape]
    for index in itertools.product(*halves):
        np.testing.assert_array_equal(pretrained.read_block(hf, layout, ours_shape, index), ours[index])


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tiny") / "gemma3")
    _gemma3_checkpoint(folder, TINY)
    return folder


def test_init_params_on_a_mesh_places_the_folder_s_weights_and_the_random_head_by_the_rules(tiny_folder):
    """With a replicated data axis too: replicas get the same block; the head is made on the mesh."""
    import jax
    from safetensors.numpy import load_file

    from embedder import partitioning
    from embedder.formats import hf_llm
    from embedder.models import dual_encoder, spec

    config = hf_llm.config_from_hf(tiny_folder)
    model = spec.ModelSpec(dual_encoder.DualEncoder(config, projection_dim=8), init_from=tiny_folder)
    mesh = partitioning.make_mesh(partitioning.MeshConfig(data=2, fsdp=2, model=2))
    shardings = partitioning.variable_shardings(model.abstract_variables()["params"], mesh)
    params = model.init_params(jax.random.key(3), shardings=shardings)

    assert jax.tree.structure(params) == jax.tree.structure(shardings)
    for got, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings), strict=True):
        assert got.sharding == sharding
    unsharded = hf_llm.load_llm_params(tiny_folder, config)
    for got, want in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(unsharded), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
    stored = load_file(os.path.join(tiny_folder, "model.safetensors"))
    gate = params["encoder"]["layer_1"]["mlp"]["wi_gate"]["kernel"]  # [embed, mlp] over (fsdp, model)
    assert gate.addressable_shards[0].data.shape == (TINY["width"] // 2, TINY["mlp"] // 2)
    for shard in gate.addressable_shards:
        np.testing.assert_array_equal(
            np.asarray(shard.data), stored["model.layers.1.mlp.gate_proj.weight"].T[shard.index]
        )
    assert params["projection"]["kernel"].shape == (TINY["width"], 8)
