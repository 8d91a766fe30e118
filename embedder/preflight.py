"""Pre-flight check: whether a run's mesh, batch and train state fit a Cloud TPU slice.

`embedder check` runs it, in three ways:

    # The table: every gin/mesh/<slice>.gin file with the Gecko-1B-sized model,
    # each mesh built on fake CPU devices of the slice's chip count, the train
    # state sharded abstractly (nothing allocated), per-device bytes against HBM.
    embedder check [--gin_file gin/models/gecko_1b.gin] [--batch_size 4096]

    # The check the tpu/ scripts run before creating or launching anything: the
    # run's own gin files and overrides against the slice; exit status 2 and one
    # line naming the problem when the mesh does not divide the chips, the global
    # batch does not split over the data-parallel devices or the hosts, or the
    # state does not fit in HBM.
    embedder check --check --accelerator v5e-16 \
        --gin_file gin/runs/pretrain.gin --gin_file gin/models/gecko_1b.gin \
        --gin_file gin/mesh/v5e-16.gin --gin.BATCH_SIZE=4096

    # One line of slice facts for shell scripts (standard library only, fast:
    # `python3 -m embedder check --slice_info v5e-16` from the repository works
    # without jax): canonical name, gcloud accelerator type, chips, hosts, HBM
    # GiB a chip, default runtime version, default zone.
    embedder check --slice_info v5e-16

Memory counted per device: parameters and Adam moments as sharded by the
logical axis rules (`Trainer.state_shardings`), plus one gradient-sized buffer
(the gradients live alongside the state during the update). Activations are not
counted: they depend on batch, lengths, remat and the gradient-cache chunk, and
take what is left ("free" in the table). HBM and chip names come from
`hardware.CHIPS`, the table MFU uses too.

This module imports only the standard library at load time; jax, gin and the
model load inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Sequence

from embedder import hardware
from embedder.errors import ConfigError

# The folder holding gin/ (gin/mesh/<slice>.gin, the table's default model file): the
# installed package (its gin files are embedder/gin/), else the repository.
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
REPO = _PACKAGE if os.path.isdir(os.path.join(_PACKAGE, "gin")) else os.path.dirname(_PACKAGE)
DEFAULT_TABLE_MODEL = os.path.join("gin", "models", "gecko_1b.gin")
GIB = 2**30

# The slices with a mesh file in gin/mesh/, in the order of the table.
MESH_SLICES = ("v4-8", "v4-32", "v5e-16", "v5e-256", "v5p-128")


@dataclasses.dataclass(frozen=True)
class Generation:
    """One TPU generation as Cloud TPU sells it.

    Attributes:
      gcloud_prefix: how `--accelerator-type` spells it (v5e is `v5litepod-N`).
      cores_per_chip: the N in the type's name counts TensorCores (2 a chip on
        v4 and v5p, megacore: JAX sees one device a chip) or chips (1).
      chips_per_host: chips a host VM holds in a multi-host slice.
      max_single_host_chips: the largest slice that is one VM.
      sizes: the N values Cloud TPU offers.
      runtime_version: the TPU VM image to use with JAX.
      zone: a zone that offers it (override with --zone / TPU_ZONE).
      chip: its chip in `hardware.CHIPS` (HBM, peak FLOP/s).
    """

    gcloud_prefix: str
    cores_per_chip: int
    chips_per_host: int
    max_single_host_chips: int
    sizes: tuple[int, ...]
    runtime_version: str
    zone: str
    chip: hardware.Chip

    @property
    def hbm_gib(self) -> float:
        """HBM a chip, GiB (from `hardware.CHIPS`)."""
        return self.chip.hbm_gib


GENERATIONS = {
    "v4": Generation(
        "v4",
        2,
        4,
        4,
        (8, 16, 32, 64, 128, 256, 512, 1024, 1536, 2048, 4096),
        "tpu-ubuntu2204-base",
        "us-central2-b",
        hardware.CHIPS["v4"],
    ),
    "v5e": Generation(
        "v5litepod",
        1,
        4,
        8,
        (1, 4, 8, 16, 32, 64, 128, 256),
        "v2-alpha-tpuv5-lite",
        "us-west4-a",
        hardware.CHIPS["v5e"],
    ),
    "v5p": Generation(
        "v5p",
        2,
        4,
        4,
        tuple(2**k for k in range(3, 14)) + (12288,),
        "v2-alpha-tpuv5",
        "us-east5-a",
        hardware.CHIPS["v5p"],
    ),
    "v6e": Generation(
        "v6e",
        1,
        4,
        8,
        (1, 4, 8, 16, 32, 64, 128, 256),
        "v2-alpha-tpuv6e",
        "us-east1-d",
        hardware.CHIPS["v6e"],
    ),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    """A concrete slice, e.g. v5e-16: 16 chips on 4 hosts."""

    name: str
    generation: Generation
    size: int

    @property
    def gcloud_type(self) -> str:
        return f"{self.generation.gcloud_prefix}-{self.size}"

    @property
    def chips(self) -> int:
        return self.size // self.generation.cores_per_chip

    @property
    def hosts(self) -> int:
        if self.chips <= self.generation.max_single_host_chips:
            return 1
        return self.chips // self.generation.chips_per_host


def parse_slice(accelerator: str) -> Slice:
    """The slice an accelerator type names (`v4-32`, `v5e-16`, `v5litepod-16`, `v5p-128`, ...).

    Raises:
      ConfigError: an unknown generation or a size Cloud TPU does not offer; the
        message lists what is known.
    """
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator.strip().lower())
    known = ", ".join(f"{g}-N (N in {list(spec.sizes)})" for g, spec in GENERATIONS.items())
    if not match:
        raise ConfigError(f"unknown accelerator type {accelerator!r}; expected one of {known}")
    family, size = _ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
    if family not in GENERATIONS:
        raise ConfigError(f"unknown accelerator type {accelerator!r}; expected one of {known}")
    generation = GENERATIONS[family]
    if size not in generation.sizes:
        raise ConfigError(
            f"unknown accelerator type {accelerator!r}: {family} slices come in sizes {list(generation.sizes)}"
        )
    return Slice(f"{family}-{size}", generation, size)


def slice_info_line(accelerator: str) -> str:
    """The slice's facts on one line, for shell scripts: name, gcloud type, chips, hosts, HBM GiB a
    chip, runtime version, zone (e.g. `v5e-16 v5litepod-16 16 4 16 v2-alpha-tpuv5-lite us-west4-a`)."""
    s = parse_slice(accelerator)
    g = s.generation
    return f"{s.name} {s.gcloud_type} {s.chips} {s.hosts} {g.hbm_gib:g} {g.runtime_version} {g.zone}"


def use_fake_devices(count: int) -> None:
    """Makes JAX (not imported yet) see `count` CPU devices, for abstract sharding only."""
    if "jax" in sys.modules:
        raise RuntimeError("use_fake_devices must run before jax is imported")
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclasses.dataclass(frozen=True)
class Report:
    """One slice x mesh x model: the mesh, the batch split and per-device bytes."""

    slice: Slice
    mesh_shape: dict[str, int]
    num_params: int
    param_bytes: int  # per device
    opt_bytes: int  # per device
    batch_size: int | None

    @property
    def grad_bytes(self) -> int:
        return self.param_bytes

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.opt_bytes + self.grad_bytes

    @property
    def hbm_bytes(self) -> int:
        return int(self.slice.generation.hbm_gib * GIB)

    @property
    def data_parallel(self) -> int:
        return self.mesh_shape["data"] * self.mesh_shape["fsdp"]


_ABSTRACT_VARIABLES: dict[tuple[int, int], object] = {}


def _shapes_evaluated_once(model):
    """`model` with its `abstract_variables` evaluated once: they do not depend on the mesh,
    and tracing a 1B-parameter init takes seconds (the Trainer asks for it twice a mesh)."""
    from embedder.models import spec as spec_lib

    @dataclasses.dataclass(frozen=True)
    class ShapeCachedSpec(spec_lib.ModelSpec):
        def abstract_variables(self, length: int = 8):
            key = (id(self.module), length)
            if key not in _ABSTRACT_VARIABLES:
                _ABSTRACT_VARIABLES[key] = super().abstract_variables(length)
            return _ABSTRACT_VARIABLES[key]

    if isinstance(model, ShapeCachedSpec):
        return model
    return ShapeCachedSpec(**{f.name: getattr(model, f.name) for f in dataclasses.fields(model)})


def _per_device_bytes(tree) -> int:
    import jax
    import numpy as np

    return sum(
        int(np.prod(leaf.sharding.shard_shape(leaf.shape))) * leaf.dtype.itemsize
        for leaf in jax.tree.leaves(tree)
    )


def analyse(
    tpu: Slice,
    model,
    mesh_config,
    batch_size: int | None = None,
    grad_cache_chunk: int = 0,
) -> Report:
    """Builds the mesh on the first `tpu.chips` devices and shards the train state abstractly.

    Raises:
      ConfigError: the mesh does not fit the chips, or the batch does not split
        over the data-parallel devices, the hosts or the gradient-cache chunks.
    """
    import jax
    import numpy as np

    from embedder import losses, partitioning, trainer

    if jax.device_count() < tpu.chips:
        raise RuntimeError(
            f"{tpu.chips} devices needed, JAX sees {jax.device_count()} (use_fake_devices first)"
        )
    if mesh_config.num_devices not in (None, tpu.chips):
        raise ConfigError(
            f"MeshConfig.num_devices={mesh_config.num_devices}, but {tpu.name} has {tpu.chips} chips"
        )
    try:
        mesh_config.shape(tpu.chips)
    except ValueError as e:
        raise ConfigError(f"{tpu.name} ({tpu.chips} chips): {e}") from e
    mesh = partitioning.make_mesh(dataclasses.replace(mesh_config, num_devices=tpu.chips))
    step_runner = trainer.Trainer(
        _shapes_evaluated_once(model),
        losses.ContrastiveLossConfig(),
        trainer.OptimizerConfig(),
        mesh,
        1,
        grad_cache_chunk=grad_cache_chunk,
    )
    if batch_size is not None:
        try:
            step_runner.check_batch(batch_size)
        except ValueError as e:
            raise ConfigError(f"{tpu.name}: {e}") from e
        if batch_size % tpu.hosts:
            raise ConfigError(
                f"{tpu.name}: global batch {batch_size} is not divisible by the {tpu.hosts} hosts "
                "(each host loads an equal share)"
            )
    state = step_runner.abstract_state()
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return Report(
        slice=tpu,
        mesh_shape=dict(mesh.shape),
        num_params=num_params,
        param_bytes=_per_device_bytes(state.params),
        opt_bytes=_per_device_bytes(state.opt_state),
        batch_size=batch_size,
    )


def check_fits(report: Report, max_fraction: float = 0.9) -> None:
    """Raises ConfigError when parameters, Adam moments and gradients take over `max_fraction` of HBM.

    The rest is for activations and XLA's own buffers; a state that leaves less
    than a tenth of a chip free does not train in practice.
    """
    if report.total_bytes > max_fraction * report.hbm_bytes:
        m = report.mesh_shape
        raise ConfigError(
            f"{report.slice.name}: parameters + Adam moments + gradients take "
            f"{report.total_bytes / GIB:.2f} GiB a chip with mesh data={m['data']} fsdp={m['fsdp']} "
            f"model={m['model']}, more than {max_fraction:.0%} of the {report.slice.generation.hbm_gib:g} GiB of HBM; "
            "raise fsdp (or model) in the mesh file"
        )


def _batch_text(r: Report) -> str:
    if r.batch_size is None:
        return ""
    return (
        f"global batch {r.batch_size} = {r.slice.hosts} hosts x {r.batch_size // r.slice.hosts} "
        f"= {r.data_parallel} data-parallel shards x {r.batch_size // r.data_parallel}"
    )


def report_dict(r: Report) -> dict:
    """The report as JSON-ready numbers (`embedder check --json`)."""
    return {
        "slice": r.slice.name,
        "chips": r.slice.chips,
        "hosts": r.slice.hosts,
        "mesh": r.mesh_shape,
        "num_params": r.num_params,
        "param_bytes": r.param_bytes,
        "opt_bytes": r.opt_bytes,
        "grad_bytes": r.grad_bytes,
        "total_bytes": r.total_bytes,
        "hbm_bytes": r.hbm_bytes,
        "batch_size": r.batch_size,
    }


def format_table(reports: list[Report]) -> str:
    """The reports as a fixed-width table, GiB a device, one row a slice."""
    head = (
        f"{'slice':>8} {'chips':>5} {'hosts':>5} {'mesh d x f x m':>15} {'params':>7} {'adam':>7} "
        f"{'grads':>7} {'total':>7} {'HBM':>5} {'used':>5} {'free':>6} {'batch/host':>10} {'batch/shard':>11}"
    )
    lines = [head]
    for r in reports:
        m = r.mesh_shape
        mesh = f"{m['data']} x {m['fsdp']} x {m['model']}"
        per_host = str(r.batch_size // r.slice.hosts) if r.batch_size else "-"
        per_shard = str(r.batch_size // r.data_parallel) if r.batch_size else "-"
        lines.append(
            f"{r.slice.name:>8} {r.slice.chips:>5} {r.slice.hosts:>5} {mesh:>15} "
            f"{r.param_bytes / GIB:>7.2f} {r.opt_bytes / GIB:>7.2f} {r.grad_bytes / GIB:>7.2f} "
            f"{r.total_bytes / GIB:>7.2f} {r.slice.generation.hbm_gib:>5g} "
            f"{100 * r.total_bytes / r.hbm_bytes:>4.0f}% {(r.hbm_bytes - r.total_bytes) / GIB:>6.2f} "
            f"{per_host:>10} {per_shard:>11}"
        )
    return "\n".join(lines)


def _mesh_config_from_file(path: str):
    import gin
    from embedder import gin_utils, partitioning

    gin_utils.parse([path])
    config = gin.get_configurable(partitioning.MeshConfig)()
    gin.clear_config()
    return config


def _model_from_files(gin_files: Sequence[str], bindings: Sequence[str], search_paths: Sequence[str]):
    from embedder import gin_utils

    gin_utils.parse(gin_files, bindings, search_paths)
    return gin_utils.macro("MODEL")


def table(
    model_files: Sequence[str],
    batch_size: int | None,
    bindings: Sequence[str] = (),
    search_paths: Sequence[str] = (),
) -> list[Report]:
    """Reports for every gin/mesh/<slice>.gin file with one model (needs max(chips) fake devices).

    Args:
      model_files: gin files that set MODEL (e.g. [gin/models/gecko_1b.gin]).
      batch_size: the global batch to split, or None.
      bindings: gin overrides of the model.
      search_paths: extra folders to find gin files in.

    Returns:
      One report a slice of MESH_SLICES, in order.
    """
    model = _model_from_files(model_files, bindings, search_paths)
    reports = []
    for name in MESH_SLICES:
        mesh_config = _mesh_config_from_file(os.path.join(REPO, "gin", "mesh", f"{name}.gin"))
        reports.append(analyse(parse_slice(name), model, mesh_config, batch_size))
    return reports


def check(
    accelerator: str,
    gin_files: Sequence[str],
    bindings: Sequence[str],
    memory: bool = True,
    search_paths: Sequence[str] = (),
) -> Report:
    """Validates a run's gin files against a slice (see the module docstring).

    Args:
      accelerator: the slice, e.g. "v5e-16" (needs as many fake devices as it has chips).
      gin_files: the run's gin files (run, model, mesh).
      bindings: the run's `NAME = VALUE` overrides.
      memory: also check that the state fits in HBM.
      search_paths: extra folders to find gin files in.

    Returns:
      The slice's report.

    Raises:
      ConfigError: what does not fit, named.
    """
    import gin
    from embedder import gin_utils, partitioning

    tpu = parse_slice(accelerator)
    gin_utils.parse(gin_files, bindings, search_paths)
    mesh_config = gin.get_configurable(partitioning.MeshConfig)()
    try:
        mesh_config.shape(tpu.chips)
    except ValueError as e:
        raise ConfigError(f"{tpu.name} ({tpu.chips} chips): {e}") from e
    batch_size = _optional_macro("BATCH_SIZE")
    chunk = _optional_macro("GRAD_CACHE_CHUNK") or 0
    model = _optional_macro("MODEL")
    if model is None:
        raise ConfigError("the gin files set no MODEL: add a gin/models/*.gin file")
    report = analyse(tpu, model, mesh_config, batch_size, chunk)
    if memory:
        check_fits(report)
    return report


def check_line(report: Report) -> str:
    """The one line `embedder check --check` prints for a run that fits."""
    tpu, m = report.slice, report.mesh_shape
    return (
        f"{tpu.name}: {tpu.chips} chips on {tpu.hosts} hosts, mesh data={m['data']} fsdp={m['fsdp']} "
        f"model={m['model']}; {_batch_text(report) or 'no BATCH_SIZE'}; state "
        f"{report.total_bytes / GIB:.2f} of {tpu.generation.hbm_gib:g} GiB HBM a chip"
    )


def _optional_macro(name: str):
    from embedder import gin_utils

    try:
        return gin_utils.macro(name)
    except ValueError:
        return None
