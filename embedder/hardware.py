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
