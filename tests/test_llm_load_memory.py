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

import json
import os
import subprocess
import sys

import numpy as np
import pytest

VOCAB, WIDTH, MLP, LAYERS = 4096, 1024, 4096, 3
HEADS, KV_HEADS, HEAD_DIM = 8, 4, 128
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


def _gemma3_checkpoint(folder: str) -> int:
    """Writes a Gemma3ForCausalLM-style folder of random float32 weights; returns its weights' bytes."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (VOCAB, WIDTH), "model.norm.weight": (WIDTH,)}
    for i in range(LAYERS):
        layer = f"model.layers.{i}."
        shapes |= {
            f"{layer}self_attn.q_proj.weight": (HEADS * HEAD_DIM, WIDTH),
            f"{layer}self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, WIDTH),
            f"{layer}self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, WIDTH),
            f"{layer}self_attn.o_proj.weight": (WIDTH, HEADS * HEAD_DIM),
            f"{layer}self_attn.q_norm.weight": (HEAD_DIM,),
            f"{layer}self_attn.k_norm.weight": (HEAD_DIM,),
            f"{layer}mlp.gate_proj.weight": (MLP, WIDTH),
            f"{layer}mlp.up_proj.weight": (MLP, WIDTH),
            f"{layer}mlp.down_proj.weight": (WIDTH, MLP),
            f"{layer}input_layernorm.weight": (WIDTH,),
            f"{layer}post_attention_layernorm.weight": (WIDTH,),
            f"{layer}pre_feedforward_layernorm.weight": (WIDTH,),
            f"{layer}post_feedforward_layernorm.weight": (WIDTH,),
        }
    os.makedirs(folder)
    save_file(
        {name: rng.random(shape, dtype=np.float32) - 0.5 for name, shape in shapes.items()},
        os.path.join(folder, "model.safetensors"),
    )
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": VOCAB,
        "hidden_size": WIDTH,
        "intermediate_size": MLP,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": HEAD_DIM,
        "sliding_window": 512,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
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
    checkpoint_bytes = _gemma3_checkpoint(folder)
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

    assert report["parameters"] == 2 + 13 * LAYERS
    assert report["wrong_shardings"] == []
    # The mesh really splits the weights: an MLP kernel [embed, mlp] is cut 4 x 2 over 8 devices.
    assert report["mlp_devices"] == 8
    assert report["mlp_shard_shape"] == [WIDTH // 4, MLP // 2]
    assert report["wrong_values"] == []
    assert report["blocks_compared"] == 8 * 8
