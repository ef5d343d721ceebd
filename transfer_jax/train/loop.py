"""The fine-tuning loop: config -> data -> sharded state -> one compiled, donated step -> eval -> checkpoints.

Host <-> device traffic is kept to batches in and scalars out: step metrics stay on device and are fetched once
per `log_every` steps; evaluation statistics are fetched once per evaluation.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from typing import Any, Optional

import jax
import numpy as np
from tqdm import tqdm

from transfer_jax.allocator import active_allocator, host_memory_hint
from transfer_jax.data.dataset import augment_config, prepare_splits
from transfer_jax.data.pipeline import PreparedCaseSource, eval_batches, memory_cache_bytes, train_dataset
from transfer_jax.models.convnext import layer_id as convnext_layer_id
from transfer_jax.models.registry import compute_dtype as model_compute_dtype
from transfer_jax.tasks.registry import get_task
from transfer_jax.train import distributed
from transfer_jax.train.checkpoint import RunCheckpointer
from transfer_jax.train.export import model_arrays, write_pretrained
from transfer_jax.train.flops import device_peak_flops, train_step_flops
from transfer_jax.train.input_wait import InputWaitClock
from transfer_jax.train.mesh import batch_sharding, check_batch_divisible, create_mesh, global_batch
from transfer_jax.train.optim import make_optimizer
from transfer_jax.train.pretrained import adopt_architecture, load_into
from transfer_jax.train.probe import AlignmentProbe, probe_images
from transfer_jax.train.state import abstract_state, count_params, init_state, model_graph
from transfer_jax.train.step import compiled_flops, describe_memory, make_eval_step, make_train_step
from transfer_jax.train.writer import MetricWriter


class SimulatedPreemption(RuntimeError):
    """Raised by `config.debug.preempt_after_step`: the run stops hard right after a checkpoint, like a kill."""


def _backbone_layer_fn(config):
    if config.model.backbone == "profound_conv":
        depths = tuple(config.model.backbone_options.depths)
        scheme = config.optimizer.layer_decay_scheme
        return (lambda path: convnext_layer_id(tuple(p.key if hasattr(p, "key") else p for p in path)[1:], depths,
                                               scheme)), sum(depths)
    return None, 0


def _fetch(tree):
    """The only device -> host transfers of the loop: small results at the logging / evaluation cadence.

    Gathers across processes when the arrays span several hosts. Everything else stays on device, which tests
    check by running the loop under `jax.transfer_guard_device_to_host("disallow")`.
    """
    with jax.transfer_guard_device_to_host("allow"):
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return multihost_utils.process_allgather(tree, tiled=True)
        return jax.device_get(tree)


class Evaluator:
    def __init__(self, task, graph, paths, crop_size, per_process_batch, mesh, compute_dtype,
                 cache_bytes: int = 0):
        self.task, self.mesh = task, mesh
        self.cases = PreparedCaseSource(paths, cache_bytes)  # read once, evaluated every `eval_every`
        self.crop_size, self.per_process_batch = crop_size, per_process_batch
        self.step = jax.jit(make_eval_step(graph, task, compute_dtype))

    def __call__(self, state) -> dict[str, float]:
        stats, losses, valid = [], [], []
        for batch in eval_batches(self.cases, self.task, crop_size=self.crop_size,
                                  per_process_batch=self.per_process_batch):
            device_batch = global_batch(batch, self.mesh)
            batch_stats, loss = self.step(state.params, state.rest, device_batch)
            stats.append(batch_stats)
            losses.append(loss)
            valid.append(device_batch["valid"])
        stats, losses, valid = _fetch((stats, losses, valid))
        mask = np.concatenate(valid)
        merged = {k: np.concatenate([s[k] for s in stats])[mask] for k in stats[0]}
        metrics = self.task.summarize(merged)
        metrics["loss"] = float(np.mean(np.concatenate(losses)[mask]))  # mean over cases, padding left out
        return metrics


def _config_snapshot(config) -> dict:
    return json.loads(config.to_json_best_effort())


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
    """Run (or resume) one fine-tuning run; returns the run summary also written to `workdir/summary.json`."""
    distributed.initialize(config.distributed)
    workdir = os.path.abspath(workdir)
    writer = MetricWriter(workdir, tensorboard=config.logging.tensorboard)
    try:
        return _run(config, workdir, writer)
    finally:
        writer.close()


def _run(config, workdir: str, writer: MetricWriter) -> dict[str, Any]:
    wall_start = time.time()
    log = writer.log
    allocator = active_allocator()
    log(f"transfer_jax: task={config.task.name} backbone={config.model.backbone} workdir={workdir}")
    log(f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es), python {platform.python_version()}, host allocator {allocator}")

    if config.init.mode not in ("scratch", "pretrained"):
        raise ValueError(f"init.mode must be 'scratch' or 'pretrained', got {config.init.mode!r}")
    init_label = config.init.mode
    if config.init.mode == "pretrained" and config.init.checkpoint:
        for change in adopt_architecture(config):
            log(f"architecture from {config.init.checkpoint}: {change}")
    elif config.init.mode == "pretrained":
        init_label = "pretrained-random-standin"
        log("WARNING: init.mode='pretrained' but no init.checkpoint is given: the backbone starts from a RANDOM "
            "stand-in. Point init.checkpoint at a converted or pretrained artifact (scripts/convert_*.py, "
            "configs/pretrain_*.py) for a real transfer measurement.")
    mesh = create_mesh(config.mesh.data, config.mesh.fsdp, num_devices=config.mesh.num_devices)
    task = get_task(config)
    per_process_batch = check_batch_divisible(config.batch_size, mesh)
    eval_per_process = check_batch_divisible(config.eval_batch_size, mesh)
    cache_bytes = memory_cache_bytes(config.data)
    compute_dtype = model_compute_dtype(config.model.backbone_options)

    cache_dir = config.data.cache_dir or os.path.join(workdir, "preprocessed")
    splits = prepare_splits(config.data, cache_dir, task, log=log)
    log(f"data: {splits.manifest}: train {len(splits.paths['train'])}, val {len(splits.paths['val'])}, "
        f"test {len(splits.paths['test'])} cases, {len(splits.skipped)} skipped")

    def build(rngs):
        return task.build_model(rngs)

    abstract = model_graph(build)
    _, abstract_params, _ = abstract
    layer_fn, num_layers = _backbone_layer_fn(config)
    tx, schedule, opt_info = make_optimizer(
        config.optimizer, abstract_params, total_steps=config.total_steps, backbone_layer_id=layer_fn,
        num_backbone_layers=num_layers, is_backbone=lambda name: name.startswith(task.backbone_prefix),
    )
    state, graph, shardings = init_state(build, tx, jax.random.key(config.seed), mesh, config.mesh.strategy,
                                         config.mesh.fsdp_min_size, abstract=abstract)
    log(f"model: {count_params(state.params):,} parameters ({len(opt_info['frozen'])} frozen tensors), "
        f"sharding={config.mesh.strategy}, mesh={dict(mesh.shape)}")
    if init_label == "pretrained":
        params, rest, report = load_into(state.params, state.rest, config.init.checkpoint,
                                         dont_load=tuple(config.init.dont_load),
                                         shardings=lambda _: (shardings.params, shardings.rest))
        state = state.replace(params=params, rest=rest)
        log(report.describe())
    probe = None
    if config.alignment.enabled:
        images = probe_images(splits.paths["val"], config.data.crop_size, config.alignment.probe_size,
                              multiple_of=mesh.devices.size)
        probe = AlignmentProbe(config.alignment, task, graph, mesh, compute_dtype, images, config.eval_batch_size)
        # Computed from the initial weights before any restore: a resumed run rebuilds them deterministically.
        probe.set_reference(state.params, state.rest)
        log(f"alignment: {probe.size} probe inputs, sites {list(probe.sites)}, spec {probe.spec}")

    train_iter = iter(train_dataset(
        splits.paths["train"], task, crop_size=tuple(config.data.crop_size), augment=augment_config(config.data),
        per_process_batch=per_process_batch, seed=config.seed, workers=config.data.workers,
        prefetch=config.data.prefetch, memory_cache_bytes=cache_bytes,
    ))
    checkpointer = RunCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    meta: dict[str, Any] = {"history": [], "best": None, "best_step": None, "evals_without_improvement": 0,
                            "config": _config_snapshot(config)}
    latest = checkpointer.latest_step()
    if latest is not None:
        state, meta = checkpointer.restore(latest, abstract_state(state, shardings), train_iter)
        log(f"resumed from checkpoint at step {latest}")
    start_step = int(_fetch(state.step))

    evaluator = Evaluator(task, graph, splits.paths["val"], tuple(config.data.crop_size), eval_per_process, mesh,
                          compute_dtype, cache_bytes)
    train_step = make_train_step(graph, task, tx, schedule, compute_dtype)
    step_fn = jax.jit(train_step, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                      donate_argnums=(0,))

    finished = start_step >= config.total_steps or meta.get("stopped_early", False)
    throughput: dict[str, float] = {}
    if not finished:
        peak = device_peak_flops(jax.devices()[0], config.logging.peak_tflops)  # a bad value fails before compiling
        batch = global_batch(next(train_iter), mesh)
        compile_start = time.time()
        compiled = step_fn.lower(state, batch).compile()
        compile_seconds = time.time() - compile_start
        memory = describe_memory(compiled)
        flops = compiled_flops(compiled)
        model_flops = train_step_flops(graph, state.params, state.rest, batch, task, compute_dtype)
        log(f"compiled train step in {compile_seconds:.1f}s; memory per device (MiB): "
            + ", ".join(f"{k}={v:.1f}" for k, v in memory.items())
            + f"; model FLOPs/step={model_flops:.3g} (dots + convs, 3 x forward)"
            + (f"; XLA flops/step/device={flops:.3g}" if flops else "")
            + (f"; peak {peak / 1e12:.3g} TFLOP/s per device" if peak else ""))
        hint = host_memory_hint(jax.devices()[0].platform, memory.get("temp_mib", 0.0), allocator, os.environ)
        if hint:
            log(hint)
        throughput = {"compile_seconds": compile_seconds, "flops_per_step_per_device": flops,
                      "model_flops_per_step": model_flops, "peak_flops_per_device": peak, **memory}
        state, meta, throughput = _train(config, state, compiled, batch, train_iter, mesh, evaluator, probe,
                                         checkpointer, writer, meta, start_step, task, throughput)
    checkpointer.close()

    exported = None
    export = task.pretrained_export()
    if export is not None:
        host_params, host_rest = _fetch(model_arrays(state.params, state.rest))
        exported = write_pretrained(export, host_params, host_rest, workdir, report={
            "source": "transfer_jax pretraining run", "task": config.task.name, "workdir": workdir,
            "steps": int(_fetch(state.step)), "final": meta["history"][-1]["metrics"] if meta["history"] else None})
        log(f"pretrained artifact: {exported} (fine-tune from it with --config.init.mode=pretrained "
            f"--config.init.checkpoint={exported})")

    summary = {
        "task": config.task.name, "backbone": config.model.backbone, "workdir": workdir,
        "primary_metric": task.primary_metric, "direction": task.direction,
        "best": meta["best"], "best_step": meta["best_step"],
        "final": meta["history"][-1]["metrics"] if meta["history"] else None,
        "steps": int(_fetch(state.step)), "stopped_early": bool(meta.get("stopped_early", False)),
        "init": init_label, "alignment": alignment_summary(meta.get("alignment", {})),
        "history": meta["history"], "throughput": throughput,
        "skipped_cases": [str(p) for p in splits.skipped], "manifest": splits.manifest,
        "wall_seconds": time.time() - wall_start, "config": _config_snapshot(config),
        "pretrained_artifact": exported,
    }
    summary["steps_to_95pct_best"] = steps_to_fraction_of_best(meta["history"], task, 0.95)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    if splits.skipped:
        log(f"{len(splits.skipped)} case(s) were skipped:\n" + "\n".join(f"  - {p}" for p in splits.skipped))
    final = summary["final"] or {}
    log(f"done: {task.primary_metric} final={final.get(task.primary_metric, float('nan')):.4f} "
        f"best={summary['best'] if summary['best'] is not None else float('nan'):.4f} (step {summary['best_step']}), "
        f"steps={summary['steps']}, wall={summary['wall_seconds']:.0f}s, outputs in {workdir}")
    return summary


def steps_to_fraction_of_best(history: list[dict], task, fraction: float) -> Optional[int]:
    """First evaluated step whose primary metric reaches `fraction` of the best value (convergence speed)."""
    values = [(h["step"], h["metrics"].get(task.primary_metric)) for h in history]
    values = [(s, v) for s, v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    best = max(v for _, v in values) if task.direction == "max" else min(v for _, v in values)
    for step, value in values:
        reached = value >= fraction * best if task.direction == "max" else value <= best / fraction
        if reached:
            return step
    return None


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


def _measure_alignment(probe, state, step, seed, writer, meta) -> float:
    start = time.time()
    measured = _fetch(probe(state.params, state.rest, jax.random.fold_in(jax.random.key(seed + 7), step)))
    seconds = time.time() - start
    flat = {}
    for site, values in measured.items():
        values = {k: float(v) for k, v in values.items()}
        meta.setdefault("alignment", {}).setdefault(site, []).append({"step": step, "values": values})
        flat.update({f"{site}/{k}": v for k, v in values.items()})
    writer.write(step, flat, prefix="align/")
    return seconds


def _train(config, state, compiled, first_batch, train_iter, mesh, evaluator, probe, checkpointer, writer, meta,
           start_step, task, throughput):
    log = writer.log
    total = config.total_steps
    bar = tqdm(total=total, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not config.logging.progress_bar or jax.process_index() != 0)
    pending = None  # metrics of the last step of the current logging window (still on device)
    window_start, window_steps, data_wait, input_fetch, paused = time.time(), 0, 0.0, 0.0, 0.0
    steady: list[float] = []
    run_start, alignment_seconds = time.time(), 0.0

    def evaluate(step: int) -> bool:
        """Validation metrics and alignment at `step`; True when early stopping says to stop."""
        nonlocal alignment_seconds
        metrics_eval = evaluator(state)
        writer.write(step, metrics_eval, prefix="val/")
        if probe is not None:
            alignment_seconds += _measure_alignment(probe, state, step, config.seed, writer, meta)
        value = metrics_eval.get(task.primary_metric, float("nan"))
        meta["history"].append({"step": step, "metrics": metrics_eval})
        if task.is_better(value, meta["best"]):
            meta["best"], meta["best_step"] = value, step
            meta["evals_without_improvement"] = 0
        else:
            meta["evals_without_improvement"] += 1
        patience = config.early_stopping_patience
        if patience and meta["evals_without_improvement"] >= patience:
            meta["stopped_early"] = True
            log(f"early stopping at step {step}: no improvement of {task.primary_metric} in {patience} evals")
            return True
        return False

    if start_step == 0:  # the untrained (pretrained or scratch) starting point: step 0 of every curve
        evaluate(0)
    batch, step = first_batch, start_step
    input_clock = InputWaitClock()
    try:
        while step < total:
            state, metrics = compiled(state, batch)
            step += 1
            input_clock.dispatched(step, metrics)
            window_steps += 1
            pending = metrics
            bar.update(1)
            last = step == total
            if step % config.log_every == 0 or last:
                scalars = {k: float(v) for k, v in _fetch(pending).items()}
                elapsed = time.time() - window_start - paused
                step_time = elapsed / max(window_steps, 1)
                scalars.update(step_seconds=step_time, volumes_per_second=config.batch_size / step_time,
                               data_wait_fraction=data_wait / max(elapsed, 1e-9),
                               input_fetch_fraction=input_fetch / max(elapsed, 1e-9),
                               **flops_rates(throughput, step_time, mesh.size))
                if step > start_step + config.log_every:  # the first window includes warm-up
                    steady.append(step_time)
                writer.write(step, scalars, prefix="train/")
                if scalars["data_wait_fraction"] > 0.05 and step > start_step + config.log_every:
                    log(f"hint: the devices sat idle waiting for the next batch {scalars['data_wait_fraction']:.0%} of "
                        "the time; raise data.workers or data.memory_cache_mb, or cache preprocessed cases on faster "
                        "storage")
                window_start, window_steps, data_wait, input_fetch, paused = time.time(), 0, 0.0, 0.0, 0.0
            pause_start = time.time()
            if step % config.eval_every == 0 or last:
                last = evaluate(step) or last
            if step % config.checkpoint_every == 0 or last:
                checkpointer.save(step, state, train_iter, meta)
                if config.debug.preempt_after_step and step >= config.debug.preempt_after_step:
                    checkpointer.wait()
                    raise SimulatedPreemption(f"simulated preemption after the checkpoint of step {step}")
            paused += time.time() - pause_start
            if last:
                break
            fetch_start = time.perf_counter()
            batch = global_batch(next(train_iter), mesh)
            if config.debug.input_delay_seconds:
                time.sleep(config.debug.input_delay_seconds)
            fetch_end = time.perf_counter()
            input_fetch += fetch_end - fetch_start
            data_wait += input_clock.idle_seconds(step, metrics, fetch_start, fetch_end)
    finally:  # also when training raises (preemption, bad batch): no thread left waiting
        input_clock.close()
        bar.close()
    if probe is not None:
        throughput.update(alignment_seconds=alignment_seconds,
                          alignment_share=alignment_seconds / max(time.time() - run_start, 1e-9))
    if steady:
        step_time = float(np.median(steady))
        throughput.update(steady_step_seconds=step_time, volumes_per_second=config.batch_size / step_time,
                          **flops_rates(throughput, step_time, mesh.size))
    return state, meta, throughput


def flops_rates(throughput: dict, step_seconds: float, num_devices: int) -> dict[str, float]:
    """Achieved model TFLOP/s per device and, where the device's peak is known, MFU."""
    per_device = throughput["model_flops_per_step"] / step_seconds / num_devices
    rates = {"tflops_per_device": per_device / 1e12}
    if throughput.get("peak_flops_per_device"):
        rates["mfu"] = per_device / throughput["peak_flops_per_device"]
    return rates
