"""Validation and test metrics of a run.

Two views of the same cases:

* `Evaluator`, the quick in-loop evaluation at every `eval_every`: the task's metrics on the centre crop of
  `data.crop_size` of each prepared case (`data/augment.py::center_crop`), one device pass per batch. It drives
  early stopping and the choice of the best checkpoint.
* `WholeVolumeEvaluator`, the end-of-run evaluation the summary reports: the task's metrics on the whole prepared
  region of each case, through the sliding window `predict` uses (`tasks/inference.py`), on the case's prepared
  grid, with no crop chosen from a mask. Dense 3-D tasks only (`whole_volume_applies`); case-level classification,
  pretraining and the ProViCNet slice tasks are reported with the in-loop view.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from transfer_jax.data.pipeline import PreparedCaseSource, eval_batches
from transfer_jax.models.upernet import SegmentationOutput
from transfer_jax.tasks.inference import whole_volume_outputs
from transfer_jax.train.mesh import fetch, global_batch, replicated
from transfer_jax.train.step import make_eval_step

IN_LOOP_VIEW = "centre crop of data.crop_size centred on each prepared region (data/augment.py center_crop)"
WHOLE_VOLUME_VIEW = ("whole prepared region of each case on its prepared grid, sliding window of data.crop_size "
                     "with overlap eval_overlap and constant blending (MONAI's default), as predict")


def _merge_case_stats(stats: list[dict], losses: list, task) -> dict[str, float]:
    """Per-case statistics (leading axis = cases) -> the task's metrics plus the mean per-case loss."""
    merged = {k: np.concatenate([s[k] for s in stats]) for k in stats[0]} if stats else {}
    metrics = task.summarize(merged)
    metrics["loss"] = float(np.mean(np.concatenate(losses))) if losses else float("nan")
    return metrics


class Evaluator:
    """The task's centre-crop metrics for a train state; the per-batch statistics are fetched once per call.

    `compile` (on any state of the run) builds the eval step ahead of the first evaluation, as the train step is
    built, so that no evaluation in the loop traces anything.
    """

    def __init__(self, task, graph, paths, crop_size, per_process_batch, mesh, compute_dtype,
                 cache_bytes: int = 0):
        self.task, self.mesh = task, mesh
        self.cases = PreparedCaseSource(paths, cache_bytes)  # read once, evaluated every `eval_every`
        self.crop_size, self.per_process_batch = crop_size, per_process_batch
        self._step = jax.jit(make_eval_step(graph, task, compute_dtype))
        self._compiled = None

    def _batches(self, cases: PreparedCaseSource):
        return eval_batches(cases, self.task, crop_size=self.crop_size, per_process_batch=self.per_process_batch)

    def compile(self, state) -> None:
        """Compiles the eval step for the shapes and shardings of `state` and of the (fixed-size) eval batches."""
        batch = global_batch(next(self._batches(self.cases)), self.mesh)
        self._compiled = self._step.lower(state.params, state.rest, batch).compile()

    def __call__(self, state, cases: Optional[PreparedCaseSource] = None) -> dict[str, float]:
        """Metrics of `state` on the validation cases, or on `cases` (e.g. the test split)."""
        if self._compiled is None:  # only a run resumed after its last step gets here: it evaluates at its end
            self.compile(state)
        stats, losses, valid = [], [], []
        for batch in self._batches(self.cases if cases is None else cases):
            device_batch = global_batch(batch, self.mesh)
            batch_stats, loss = self._compiled(state.params, state.rest, device_batch)
            stats.append(batch_stats)
            losses.append(loss)
            valid.append(device_batch["valid"])
        stats, losses, valid = fetch((stats, losses, valid))
        mask = np.concatenate(valid)
        stats = [{k: v[m] for k, v in s.items()} for s, m in zip(stats, np.split(mask, len(valid)))]
        losses = [loss[m] for loss, m in zip(losses, np.split(mask, len(valid)))]
        return _merge_case_stats(stats, losses, self.task)  # padding rows left out


class WholeVolumeEvaluator:
    """The task's metrics on whole prepared cases, one case per device call.

    Every process runs every case (the window batch is split over the mesh), so the statistics are those of one
    program however many devices share it. The step compiles once per region shape (one shape for a run: every
    prepared region has `crop_size * region_margin` voxels).
    """

    def __init__(self, task, graph, *, roi: Sequence[int], overlap: float, window_batch: int, mesh: Mesh,
                 compute_dtype):
        self.task, self.mesh = task, mesh

        def case_step(params, rest, batch):
            model = graph.merge(params, rest, training=False)
            logits = whole_volume_outputs(task, model, batch["image"][0], roi=roi, overlap=overlap,
                                          batch_size=window_batch, compute_dtype=compute_dtype, mesh=mesh)
            outputs = SegmentationOutput(logits=logits[None], aux_logits=None)
            loss, _ = task.loss(outputs, batch)
            return task.eval_stats(outputs, batch), loss[None]

        self._step = jax.jit(case_step)

    def __call__(self, params, rest, paths: Sequence[str]) -> dict[str, float]:
        cases = PreparedCaseSource(list(paths))
        stats, losses = [], []
        for index in range(len(cases)):
            sample = self.task.make_sample(cases[index])
            batch = {k: jax.make_array_from_process_local_data(replicated(self.mesh), np.asarray(v)[None])
                     for k, v in sample.items()}
            case_stats, loss = self._step(params, rest, batch)
            stats.append(case_stats)
            losses.append(loss)
        stats, losses = fetch((stats, losses))
        return _merge_case_stats(stats, losses, self.task)
