"""Set-up of a fine-tuning run, before its first step: config -> mesh, task, data, sharded state, optimizer,
checkpointer, evaluators (in-loop, whole-volume), alignment probe; then the one place that compiles the run's device
code.

`set_up` builds the pieces and the initial state, `resume` restores the latest checkpoint over them, and
`compile_steps` traces and compiles every device function the loop calls (the donated train step ahead of time,
the eval step, the alignment probe) and counts the model FLOPs, so that a caller can wrap all of it in one context.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import optax
from jax.sharding import Mesh

from transfer_jax.allocator import active_allocator, host_memory_hint
from transfer_jax.data.dataset import augment_config, prepare_splits, prepared_cache_dir
from transfer_jax.data.pipeline import memory_cache_bytes, train_dataset
from transfer_jax.models.cpu_conv import target_mesh
from transfer_jax.models.registry import compute_dtype as model_compute_dtype
from transfer_jax.tasks.inference import whole_volume_applies
from transfer_jax.tasks.registry import get_task
from transfer_jax.train.checkpoint import RunCheckpointer
from transfer_jax.train.chrono import StepCost
from transfer_jax.train.evaluator import Evaluator, WholeVolumeEvaluator
from transfer_jax.train.flops import device_peak_flops, train_step_flops
from transfer_jax.train.mesh import check_batch_divisible, create_mesh
from transfer_jax.train.optim import make_run_optimizer
from transfer_jax.train.pretrained import adopt_architecture, check_init, load_into
from transfer_jax.train.probe import AlignmentProbe, probe_images
from transfer_jax.train.state import ModelGraph, TrainState, abstract_state, count_params, init_state, model_graph
from transfer_jax.train.step import compiled_flops, describe_memory, jit_train_step, make_train_step
from transfer_jax.train.writer import MetricWriter


@dataclasses.dataclass(frozen=True)
class Run:
    """What set-up builds from a run's config, for the step loop and the summary."""
    config: Any
    workdir: str
    writer: MetricWriter
    started: float  # time.time() when set-up began
    init_label: str  # "scratch", "pretrained" or "pretrained-random-standin"
    mesh: Mesh
    task: Any
    splits: Any  # data.dataset.Splits: case paths per split, manifest, skipped cases
    compute_dtype: Any
    graph: ModelGraph
    tx: optax.GradientTransformation
    schedule: Callable
    shardings: TrainState  # of the train state
    data: Any  # the training data iterator, whose position the checkpoints hold
    batches: Iterator[dict]  # the host batches the loop trains on: `data`, through the callbacks' `batches`
    checkpointer: RunCheckpointer
    evaluator: Evaluator  # in-loop, centre crops
    whole_volume: Optional[WholeVolumeEvaluator]  # end of run; None for tasks it does not apply to
    probe: Optional[AlignmentProbe]
    callbacks: Sequence[Any]  # loop.Callback
    allocator: str

    @property
    def log(self) -> Callable[[str], None]:
        return self.writer.log


@dataclasses.dataclass(frozen=True)
class Steps:
    """The compiled train step, what one step costs and what compiling it measured."""
    train: Any  # (state, batch) -> (state, metrics); the state is donated
    cost: StepCost
    throughput: dict[str, float]


def config_snapshot(config) -> dict:
    return json.loads(config.to_json_best_effort())


def set_up(config, workdir: str, writer: MetricWriter, callbacks: Sequence[Any] = ()) -> tuple[Run, TrainState]:
    """The run's pieces and its initial train state (initialised, or loaded from `init.checkpoint`)."""
    started, log = time.time(), writer.log
    allocator = active_allocator()
    log(f"transfer_jax: task={config.task.name} backbone={config.model.backbone} workdir={workdir}")
    log(f"jax {jax.__version__} on {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es), python {platform.python_version()}, host allocator {allocator}")
    init_label = _init_label(config, log)
    mesh = create_mesh(config.mesh.data, config.mesh.fsdp, num_devices=config.mesh.num_devices)
    task = get_task(config)
    per_process_batch = check_batch_divisible(config.batch_size, mesh)
    eval_per_process = check_batch_divisible(config.eval_batch_size, mesh)
    cache_bytes = memory_cache_bytes(config.data)
    compute_dtype = model_compute_dtype(config.model.backbone_options)

    splits = prepare_splits(config.data, prepared_cache_dir(config.data), task, log=log,
                            progress=config.logging.progress_bar and jax.process_index() == 0)
    log(f"data: {splits.manifest}: train {len(splits.paths['train'])}, val {len(splits.paths['val'])}, "
        f"test {len(splits.paths['test'])} cases, {len(splits.skipped)} skipped")

    abstract = model_graph(task.build_model)
    tx, schedule, opt_info = make_run_optimizer(config, abstract[1], task.backbone_prefix)
    state, graph, shardings = init_state(task.build_model, tx, jax.random.key(config.seed), mesh,
                                         config.mesh.strategy, config.mesh.fsdp_min_size, abstract=abstract)
    log(f"model: {count_params(state.params):,} parameters ({len(opt_info['frozen'])} frozen tensors), "
        f"sharding={config.mesh.strategy}, mesh={dict(mesh.shape)}")
    if init_label == "pretrained":
        params, rest, report = load_into(state.params, state.rest, config.init.checkpoint,
                                         dont_load=tuple(config.init.dont_load),
                                         shardings=lambda _: (shardings.params, shardings.rest))
        state = state.replace(params=params, rest=rest)
        log(report.describe())

    data = iter(train_dataset(
        splits.paths["train"], task, crop_size=tuple(config.data.crop_size), augment=augment_config(config.data),
        per_process_batch=per_process_batch, seed=config.seed, workers=config.data.workers,
        prefetch=config.data.prefetch, memory_cache_bytes=cache_bytes, sampler=config.data.get("sampler", "shuffle"),
    ))
    batches = data
    for callback in callbacks:
        batches = callback.batches(batches)
    evaluator = Evaluator(task, graph, splits.paths["val"], tuple(config.data.crop_size), eval_per_process, mesh,
                          compute_dtype, cache_bytes)
    whole_volume = None
    if whole_volume_applies(task):
        whole_volume = WholeVolumeEvaluator(task, graph, roi=tuple(config.data.crop_size),
                                            overlap=_overlap(config), window_batch=config.eval_batch_size,
                                            mesh=mesh, compute_dtype=compute_dtype)
    checkpointer = RunCheckpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
    run = Run(config=config, workdir=workdir, writer=writer, started=started, init_label=init_label, mesh=mesh,
              task=task, splits=splits, compute_dtype=compute_dtype, graph=graph, tx=tx, schedule=schedule,
              shardings=shardings, data=data, batches=batches,
              checkpointer=checkpointer, evaluator=evaluator, whole_volume=whole_volume,
              probe=_alignment_probe(config, task, graph, mesh, splits, compute_dtype, log),
              callbacks=tuple(callbacks), allocator=allocator)
    return run, state


def _overlap(config) -> float:
    overlap = config.eval_overlap
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0.0 <= overlap < 1.0:
        raise ValueError(f"config.eval_overlap must be a fraction in [0, 1) (sliding-window overlap of the "
                         f"end-of-run evaluation), got {overlap!r}")
    return float(overlap)


def _init_label(config, log) -> str:
    """Checks `init` and adopts the architecture of `init.checkpoint`; how the backbone starts."""
    label = check_init(config.init)
    if label == "pretrained":
        for change in adopt_architecture(config):
            log(f"architecture from {config.init.checkpoint}: {change}")
    elif label == "pretrained-random-standin":
        log("WARNING: init.mode='pretrained' without init.checkpoint and init.allow_random=True: the backbone "
            "starts from a RANDOM stand-in, which measures no transfer.")
    return label


def _alignment_probe(config, task, graph, mesh, splits, compute_dtype, log) -> Optional[AlignmentProbe]:
    if not config.alignment.enabled:
        return None
    images = probe_images(splits.paths["val"], config.data.crop_size, config.alignment.probe_size,
                          multiple_of=mesh.devices.size)
    probe = AlignmentProbe(config.alignment, task, graph, mesh, compute_dtype, images, config.eval_batch_size)
    log(f"alignment: {probe.size} probe inputs, sites {list(probe.sites)}, spec {probe.spec}")
    return probe


def resume(run: Run, state: TrainState) -> tuple[TrainState, dict]:
    """The latest checkpoint's state and run metadata (the data iterator moves to its position too), or `state`
    and fresh metadata when the run has no checkpoint yet."""
    meta = {"history": [], "best": None, "best_step": None, "evals_without_improvement": 0,
            "config": config_snapshot(run.config)}
    latest = run.checkpointer.latest_step()
    if latest is None:
        return state, meta
    state, meta = run.checkpointer.restore(latest, abstract_state(state, run.shardings), run.data)
    run.log(f"resumed from checkpoint at step {latest}")
    return state, meta


def compile_steps(run: Run, state: TrainState, batch: dict, initial: TrainState) -> Steps:
    """Traces and compiles every device function of the loop: the alignment probe (embedding its reference with
    the `initial` weights), the eval step and the train step, for the shapes and shardings of `state` and of the
    global `batch` and with the layer forms of the mesh's platform; counts the model FLOPs of a train step."""
    with target_mesh(run.mesh):
        return _compile_steps(run, state, batch, initial)


def _compile_steps(run: Run, state: TrainState, batch: dict, initial: TrainState) -> Steps:
    config, log = run.config, run.log
    peak = device_peak_flops(jax.devices()[0], config.logging.peak_tflops)  # a bad value fails before compiling
    if run.probe is not None:  # the reference: the initial weights, which a resumed run rebuilds deterministically
        run.probe.set_reference(initial.params, initial.rest)
    run.evaluator.compile(state)
    compile_start = time.time()
    train_step = make_train_step(run.graph, run.task, run.tx, run.schedule, run.compute_dtype)
    compiled = jit_train_step(train_step, run.shardings, run.mesh).lower(state, batch).compile()
    compile_seconds = time.time() - compile_start
    memory = describe_memory(compiled)
    flops = compiled_flops(compiled)
    model_flops = train_step_flops(run.graph, state.params, state.rest, batch, run.task, run.compute_dtype)
    log(f"compiled train step in {compile_seconds:.1f}s; memory per device (MiB): "
        + ", ".join(f"{k}={v:.1f}" for k, v in memory.items())
        + f"; model FLOPs/step={model_flops:.3g} (dots + convs, 3 x forward)"
        + (f"; XLA flops/step/device={flops:.3g}" if flops else "")
        + (f"; peak {peak / 1e12:.3g} TFLOP/s per device" if peak else ""))
    hint = host_memory_hint(jax.devices()[0].platform, memory.get("temp_mib", 0.0), run.allocator, os.environ)
    if hint:
        log(hint)
    throughput = {"compile_seconds": compile_seconds, "flops_per_step_per_device": flops,
                  "model_flops_per_step": model_flops, "peak_flops_per_device": peak, **memory}
    return Steps(train=compiled, cost=StepCost(config.batch_size, model_flops, run.mesh.size, peak),
                 throughput=throughput)
