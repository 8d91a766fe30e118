"""embedder.preflight (`embedder check`): slice facts, the mesh files, and per-device memory on fake devices."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from embedder import hardware
from embedder import preflight as mesh_memory

REPO = Path(__file__).resolve().parents[1]

GIB = 2**30


def _gecko_matmul_params() -> int:
    """Gecko-1B's weight matrices, counted from gin/models/gecko_1b.gin's numbers by hand.

    Embedding 262144 x 1152; per layer q and o 1152 x (4 x 256), k and v 1152 x 256,
    a gated MLP of three 1152 x 6912 matrices; 26 layers; the 1152 x 768 projection.
    Norm scales come on top (Gemma 3's four per layer plus query and key norms: under 0.02%).
    """
    d, layers = 1152, 26
    attention = 2 * d * 4 * 256 + 2 * d * 256
    mlp = 3 * d * 6912
    return 262144 * d + layers * (attention + mlp) + d * 768


@pytest.mark.parametrize(
    "name, gcloud_type, chips, hosts, hbm",
    [
        ("v4-8", "v4-8", 4, 1, 32),
        ("v4-32", "v4-32", 16, 4, 32),
        ("v5e-16", "v5litepod-16", 16, 4, 16),
        ("v5litepod-16", "v5litepod-16", 16, 4, 16),
        ("v5e-8", "v5litepod-8", 8, 1, 16),
        ("v5e-256", "v5litepod-256", 256, 64, 16),
        ("v5p-8", "v5p-8", 4, 1, 95),
        ("v5p-128", "v5p-128", 64, 16, 95),
        ("v6e-16", "v6e-16", 16, 4, 32),
    ],
)
def test_slices(name, gcloud_type, chips, hosts, hbm):
    tpu = mesh_memory.parse_slice(name)
    assert (tpu.gcloud_type, tpu.chips, tpu.hosts, tpu.generation.hbm_gib) == (gcloud_type, chips, hosts, hbm)


@pytest.mark.parametrize("name", ["v5e-12", "v4-4", "v7-8", "tpu-v4-8", "v4", ""])
def test_unknown_slices_are_errors(name):
    with pytest.raises(ValueError, match="unknown accelerator type"):
        mesh_memory.parse_slice(name)


@pytest.mark.parametrize("name", mesh_memory.MESH_SLICES)
def test_mesh_file_headers_state_the_slice(name):
    """Each gin/mesh/<slice>.gin starts with its hosts x chips = devices and HBM, and they are right."""
    tpu = mesh_memory.parse_slice(name)
    header = (REPO / "gin" / "mesh" / f"{name}.gin").read_text().splitlines()[0]
    match = re.search(
        r"gcloud: ([\w-]+)\): (\d+) hosts? x (\d+) chips = (\d+) devices, (\d+) GiB HBM", header
    )
    assert match, header
    gcloud_type, hosts, per_host, devices, hbm = match.groups()
    assert gcloud_type == tpu.gcloud_type
    assert (int(hosts), int(hosts) * int(per_host), int(devices)) == (tpu.hosts, tpu.chips, tpu.chips)
    assert int(hbm) == tpu.generation.hbm_gib


@pytest.mark.subprocess
@pytest.mark.slow
def test_every_mesh_file_shards_gecko_1b_on_its_device_count_and_fits():
    """256 fake CPU devices in a subprocess; each slice's mesh on exactly its chip count."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run(
        [sys.executable, "-m", "embedder", "check", "--json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    reports = {r["slice"]: r for r in json.loads(proc.stdout)}
    assert sorted(reports) == sorted(mesh_memory.MESH_SLICES)
    expected_params = _gecko_matmul_params()
    for name, r in reports.items():
        tpu = mesh_memory.parse_slice(name)
        mesh = r["mesh"]
        assert mesh["data"] * mesh["fsdp"] * mesh["model"] == tpu.chips, name
        assert r["num_params"] == pytest.approx(expected_params, rel=2e-4)
        shards = mesh["fsdp"] * mesh["model"]
        full = 4 * r["num_params"]  # fp32
        # Every large matrix is split over fsdp (and model); only norms and biases are whole.
        assert full / shards <= r["param_bytes"] <= full / shards * 1.001, name
        # Adam's two moments mirror the parameters (plus a few scalars).
        assert r["opt_bytes"] == pytest.approx(2 * r["param_bytes"], rel=1e-6), name
        assert r["total_bytes"] == r["param_bytes"] + r["opt_bytes"] + r["grad_bytes"]
        assert r["total_bytes"] < 0.9 * tpu.generation.hbm_gib * GIB, name
        # The default global batch (4096) splits over hosts and data-parallel devices.
        assert r["batch_size"] % tpu.hosts == 0 and r["batch_size"] % (mesh["data"] * mesh["fsdp"]) == 0
    # The README's numbers.
    assert reports["v4-8"]["total_bytes"] / GIB == pytest.approx(14.91, abs=0.01)
    assert reports["v5e-256"]["total_bytes"] / GIB == pytest.approx(1.86, abs=0.01)


def test_check_fits_names_the_slice_and_what_to_change():
    tpu = mesh_memory.parse_slice("v5e-16")
    report = mesh_memory.Report(tpu, {"data": 16, "fsdp": 1, "model": 1}, 10**9, 4 * 10**9, 8 * 10**9, 4096)
    with pytest.raises(
        ValueError, match=r"v5e-16: .* 14\.90 GiB a chip .* more than 90% of the 16 GiB .* raise fsdp"
    ):
        mesh_memory.check_fits(report)
    mesh_memory.check_fits(
        mesh_memory.Report(tpu, {"data": 2, "fsdp": 8, "model": 1}, 10**9, 5 * 10**8, 10**9, 4096)
    )


def test_analyse_checks_the_batch_against_devices_and_hosts():
    """On the 8 fake devices of conftest.py: v4-16 is 8 chips on 2 hosts."""
    from embedder import partitioning
    from embedder.models import dual_encoder, spec, transformer

    model = spec.ModelSpec(
        dual_encoder.DualEncoder(
            transformer.TransformerConfig(
                family="bert", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32
            )
        )
    )
    tpu = mesh_memory.parse_slice("v4-16")
    report = mesh_memory.analyse(tpu, model, partitioning.MeshConfig(data=-1, fsdp=2), batch_size=16)
    assert report.mesh_shape == {"data": 4, "fsdp": 2, "model": 1}
    with pytest.raises(
        ValueError, match="v4-16: global batch 12 is not divisible by the data-parallel size 8"
    ):
        mesh_memory.analyse(tpu, model, partitioning.MeshConfig(data=-1, fsdp=2), batch_size=12)
    # All 8 chips on the model axis: one data-parallel shard, but the 2 hosts each load half.
    with pytest.raises(ValueError, match="global batch 3 is not divisible by the 2 hosts"):
        mesh_memory.analyse(tpu, model, partitioning.MeshConfig(data=1, model=8), batch_size=3)
    with pytest.raises(ValueError, match=r"v4-16 \(8 chips\): MeshConfig\(-1, 3, 1\)"):
        mesh_memory.analyse(tpu, model, partitioning.MeshConfig(data=-1, fsdp=3))
    with pytest.raises(ValueError, match="gradient cache chunk size 12 is not divisible by the 8"):
        mesh_memory.analyse(tpu, model, partitioning.MeshConfig(), batch_size=48, grad_cache_chunk=12)


@pytest.mark.subprocess
def test_slice_info_is_one_line_and_loads_neither_jax_nor_numpy():
    """What tpu/_lib.sh reads: one line of facts, from a bare interpreter's standard library."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "embedder", "check", "--slice_info", "v5e-16"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "v5e-16 v5litepod-16 16 4 16 v2-alpha-tpuv5-lite us-west4-a\n"
    imported = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "embedder.preflight" in imported
    assert not {m for m in imported if m.split(".")[0] in ("jax", "numpy", "gin", "tensorflow")}


@pytest.mark.subprocess
def test_check_of_an_unknown_slice_is_one_line_and_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "embedder", "check", "--slice_info", "v5e-12"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("embedder check: error: unknown accelerator type 'v5e-12'")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr


def test_one_hardware_table_for_mfu_and_the_preflight_check():
    # The generations' HBM is the table's; JAX's device kinds map to the same chips.
    for name, generation in mesh_memory.GENERATIONS.items():
        assert generation.chip is hardware.CHIPS[name]
    assert hardware.chip_of_device_kind("TPU v5 lite") is hardware.CHIPS["v5e"]
    assert hardware.chip_of_device_kind("TPU v5p") is hardware.CHIPS["v5p"]
    assert hardware.chip_of_device_kind("TPU v4") is hardware.CHIPS["v4"]
    assert hardware.chip_of_device_kind("NVIDIA H100 80GB HBM3").peak_bf16_flops == 989e12
    assert hardware.chip_of_device_kind("cpu") is None
