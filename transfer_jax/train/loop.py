"""The fine-tuning loop: set-up -> one compiled, donated step per batch -> evaluations, checkpoints -> end-of-run
evaluation -> summary.

Host <-> device traffic is kept to batches in and scalars out: step metrics stay on device and are fetched once
per `log_every` steps; evaluation statistics are fetched once per evaluation. Set-up and compilation live in
`setup.py`, the throughput accounting in `chrono.py`.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Iterator, Optional, Sequence

import jax
from tqdm import tqdm

from transfer_jax.data.pipeline import PreparedCaseSource
from transfer_jax.train import distributed
from transfer_jax.train.checkpoint import RunCheckpointer, selection_metrics
from transfer_jax.train.convergence import steps_to_fraction_of_gain
from transfer_jax.train.chrono import Chrono
from transfer_jax.train.evaluator import IN_LOOP_VIEW, WHOLE_VOLUME_VIEW
from transfer_jax.train.export import model_arrays, write_pretrained
from transfer_jax.train.mesh import fetch, global_batch
from transfer_jax.train.optim import observe_evaluation
from transfer_jax.train.setup import Run, Steps, compile_steps, config_snapshot, resume, set_up
from transfer_jax.train.state import TrainState, abstract_state
from transfer_jax.train.writer import MetricWriter


class Callback:
    """A hook into the loop, for tools and tests (a hard stop after a checkpoint, slow storage); by default every
    method leaves the run as it is."""

    def batches(self, batches: Iterator[dict]) -> Iterator[dict]:
        """The host batches the run trains on, in order; return them wrapped to delay or watch them."""
        return batches

    def after_checkpoint(self, step: int, checkpointer: RunCheckpointer) -> None:
        """Called once the checkpoint of `step` is handed to the (asynchronous) checkpointer."""


def train_and_evaluate(config, workdir: str, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Run (or resume) one fine-tuning run; returns the run summary also written to `workdir/summary.json`."""
    distributed.initialize(config.distributed)
    workdir = os.path.abspath(workdir)
    writer = MetricWriter(workdir, tensorboard=config.logging.tensorboard)
    try:
        return _run(config, workdir, writer, callbacks)
    finally:
        writer.close()


def _run(config, workdir: str, writer: MetricWriter, callbacks: Sequence[Callback]) -> dict[str, Any]:
    run, initial = set_up(config, workdir, writer, callbacks)
    state, meta = resume(run, initial)
    throughput: dict[str, float] = {}
    if int(fetch(state.step)) < config.total_steps and not meta.get("stopped_early", False):
        batch = global_batch(next(run.batches), run.mesh)
        # The one place that traces the run's device code (train step, eval step, alignment probe).
        steps = compile_steps(run, state, batch, initial)
        del initial  # a resumed run keeps only the restored state
        state, figures = train(run, steps, state, meta, batch)
        throughput = {**steps.throughput, **figures}
    run.checkpointer.wait()
    evaluation = end_of_run_evaluation(run, state, meta)
    run.checkpointer.close()
    exported = _export(run, state, meta)
    return _summarize(run, state, meta, throughput, exported, evaluation)


def train(run: Run, steps: Steps, state: TrainState, meta: dict, batch: dict) -> tuple[TrainState, dict]:
    """Steps from `state` on `batch` and the following batches to `total_steps` (or an early stop), with logging,
    evaluations and checkpoints at their cadence; returns the final state and the throughput figures."""
    config, step = run.config, int(fetch(state.step))
    accounts = ("alignment",) if run.probe is not None else ()
    with Chrono(steps.cost, first_step=step, warmup_steps=config.log_every, accounts=accounts) as chrono, \
            _progress_bar(config, step) as bar:
        if step == 0:  # the untrained (pretrained or scratch) starting point: step 0 of every curve
            _evaluate(run, state, step, meta, chrono)
        while step < config.total_steps:
            state, metrics = steps.train(state, batch)
            step += 1
            chrono.dispatched(step, metrics)
            bar.update(1)
            if step % config.log_every == 0 or step == config.total_steps:
                _log_window(run, chrono, step, metrics)
            with chrono.paused():
                state, stop = _evaluate_and_save(run, state, step, meta, chrono)
                if stop:
                    break
            batch = chrono.fetch(step, metrics, lambda: global_batch(next(run.batches), run.mesh))
        return state, chrono.summary()


def _progress_bar(config, step: int) -> tqdm:
    return tqdm(total=config.total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True,
                disable=not config.logging.progress_bar or jax.process_index() != 0)


def _log_window(run: Run, chrono: Chrono, step: int, metrics: dict) -> None:
    """The last step's metrics (the loop's one fetch of them) and the window's throughput figures."""
    scalars = {k: float(v) for k, v in fetch(metrics).items()}
    figures = chrono.window(step)
    run.writer.write(step, {**scalars, **figures}, prefix="train/")
    hint = chrono.input_hint(step, figures)
    if hint:
        run.log(hint)


def _evaluate_and_save(run: Run, state: TrainState, step: int, meta: dict,
                       chrono: Chrono) -> tuple[TrainState, bool]:
    """Evaluation and checkpoint when due after `step`: the state (an lr-on-plateau schedule reads the evaluation)
    and True when the run ends here (last step, early stop)."""
    config, task = run.config, run.task
    last = step == config.total_steps
    evaluated = step % config.eval_every == 0 or last
    if evaluated:
        last = _evaluate(run, state, step, meta, chrono) or last
        metrics = meta["history"][-1]["metrics"]
        state = state.replace(opt_state=observe_evaluation(state.opt_state, metrics, config.optimizer))
    improved = evaluated and meta["best_step"] == step  # a new best is always saved, so that it can be restored
    if step % config.checkpoint_every == 0 or last or improved:
        selection = None
        if evaluated:
            selection = selection_metrics(task.primary_metric, meta["history"][-1]["metrics"].get(task.primary_metric),
                                          task.direction)
        run.checkpointer.save(step, state, run.data, meta, metrics=selection)
        for callback in run.callbacks:
            callback.after_checkpoint(step, run.checkpointer)
    return state, last


def _evaluate(run: Run, state: TrainState, step: int, meta: dict, chrono: Chrono) -> bool:
    """Validation metrics and alignment at `step`, into the log and `meta`; True when early stopping says stop."""
    metrics = run.evaluator(state)
    run.writer.write(step, metrics, prefix="val/")
    if run.probe is not None:
        key = jax.random.fold_in(jax.random.key(run.config.seed + 7), step)
        with chrono.accounted("alignment"):
            measured = fetch(run.probe(state.params, state.rest, key))
        _record_alignment(run.writer, step, measured, meta)
    meta["history"].append({"step": step, "metrics": metrics})
    task, patience = run.task, run.config.early_stopping_patience
    value = metrics.get(task.primary_metric, float("nan"))
    if task.is_better(value, meta["best"]):
        meta["best"], meta["best_step"] = value, step
        meta["evals_without_improvement"] = 0
    else:
        meta["evals_without_improvement"] += 1
    if patience and meta["evals_without_improvement"] >= patience:
        meta["stopped_early"] = True
        run.log(f"early stopping at step {step}: no improvement of {task.primary_metric} in {patience} evals")
        return True
    return False


def _record_alignment(writer: MetricWriter, step: int, measured: dict, meta: dict) -> None:
    flat = {}
    for site, values in measured.items():
        values = {k: float(v) for k, v in values.items()}
        meta.setdefault("alignment", {}).setdefault(site, []).append({"step": step, "values": values})
        flat.update({f"{site}/{k}": v for k, v in values.items()})
    writer.write(step, flat, prefix="align/")


def _export(run: Run, state: TrainState, meta: dict) -> Optional[str]:
    """The pretrained artifact of a pretraining task (None for other tasks)."""
    export = run.task.pretrained_export()
    if export is None:
        return None
    host_params, host_rest = fetch(model_arrays(state.params, state.rest))
    exported = write_pretrained(export, host_params, host_rest, run.workdir, report={
        "source": "transfer_jax pretraining run", "task": run.config.task.name, "workdir": run.workdir,
        "steps": int(fetch(state.step)), "final": meta["history"][-1]["metrics"] if meta["history"] else None})
    run.log(f"pretrained artifact: {exported} (fine-tune from it with --config.init.mode=pretrained "
            f"--config.init.checkpoint={exported})")
    return exported


def end_of_run_evaluation(run: Run, state: TrainState, meta: dict) -> dict[str, Any]:
    """The metrics the summary reports: the final state and the best checkpoint on the validation split, and the
    best checkpoint once on the test split (when the manifest has one).

    Dense 3-D tasks are measured on whole prepared volumes (`WholeVolumeEvaluator`); the others keep the in-loop
    view, for which the validation numbers are those of the in-loop history. The best checkpoint is the saved step
    with the best in-loop primary metric (`RunCheckpointer.best_step`), the final state when none records one.
    """
    paths, final_step = run.splits.paths, int(fetch(state.step))
    best_step = run.checkpointer.best_step()
    best_step = final_step if best_step is None else best_step
    in_loop = {h["step"]: h["metrics"] for h in meta["history"]}

    def measure(weights: TrainState, step: int, split: str) -> dict[str, float]:
        if run.whole_volume is not None:
            return run.whole_volume(weights.params, weights.rest, paths[split])
        if split == "val" and step in in_loop:
            return in_loop[step]  # the in-loop view, measured already
        return run.evaluator(weights, PreparedCaseSource(paths[split]))

    final = measure(state, final_step, "val")
    best_weights = state
    if best_step != final_step:
        best_weights = run.checkpointer.restore_state(best_step, abstract_state(state, run.shardings))
    best = final if best_weights is state else measure(best_weights, best_step, "val")
    test = measure(best_weights, best_step, "test") if paths["test"] else None
    view = WHOLE_VOLUME_VIEW if run.whole_volume is not None else (
        IN_LOOP_VIEW + "; whole-volume evaluation does not apply to this task")
    run.writer.write(final_step, final, prefix="final/")
    run.writer.write(best_step, best, prefix="best/")
    if test is not None:
        run.writer.write(best_step, test, prefix="test/")
    return {"view": view, "final": final, "best": best, "best_step": best_step, "test": test,
            "test_cases": len(paths["test"])}


def _summarize(run: Run, state: TrainState, meta: dict, throughput: dict, exported: Optional[str],
               evaluation: dict) -> dict:
    """The run summary, written to `workdir/summary.json` (process 0) and closed by the log's `done:` line.

    `final`, `best` (the primary metric) and `best_metrics` come from the end-of-run evaluation (whole volumes
    for the dense tasks, see `evaluation`), `test` from the best checkpoint on the test split; `in_loop` and
    `history` hold the quick in-loop evaluations (centre crops) that chose the best checkpoint.
    """
    config, task, splits = run.config, run.task, run.splits
    summary = {
        "task": config.task.name, "backbone": config.model.backbone, "workdir": run.workdir,
        "primary_metric": task.primary_metric, "direction": task.direction,
        "evaluation": {"final_best_test": evaluation["view"], "in_loop": IN_LOOP_VIEW,
                       "best_checkpoint": "chosen by the in-loop primary metric"},
        "best": evaluation["best"].get(task.primary_metric), "best_step": evaluation["best_step"],
        "final": evaluation["final"], "best_metrics": evaluation["best"],
        "test": evaluation["test"], "test_cases": evaluation["test_cases"],
        "in_loop": {"best": meta["best"], "best_step": meta["best_step"],
                    "final": meta["history"][-1]["metrics"] if meta["history"] else None},
        "steps": int(fetch(state.step)), "stopped_early": bool(meta.get("stopped_early", False)),
        "init": run.init_label, "alignment": alignment_summary(meta.get("alignment", {})),
        "history": meta["history"], "throughput": throughput,
        "skipped_cases": [str(p) for p in splits.skipped], "manifest": splits.manifest,
        "wall_seconds": time.time() - run.started, "config": config_snapshot(config),
        "pretrained_artifact": exported,
    }
    summary["steps_to_95pct_gain"] = steps_to_fraction_of_gain(meta["history"], task.primary_metric, task.direction)
    if jax.process_index() == 0:
        with open(os.path.join(run.workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=str)
    if splits.skipped:
        run.log(f"{len(splits.skipped)} case(s) were skipped:\n" + "\n".join(f"  - {p}" for p in splits.skipped))
    final, test = summary["final"] or {}, summary["test"] or {}
    run.log(f"done: {task.primary_metric} final={final.get(task.primary_metric, float('nan')):.4f} "
            f"best={summary['best'] if summary['best'] is not None else float('nan'):.4f} "
            f"(step {summary['best_step']}), test={test.get(task.primary_metric, float('nan')):.4f} "
            f"({summary['test_cases']} cases), steps={summary['steps']}, wall={summary['wall_seconds']:.0f}s, "
            f"outputs in {run.workdir}")
    return summary


def alignment_summary(trajectories: dict) -> dict:
    """Per site: the last measurement of every quantity plus the MMD² trajectory over steps."""
    summary = {}
    for site, records in trajectories.items():
        last = dict(records[-1]["values"]) if records else {}
        p_values = [v for k, v in last.items() if k.startswith("p_value_unbiased")]
        summary[site] = {
            **last, "p_value": p_values[0] if p_values else None,
            "trajectory": [[r["step"], r["values"].get("mmd2_unbiased")] for r in records],
        }
    return summary
