"""Multi-host start-up: `jax.distributed.initialize` from the config or the environment.

- TPU VM pods (and SLURM / Open MPI clusters that JAX detects): `distributed.auto=True` calls it without
  arguments and JAX reads the topology from the environment.
- GPU clusters without a detected launcher: give `coordinator_address` (host:port of process 0),
  `num_processes` and `process_id`, in the config or as TRANSFER_JAX_COORDINATOR / TRANSFER_JAX_NUM_PROCESSES /
  TRANSFER_JAX_PROCESS_ID.
Single-process runs need nothing.
"""
from __future__ import annotations

import os

import jax

_initialized = False


def initialize(config) -> None:
    global _initialized
    if _initialized:
        return
    address = config.coordinator_address or os.environ.get("TRANSFER_JAX_COORDINATOR", "")
    num_processes = int(config.num_processes or os.environ.get("TRANSFER_JAX_NUM_PROCESSES", 0) or 0)
    process_id = config.process_id if config.process_id >= 0 else int(
        os.environ.get("TRANSFER_JAX_PROCESS_ID", -1))
    if address:
        if num_processes < 1 or process_id < 0:
            raise ValueError("distributed.coordinator_address needs num_processes >= 1 and process_id >= 0 "
                             f"(got num_processes={num_processes}, process_id={process_id})")
        jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id,
                                   local_device_ids=config.get("local_device_ids") or None)
        _initialized = True
    elif config.auto:
        jax.distributed.initialize()
        _initialized = True
