"""Device mesh, shardings and host <-> global array transfer.

The mesh has two axes, `data` and `fsdp`, both with Auto axis types (jax >= 0.9 defaults to Explicit, under which
the pairwise kernels of the in-loop MMD fail to trace). The batch is split over both axes; parameters are
replicated, or split over `fsdp` along their largest divisible dimension (ZeRO-3 style: XLA gathers them for the
forward pass and reduce-scatters the gradients).
"""
from __future__ import annotations

import numpy as np
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def create_mesh(data: int = -1, fsdp: int = 1, devices=None, num_devices: int = 0) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all, or the first `num_devices` of each process)."""
    if devices is None:
        devices = jax.devices()
        if num_devices:
            if jax.process_count() > 1:
                raise ValueError("mesh.num_devices only applies to single-process runs; use all devices")
            if num_devices > len(devices):
                raise ValueError(f"mesh.num_devices={num_devices} but only {len(devices)} devices are visible")
            devices = devices[:num_devices]
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh.fsdp={fsdp} must divide the number of devices ({n})")
    if data == -1:
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp} does not match {n} devices")
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(shape: tuple[int, ...], mesh: Mesh, strategy: str, min_size: int = 2 ** 12) -> NamedSharding:
    """Replicate, or shard the largest dimension divisible by the fsdp axis (small arrays stay replicated)."""
    if strategy == "replicate" or mesh.shape["fsdp"] == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return replicated(mesh)
    if strategy != "fsdp":
        raise ValueError(f"sharding strategy must be 'replicate' or 'fsdp', got {strategy!r}")
    size = mesh.shape["fsdp"]
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def tree_shardings(abstract_tree, mesh: Mesh, strategy: str, min_size: int = 2 ** 12):
    return jax.tree.map(lambda x: param_sharding(tuple(x.shape), mesh, strategy, min_size), abstract_tree)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Each process contributes its rows; the result is one array sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def mesh_platform(mesh: Mesh) -> str:
    """The platform the mesh's devices belong to ("cpu", "gpu", "tpu"): what its programs are compiled for, which
    may differ from the host's default backend (compile-only TPU devices on a CPU host)."""
    return mesh.devices.flat[0].platform


def fetch(tree):
    """Device -> host copy of small results (metrics, statistics), gathered across processes when the arrays
    span several hosts. The training loop copies nothing else, which tests check by running it under
    `jax.transfer_guard_device_to_host("disallow")`."""
    with jax.transfer_guard_device_to_host("allow"):
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.device_get(tree)


def check_batch_divisible(global_batch_size: int, mesh: Mesh) -> int:
    """The per-process batch, after checking the global batch splits evenly over devices and processes."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise ValueError(f"batch_size={global_batch_size} must be a multiple of the {devices} devices in the mesh")
    return global_batch_size // jax.process_count()
