"""Device mesh, logical axis rules and shardings.

Parameters and activations are annotated with logical axis names in the model
(`embed`, `mlp`, `heads`, `batch`, ...). The rules here map those names onto the
mesh axes:

* ``data``: data parallelism (the batch is split, parameters replicated);
* ``fsdp``: fully-sharded data parallelism (the batch *and* the parameters'
  `embed` axis are split; XLA all-gathers weights per layer);
* ``model``: tensor parallelism (heads and the MLP's hidden axis are split).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from embedder.errors import ConfigError

MESH_AXES = ("data", "fsdp", "model")

# (logical name, mesh axis or axes or None). Activations' `batch` is split over
# both data-parallel axes; weights' `embed` over fsdp; the tensor-parallel
# dimensions over model.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("kv", None),
    ("length", None),
    ("projection", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes; one size may be -1 to take the remaining devices.

    Attributes:
      data, fsdp, model: axis sizes (see the module docstring).
      num_devices: use only the first this many devices (None: all of them), e.g.
        to compare a one-device run with a sharded one on the same host.
    """

    data: int = -1
    fsdp: int = 1
    model: int = 1
    num_devices: int | None = None

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """The concrete (data, fsdp, model) sizes for `num_devices` devices."""
        sizes = [self.data, self.fsdp, self.model]
        if sizes.count(-1) > 1:
            raise ConfigError(f"MeshConfig{tuple(sizes)}: at most one axis may be -1")
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"MeshConfig{tuple(sizes)}: sizes must be positive or -1")
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ConfigError(
                    f"MeshConfig{tuple(sizes)}: the fixed axes ({known} devices) do not divide "
                    f"the {num_devices} available devices"
                )
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ConfigError(
                f"MeshConfig{tuple(sizes)} needs {int(np.prod(sizes))} devices but "
                f"{num_devices} are available"
            )
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, model) mesh.

    Axis types are Auto on purpose: with Explicit axes (the default of
    `jax.make_mesh` in current JAX) a global `q @ p.T` of batch-sharded operands
    is a sharding type error, while Auto lets XLA insert the all-gather.
    """
    devices = list(devices if devices is not None else jax.devices())
    if config.num_devices is not None:
        if not 0 < config.num_devices <= len(devices):
            raise ConfigError(
                f"MeshConfig.num_devices={config.num_devices}: {len(devices)} devices are available"
            )
        devices = devices[: config.num_devices]
    shape = config.shape(len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_to_sharding(
    logical_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> Any:
    """Maps a tree of logical PartitionSpecs to NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def variable_shardings(
    abstract_variables: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> Any:
    """NamedShardings for a (boxed, e.g. from `jax.eval_shape(module.init, ...)`) variable tree."""
    return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> NamedSharding:
    """Sharding of an input array whose leading axis is the batch."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, PartitionSpec(*spec))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (the product of the data and fsdp axes)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Starts multi-host JAX before anything touches the devices.

    With a coordinator address, the processes find each other through it (CPU
    processes then use gloo collectives, so two processes on one machine can
    train together). On a TPU pod slice JAX finds its peers itself; with no
    address and one host this does nothing.

    Args:
      coordinator_address: "host:port" of process 0, or None.
      num_processes: how many processes take part.
      process_id: this process's index.
    """
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process_id={process_id} is outside [0, {num_processes})")
        if jax.config.jax_platforms in (None, "", "cpu") or str(jax.config.jax_platforms).startswith("cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif _on_tpu_pod():
        jax.distributed.initialize()


def _on_tpu_pod() -> bool:
    import os

    # Set on every worker of a multi-host Cloud TPU slice.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def global_batch(
    mesh: Mesh, local: dict[str, np.ndarray], rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
) -> dict:
    """Assembles each process's share of the batch into global, batch-sharded arrays."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim, rules), v)
        for k, v in local.items()
    }
