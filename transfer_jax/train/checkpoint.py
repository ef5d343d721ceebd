"""Checkpoints of a run: train state, data-iterator position and run metadata, saved together by Orbax.

Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save leaves the
previous checkpoint intact; saving is asynchronous (the device -> host copy is synchronous, the file writes are
not) and `close()` waits for the last one. Restoring targets abstract arrays that carry the run's shardings, so
the state comes back already distributed.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp


class RunCheckpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 2, asynchronous: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iterator, meta: dict) -> None:
        # Writing a checkpoint is, with the logged scalars, the loop's only intended device -> host copy.
        with jax.transfer_guard_device_to_host("allow"):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator) -> tuple[Any, dict]:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore(),
        ))
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
