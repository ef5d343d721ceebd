"""Kernels and bandwidth rules for the MMD estimators.

Conventions (they differ between libraries, so they are fixed here once):

* Gaussian: ``k(x, y) = exp(-||x - y||² / (2 σ²))`` (Gretton et al.; σ is a length, not a precision).
* Laplace:  ``k(x, y) = exp(-||x - y|| / σ)`` with the **Euclidean** norm (not the L1 norm used by mmdagg).
* Several bandwidths σ_1..σ_K give the **sum** of the K kernels, ``k = Σ_k k_σk``, so ``k(x, x) = K``.
* Median heuristic: σ = median of the pairwise Euclidean distances ``||z_i - z_j||`` over the pooled sample
  Z = X ∪ Y, pairs i ≠ j (the median over ordered pairs equals the one over unordered pairs i < j). Exact when
  ``|X| + |Y| <= max_points``; above that, on the deterministic strided subsample described in
  :func:`median_subsample_sizes` / :func:`median_heuristic`. The σ values actually used are
  ``base σ × multiplier`` for every multiplier.

A :class:`Kernel` is a pytree: its kind is static, its bandwidths are a device array, so a bandwidth computed on
device (median heuristic) flows into the estimators without leaving the device.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KERNEL_KINDS: tuple[str, ...] = ("gaussian", "laplace")
DEFAULT_MEDIAN_MAX_POINTS = 2048
# Full fp32 matmuls by default: TF32/bf16 passes (the GPU/TPU defaults) would make the "exact" estimators inexact.
DEFAULT_PRECISION = lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Kernel:
    """A Gaussian or Laplace kernel, or a sum of them over several bandwidths.

    Attributes:
      kind: ``'gaussian'`` or ``'laplace'`` (static).
      bandwidths: shape ``(K,)`` array of σ values (dynamic; may be computed on device).
    """

    bandwidths: jax.Array
    kind: str = dataclasses.field(default="gaussian", metadata=dict(static=True))

    def __post_init__(self) -> None:
        if self.kind not in KERNEL_KINDS:
            raise ValueError(f"kernel kind must be one of {KERNEL_KINDS}, got {self.kind!r}")
        shape = getattr(self.bandwidths, "shape", None)
        if shape is not None and len(shape) != 1:
            raise ValueError(f"kernel bandwidths must be a 1-D array of σ values, got shape {shape}")

    @property
    def num_bandwidths(self) -> int:
        return int(self.bandwidths.shape[0])

    @property
    def diagonal_value(self) -> int:
        """k(x, x): every component kernel is 1 at distance 0, so the sum is K."""
        return self.num_bandwidths

    def from_squared_distances(self, sq_dists: jax.Array) -> jax.Array:
        """Kernel values from squared Euclidean distances (any shape), summed over the bandwidths.

        The loop over bandwidths is a Python loop (K is static and small) that accumulates in place, so the
        memory stays that of one ``sq_dists``-shaped array instead of K of them.
        """
        bandwidths = self.bandwidths.astype(sq_dists.dtype)
        if self.kind == "laplace":
            distances = jnp.sqrt(sq_dists)
        total = jnp.zeros_like(sq_dists)
        for k in range(self.num_bandwidths):
            sigma = bandwidths[k]
            if self.kind == "gaussian":
                total = total + jnp.exp(-sq_dists / (2.0 * sigma * sigma))
            else:
                total = total + jnp.exp(-distances / sigma)
        return total

    def __call__(self, x: jax.Array, y: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
        """Gram matrix ``K[i, j] = k(x_i, y_j)`` (dense: use the tiled estimators for large inputs)."""
        return self.from_squared_distances(squared_distances(x, y, precision=precision))


def gaussian(bandwidths: float | Sequence[float] | jax.Array) -> Kernel:
    """Sum of Gaussian kernels ``Σ_k exp(-d² / (2 σ_k²))``."""
    return Kernel(bandwidths=jnp.atleast_1d(jnp.asarray(bandwidths, dtype=jnp.result_type(float))), kind="gaussian")


def laplace(bandwidths: float | Sequence[float] | jax.Array) -> Kernel:
    """Sum of Laplace kernels ``Σ_k exp(-d / σ_k)`` with Euclidean distance d."""
    return Kernel(bandwidths=jnp.atleast_1d(jnp.asarray(bandwidths, dtype=jnp.result_type(float))), kind="laplace")


def squared_norms(x: jax.Array) -> jax.Array:
    """Row-wise ``||x_i||²`` (a row sum of squares, not ``diag(x @ x.T)``)."""
    return jnp.sum(x * x, axis=-1)


def squared_distances(
    x: jax.Array,
    y: jax.Array,
    x_sq_norms: jax.Array | None = None,
    y_sq_norms: jax.Array | None = None,
    *,
    precision=DEFAULT_PRECISION,
) -> jax.Array:
    """``||x_i - y_j||²`` as ``||x_i||² + ||y_j||² - 2 x_i·y_j`` (one matmul), clamped at 0.

    The expansion loses relative accuracy for nearby points when the features carry a large common offset;
    the estimators therefore centre the pooled sample first (distances are translation invariant).
    """
    if x_sq_norms is None:
        x_sq_norms = squared_norms(x)
    if y_sq_norms is None:
        y_sq_norms = squared_norms(y)
    cross = jnp.matmul(x, y.T, precision=precision)
    return jnp.maximum(x_sq_norms[:, None] + y_sq_norms[None, :] - 2.0 * cross, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Median heuristic


def median_subsample_sizes(n_x, n_y, max_points: int):
    """How many points of X and of Y the median heuristic uses (works on Python ints and traced ints).

    ``k_x = min(n_x, max(max_points // 2, max_points - n_y))``, ``k_y = min(n_y, max_points - k_x)``:
    everything when ``n_x + n_y <= max_points``; otherwise half of the budget each, with the budget a small
    sample leaves unused going to the other one.
    """
    minimum = jnp.minimum if isinstance(n_x, jax.Array) or isinstance(n_y, jax.Array) else min
    maximum = jnp.maximum if minimum is jnp.minimum else max
    k_x = minimum(n_x, maximum(max_points // 2, max_points - n_y))
    k_y = minimum(n_y, max_points - k_x)
    return k_x, k_y


@functools.partial(jax.jit, static_argnames=("max_points", "precision"))
def median_heuristic(
    x: jax.Array,
    y: jax.Array | None = None,
    *,
    n_x: jax.Array | int | None = None,
    n_y: jax.Array | int | None = None,
    max_points: int = DEFAULT_MEDIAN_MAX_POINTS,
    precision=DEFAULT_PRECISION,
) -> jax.Array:
    """Median of the pairwise Euclidean distances of the pooled sample X ∪ Y over pairs i ≠ j.

    Args:
      x: ``(cap_x, D)`` array; only its first ``n_x`` rows are data (all rows when ``n_x`` is None).
      y: optional ``(cap_y, D)`` array, first ``n_y`` rows are data.
      n_x, n_y: valid row counts (may be traced, e.g. the counts of a streaming buffer).
      max_points: pooled subsample budget. With ``k_x, k_y`` from :func:`median_subsample_sizes`, the points
        used are ``x[floor(i * n_x / k_x)]`` for ``i < k_x`` and ``y[floor(j * n_y / k_y)]`` for ``j < k_y``
        (evenly strided, deterministic; all points when ``n_x + n_y <= max_points``).

    Returns:
      Scalar σ in the dtype of ``x``. The median of an even number of pairs is the mean of the two middle ones
      (NumPy's convention). Costs O(max_points²) memory and one sort of ``max_points²`` values.
    """
    if y is None:
        y = x[:0]
        n_y = 0
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"median_heuristic needs two (N, D) arrays with the same D, got {x.shape} and {y.shape}")
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    cap_x, cap_y = x.shape[0], y.shape[0]
    n_x = cap_x if n_x is None else n_x
    n_y = cap_y if n_y is None else n_y
    slots = min(max_points, cap_x + cap_y)
    k_x, k_y = median_subsample_sizes(jnp.asarray(n_x), jnp.asarray(n_y), max_points)

    slot = jnp.arange(slots)
    from_x = slot < k_x
    valid = slot < k_x + k_y
    # Integer strided positions floor(i * n / k); the guards avoid 0/0 for an empty side.
    x_rows = jnp.where(from_x, (slot * n_x) // jnp.maximum(k_x, 1), 0)
    y_rows = jnp.where(from_x, 0, ((slot - k_x) * n_y) // jnp.maximum(k_y, 1))
    x_rows = jnp.clip(x_rows, 0, cap_x - 1)
    y_rows = jnp.clip(y_rows, 0, max(cap_y - 1, 0))
    if cap_y > 0:
        points = jnp.where(from_x[:, None], x[x_rows], y[y_rows])
    else:
        points = x[x_rows]
    # Centre on the valid points: the ||a||²+||b||²-2a·b expansion is then accurate for feature sets with a
    # large common offset (typical of post-activation features).
    weights = valid.astype(points.dtype)
    centre = jnp.sum(points * weights[:, None], axis=0) / jnp.maximum(jnp.sum(weights), 1.0)
    points = (points - centre) * weights[:, None]

    sq = squared_distances(points, points, precision=precision)
    # Upper triangle i < j of the valid block, built from iotas (no O(slots²) index constants in the program).
    pair_valid = (slot[:, None] < slot[None, :]) & valid[:, None] & valid[None, :]
    pair_dists = jnp.where(pair_valid, jnp.sqrt(sq), jnp.inf)
    num_pairs = jnp.sum(pair_valid)
    ordered = jnp.sort(pair_dists.reshape(-1))
    lower = ordered[jnp.maximum(num_pairs - 1, 0) // 2]
    upper = ordered[num_pairs // 2]
    return jnp.where(num_pairs > 0, 0.5 * (lower + upper), jnp.nan)


# ----------------------------------------------------------------------------------------------------------------
# Bandwidth rules


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """Static (hashable) description of a kernel and of how its bandwidths are chosen.

    Registered as a static pytree (no array leaves), so it may be passed straight into jitted functions.

    Attributes:
      kind: ``'gaussian'`` or ``'laplace'``.
      bandwidth: ``'median'`` (median heuristic on the pooled sample) or a tuple of fixed σ values.
      multipliers: every base σ is multiplied by each of these (``σ × m`` for all pairs), giving
        ``len(base) * len(multipliers)`` kernels that are summed.
      median_max_points: subsample budget of the median heuristic (see :func:`median_heuristic`).
    """

    kind: str = "gaussian"
    bandwidth: str | tuple[float, ...] = "median"
    multipliers: tuple[float, ...] = (1.0,)
    median_max_points: int = DEFAULT_MEDIAN_MAX_POINTS

    def __post_init__(self) -> None:
        if self.kind not in KERNEL_KINDS:
            raise ValueError(f"kernel kind must be one of {KERNEL_KINDS}, got {self.kind!r}")
        if isinstance(self.bandwidth, str):
            if self.bandwidth != "median":
                raise ValueError(f"bandwidth must be 'median' or a tuple of positive floats, got {self.bandwidth!r}")
        else:
            values = tuple(float(s) for s in self.bandwidth)
            if not values or not all(np.isfinite(s) and s > 0 for s in values):
                raise ValueError(
                    f"fixed bandwidths must be a non-empty tuple of positive floats, got {self.bandwidth!r}"
                )
            object.__setattr__(self, "bandwidth", values)
        multipliers = tuple(float(m) for m in self.multipliers)
        if not multipliers or not all(np.isfinite(m) and m > 0 for m in multipliers):
            raise ValueError(f"multipliers must be a non-empty tuple of positive floats, got {self.multipliers!r}")
        object.__setattr__(self, "multipliers", multipliers)
        if self.median_max_points < 2:
            raise ValueError(f"median_max_points must be at least 2, got {self.median_max_points}")

    @property
    def uses_median(self) -> bool:
        return isinstance(self.bandwidth, str)

    @property
    def num_bandwidths(self) -> int:
        num_base = 1 if self.uses_median else len(self.bandwidth)
        return num_base * len(self.multipliers)

    def base_bandwidths(self, x, y=None, *, n_x=None, n_y=None, dtype=None) -> jax.Array:
        """The σ values before the multipliers: ``(1,)`` median, or the fixed values."""
        if self.uses_median:
            return median_heuristic(x, y, n_x=n_x, n_y=n_y, max_points=self.median_max_points)[None]
        return jnp.asarray(self.bandwidth, dtype=dtype or x.dtype)

    def resolve(self, x, y=None, *, n_x=None, n_y=None) -> Kernel:
        """The concrete :class:`Kernel` for data ``x``, ``y`` (σ_base ⊗ multipliers, base-major order)."""
        base = self.base_bandwidths(x, y, n_x=n_x, n_y=n_y)
        multipliers = jnp.asarray(self.multipliers, dtype=base.dtype)
        return Kernel(bandwidths=(base[:, None] * multipliers[None, :]).reshape(-1), kind=self.kind)

    def with_bandwidths(self, bandwidths: jax.Array) -> Kernel:
        """A :class:`Kernel` of this kind with explicitly given (already multiplied) σ values."""
        return Kernel(bandwidths=jnp.atleast_1d(bandwidths), kind=self.kind)
