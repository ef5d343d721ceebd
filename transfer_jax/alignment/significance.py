"""Significance of the exact MMD²: permutation test and paired sign-flip test, entirely on device.

Both tests fix the kernel (bandwidths) from the observed pooled sample, recompute the statistic under B random
relabellings of the pooled points and report ``p = (1 + #{T_b >= T}) / (B + 1)`` (the observed statistic counts
as one of the B + 1 equally likely values, so p is never 0 and the test is exact at level α for any B).

* Permutation test (two-sample null "X and Y have the same distribution"): each draw picks ``m`` of the ``m + n``
  pooled points uniformly at random as the new X.
* Sign-flip test (paired null, for before/after features of the same inputs, x_i ↔ y_i): each draw swaps x_i and
  y_i independently with probability 1/2. Needs ``m = n``.

How it is computed (memory and cost): the statistic of every draw is a set of quadratic forms ``aᵀ K₀ b`` of the
pooled (m+n)² Gram matrix K₀ with 0/1 group indicators (the quadratic-form trick of mmdagg, App. C). K₀ is never
stored: it is recomputed tile by tile and multiplied into the indicator columns of ``draws_per_pass`` draws at once
(plus the observed labelling), so the device memory is O(tile² + (m+n)·draws_per_pass) instead of O((m+n)²) and
there is no size limit; the cost is ``ceil((B+1)/draws_per_pass)`` Gram passes (each ~ (m+n)²·D flops on one
device, halved by symmetry) plus ~ 2·(m+n)²·(B+1) flops for the projections. With a mesh the tiles are split over
the devices like the estimator (see :mod:`._tiled`).

The linear-time estimator's test is its normal approximation, returned by :func:`.mmd.mmd2_linear` /
:meth:`.mmd.LinearTimeMMD.finalize`.
"""
from __future__ import annotations

import jax
from jax.sharding import Mesh

from transfer_jax.alignment import _exact
from transfer_jax.alignment.kernels import DEFAULT_PRECISION, KernelSpec
from transfer_jax.alignment.mmd import (
    DEFAULT_TILE,
    ExactMMDTestResult,
    KernelLike,
    _check_features,
    resolve_kernel,
)

permutation_p_value = _exact.permutation_p_value
DEFAULT_DRAWS_PER_PASS = _exact.DEFAULT_DRAWS_PER_PASS


def relabelling_test(
    x: jax.Array,
    y: jax.Array,
    kernel: KernelLike,
    key: jax.Array,
    num_draws: int,
    *,
    method: str = "permutation",
    tile: int = DEFAULT_TILE,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    precision=DEFAULT_PRECISION,
    draws_per_pass: int = DEFAULT_DRAWS_PER_PASS,
) -> ExactMMDTestResult:
    """Exact MMD² of x, y with the p-value of a ``'permutation'`` or ``'sign_flip'`` test of B = num_draws draws."""
    _check_features(x, y, same_length=(method == "sign_flip"), what=f"{method} test")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"{method} test needs at least 2 rows in x and in y, got {x.shape[0]} and {y.shape[0]}")
    if num_draws < 1:
        raise ValueError(f"{method} test needs num_draws >= 1, got {num_draws}")
    resolved = resolve_kernel(kernel, x, y)
    stats = _exact.relabelled_statistics(
        x, y, resolved, key=key, num_draws=num_draws, method=method, tile=tile, mesh=mesh, data_axis=data_axis,
        precision=precision, draws_per_pass=draws_per_pass,
    )
    return ExactMMDTestResult(
        mmd2_unbiased=stats.unbiased[0],
        mmd2_biased=stats.biased[0],
        p_value_unbiased=permutation_p_value(stats.unbiased),
        p_value_biased=permutation_p_value(stats.biased),
        bandwidths=resolved.bandwidths,
    )


def permutation_test(
    x: jax.Array, y: jax.Array, kernel: KernelLike = KernelSpec(), *, key: jax.Array, num_permutations: int, **kwargs
) -> ExactMMDTestResult:
    """Two-sample permutation test of the exact MMD² (keyword arguments as :func:`relabelling_test`)."""
    return relabelling_test(x, y, kernel, key, num_permutations, method="permutation", **kwargs)


def sign_flip_test(
    x: jax.Array, y: jax.Array, kernel: KernelLike = KernelSpec(), *, key: jax.Array, num_flips: int, **kwargs
) -> ExactMMDTestResult:
    """Paired sign-flip test (swap x_i, y_i with probability 1/2) of the exact MMD²; needs len(x) == len(y)."""
    return relabelling_test(x, y, kernel, key, num_flips, method="sign_flip", **kwargs)
