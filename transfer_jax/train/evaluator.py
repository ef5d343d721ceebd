"""Validation during training: the task's metrics over every validation case, one device pass per batch."""
from __future__ import annotations

import jax
import numpy as np

from transfer_jax.data.pipeline import PreparedCaseSource, eval_batches
from transfer_jax.train.mesh import fetch, global_batch
from transfer_jax.train.step import make_eval_step


class Evaluator:
    """The task's validation metrics for a train state; the per-batch statistics are fetched once per call.

    `compile` (on any state of the run) builds the eval step ahead of the first evaluation, as the train step is
    built, so that no evaluation traces anything.
    """

    def __init__(self, task, graph, paths, crop_size, per_process_batch, mesh, compute_dtype,
                 cache_bytes: int = 0):
        self.task, self.mesh = task, mesh
        self.cases = PreparedCaseSource(paths, cache_bytes)  # read once, evaluated every `eval_every`
        self.crop_size, self.per_process_batch = crop_size, per_process_batch
        self._step = jax.jit(make_eval_step(graph, task, compute_dtype))
        self._compiled = None

    def _batches(self):
        return eval_batches(self.cases, self.task, crop_size=self.crop_size, per_process_batch=self.per_process_batch)

    def compile(self, state) -> None:
        """Compiles the eval step for the shapes and shardings of `state` and of the (fixed-size) eval batches."""
        batch = global_batch(next(self._batches()), self.mesh)
        self._compiled = self._step.lower(state.params, state.rest, batch).compile()

    def __call__(self, state) -> dict[str, float]:
        if self._compiled is None:
            raise RuntimeError("Evaluator.compile must run before the first evaluation")
        stats, losses, valid = [], [], []
        for batch in self._batches():
            device_batch = global_batch(batch, self.mesh)
            batch_stats, loss = self._compiled(state.params, state.rest, device_batch)
            stats.append(batch_stats)
            losses.append(loss)
            valid.append(device_batch["valid"])
        stats, losses, valid = fetch((stats, losses, valid))
        mask = np.concatenate(valid)
        merged = {k: np.concatenate([s[k] for s in stats])[mask] for k in stats[0]}
        metrics = self.task.summarize(merged)
        metrics["loss"] = float(np.mean(np.concatenate(losses)[mask]))  # mean over cases, padding left out
        return metrics
