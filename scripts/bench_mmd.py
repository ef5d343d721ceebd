"""Benchmark of the exact tiled unbiased MMD² (transfer_jax.alignment) — prints a table, asserts nothing.

For N = 2^min … 2^max samples per side and D in --dims, it measures, on the default JAX device:

* ``tiled``  — ``mmd2_exact`` (tiled, symmetric, O(tile²) memory), jitted, fixed Gaussian σ = sqrt(D);
* ``naive``  — a full-Gram ``jnp`` version (three N×N blocks in memory), where they fit in --naive-max-gib;
* ``numpy``  — the same three full blocks in NumPy float32, where they fit;
* ``matmul`` — a plain jitted ``a @ b.T`` of shape (M, D)×(D, M), M = min(N, --matmul-max-n), the
  reference throughput of the device measured in the same run.

Timings are warm (compiled first, then the minimum of --repeats runs, each ended by ``block_until_ready``).
All JAX matmuls run at precision HIGHEST (full fp32), like the estimator.

FLOP convention (stated, not measured): the three Gram blocks Kxx, Kyy, Kxy of an N-vs-N problem are counted as
``3 × 2·N²·D`` "nominal" flops (the distance matmuls only, not the exp). The tiled estimator actually executes
about 2/3 of that (the pooled 2N×2N Gram is symmetric, so only tile pairs j ≥ i are formed: ≈ (2N)²·D flops);
its nominal GFLOP/s can therefore exceed the raw matmul rate. ``ratio`` = nominal GFLOP/s ÷ matmul GFLOP/s.

Peak memory: for JAX, ``compiled.memory_analysis().temp_size_in_bytes`` (scratch beyond inputs/outputs); for
NumPy, the ``tracemalloc`` peak of the call.

    python scripts/bench_mmd.py --quick             # N = 2^11, 2^12; D = 384, 768 (about a minute on 2 cores)
    python scripts/bench_mmd.py --max-log2n 17      # on an accelerator
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
import tracemalloc

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from transfer_jax.alignment import gaussian, mmd2_exact  # noqa: E402

PRECISION = jax.lax.Precision.HIGHEST


def warm_time(fn, *args, repeats: int) -> float:
    """Minimum wall time of ``repeats`` calls, each blocked until its result is ready (first call excluded)."""
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def compile_with_stats(fn, *args):
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    return compiled, compile_s, temp


def naive_unbiased(x, y, sigma):
    """Three dense Gram blocks, diagonals removed from the within-sample sums."""

    def gram(a, b):
        d2 = jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * jnp.matmul(a, b.T, precision=PRECISION)
        return jnp.exp(-jnp.maximum(d2, 0.0) / (2.0 * sigma * sigma))

    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = gram(x, x), gram(y, y), gram(x, y)
    return (
        (jnp.sum(kxx) - jnp.trace(kxx)) / (m * (m - 1))
        + (jnp.sum(kyy) - jnp.trace(kyy)) / (n * (n - 1))
        - 2.0 * jnp.mean(kxy)
    )


def numpy_unbiased(x: np.ndarray, y: np.ndarray, sigma: float) -> float:
    def gram(a, b):
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
        np.maximum(d2, 0.0, out=d2)
        d2 *= -1.0 / (2.0 * sigma * sigma)
        return np.exp(d2, out=d2)

    m, n = len(x), len(y)
    kxx = gram(x, x)
    within_x = (kxx.sum(dtype=np.float64) - np.trace(kxx)) / (m * (m - 1))
    del kxx
    kyy = gram(y, y)
    within_y = (kyy.sum(dtype=np.float64) - np.trace(kyy)) / (n * (n - 1))
    del kyy
    return float(within_x + within_y - 2.0 * gram(x, y).mean(dtype=np.float64))


def fmt_bytes(value) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 2^11..2^12 only, 1 repeat")
    parser.add_argument("--min-log2n", type=int, default=12)
    parser.add_argument("--max-log2n", type=int, default=None, help="default 14 on CPU, 17 on an accelerator")
    parser.add_argument("--dims", default="384,768")
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-max-gib", type=float, default=2.0, help="skip naive/numpy above 3·N² floats")
    parser.add_argument("--matmul-max-n", type=int, default=8192, help="largest M of the (M×D)(D×M) reference matmul")
    args = parser.parse_args()

    on_cpu = jax.default_backend() == "cpu"
    min_log2n, max_log2n, repeats = args.min_log2n, args.max_log2n, args.repeats
    if max_log2n is None:
        max_log2n = 14 if on_cpu else 17
    if args.quick:
        min_log2n, max_log2n, repeats = 11, min(max_log2n, 12), 1
    dims = [int(d) for d in args.dims.split(",")]

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()[0].device_kind} "
          f"x{jax.device_count()}, tile {args.tile}, precision HIGHEST, repeats {repeats} (min)")
    print("nominal flops = 3 * 2*N^2*D (Kxx, Kyy, Kxy distance matmuls); "
          "ratio = tiled nominal GFLOP/s / matmul GFLOP/s")
    header = (f"{'N':>7} {'D':>4} | {'tiled s':>8} {'compile':>7} {'temp mem':>9} {'GFLOP/s':>8} | "
              f"{'matmul M':>8} {'GFLOP/s':>8} {'ratio':>5} | {'naive s':>8} {'temp mem':>9} | "
              f"{'numpy s':>8} {'peak mem':>9} | {'|tiled-numpy|':>13}")
    print(header)
    print("-" * len(header))

    rng = np.random.default_rng(0)
    for log2n in range(min_log2n, max_log2n + 1):
        n = 2**log2n
        for dim in dims:
            x_host = rng.normal(size=(n, dim)).astype(np.float32)
            y_host = (rng.normal(size=(n, dim)) + 0.05).astype(np.float32)
            x, y = jax.device_put(x_host), jax.device_put(y_host)
            sigma = float(np.sqrt(dim))
            kernel = gaussian(sigma)
            nominal_flops = 3 * 2.0 * n * n * dim

            tiled_fn = functools.partial(mmd2_exact, tile=args.tile)
            tiled_compiled, compile_s, tiled_temp = compile_with_stats(
                lambda a, b, k: tiled_fn(a, b, k).unbiased, x, y, kernel
            )
            tiled_s = warm_time(tiled_compiled, x, y, kernel, repeats=repeats)
            tiled_value = float(tiled_compiled(x, y, kernel))

            m = min(n, args.matmul_max_n)
            a, b = x[:m], y[:m]
            matmul_compiled, _, _ = compile_with_stats(lambda p, q: jnp.matmul(p, q.T, precision=PRECISION), a, b)
            matmul_s = warm_time(matmul_compiled, a, b, repeats=repeats)
            matmul_gflops = 2.0 * m * m * dim / matmul_s / 1e9
            tiled_gflops = nominal_flops / tiled_s / 1e9

            fits = 3 * n * n * 4 <= args.naive_max_gib * 2**30
            naive_s = naive_temp = numpy_s = numpy_peak = None
            difference = None
            if fits:
                naive_compiled, _, naive_temp = compile_with_stats(functools.partial(naive_unbiased, sigma=sigma), x, y)
                naive_s = warm_time(naive_compiled, x, y, repeats=repeats)
                tracemalloc.start()
                start = time.perf_counter()
                numpy_value = numpy_unbiased(x_host, y_host, sigma)
                numpy_s = time.perf_counter() - start
                numpy_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                difference = abs(tiled_value - numpy_value)

            cell = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            print(f"{n:>7} {dim:>4} | {tiled_s:>8.3f} {compile_s:>7.2f} {fmt_bytes(tiled_temp):>9} "
                  f"{tiled_gflops:>8.1f} | "
                  f"{m:>8} {matmul_gflops:>8.1f} {tiled_gflops / matmul_gflops:>5.2f} | "
                  f"{cell(naive_s, '8.3f'):>8} {fmt_bytes(naive_temp):>9} | "
                  f"{cell(numpy_s, '8.3f'):>8} {fmt_bytes(numpy_peak):>9} | {cell(difference, '13.2e'):>13}",
                  flush=True)


if __name__ == "__main__":
    main()
