"""Checkpoints of a run: train state, data-iterator position and run metadata, saved together by Orbax.

Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save leaves the
previous checkpoint intact; saving is asynchronous (the device -> host copy is synchronous, the file writes are
not) and `close()` waits for the last one. Restoring targets abstract arrays that carry the run's shardings, so
the state comes back already distributed.

Which checkpoints stay: the latest `max_to_keep`, plus the best one by the task's primary metric (Orbax's
best-checkpoint tracking). A save made right after an evaluation carries that evaluation's primary metric as the
checkpoint's metrics; Orbax ranks by `selection_score`, the metric signed so that higher is better (a missing or
non-finite value ranks last), so that a reader (`predict --checkpoint best`) needs no task to find the best step.
"""
from __future__ import annotations

import math
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

ITEMS = ("state", "data", "meta")
SCORE = "selection_score"


def selection_metrics(name: str, value: Optional[float], direction: str) -> dict[str, float]:
    """The metrics a checkpoint is saved with: the primary metric and its rank key (higher is better)."""
    value = float("nan") if value is None else float(value)
    score = (value if direction == "max" else -value) if math.isfinite(value) else -math.inf
    return {name: value, SCORE: score}


def _score(metrics) -> float:
    return float(metrics.get(SCORE, -math.inf))


def _manager(directory: str, *, max_to_keep: int, asynchronous: bool, read_only: bool) -> ocp.CheckpointManager:
    # Latest N for resuming, best 1 for reporting and predictions; checkpoints without metrics count only as latest.
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max_to_keep),
        checkpoint_managers.BestN(get_metric_fn=_score, n=1, keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only, enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=not read_only, best_fn=_score, best_mode="max", preservation_policy=policy,
    )
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


class RunCheckpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 2, asynchronous: bool = True, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.manager = _manager(self.directory, max_to_keep=max_to_keep, asynchronous=asynchronous,
                                read_only=read_only)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The saved step with the best primary metric; None when no saved step carries one."""
        ranked = [s for s in self.manager.all_steps() if self.manager.metrics(s) is not None]
        return self.manager.best_step() if ranked else None

    def save(self, step: int, state: Any, data_iterator, meta: dict,
             metrics: Optional[dict[str, float]] = None) -> None:
        # Writing a checkpoint is, with the logged scalars, the loop's only intended device -> host copy.
        with jax.transfer_guard_device_to_host("allow"):
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=grain.checkpoint.CheckpointSave(data_iterator),
                meta=ocp.args.JsonSave(meta),
            ), metrics=metrics, force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator) -> tuple[Any, dict]:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
            meta=ocp.args.JsonRestore(),
        ))
        return restored["state"], dict(restored["meta"])

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Only the train state of `step` (the data position and metadata stay where they are)."""
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def restore_meta(self, step: int) -> dict:
        return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def select_step(checkpointer: RunCheckpointer, which: str) -> tuple[int, str]:
    """`which` = "latest", "best" or a step number -> (step, how it was chosen); a clear error when it is absent.

    "best" falls back to the latest checkpoint when no saved step carries a primary metric (runs written before
    checkpoints carried metrics), and says so in the returned description.
    """
    steps = checkpointer.manager.all_steps()
    where = checkpointer.directory
    if not steps:
        raise FileNotFoundError(f"no completed checkpoint in {where}")
    if which == "latest":
        return checkpointer.latest_step(), "latest"
    if which == "best":
        best = checkpointer.best_step()
        if best is None:
            return checkpointer.latest_step(), "latest (no checkpoint records a primary metric)"
        return best, "best"
    try:
        step = int(which)
    except ValueError:
        raise ValueError(f"--checkpoint must be 'latest', 'best' or a step number, got {which!r}") from None
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint of step {step} in {where}; saved steps: {sorted(steps)}")
    return step, f"step {step}"
