"""Compile a run's steps for a Cloud TPU topology on this host (no TPU needed): does it fit, how fast could it be.

    python -m transfer_jax.aot --config=configs/seg.py:full --topology=v5e:2x4 [--config.mesh.fsdp=8] [--max-batch]

The train state, train step, evaluation step and alignment probe are built by the trainer's own functions
(train/state.py, train/optim.py, train/step.py, train/mesh.py, train/probe.py) over compile-only TPU devices
(`jax.experimental.topologies`, backed by libtpu): the state is abstract (shapes + shardings, no weights), and
`jit(...).lower(...).compile()` runs the real TPU compiler, whose memory and cost analyses are those of the
executable a TPU slice would run (MaxText's train_compile.py works the same way). The host itself stays on the
CPU platform: libtpu is only asked for a topology description, never for a TPU backend.

Figures are per device (one chip runs one SPMD program) unless named `global`. The roofline step time is the
larger of the compiled step's FLOPs over the chip's bf16 peak and its HBM traffic over the chip's bandwidth
(train/flops.py datasheets), both from XLA's cost analysis plus what it leaves out of Pallas kernels (their
operands and results; their FLOPs through the model count where that is larger); roofline MFU puts the model FLOPs
(train/flops.py) over that time. The last line of the output is one JSON object (scripts/aot_matrix.py collects
them).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Optional

from absl import app, flags
from ml_collections import config_flags

from transfer_jax.cli import parse_flags, prepare_runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/seg.py[:ARG].",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x4", "Cloud TPU topology, <chip>:<shape>, e.g. v5e:2x4 "
                                "(a v5e-8), v4:2x2x1, v5p:2x2x1, v6e:2x4.")
_MAX_BATCH = flags.DEFINE_boolean("max_batch", False, "Also search the largest global batch whose train step fits "
                                  "(doubling, then bisection over multiples of the batch-parallel size).")
flags.DEFINE_alias("max-batch", "max_batch")
_CACHE_DIR = flags.DEFINE_string("cache_dir", "", "Persistent XLA compilation cache folder (default off). jax "
                                 "writes compile-only TPU executables there but cannot read them back (libtpu: "
                                 "\"PjRtCompiler must be constructed with a Client to call "
                                 "DeserializeLoadedExecutable\"); scripts/aot_matrix.py caches the results instead.")
_SKIP = flags.DEFINE_list("skip", [], "Steps not to compile: any of eval, probe.")

# Names libtpu's compile-only topologies accept (chip:shape; v4 and v5p are 3-D tori, v5e and v6e 2-D).
TOPOLOGY_EXAMPLES = ("v5e:1x1", "v5e:2x2", "v5e:2x4", "v5e:4x4", "v6e:2x2", "v6e:2x4", "v4:2x2x1", "v4:2x2x2",
                     "v5p:2x2x1", "v5p:2x2x2")
GIB = 2.0 ** 30


class AotError(ValueError):
    """Bad input found before compiling: reported as one line."""


def use_host_cpu() -> None:
    """Host work (tracing, FLOP counting) on the CPU platform: never initialise a TPU backend on this host."""
    import jax

    jax.config.update("jax_platforms", "cpu")


def use_compilation_cache(path: str) -> None:
    if not path:
        return
    import jax

    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def topology_devices(name: str) -> list:
    """The compile-only devices of a Cloud TPU topology such as "v5e:2x4"."""
    # A compile-only client opens no chip, so other processes may hold libtpu at the same time (tests, the matrix);
    # without this libtpu refuses a second process at its lockfile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    # v4 and v5p chips have two TensorCores that run as one device ("megacore"), as on a real slice; by default
    # libtpu's compile-only topology would expose each core, on which `jax.make_mesh` refuses to lay out a mesh.
    options = {"chip_config_name": "megacore"} if name.split(":")[0].lower() in ("v4", "v5p") else {}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **options).devices)
    except Exception as exc:  # libtpu rejects unknown names with a long XlaRuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "INVALID_ARGUMENT" not in first:
            raise AotError(f"libtpu could not describe --topology={name!r}: {first[:300]}") from None
        raise AotError(f"--topology={name!r} is not a Cloud TPU topology libtpu knows ({first[:160]}); valid "
                       f"examples: {', '.join(TOPOLOGY_EXAMPLES)}") from None


def _forms_for(mesh):
    """The layer forms of the mesh's platform (never the host's): lax convolutions and the fused attention kernel
    for TPU devices."""
    from transfer_jax.models.cpu_conv import target_mesh

    return target_mesh(mesh)


def _abstract(tree, shardings=None):
    import jax

    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _batch_spec(task, config, rows: int, sharding, *, valid: bool = False) -> dict:
    """Abstract global batch of `rows`: shapes and dtypes of one synthetic sample through the task's make_sample."""
    import jax
    import numpy as np

    from transfer_jax.data.phantom import random_crop_batch

    one = random_crop_batch(task.make_sample, config.data.crop_size, len(config.data.channels), 1)
    if valid:
        one["valid"] = np.ones(1, bool)
    return {k: jax.ShapeDtypeStruct((rows, *v.shape[1:]), v.dtype, sharding=sharding) for k, v in one.items()}


def _bytes_per_device(tree) -> int:
    """Bytes one device holds of an abstract sharded tree."""
    import jax
    import numpy as np

    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * x.dtype.itemsize  # also typed PRNG keys
    return total


class Programs:
    """The trainer's state, steps and probe for one config on one mesh, abstract: everything `lower` needs."""

    def __init__(self, config, mesh):
        import jax
        import jax.numpy as jnp

        from transfer_jax.models.registry import compute_dtype as model_compute_dtype
        from transfer_jax.tasks.registry import get_task
        from transfer_jax.train.mesh import batch_sharding
        from transfer_jax.train.optim import make_run_optimizer
        from transfer_jax.train.state import TrainState, abstract_state, model_graph, state_shardings

        self.config, self.mesh = config, mesh
        self.task = task = get_task(config)
        self.compute_dtype = model_compute_dtype(config.model.backbone_options)
        self.batch_sharding = batch_sharding(mesh)
        with _forms_for(mesh):
            self.graph, params, rest = model_graph(task.build_model)
        self.tx, self.schedule, _ = make_run_optimizer(config, params, task.backbone_prefix)
        params, rest = _abstract(params), _abstract(rest)
        state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, rest=rest,
                           opt_state=jax.eval_shape(self.tx.init, params))
        self.unsharded_state = state
        self.shardings = state_shardings(state, mesh, config.mesh.strategy, config.mesh.fsdp_min_size)
        self.state = abstract_state(state, self.shardings)

    def batch(self, rows: int, *, valid: bool = False) -> dict:
        return _batch_spec(self.task, self.config, rows, self.batch_sharding, valid=valid)

    def lower_train(self, batch_size: int):
        from transfer_jax.train.step import jit_train_step, make_train_step

        step = make_train_step(self.graph, self.task, self.tx, self.schedule, self.compute_dtype)
        jitted = jit_train_step(step, self.shardings, self.mesh)
        with _forms_for(self.mesh):
            return jitted.lower(self.state, self.batch(batch_size))

    def lower_eval(self):
        import jax

        from transfer_jax.train.step import make_eval_step

        step = jax.jit(make_eval_step(self.graph, self.task, self.compute_dtype))
        with _forms_for(self.mesh):
            return step.lower(self.state.params, self.state.rest, self.batch(self.config.eval_batch_size, valid=True))

    def lower_probe(self):
        """(features, measure) of the in-loop alignment probe over a probe set of the configured size."""
        import jax
        import numpy as np

        from transfer_jax.train.probe import AlignmentProbe

        size = self.config.alignment.probe_size // self.mesh.devices.size * self.mesh.devices.size
        crop = np.zeros((1, *self.config.data.crop_size, len(self.config.data.channels)), np.float32)
        one = np.asarray(self.task.probe_inputs(crop))
        images = jax.ShapeDtypeStruct((size, *one.shape[1:]), one.dtype, sharding=self.batch_sharding)
        probe = AlignmentProbe(self.config.alignment, self.task, self.graph, self.mesh, self.compute_dtype, images,
                               self.config.eval_batch_size)
        with _forms_for(self.mesh):
            return probe.lower(self.state.params, self.state.rest)

    def model_flops(self, batch_size: int) -> float:
        """Model FLOPs of one global train step (train/flops.py: dots + convolutions, 3 x forward)."""
        from transfer_jax.train.flops import train_step_flops

        batch = _batch_spec(self.task, self.config, batch_size, None)
        return train_step_flops(self.graph, self.unsharded_state.params, self.unsharded_state.rest, batch,
                                self.task, self.compute_dtype)


# Bytes per element of the HLO element types a kernel's operands and results use.
_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
                  "f64": 8, "s64": 8, "u64": 8}
_OPERAND_SHAPES = re.compile(r"operand_layout_constraints=\{(.*?\})\}")
_SHAPE = re.compile(r"\b(" + "|".join(_ELEMENT_BYTES) + r")\[([0-9,]*)\]")


def _shape_bytes(text: str) -> int:
    return sum(_ELEMENT_BYTES[kind] * math.prod(int(d) for d in dims.split(",") if d)
               for kind, dims in _SHAPE.findall(text))


def kernel_bytes(hlo_text: str) -> int:
    """HBM bytes of the Pallas kernels (Mosaic `tpu_custom_call`s) in a compiled module's text, which XLA's
    `cost_analysis()` leaves out: each kernel's operands and results counted once at their logical size, a lower
    bound (a kernel may read an operand block more than once, and TPU tiles pad narrow minor dimensions)."""
    total = 0
    for line in hlo_text.splitlines():
        if 'custom_call_target="tpu_custom_call"' not in line:
            continue
        results = line.split(" = ", 1)[1].split(" custom-call(", 1)[0]
        operands = _OPERAND_SHAPES.search(line)  # operand shapes with their layouts: {bf16[..]{3,2,1,0}, ...}
        total += _shape_bytes(results) + (_shape_bytes(operands.group(1)) if operands else 0)
    return total


def analyse(compiled, resident_bytes: int = 0) -> dict[str, Any]:
    """Per-device memory and cost of one executable. `resident_bytes`: device memory held by buffers that are not
    its arguments while it runs (the optimizer state during evaluation), added to its peak."""
    memory = compiled.memory_analysis()
    arg, out = int(memory.argument_size_in_bytes), int(memory.output_size_in_bytes)
    temp, alias = int(memory.temp_size_in_bytes), int(memory.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    peak = int(getattr(memory, "peak_memory_in_bytes", 0) or 0)
    peak = max(peak, arg + out - alias + temp) + resident_bytes
    kernels = kernel_bytes(compiled.as_text())
    return {"argument_bytes": arg, "output_bytes": out, "temp_bytes": temp, "alias_bytes": alias,
            "generated_code_bytes": int(getattr(memory, "generated_code_size_in_bytes", 0)), "peak_bytes": peak,
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)) + kernels, "kernel_bytes": kernels}


class OutOfMemory(RuntimeError):
    """The TPU compiler could not place the program in HBM (it refuses to emit it)."""


def _timed_compile(lower: Callable[[], Any]) -> tuple[Any, float]:
    start = time.time()
    try:
        compiled = lower().compile()
    except Exception as exc:
        if "RESOURCE_EXHAUSTED" in str(exc) or "Ran out of memory" in str(exc):
            raise OutOfMemory(str(exc).strip().splitlines()[0][:400]) from None
        raise
    return compiled, time.time() - start


def check_inputs(config, devices) -> None:
    """Every mistake that would only surface in the compiler, named before compiling."""
    n = len(devices)
    fsdp = config.mesh.fsdp
    if fsdp < 1 or n % fsdp:
        raise AotError(f"config.mesh.fsdp={fsdp} must divide the {n} devices of the topology")
    if config.mesh.data not in (-1, n // fsdp):
        raise AotError(f"config.mesh.data={config.mesh.data} x mesh.fsdp={fsdp} must equal the topology's {n} "
                       f"devices (use -1)")
    for key in ("batch_size", "eval_batch_size"):
        if config[key] % n:
            nearest = max(n, config[key] // n * n)
            raise AotError(f"config.{key}={config[key]} must be a multiple of the {n} devices of the topology (the "
                           f"batch is split over the data x fsdp axes); e.g. --config.{key}={nearest}")
    if config.mesh.strategy not in ("replicate", "fsdp"):
        raise AotError(f"config.mesh.strategy must be 'replicate' or 'fsdp', got {config.mesh.strategy!r}")


def make_mesh(config, devices):
    from transfer_jax.train.mesh import create_mesh

    return create_mesh(config.mesh.data, config.mesh.fsdp, devices=devices)


def roofline(flops: float, bytes_accessed: float, peak_flops: Optional[float], hbm_bandwidth: Optional[float]
             ) -> Optional[float]:
    if not peak_flops or not hbm_bandwidth:
        return None
    return max(flops / peak_flops, bytes_accessed / hbm_bandwidth)


def compile_run(config, devices, *, name: str, topology: str, skip=(), log=print) -> dict[str, Any]:
    """Compile the train step (and the evaluation step and probe unless skipped) for `devices`; the report.

    `name` labels the config (file[:arg]) and `topology` the devices in the report."""
    from transfer_jax.train.flops import device_hbm, device_peak_flops

    check_inputs(config, devices)
    mesh = make_mesh(config, devices)
    device = devices[0]
    programs = Programs(config, mesh)
    n = mesh.devices.size
    peak_flops = device_peak_flops(device, config.logging.peak_tflops)
    hbm = device_hbm(device)
    hbm_bytes, hbm_bandwidth = hbm if hbm else (None, None)

    start = time.time()
    try:
        compiled, seconds = _timed_compile(lambda: programs.lower_train(config.batch_size))
    except OutOfMemory as exc:
        log(f"train step does not fit: {exc}")
        return {"config": name, "topology": topology, "device_kind": device.device_kind, "devices": n,
                "mesh": dict(mesh.shape), "strategy": config.mesh.strategy, "batch_size": config.batch_size,
                "compiled": False, "fits": False, "error": str(exc), "compile_s": round(time.time() - start, 1),
                "hbm_bytes": hbm_bytes}
    train = analyse(compiled)
    log(f"train step compiled in {seconds:.0f}s")
    # The state as the device lays it out (the train step's outputs: the new state and a few scalars); tiled TPU
    # layouts pad small arrays, so this exceeds the logical size. Evaluation and the probe run while the
    # optimizer state (its logical share of the state) stays resident outside their arguments.
    state_bytes = train["output_bytes"]
    optimizer_share = 1.0 - (_bytes_per_device((programs.state.params, programs.state.rest))
                             / max(_bytes_per_device(programs.state), 1))
    parts = {"train": dict(train, compile_s=seconds)}
    if "eval" not in skip:
        compiled_eval, seconds_eval = _timed_compile(programs.lower_eval)
        parts["eval"] = dict(analyse(compiled_eval, resident_bytes=int(state_bytes * optimizer_share)),
                             compile_s=seconds_eval)
        log(f"evaluation step compiled in {seconds_eval:.0f}s")
    if "probe" not in skip and config.alignment.enabled:
        features, measure = programs.lower_probe()
        compiled_features, s1 = _timed_compile(lambda: features)
        compiled_measure, s2 = _timed_compile(lambda: measure)
        feat = analyse(compiled_features, resident_bytes=int(state_bytes * optimizer_share))
        # The measurement runs on the two feature sets while the whole state stays resident.
        meas = analyse(compiled_measure, resident_bytes=state_bytes)
        parts["probe_features"] = dict(feat, compile_s=s1)
        parts["probe_measure"] = dict(meas, compile_s=s2)
        log(f"alignment probe compiled in {s1 + s2:.0f}s")

    model_flops = programs.model_flops(config.batch_size)
    # XLA counts no FLOPs for Pallas kernels (the fused attention): the compute term takes the model's count
    # where it is the larger.
    step_flops = max(train["flops"], model_flops / n)
    step_s = roofline(step_flops, train["bytes_accessed"], peak_flops, hbm_bandwidth)
    fits = {step: (p["peak_bytes"] <= hbm_bytes if hbm_bytes else None) for step, p in parts.items()}
    report = {
        "config": name, "topology": topology, "device_kind": device.device_kind, "devices": n,
        "mesh": dict(mesh.shape), "strategy": config.mesh.strategy,
        "batch_size": config.batch_size,
        "batch_per_device": config.batch_size / n, "dtype": str(config.model.backbone_options.get("dtype", "")),
        "compiled": True, "compile_s": round(sum(p["compile_s"] for p in parts.values()), 1),
        "per_device": True,
        **{k: train[k] for k in ("argument_bytes", "output_bytes", "temp_bytes", "alias_bytes", "peak_bytes")},
        "state_bytes": state_bytes, "hbm_bytes": hbm_bytes,
        "fits": all(fits.values()) if hbm_bytes else None, "fits_by_step": fits,
        "flops_per_step": train["flops"], "bytes_accessed_per_step": train["bytes_accessed"],
        "model_flops_per_step_global": model_flops, "peak_flops": peak_flops, "hbm_bandwidth": hbm_bandwidth,
        "roofline_step_s": step_s,
        "roofline_bound": (None if step_s is None else
                           "compute" if step_flops / peak_flops >= train["bytes_accessed"] / hbm_bandwidth
                           else "memory"),
        "roofline_mfu": (model_flops / n / peak_flops / step_s) if step_s else None,
        "steps": parts,
    }
    return report


def max_batch(config, devices, report: Optional[dict] = None, log=print) -> tuple[int, dict[int, bool]]:
    """Largest global batch (a multiple of the device count) whose train step fits in HBM.

    Only the train step is compiled per candidate; the evaluation step's batch is separate (eval_batch_size). With
    `report` (compile_run's, at the config's batch) the search starts where a peak linear in the batch (the state
    fixed, the rest per sample) reaches the HBM, and takes the config's batch as already tried: a full-size step
    compiles for minutes, and the estimate is usually within one of the answer.
    """
    from transfer_jax.train.flops import device_hbm

    hbm = device_hbm(devices[0])
    if not hbm:
        raise AotError(f"no HBM size known for {devices[0].device_kind!r} (train/flops.py TPU_HBM)")
    mesh = make_mesh(config, devices)
    programs = Programs(config, mesh)
    unit = mesh.devices.size
    known, guess = {}, 1
    if report and report.get("compiled"):
        multiple = report["batch_size"] // unit
        known[multiple] = report["peak_bytes"] <= hbm[0]
        per_sample = max(report["peak_bytes"] - report["state_bytes"], 1) / multiple
        guess = max(1, int((hbm[0] - report["state_bytes"]) // per_sample))

    def fits(multiple: int) -> bool:
        if multiple in known:
            return known[multiple]
        try:
            compiled, seconds = _timed_compile(lambda: programs.lower_train(multiple * unit))
        except OutOfMemory as exc:
            log(f"  batch {multiple * unit}: does not fit ({exc})")
            return False
        peak = analyse(compiled)["peak_bytes"]
        log(f"  batch {multiple * unit}: peak {peak / GIB:.2f} GiB per device, "
            f"{'fits' if peak <= hbm[0] else 'does not fit'} ({seconds:.0f}s)")
        return peak <= hbm[0]

    best, tried = largest_fitting(fits, guess)
    return best * unit, {k * unit: v for k, v in tried.items()}


def largest_fitting(fits: Callable[[int], bool], guess: int = 1) -> tuple[int, dict[int, bool]]:
    """The largest k >= 1 with fits(k), for a `fits` that holds up to some k and fails beyond it: from `guess`,
    steps of 1, 2, 4, ... up (or down) until the answer is bracketed, then bisection. Returns (k or 0,
    {k tried: fits})."""
    tried: dict[int, bool] = {}

    def check(k: int) -> bool:
        if k not in tried:
            tried[k] = bool(fits(k))
        return tried[k]

    guess, step = max(1, guess), 1
    if check(guess):
        low = guess
        while check(low + step):
            low, step = low + step, step * 2
        high = low + step
    else:
        high = guess
        while high - step >= 1 and not check(high - step):
            high, step = high - step, step * 2
        if high - step < 1 and not check(1):
            return 0, dict(sorted(tried.items()))
        low = max(1, high - step)
    while high - low > 1:  # low fits, high does not
        mid = (low + high) // 2
        low, high = (mid, high) if check(mid) else (low, mid)
    return low, dict(sorted(tried.items()))


def format_table(report: dict) -> str:
    mib = 2.0 ** 20
    lines = [f"{report['config']} on {report['topology']} ({report['devices']} x {report['device_kind']}), "
             f"mesh {report['mesh']}, {report['strategy']}, global batch {report['batch_size']}",
             f"{'step':<15}{'compile s':>10}{'args MiB':>10}{'out MiB':>10}{'alias MiB':>10}{'temp MiB':>10}"
             f"{'peak MiB':>10}{'GFLOP':>11}{'GB moved':>10}"]
    for name, p in report["steps"].items():
        lines.append(f"{name:<15}{p['compile_s']:>10.0f}{p['argument_bytes'] / mib:>10.0f}"
                     f"{p['output_bytes'] / mib:>10.0f}{p['alias_bytes'] / mib:>10.0f}{p['temp_bytes'] / mib:>10.0f}"
                     f"{p['peak_bytes'] / mib:>10.0f}{p['flops'] / 1e9:>11.1f}{p['bytes_accessed'] / 1e9:>10.2f}")
    lines.append("(per device; peak = arguments + outputs - aliased + temporaries, plus the train state held "
                 "outside the step's arguments)")
    if report["hbm_bytes"]:
        lines.append(f"HBM {report['hbm_bytes'] / GIB:.0f} GiB per device: fits={report['fits']}")
    if report["roofline_step_s"]:
        lines.append(f"roofline train step {report['roofline_step_s'] * 1e3:.1f} ms "
                     f"({report['roofline_bound']}-bound), "
                     f"model {report['model_flops_per_step_global'] / 1e12:.2f} TFLOP/step global, "
                     f"roofline MFU {report['roofline_mfu']:.1%}")
    if "max_batch" in report:
        lines.append(f"largest global batch that fits: {report['max_batch']} (tried {report['max_batch_tried']})")
    return "\n".join(lines)


def emit(report: dict, out=None) -> None:
    """The readable table, then the report as one JSON line: always the last line of the output."""
    out = out or sys.stdout
    print(format_table(report), file=out)
    print(json.dumps(report, default=str), file=out, flush=True)


def main(argv):
    prepare_runtime(argv)
    use_host_cpu()
    use_compilation_cache(_CACHE_DIR.value)
    config = _CONFIG.value
    unknown = [s for s in _SKIP.value if s not in ("eval", "probe")]
    try:
        if unknown:
            raise AotError(f"--skip={','.join(unknown)}: expected any of eval, probe")
        devices = topology_devices(_TOPOLOGY.value)
        report = compile_run(config, devices, name=flags.FLAGS["config"].config_filename,
                             topology=_TOPOLOGY.value, skip=_SKIP.value, log=lambda m: print(m, flush=True))
        report["overrides"] = config_flags.get_override_values(flags.FLAGS["config"])
        if _MAX_BATCH.value:
            best, tried = max_batch(config, devices, report, log=lambda m: print(m, flush=True))
            report.update(max_batch=best, max_batch_per_device=best / len(devices),
                          max_batch_tried={str(k): v for k, v in tried.items()})
    except AotError as exc:
        sys.exit(f"error: {exc}")
    if report.get("compiled"):
        emit(report)
    else:  # out of HBM at compile time: the report is the JSON line alone
        print(json.dumps(report, default=str), flush=True)


def run():
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
