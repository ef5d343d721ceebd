"""Fine-tuning throughput benchmark (a benchmark, not a test): prints tables, optionally JSON lines.

    .venv/bin/python scripts/benchmark.py --quick                      # ~2-3 min on a laptop CPU
    .venv/bin/python scripts/benchmark.py --sizes small,real --dtype fp32,bf16 --torch --data --scaling --mmd

Per model x size x dtype: the train step built exactly as the trainer builds it (`train/loop.py`: task model,
`make_optimizer` with layer decay, `init_state` with shardings, `make_train_step`, jit with donated state,
AOT `lower().compile()`), on one device; compile time, `memory_analysis()` (MiB), model FLOPs per step
(`train/flops.py`: the dots and convolutions of the traced forward pass at 2 FLOPs per MAC, x3 for forward +
backward) against XLA's `cost_analysis()` of the compiled step, steady-state step time (median of timed windows
after warm-up, `jax.block_until_ready` at the end of each), volumes/s, MFU against the peak of a large matmul
measured in the same run, and minor page faults per step (temporaries the allocator maps afresh every step).

Host allocator: the one the command was started with, e.g. `LD_PRELOAD=libtcmalloc_minimal.so.4 .venv/bin/python
scripts/benchmark.py ...` for tcmalloc (`transfer_jax/allocator.py`); the PyTorch subprocess inherits it
(`--torch-allocator same`) or runs on glibc malloc (`system`); MALLOC_* variables on the command reach both.

Sections (flags): `--torch` runs scripts/bench_torch.py in the side venv (.venv-torch) on the same model, batch
and crop right after each JAX row, times the JAX step again, and prints JAX / PyTorch ratios against the mean of
the two JAX timings (machine speed drifts by tens of percent over minutes on shared CPUs); `--data` times
preprocessing (NIfTI decode + resample + normalise + crop), the random crop's resampling (separable, against
`ndimage.affine_transform`'s general path in the same process), each augmentation pipeline
(`data.augment.pipeline`: ours and upstream's) on one prepared case, and the grain training pipeline with 0, 2 and
os.cpu_count() workers against the step; `--scaling` runs data-parallel and FSDP steps over 1/2/4/8 fake CPU
devices (a subprocess with --xla_force_host_platform_device_count=8;
correctness-only on CPU: the fake devices share the same cores); `--mmd` runs configs/seg.py (default preset) for
`--mmd-steps` steps and prints the share of training time the in-loop alignment probe takes.

Sizes: `small` = the configs/seg.py `smoke` (test) and `default` presets; `real` = the `full` preset (ConvNeXt-V2
Tiny at 64x224x224; on CPU the batch defaults to 1, see --real-batch).
"""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TORCH_PYTHON = os.path.join(REPO, ".venv-torch", "bin", "python")
SIZES = {"small": ("smoke", "default"), "real": ("full",), "smoke": ("smoke",), "default": ("default",),
         "full": ("full",)}
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few steps, small sizes, fp32: a smoke run of the benchmark")
    p.add_argument("--models", default="profound_conv", help="comma list: profound_conv, profound_vit, provicnet")
    p.add_argument("--sizes", default="small", help="comma list of small | real (or smoke | default | full)")
    p.add_argument("--dtype", default="fp32", help="comma list of fp32 | bf16 (backbone_options.dtype)")
    p.add_argument("--remat", action="store_true", help="backbone_options.remat=True (nnx.remat per block)")
    p.add_argument("--remat-policy", default="",
                   help="backbone_options.remat_policy, implies --remat: nothing_saveable | dots_saveable | "
                        "dots_with_no_batch_dims_saveable (what a rematerialised block saves)")
    p.add_argument("--depthwise-impl", default="auto",
                   help="backbone_options.depthwise_impl: auto | conv | shift_sum | toeplitz | matrix "
                        "(cpu_conv.depthwise_conv)")
    p.add_argument("--conv-impl", default="auto",
                   help="head_options.conv_impl: auto | conv | fold (cpu_conv.dense_conv, the UPerNet head)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per row (default 10; --quick 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    p.add_argument("--batch", type=int, default=0, help="override the config's global batch (small sizes)")
    p.add_argument("--real-batch", type=int, default=1, help="batch for the real (full) size")
    p.add_argument("--real-slices", type=int, default=0,
                   help="ProViCNet at the real size: slices per case (default the preset's 20; one case of 20 "
                        "448-px slices needs ~31 GB of activations without remat)")
    p.add_argument("--threads", type=int, default=0, help="PyTorch threads (default: os.cpu_count())")
    p.add_argument("--peak-n", type=int, default=0, help="matmul size for the peak (default 2048; --quick 1024)")
    p.add_argument("--torch", action="store_true", help="also run scripts/bench_torch.py and print JAX/PyTorch")
    p.add_argument("--no-compile", action="store_true", help="PyTorch: eager only (skip torch.compile)")
    p.add_argument("--torch-allocator", default="same", choices=("same", "system"),
                   help="PyTorch's allocator: the same as JAX's, or glibc malloc (PyTorch as usually run)")
    p.add_argument("--data", action="store_true", help="data pipeline throughput section")
    p.add_argument("--scaling", action="store_true", help="1/2/4/8 fake-device data-parallel / FSDP section")
    p.add_argument("--mmd", action="store_true", help="in-loop alignment overhead section (a short training run)")
    p.add_argument("--mmd-steps", type=int, default=100)
    p.add_argument("--json", default="", help="also append every row as a JSON line to this file")
    p.add_argument("--scaling-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.real_slices < 0:
        p.error(f"--real-slices {args.real_slices}: expected a positive slice count (0 = the preset's)")
    if not args.steps:
        args.steps = 4 if args.quick else 10
    if not args.peak_n:
        args.peak_n = 1024 if args.quick else 2048
    args.threads = args.threads or os.cpu_count()
    return args


# ---------------------------------------------------------------------------------------------------------------
# configs


def load_config(arg: str):
    spec = importlib.util.spec_from_file_location("bench_config_seg", os.path.join(REPO, "configs", "seg.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def bench_config(model: str, preset: str, dtype: str, args):
    config = load_config(f"{model},{preset}" if model != "profound_conv" else preset)
    if config.model.backbone != model:
        raise ValueError(f"configs/seg.py:{model} builds {config.model.backbone}")
    config.model.backbone_options.dtype = DTYPES[dtype]
    if args.remat or args.remat_policy:
        config.model.backbone_options.remat = True
    if args.remat_policy:
        config.model.backbone_options.remat_policy = args.remat_policy
    with config.unlocked():  # speed-only options; the configs leave them at their "auto" defaults
        if getattr(args, "depthwise_impl", "auto") != "auto" and model == "profound_conv":
            config.model.backbone_options.depthwise_impl = args.depthwise_impl
        if getattr(args, "conv_impl", "auto") != "auto":
            config.model.head_options.conv_impl = args.conv_impl
    if preset == "full":
        config.batch_size = args.real_batch
        if model == "provicnet" and args.real_slices:
            config.data.crop_size = (args.real_slices, *config.data.crop_size[1:])
    elif args.batch:
        config.batch_size = args.batch
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    return config


# ---------------------------------------------------------------------------------------------------------------
# the JAX step, built as the trainer builds it


def build_step(config, mesh, strategy="replicate"):
    import jax

    from transfer_jax.models.registry import compute_dtype as model_compute_dtype
    from transfer_jax.tasks.registry import get_task
    from transfer_jax.train.optim import make_run_optimizer
    from transfer_jax.train.state import init_state, model_graph
    from transfer_jax.train.step import jit_train_step, make_train_step

    task = get_task(config)
    build = task.build_model
    _, abstract_params, _ = model_graph(build)
    tx, schedule, _ = make_run_optimizer(config, abstract_params, task.backbone_prefix)
    state, graph, shardings = init_state(build, tx, jax.random.key(config.seed), mesh, strategy,
                                         config.mesh.fsdp_min_size)
    compute_dtype = model_compute_dtype(config.model.backbone_options)
    step_fn = jit_train_step(make_train_step(graph, task, tx, schedule, compute_dtype), shardings, mesh)
    return task, graph, state, step_fn


def synthetic_batch(config, task, seed=0):
    """A training batch of the config's size made by the task's own `make_sample` (slice tasks get their slice
    stacks, positions and pair seeds as in training)."""
    from transfer_jax.data.phantom import random_crop_batch

    return random_crop_batch(task.make_sample, config.data.crop_size, len(config.data.channels), config.batch_size,
                             seed)


def minor_faults() -> int:
    """Minor page faults of this process so far (a page touched for the first time since it was mapped)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def glibc_malloc_env() -> dict[str, str]:
    """MALLOC_* variables of this process; the PyTorch subprocess inherits them, so both run with one allocator."""
    return {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}


def torch_environment(torch_allocator: str) -> dict[str, str]:
    """The PyTorch subprocess's environment: this one's, without LD_PRELOAD for `system` (glibc malloc)."""
    dropped = {"PYTHONPATH", "LD_PRELOAD"} if torch_allocator == "system" else {"PYTHONPATH"}
    return {k: v for k, v in os.environ.items() if k not in dropped}


def time_steps(compiled, state, batch, steps: int, warmup: int, windows: int = 3):
    """(median seconds per step over `windows` timed windows, each ending with block_until_ready, state, metrics,
    minor page faults per timed step)."""
    import jax

    metrics = None
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    per_window = max(1, steps // windows)
    times = []
    faults_before = minor_faults()
    for _ in range(max(1, steps // per_window)):
        start = time.perf_counter()
        for _ in range(per_window):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append((time.perf_counter() - start) / per_window)
    faults = (minor_faults() - faults_before) / (len(times) * per_window)
    return statistics.median(times), state, metrics, faults


def measure_peak(n: int, dtype: str) -> float:
    """FLOP/s of an n x n x n matmul on device 0 (the MFU denominator), best of several runs."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(DTYPES[dtype])
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(DTYPES[dtype])
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def model_row(model, preset, dtype, args, peaks):
    import jax
    import jax.numpy as jnp

    from transfer_jax.train.mesh import create_mesh, global_batch
    from transfer_jax.train.flops import train_step_flops
    from transfer_jax.train.step import compiled_flops, describe_memory

    config = bench_config(model, preset, dtype, args)
    mesh = create_mesh(1, 1, devices=jax.devices()[:1])
    task, graph, state, step_fn = build_step(config, mesh)
    batch = global_batch(synthetic_batch(config, task), mesh)
    model_flops = train_step_flops(graph, state.params, state.rest, batch, task,
                                   jnp.dtype(config.model.backbone_options.dtype))
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    memory = describe_memory(compiled)
    xla_flops = compiled_flops(compiled)
    step_s, state, metrics, faults = time_steps(compiled, state, batch, args.steps, args.warmup)
    row = {
        "section": "model", "model": model, "size": preset, "dtype": dtype,
        "remat": bool(args.remat or args.remat_policy),
        "remat_policy": args.remat_policy or ("nothing_saveable" if args.remat else None),
        "depthwise_impl": args.depthwise_impl, "conv_impl": args.conv_impl,
        "batch": config.batch_size, "crop": list(config.data.crop_size), "compile_s": compile_s,
        "step_s": step_s, "volumes_per_s": config.batch_size / step_s,
        "model_gflop_step": model_flops / 1e9,
        "xla_gflop_step": xla_flops / 1e9, "xla_over_model": xla_flops / model_flops,
        "achieved_gflops": model_flops / step_s / 1e9, "peak_gflops": peaks[dtype] / 1e9,
        "mfu": model_flops / step_s / peaks[dtype], "loss": float(metrics["loss"]),
        "minor_faults_per_step": faults,
        "mem_mib": {k: round(v, 2) for k, v in memory.items()},
    }
    box = {"state": state}

    def retime() -> float:
        """The same compiled step timed again (JAX / PyTorch ratios use timings taken next to each other)."""
        seconds, box["state"], _, _ = time_steps(compiled, box["state"], batch, args.steps, 1)
        return seconds

    return row, retime


# ---------------------------------------------------------------------------------------------------------------
# sections


def torch_spec(model: str, config) -> dict:
    """What scripts/bench_torch.py needs to build the same model, batch, crop, loss and optimizer in PyTorch."""
    bo, ho = config.model.backbone_options, config.model.head_options
    spec = {"model": model, "crop": list(config.data.crop_size), "batch": config.batch_size,
            "lr": config.optimizer.lr, "weight_decay": config.optimizer.weight_decay}
    if model == "provicnet":
        vit = bo.backbone
        spec.update(width=vit.width, depth=vit.depth, heads=vit.num_heads, patch=vit.patch, pos_grid=vit.pos_grid,
                    registers=vit.num_registers, head=list(bo.head_channels), num_classes=4,
                    slices=config.data.crop_size[0], image_size=config.task.image_size,
                    label_size=config.data.crop_size[1], class_weights=list(config.task.class_weights))
        return spec
    spec.update(hidden=ho.hidden_size, aux=ho.auxiliary_channels, num_classes=3, aux_weight=config.task.aux_weight)
    if model == "profound_vit":
        spec.update(patch=list(bo.patch_size), width=bo.width, depth=bo.depth, heads=bo.num_heads,
                    out_indices=list(bo.out_indices))
    else:
        spec.update(dims=list(bo.dims), depths=list(bo.depths))
    return spec


def run_torch(args, row, retime):
    """PyTorch's step for `row` (a subprocess in the side venv), then the JAX step timed again: the ratio uses the
    mean of the JAX timings just before and just after, so that drift in machine speed cancels."""
    out = []
    config = bench_config(row["model"], row["size"], row["dtype"], args)
    spec = torch_spec(row["model"], config)
    spec.update(dtype=row["dtype"], size=row["size"])
    cmd = [TORCH_PYTHON, os.path.join(REPO, "scripts", "bench_torch.py"), "--spec", json.dumps(spec),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.no_compile or args.quick:  # torch.compile takes minutes on CPU (and fails here, see RESULTS.md)
        cmd.append("--no-compile")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800,
                              env=torch_environment(args.torch_allocator), cwd=REPO)
    except subprocess.TimeoutExpired:
        print(f"[torch] {row['model']}/{row['size']}/{row['dtype']}: timed out")
        return []
    jax_step = (row["step_s"] + retime()) / 2
    jax_vps = row["batch"] / jax_step
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not results:
        print(f"[torch] {row['model']}/{row['size']}/{row['dtype']} failed (rc={proc.returncode}):\n"
              f"{proc.stderr[-2000:]}")
    flops_over_peak = row["mfu"] * row["step_s"]  # the step's FLOPs in seconds at the measured matmul peak
    for r in results:
        r.update(section="torch", jax_step_s=jax_step, jax_volumes_per_s=jax_vps,
                 jax_over_torch=(jax_vps / r["volumes_per_s"]) if r.get("volumes_per_s") else None,
                 jax_mfu=flops_over_peak / jax_step)
        if r.get("step_s"):
            # Same FLOPs for both frameworks: PyTorch's MFU bounds the reachable ratio (JAX at 100 % = 1 / torch_mfu).
            r.update(torch_mfu=flops_over_peak / r["step_s"], ratio_at_peak=r["step_s"] / flops_over_peak)
        out.append(r)
    return out


def data_section(args, step_rows):
    import numpy as np

    from transfer_jax.data.dataset import augment_config, preprocess_config, prepare_splits
    from transfer_jax.data.manifest import read_manifest
    from transfer_jax.data.phantom import PhantomConfig, default_phantom_manifest
    from transfer_jax.data.pipeline import PreparedCaseSource, memory_cache_bytes, train_dataset
    from transfer_jax.data.preprocess import prepare_case
    from transfer_jax.data.manifest import Case
    from transfer_jax.tasks.registry import get_task

    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS.mark_as_parsed()
    rows = []
    presets = [p for s in args.sizes.split(",") for p in SIZES[s]]
    steps = {r["size"]: r for r in step_rows if r["model"] == "profound_conv" and r["dtype"] == "fp32"}
    sample = os.path.join(REPO, "tests", "data", "prostate_mri_sample")
    for preset in presets:
        config = bench_config("profound_conv", preset, "fp32", args)
        pconfig = preprocess_config(config.data)
        cases = read_manifest(default_phantom_manifest(PhantomConfig(**config.data.phantom.to_dict())))
        cases = cases[: (3 if args.quick else 8)]
        prepare_case(cases[0], pconfig)  # warm caches / imports
        start = time.perf_counter()
        for case in cases:
            prepare_case(case, pconfig)
        per = (time.perf_counter() - start) / len(cases)
        step_vps = steps.get(preset, {}).get("volumes_per_s")
        rows.append({"section": "data", "what": "prepare_case phantom", "size": preset, "volumes_per_s": 1 / per,
                     "over_step": (1 / per) / step_vps if step_vps else None})
        if os.path.isdir(sample):
            join = lambda n: os.path.join(sample, f"sample_{n}.nii.gz")  # noqa: E731
            real = Case(case_id="sample", t2=join("t2"), adc=join("adc"), dwi=join("dwi"), split="train",
                        gland_mask=join("mask"), lesion_mask=join("lesions"))
            repeats = 2 if args.quick else 4
            start = time.perf_counter()
            for _ in range(repeats):
                prepare_case(real, pconfig)
            per = (time.perf_counter() - start) / repeats
            rows.append({"section": "data", "what": "prepare_case real sample", "size": preset,
                         "volumes_per_s": 1 / per, "over_step": (1 / per) / step_vps if step_vps else None})
        # the grain training pipeline over cached prepared cases
        task = get_task(config)
        with tempfile.TemporaryDirectory() as cache:
            splits = prepare_splits(config.data, cache, task, log=lambda *_: None)
            case = PreparedCaseSource(splits.paths["train"])[0]
            rows += warp_rows(case, tuple(config.data.crop_size), preset, step_vps)
            rows += augment_rows(case, tuple(config.data.crop_size), preset, step_vps, repeats=4 if args.quick else 12)
            cache_bytes = memory_cache_bytes(config.data)
            epoch_batches = -(-len(splits.paths["train"]) // config.batch_size)
            for workers, memory_cache in itertools.product(sorted({0, 2, os.cpu_count() or 1}), (0, cache_bytes)):
                ds = train_dataset(splits.paths["train"], task, crop_size=tuple(config.data.crop_size),
                                   augment=augment_config(config.data), per_process_batch=config.batch_size,
                                   seed=0, workers=workers, prefetch=config.data.prefetch,
                                   memory_cache_bytes=memory_cache)
                it = iter(ds)
                for _ in range(1 if args.quick else epoch_batches):  # start-up and a first epoch's reads
                    next(it)
                # Empty the prefetch buffers (grain's thread buffer holds max(prefetch, threads <= 4) batches, each
                # worker `prefetch` more) so the timed batches are produced while timed, not handed over ready.
                for _ in range(max(config.data.prefetch, 4) + workers * config.data.prefetch):
                    next(it)
                n = 3 if args.quick else 10
                start = time.perf_counter()
                for _ in range(n):
                    batch = next(it)
                vps = n * config.batch_size / (time.perf_counter() - start)
                del it
                rows.append({"section": "data", "what": f"grain train pipeline, {workers} workers",
                             "memory_cache_mib": memory_cache / 2 ** 20, "size": preset, "volumes_per_s": vps,
                             "over_step": vps / step_vps if step_vps else None,
                             "batch_shape": list(np.shape(batch["image"]))})
    return rows


def warp_rows(case: dict, crop_size: tuple[int, int, int], preset: str, step_vps: float | None,
              repeats: int = 10) -> list[dict]:
    """The training crop's resampling (zoom 1.1, W flipped, image + masks), separable against the general 3-D path.

    `augment.axis_aligned_warp` gives the samples of `ndimage.affine_transform` with the same diagonal matrix; the
    ratio is timed here in one process, on one prepared case.
    """
    import numpy as np
    from scipy import ndimage

    from transfer_jax.data.augment import MASK_KEYS, axis_aligned_warp

    region, crop = np.asarray(case["image"].shape[:3], float), np.asarray(crop_size, float)
    scale = np.array([1.1, 1.1, -1.1])
    offset = (region - 1) / 2 - scale * (crop - 1) / 2
    masks = [case[k] for k in MASK_KEYS if case.get(k) is not None]

    def separable():
        axis_aligned_warp(case["image"], scale, offset, crop_size, order=1)
        for mask in masks:
            axis_aligned_warp(mask, scale, offset, crop_size, order=0)

    def general():
        warp = lambda a, order: ndimage.affine_transform(  # noqa: E731
            a, np.diag(scale), offset=offset, output_shape=crop_size, order=order, mode="constant", prefilter=False)
        for c in range(case["image"].shape[-1]):
            warp(case["image"][..., c], 1)
        for mask in masks:
            warp(mask, 0)

    rows = []
    for what, fn in (("random-crop resampling, separable", separable),
                     ("random-crop resampling, ndimage general affine", general)):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        vps = repeats / (time.perf_counter() - start)
        rows.append({"section": "data", "what": what, "size": preset, "volumes_per_s": vps,
                     "over_step": vps / step_vps if step_vps else None})
    rows[0]["over_general"] = rows[0]["volumes_per_s"] / rows[1]["volumes_per_s"]
    return rows


def augment_rows(case: dict, crop_size: tuple[int, int, int], preset: str, step_vps: float | None,
                 repeats: int = 12) -> list[dict]:
    """Each `data.augment.pipeline` on one prepared case (image + masks), one element per seed, in one process."""
    import numpy as np

    from transfer_jax.data import augment_upstream
    from transfer_jax.data.augment import AugmentConfig, random_crop

    pipelines = {"ours": lambda c, crop, rng: random_crop(c, crop, AugmentConfig(), rng),
                 **augment_upstream.PIPELINES}
    rows = []
    for name, fn in pipelines.items():
        fn(case, crop_size, np.random.default_rng(0))
        start = time.perf_counter()
        for seed in range(repeats):
            fn(case, crop_size, np.random.default_rng(seed))
        vps = repeats / (time.perf_counter() - start)
        rows.append({"section": "data", "what": f"augmentation {name}", "size": preset, "volumes_per_s": vps,
                     "over_step": vps / step_vps if step_vps else None})
    return rows


def scaling_child(args):
    """Runs in a subprocess with 8 fake CPU devices: the smoke model's step over 1/2/4/8 devices."""
    import jax

    from transfer_jax.train.mesh import create_mesh, global_batch

    rows = []
    preset = "smoke"
    config = bench_config("profound_conv", preset, "fp32", args)
    config.batch_size = 8
    layouts = [(n, 1, "replicate") for n in (1, 2, 4, 8)] + [(2, 2, "fsdp"), (4, 2, "fsdp")]
    for data, fsdp, strategy in layouts:
        mesh = create_mesh(data, fsdp, devices=jax.devices()[: data * fsdp])
        task, _, state, step_fn = build_step(config, mesh, strategy)
        batch = global_batch(synthetic_batch(config, task), mesh)
        start = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        state, metrics = compiled(state, batch)
        first_loss = float(metrics["loss"])
        step_s, state, metrics, _ = time_steps(compiled, state, batch, max(2, args.steps // 2), 0, windows=1)
        rows.append({"section": "scaling", "devices": data * fsdp, "data": data, "fsdp": fsdp,
                     "strategy": strategy, "batch": config.batch_size, "compile_s": compile_s, "step_s": step_s,
                     "volumes_per_s": config.batch_size / step_s, "first_loss": first_loss})
    for r in rows:
        print(json.dumps(r), flush=True)


def run_scaling(args):
    flags = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in flags.split() if "device_count" not in f) + " --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.abspath(__file__), "--scaling-child", "--steps", str(args.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=1800)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode:
        print(f"[scaling] failed (rc={proc.returncode}):\n{proc.stderr[-2000:]}")
    if rows:
        ref = rows[0]["first_loss"]
        for r in rows:
            r["loss_diff_vs_1"] = abs(r["first_loss"] - ref)
    return rows


def mmd_section(args):
    from transfer_jax.train.loop import train_and_evaluate

    config = load_config("default")
    config.total_steps = args.mmd_steps
    config.logging.progress_bar = False
    config.logging.tensorboard = False
    with tempfile.TemporaryDirectory() as workdir:
        summary = train_and_evaluate(config, workdir)
    t = summary["throughput"]
    return [{"section": "mmd", "steps": summary["steps"], "eval_every": config.eval_every,
             "probe_size": config.alignment.probe_size, "alignment_seconds": t.get("alignment_seconds"),
             "alignment_share": t.get("alignment_share"), "wall_seconds": summary["wall_seconds"],
             "steady_step_seconds": t.get("steady_step_seconds")}]


# ---------------------------------------------------------------------------------------------------------------
# printing


def table(rows, columns, title):
    if not rows:
        return
    def fmt(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def main(argv=None):
    args = parse_args(argv)
    if args.scaling_child:
        scaling_child(args)
        return
    import jax

    from transfer_jax.allocator import active_allocator

    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s) "
          f"({jax.devices()[0].device_kind}); os.cpu_count()={os.cpu_count()}; XLA CPU uses its own thread pool "
          f"over all visible cores (XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}); torch threads={args.threads}; "
          f"host allocator: {active_allocator()} (LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}; PyTorch: "
          f"{args.torch_allocator}); glibc malloc environment (both frameworks): {glibc_malloc_env() or 'defaults'}")
    if args.torch and not os.path.exists(TORCH_PYTHON):
        print(f"[torch] side venv not found at {TORCH_PYTHON}: the PyTorch comparison is skipped")
        args.torch = False
    dtypes = args.dtype.split(",")
    peaks = {d: measure_peak(args.peak_n, d) for d in dtypes}
    print("peak matmul " + ", ".join(f"{d}: {p / 1e9:.1f} GFLOP/s (n={args.peak_n})" for d, p in peaks.items()))
    all_rows, torch_rows = [], []
    for model in args.models.split(","):
        for size in args.sizes.split(","):
            for preset in SIZES[size]:
                for dtype in dtypes:
                    try:
                        row, retime = model_row(model, preset, dtype, args, peaks)
                    except Exception as e:  # e.g. a backbone whose config does not exist yet
                        print(f"[model] {model}/{preset}/{dtype}: skipped ({type(e).__name__}: {e})")
                        continue
                    all_rows.append(row)
                    print(json.dumps(row), flush=True)
                    if args.torch:
                        torch_rows += run_torch(args, row, retime)
                    del retime  # frees the compiled step and its state
    model_rows = list(all_rows)
    table(model_rows, ["model", "size", "dtype", "batch", "crop", "compile_s", "step_s", "volumes_per_s",
                       "model_gflop_step", "xla_gflop_step", "xla_over_model", "achieved_gflops",
                       "peak_gflops", "mfu", "minor_faults_per_step"], "JAX fine-tuning step (1 device)")
    table([dict(r, **r["mem_mib"]) for r in model_rows],
          ["model", "size", "dtype", "argument_mib", "output_mib", "temp_mib", "alias_mib", "generated_code_mib"],
          "compiled.memory_analysis() of the train step (MiB per device)")
    if args.torch:
        all_rows += torch_rows
        table(torch_rows, ["model", "size", "dtype", "mode", "threads", "allocator", "batch", "compile_s", "step_s",
                           "volumes_per_s", "minor_faults_per_step", "torch_mfu", "jax_step_s", "jax_volumes_per_s",
                           "jax_mfu", "jax_over_torch", "ratio_at_peak", "error"],
              "PyTorch reference (same step) and JAX / PyTorch (JAX re-timed next to it)")
    if args.data:
        rows = data_section(args, model_rows)
        all_rows += rows
        table(rows, ["what", "memory_cache_mib", "size", "volumes_per_s", "over_step", "over_general"],
              "Data pipeline (volumes/s; over_step = data volumes/s / train-step volumes/s; over_general = "
              "separable / general resampling, same process)")
    if args.scaling:
        rows = run_scaling(args)
        all_rows += rows
        table(rows, ["devices", "data", "fsdp", "strategy", "batch", "compile_s", "step_s", "volumes_per_s",
                     "first_loss", "loss_diff_vs_1"],
              "Data-parallel / FSDP over fake CPU devices (correctness only: they share the same cores)")
    if args.mmd:
        rows = mmd_section(args)
        all_rows += rows
        table(rows, ["steps", "eval_every", "probe_size", "alignment_seconds", "wall_seconds", "alignment_share"],
              "In-loop alignment (MMD/CKA probe) overhead")
    if args.json:
        with open(args.json, "a", encoding="utf-8") as f:
            for r in all_rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
