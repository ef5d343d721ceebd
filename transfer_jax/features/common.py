"""What every extractor shares: the data mesh, the fixed-size batch runner and the output file.

* :func:`make_data_mesh` -- a 1-D ``('data',)`` mesh with ``AxisType.Auto`` over the local devices.
* :func:`run_in_batches` -- run a jitted function over the leading axis of host arrays in fixed-size batches
  (the last one zero-padded, results trimmed), one compilation per function since every batch has the same shape;
  with a mesh each batch is placed with ``NamedSharding(mesh, P('data'))``.
* :func:`save_features` -- the arrays to an ``.npz``, returning their shapes (what the extract command prints).
"""
from __future__ import annotations

import math
import os
from typing import Callable, Mapping

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def make_data_mesh(num_devices: int | None = None) -> jax.sharding.Mesh:
    """1-D data-parallel mesh ``('data',)`` with Auto axis types (classic sharding propagation)."""
    count = num_devices or jax.device_count()
    return jax.make_mesh((count,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def batch_size_for(mesh: jax.sharding.Mesh, requested: int) -> int:
    """``requested`` rounded up to a multiple of the mesh's data axis (each device gets whole rows)."""
    devices = mesh.shape["data"]
    return max(1, math.ceil(requested / devices)) * devices


def run_in_batches(
    fn: Callable[[dict[str, jax.Array]], Mapping[str, jax.Array]],
    inputs: Mapping[str, np.ndarray],
    *,
    batch_size: int,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, np.ndarray]:
    """Apply ``fn`` to ``inputs`` (host arrays sharing the leading length N) batch by batch; concatenated numpy.

    The last batch is padded with zero rows so every call has the same shape (no recompilation); the padded rows
    are cut from the outputs. Each output must have the batch as its leading axis. Without ``mesh`` batches go to
    the default device; with one, ``batch_size`` must be a multiple of its data axis size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sharding = None
    if mesh is not None:
        devices = mesh.shape["data"]
        if batch_size % devices:
            raise ValueError(f"batch_size {batch_size} is not a multiple of the {devices} devices on the 'data' axis")
        sharding = NamedSharding(mesh, P("data"))
    lengths = {name: len(array) for name, array in inputs.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs differ in their leading (batch) length: {lengths}")
    total = next(iter(lengths.values()))
    collected: dict[str, list[np.ndarray]] = {}
    for start in range(0, total, batch_size):
        valid = min(batch_size, total - start)
        batch = {}
        for name, array in inputs.items():
            chunk = np.asarray(array[start : start + valid])
            if valid < batch_size:
                chunk = np.concatenate([chunk, np.zeros((batch_size - valid,) + chunk.shape[1:], chunk.dtype)])
            batch[name] = jax.device_put(chunk, sharding)
        for name, value in fn(batch).items():
            collected.setdefault(name, []).append(np.asarray(value)[:valid])
    return {name: np.concatenate(parts) for name, parts in collected.items()}


def save_features(output_path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Write ``arrays`` to the ``.npz`` ``output_path`` (creating its folder); returns {name: shape}."""
    output_path = os.fspath(output_path)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    np.savez(output_path, **arrays)
    return {name: tuple(value.shape) for name, value in arrays.items()}
