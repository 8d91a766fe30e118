"""The accelerators embedder knows: peak matmul FLOP/s and HBM a chip, in one table.

Two readers: the MFU estimate of training (`summaries.peak_flops_per_device`,
which looks a chip up by JAX's `device_kind`) and the pre-flight check of a
TPU slice (`preflight`, which looks a generation up by name). Numbers are the
vendors' spec sheets: dense bf16 (no sparsity) matmul FLOP/s, and HBM where
the chip is sold with one size (GPUs come with several, so theirs is None).

This module imports nothing beyond the standard library: the tpu/ scripts ask
for slice facts with a bare `python3`.
"""

from __future__ import annotations

import dataclasses
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip (what JAX calls a device: a megacore TPU chip is one device).

    Attributes:
      name: the short name (`v4`, `v5e`, `H100`); TPU names are the generations of `preflight`.
      device_kinds: prefixes of `jax.Device.device_kind` that mean this chip.
      peak_bf16_flops: dense bf16 matmul FLOP/s of one chip.
      hbm_gib: HBM a chip in GiB; None where the chip is sold with several sizes.
    """

    name: str
    device_kinds: tuple[str, ...]
    peak_bf16_flops: float
    hbm_gib: float | None


CHIPS: dict[str, Chip] = {
    chip.name: chip
    for chip in (
        Chip("v4", ("TPU v4",), 275e12, 32),
        Chip("v5e", ("TPU v5 lite", "TPU v5e"), 197e12, 16),
        Chip("v5p", ("TPU v5p", "TPU v5"), 459e12, 95),
        Chip("v6e", ("TPU v6 lite", "TPU v6e"), 918e12, 32),
        Chip("A100", ("NVIDIA A100",), 312e12, None),
        Chip("H100", ("NVIDIA H100",), 989e12, None),
        Chip("H200", ("NVIDIA H200",), 989e12, None),
    )
}


def chip_of_device_kind(device_kind: str) -> Chip | None:
    """The chip a JAX `device_kind` names (the longest matching prefix), or None if unknown.

    Args:
      device_kind: e.g. "TPU v5 lite", "TPU v4", "NVIDIA H100 80GB HBM3".

    Returns:
      The entry of CHIPS, or None (a CPU, or a chip not in the table).
    """
    best, best_length = None, 0
    for chip in CHIPS.values():
        for prefix in chip.device_kinds:
            if device_kind.startswith(prefix) and len(prefix) > best_length:
                best, best_length = chip, len(prefix)
    return best


# ---------------------------------------------------------------- CPU peaks by instruction set
#
# A CPU's peak cannot be looked up by name (the same model name covers several
# clocks), and a matmul timed at start-up is undercut by whatever else loads the
# machine (a run once showed MFU 0.98). The peak here is what the vector units
# can do: fp32 FLOPs a cycle a core by the widest FMA the flags announce (two
# FMA ports, as Intel since Haswell and AMD since Zen 2), times the physical
# cores, times the base clock. AMX is bf16 only: it does not raise an fp32 peak.

FP32_FLOPS_PER_CYCLE = (("avx512f", 64), ("fma", 32), ("avx", 16), ("sse2", 8))


@dataclasses.dataclass(frozen=True)
class CpuPeak:
    """The fp32 peak of the host's CPU and how it was derived.

    Attributes:
      flops: FLOP/s of all physical cores.
      source: e.g. "cpuinfo: 2 cores x 64 FLOP/cycle (avx512f) x 2.60 GHz".
    """

    flops: float
    source: str


def cpu_peak_from_cpuinfo(text: str) -> CpuPeak | None:
    """The fp32 peak that a /proc/cpuinfo text announces, or None if it lacks flags or a clock.

    Args:
      text: the contents of /proc/cpuinfo.

    Returns:
      cores (distinct (physical id, core id), else processors) x FLOPs a cycle of the
      widest FMA in `flags` x the clock (the model name's "@ X GHz", else the
      largest "cpu MHz").
    """
    blocks = [b for b in text.split("\n\n") if "processor" in b]
    if not blocks:
        return None
    fields = [dict(_cpuinfo_fields(b)) for b in blocks]
    flags = set(fields[0].get("flags", "").split())
    per_cycle = next(((name, n) for name, n in FP32_FLOPS_PER_CYCLE if name in flags), None)
    if per_cycle is None:
        return None
    cores = {(f.get("physical id"), f.get("core id")) for f in fields}
    count = len(cores) if None not in {c for pair in cores for c in pair} else len(fields)
    named = re.search(r"@\s*([0-9.]+)\s*GHz", fields[0].get("model name", ""))
    if named:
        ghz = float(named.group(1))
    else:
        mhz = [float(f["cpu MHz"]) for f in fields if _is_number(f.get("cpu MHz"))]
        if not mhz:
            return None
        ghz = max(mhz) / 1000
    flops = count * per_cycle[1] * ghz * 1e9
    source = f"cpuinfo: {count} cores x {per_cycle[1]} FLOP/cycle ({per_cycle[0]}) x {ghz:.2f} GHz"
    return CpuPeak(flops, source)


def _cpuinfo_fields(block: str):
    for line in block.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            yield key.strip(), value.strip()


def _is_number(text: str | None) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def host_cpu_peak(path: str = "/proc/cpuinfo") -> CpuPeak | None:
    """`cpu_peak_from_cpuinfo` of this host, or None where there is no readable /proc/cpuinfo."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return cpu_peak_from_cpuinfo(f.read())
    except OSError:
        return None
