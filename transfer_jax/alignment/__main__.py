"""MMD² (and optionally a p-value and linear CKA) between two feature files, e.g. before and after fine-tuning.

    python -m transfer_jax.alignment before.npy after.npy --permutations=1000 --cka
    python -m transfer_jax.alignment X.npy Y.npy [--estimator=unbiased|biased|linear|rff]
        [--kernel=gaussian|laplace] [--bandwidth=median|σ[,σ...]] [--multipliers=m[,m...]]
        [--permutations=B] [--test=permutation|sign-flip] [--cka] [--seed=S] [--tile=T]
        [--rff_features=R] [--x64]

X and Y are ``.npy`` files holding (N, D) floating-point arrays (N may differ between them, except for the
linear-time estimator, the sign-flip test and CKA, which pair row i of X with row i of Y). The last line on
stdout is one JSON object with at least ``mmd2``, ``estimator``, ``bandwidths``, ``n_x``, ``n_y``, ``dim``,
plus ``p_value`` when a test ran (``--permutations B > 0``, or always for ``linear``) and ``cka`` with
``--cka``. Bad input exits with status 2 and a message naming the offending file or option.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from transfer_jax.alignment.api import AlignmentSpec, compute_alignment
from transfer_jax.cli import ArgumentParser

ESTIMATORS = ("unbiased", "biased", "linear", "rff")


def _float_list(text: str, option: str, parser: argparse.ArgumentParser) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        parser.error(f"{option} must be a comma-separated list of positive numbers, got {text!r}")
    if not values or not all(np.isfinite(v) and v > 0 for v in values):
        parser.error(f"{option} must be a comma-separated list of positive numbers, got {text!r}")
    return values


def load_features(path: str, label: str, parser: argparse.ArgumentParser) -> np.ndarray:
    """Load and validate one (N, D) float array; every problem is reported with the file name."""
    if not os.path.isfile(path):
        parser.error(f"{label} file not found: {path}")
    try:
        array = np.load(path, allow_pickle=False)
    except Exception as error:  # np.load raises several types for non-.npy / pickled content
        parser.error(f"{label} file {path} is not a readable .npy array: {error}")
    if not isinstance(array, np.ndarray):
        parser.error(f"{label} file {path} must hold a single .npy array, not an archive")
    if array.ndim != 2:
        parser.error(f"{label} file {path} must hold a 2-D (N, D) array, got shape {array.shape}")
    if array.dtype.kind != "f":
        parser.error(f"{label} file {path} must hold floating-point features, got dtype {array.dtype}")
    if array.shape[0] < 2 or array.shape[1] < 1:
        parser.error(f"{label} file {path} needs at least 2 rows and 1 column, got shape {array.shape}")
    finite = np.isfinite(array)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        parser.error(
            f"{label} file {path} contains {np.count_nonzero(~finite)} NaN/Inf values "
            f"(first at row {row}, column {col})"
        )
    return array


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser("transfer_jax.alignment", __doc__)
    parser.add_argument("x", metavar="X.npy", help="first feature array, shape (N_x, D)")
    parser.add_argument("y", metavar="Y.npy", help="second feature array, shape (N_y, D)")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="unbiased", help="MMD² estimator")
    parser.add_argument("--kernel", choices=("gaussian", "laplace"), default="gaussian", help="kernel family")
    parser.add_argument(
        "--bandwidth", default="median", help="'median' (pooled median heuristic) or σ[,σ...] (sum of kernels)"
    )
    parser.add_argument("--multipliers", default="1", help="comma-separated factors applied to every base σ")
    parser.add_argument("--permutations", type=int, default=0, help="B draws of a test of the exact estimators")
    parser.add_argument(
        "--test", choices=("permutation", "sign-flip"), default="permutation",
        help="permutation (two-sample) or sign-flip (paired x_i <-> y_i swaps, needs N_x = N_y)",
    )
    parser.add_argument("--cka", action="store_true", help="also report linear CKA (needs N_x = N_y)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed for tests and random features")
    parser.add_argument("--tile", type=int, default=1024, help="rows per tile of the exact Gram computation")
    parser.add_argument("--rff_features", type=int, default=1024, help="random frequencies R for --estimator rff")
    parser.add_argument("--median_max_points", type=int, default=2048, help="subsample budget of the median heuristic")
    parser.add_argument("--x64", action="store_true", help="compute in float64 (default float32)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bandwidth = "median" if args.bandwidth == "median" else _float_list(args.bandwidth, "--bandwidth", parser)
    multipliers = _float_list(args.multipliers, "--multipliers", parser)
    if args.permutations < 0:
        parser.error(f"--permutations must be >= 0, got {args.permutations}")
    if args.permutations and args.estimator not in ("unbiased", "biased"):
        parser.error(
            f"--permutations applies to the exact estimators (unbiased, biased), not {args.estimator}"
            + (" (its p-value comes from the normal approximation)" if args.estimator == "linear" else "")
        )
    for option, value, minimum in (
        ("--tile", args.tile, 1),
        ("--rff_features", args.rff_features, 1),
        ("--median_max_points", args.median_max_points, 2),
    ):
        if value < minimum:
            parser.error(f"{option} must be at least {minimum}, got {value}")

    x = load_features(args.x, "X", parser)
    y = load_features(args.y, "Y", parser)
    if x.shape[1] != y.shape[1]:
        parser.error(
            f"feature dimensions differ: X file {args.x} has D={x.shape[1]}, Y file {args.y} has D={y.shape[1]}"
        )
    test = args.test.replace("-", "_")
    paired_reasons = [
        reason
        for reason, needed in (
            ("--estimator linear", args.estimator == "linear"),
            ("--test sign-flip", args.permutations > 0 and test == "sign_flip"),
            ("--cka", args.cka),
        )
        if needed
    ]
    if paired_reasons and x.shape[0] != y.shape[0]:
        parser.error(
            f"{' and '.join(paired_reasons)} pair row i of X with row i of Y and need equal N, "
            f"got N={x.shape[0]} in {args.x} and N={y.shape[0]} in {args.y}"
        )
    if args.estimator == "linear" and x.shape[0] < 4:
        parser.error(f"--estimator linear needs at least 4 rows (2 pairs), got {x.shape[0]}")

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if args.x64 else jnp.float32
    spec = AlignmentSpec(
        estimators=(args.estimator,),
        kernel=args.kernel,
        bandwidth=bandwidth,
        multipliers=multipliers,
        permutations=args.permutations,
        tests=(test,),
        cka=args.cka,
        rff_features=args.rff_features,
        tile=args.tile,
        median_max_points=args.median_max_points,
    )
    metrics = jax.jit(compute_alignment, static_argnums=0)(
        spec, jnp.asarray(x, dtype), jnp.asarray(y, dtype), jax.random.key(args.seed)
    )
    metrics = {name: float(value) for name, value in jax.device_get(metrics).items()}
    if "bandwidth" in metrics:
        bandwidths = [metrics["bandwidth"]]
    else:
        bandwidths = [metrics[f"bandwidth_{i}"] for i in range(spec.kernel_spec.num_bandwidths)]

    result: dict[str, object] = {
        "mmd2": metrics[f"mmd2_{args.estimator}"],
        "estimator": args.estimator,
        "kernel": args.kernel,
        "bandwidth_rule": "median" if bandwidth == "median" else "fixed",
        "bandwidths": bandwidths,
        "multipliers": list(multipliers),
        "n_x": int(x.shape[0]),
        "n_y": int(y.shape[0]),
        "dim": int(x.shape[1]),
        "dtype": np.dtype(dtype).name,
        "seed": args.seed,
    }
    if args.estimator == "rff":
        result["rff_features"] = args.rff_features
    if args.estimator == "linear":
        result["p_value"] = metrics["p_value_linear"]
        result["test"] = "normal_approximation"
    elif args.permutations > 0:
        result["p_value"] = metrics[f"p_value_{args.estimator}_{test}"]
        result["test"] = test
        result["permutations"] = args.permutations
    if args.cka:
        result["cka"] = metrics["cka_linear"]

    summary = f"MMD²_{args.estimator} = {result['mmd2']:.6g} (σ = {', '.join(f'{s:.4g}' for s in bandwidths)})"
    if "p_value" in result:
        summary += f", p = {result['p_value']:.4g} ({result['test']})"
    if args.cka:
        summary += f", linear CKA = {result['cka']:.4f}"
    print(summary)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
