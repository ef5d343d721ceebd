"""MMD² estimators: exact (unbiased U / biased V), linear-time, and random Fourier features.

Notation: X = {x_1..x_m}, Y = {y_1..y_n} in R^D, k a kernel from :mod:`.kernels` (a sum of K Gaussian or
Laplace kernels, so k(z, z) = K).

* Unbiased U-statistic (two-sample form; the cross term keeps i = j):
  ``MMD²_u = Σ_{i≠j} k(x_i,x_j) / (m(m-1)) + Σ_{i≠j} k(y_i,y_j) / (n(n-1)) - 2 Σ_{i,j} k(x_i,y_j) / (mn)``.
  Unbiased for the population MMD²; can be negative.
* Biased V-statistic: the same means over all pairs, diagonals included (always >= 0, upward bias O(1/n)).
* Linear time (Gretton et al. 2012, Lemma 14): with consecutive pairs, h_i = k(x_{2i},x_{2i+1}) +
  k(y_{2i},y_{2i+1}) - k(x_{2i},y_{2i+1}) - k(x_{2i+1},y_{2i}); MMD²_l = mean(h), p-value from the normal
  approximation N(0, var(h) / #pairs) (one-sided: large values reject).
* Random Fourier features (Rahimi & Recht 2007): ``k(x, y) ≈ φ(x)·φ(y)``; the estimate is the unbiased
  U-statistic of that approximate kernel (see :class:`RandomFeatureMMD`). O(R·D) state for any N.

Every estimator exists as a pure function of two arrays and as a streaming estimator: a frozen (hashable,
static) configuration object with ``init``, ``update(state, x_shard, y_shard)`` and ``finalize(state)``,
whose state is a NamedTuple of device arrays, so it can live inside a jitted train/eval step, be donated and be
sharded. Nothing here transfers to the host.

The exact estimators are tiled (memory O(tile²), never O(N²)); see :mod:`._tiled` for the algorithm.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from transfer_jax.alignment import _exact, _tiled
from transfer_jax.alignment.kernels import DEFAULT_PRECISION, Kernel, KernelSpec

DEFAULT_TILE = _tiled.DEFAULT_TILE
KernelLike = Kernel | KernelSpec


def _check_features(x: jax.Array, y: jax.Array, *, same_length: bool = False, what: str = "MMD") -> None:
    for name, a in (("x", x), ("y", y)):
        if a.ndim != 2:
            raise ValueError(f"{what}: {name} must be a 2-D (N, D) array, got shape {a.shape}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{what}: {name} must be a floating-point array, got dtype {a.dtype}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"{what}: x and y must have the same feature dimension, got {x.shape[1]} and {y.shape[1]}")
    if same_length and x.shape[0] != y.shape[0]:
        raise ValueError(f"{what}: needs paired samples with as many x as y rows, got {x.shape[0]} and {y.shape[0]}")


def resolve_kernel(kernel: KernelLike, x: jax.Array, y: jax.Array | None = None, *, n_x=None, n_y=None) -> Kernel:
    """A :class:`Kernel` as is, or a :class:`KernelSpec` resolved on the pooled sample (median heuristic)."""
    if isinstance(kernel, Kernel):
        return kernel
    if isinstance(kernel, KernelSpec):
        return kernel.resolve(x, y, n_x=n_x, n_y=n_y)
    raise ValueError(f"kernel must be a Kernel or a KernelSpec, got {type(kernel).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Exact estimators


class MMDEstimate(NamedTuple):
    """Exact unbiased and biased MMD² of the same data (computed together: they share all kernel sums)."""

    unbiased: jax.Array
    biased: jax.Array
    bandwidths: jax.Array


def mmd2_exact(
    x: jax.Array,
    y: jax.Array,
    kernel: KernelLike = KernelSpec(),
    *,
    tile: int = DEFAULT_TILE,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    precision=DEFAULT_PRECISION,
) -> MMDEstimate:
    """Exact unbiased and biased MMD² of ``x (m, D)`` and ``y (n, D)``, tiled (memory O(tile²)).

    Args:
      kernel: a :class:`Kernel`, or a :class:`KernelSpec` (resolved on the pooled sample, e.g. median heuristic).
      tile: rows per tile; any value works (ragged last tiles are padded and masked).
      mesh: optional mesh whose ``data_axis`` shards the rows of x and y: then the Gram work is split across the
        devices with ``shard_map`` (same value as without a mesh). Without it, jit on sharded inputs also works
        (the compiler replicates the O(N·D) inputs and every device does the whole sum).
    """
    _check_features(x, y, what="exact MMD")
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"exact MMD needs at least 2 rows in x and in y, got {x.shape[0]} and {y.shape[0]}")
    resolved = resolve_kernel(kernel, x, y)
    stats = _exact.relabelled_statistics(
        x, y, resolved, tile=tile, mesh=mesh, data_axis=data_axis, precision=precision
    )
    return MMDEstimate(unbiased=stats.unbiased[0], biased=stats.biased[0], bandwidths=resolved.bandwidths)


def mmd2_unbiased(x: jax.Array, y: jax.Array, kernel: KernelLike = KernelSpec(), **kwargs) -> jax.Array:
    """Exact unbiased U-statistic MMD²_u (see the module docstring); keyword arguments as :func:`mmd2_exact`."""
    return mmd2_exact(x, y, kernel, **kwargs).unbiased


def mmd2_biased(x: jax.Array, y: jax.Array, kernel: KernelLike = KernelSpec(), **kwargs) -> jax.Array:
    """Exact biased V-statistic MMD²_b (see the module docstring); keyword arguments as :func:`mmd2_exact`."""
    return mmd2_exact(x, y, kernel, **kwargs).biased


class ExactMMDState(NamedTuple):
    """Feature buffers of a streaming exact estimator.

    ``x[:n_x]`` and ``y[:n_y]`` hold the features seen so far. Counts keep growing past the capacity (the extra
    rows are dropped), which :meth:`ExactMMD.finalize` reports as NaN instead of a silently truncated value.
    """

    x: jax.Array
    y: jax.Array
    n_x: jax.Array
    n_y: jax.Array


class ExactMMDResult(NamedTuple):
    mmd2_unbiased: jax.Array
    mmd2_biased: jax.Array
    bandwidths: jax.Array


class ExactMMDTestResult(NamedTuple):
    """Exact MMD² with relabelling-test p-values ``(1 + #{T_b >= T}) / (B + 1)`` for each statistic."""

    mmd2_unbiased: jax.Array
    mmd2_biased: jax.Array
    p_value_unbiased: jax.Array
    p_value_biased: jax.Array
    bandwidths: jax.Array


@dataclasses.dataclass(frozen=True)
class ExactMMD:
    """Streaming exact (unbiased and biased) MMD² over a preallocated device buffer.

    The exact statistics need all pairs, so ``update`` appends the shards to buffers of capacity N (O(N·D)
    memory) and ``finalize`` computes the kernel sums tile by tile (O(tile²) extra memory). The bandwidth rule
    is applied in ``finalize`` to the pooled buffered sample, unless explicit ``bandwidths`` are passed (e.g. a σ
    fixed at the first evaluation, to keep the kernel constant across a run).

    Attributes:
      kernel: kernel kind and bandwidth rule.
      tile: rows per tile of the Gram computation.
      mesh, data_axis: optional mesh to shard the buffers over (capacities must be multiples of the axis size)
        and to split the Gram work with ``shard_map``; see :func:`mmd2_exact`.
      precision: matmul precision of the Gram tiles (default full fp32).
      draws_per_pass: relabelling draws evaluated per pass over the Gram tiles in :meth:`test`
        (memory O(N · draws_per_pass)).
    """

    kernel: KernelSpec = KernelSpec()
    tile: int = DEFAULT_TILE
    mesh: Mesh | None = None
    data_axis: str = "data"
    precision: lax.Precision | str | None = DEFAULT_PRECISION
    draws_per_pass: int = _exact.DEFAULT_DRAWS_PER_PASS

    def _constrain(self, buffer: jax.Array) -> jax.Array:
        if self.mesh is None:
            return buffer
        return lax.with_sharding_constraint(buffer, NamedSharding(self.mesh, P(self.data_axis, None)))

    def init(self, dim: int, capacity_x: int, capacity_y: int | None = None, dtype=jnp.float32) -> ExactMMDState:
        """Empty buffers for up to ``capacity_x`` / ``capacity_y`` (default: same) rows of dimension ``dim``."""
        capacity_y = capacity_x if capacity_y is None else capacity_y
        for name, value in (("dim", dim), ("capacity_x", capacity_x), ("capacity_y", capacity_y)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ExactMMD.init: {name} must be a positive int, got {value!r}")
        if self.mesh is not None:
            axis_size = self.mesh.shape[self.data_axis]
            if capacity_x % axis_size or capacity_y % axis_size:
                raise ValueError(
                    f"ExactMMD.init: capacities must be multiples of the '{self.data_axis}' axis size {axis_size} "
                    f"to be sharded, got {capacity_x} and {capacity_y}"
                )
        # Every leaf is its own buffer (no shared zeros), so the state can be donated to a jitted update.
        return ExactMMDState(
            x=self._constrain(jnp.zeros((capacity_x, dim), dtype)),
            y=self._constrain(jnp.zeros((capacity_y, dim), dtype)),
            n_x=jnp.zeros((), jnp.int32),
            n_y=jnp.zeros((), jnp.int32),
        )

    def update(self, state: ExactMMDState, x_shard: jax.Array | None, y_shard: jax.Array | None) -> ExactMMDState:
        """Append a shard of X rows and/or of Y rows (either may be None; shard sizes may differ)."""

        def append(buffer, count, rows, name):
            if rows is None:
                return buffer, count
            if rows.ndim != 2 or rows.shape[1] != buffer.shape[1]:
                raise ValueError(f"ExactMMD.update: {name} shard must be (B, {buffer.shape[1]}), got {rows.shape}")
            positions = count + jnp.arange(rows.shape[0], dtype=count.dtype)
            # mode='drop': rows past the capacity are discarded (not clamped onto the last rows).
            buffer = buffer.at[positions].set(rows.astype(buffer.dtype), mode="drop")
            return self._constrain(buffer), count + rows.shape[0]

        x, n_x = append(state.x, state.n_x, x_shard, "x")
        y, n_y = append(state.y, state.n_y, y_shard, "y")
        return ExactMMDState(x=x, y=y, n_x=n_x, n_y=n_y)

    def resolve_kernel(self, state: ExactMMDState, bandwidths: jax.Array | None = None) -> Kernel:
        """The kernel ``finalize`` uses: explicit σ values, or the spec's rule on the buffered pooled sample."""
        if bandwidths is not None:
            return self.kernel.with_bandwidths(jnp.asarray(bandwidths, state.x.dtype))
        n_x = jnp.minimum(state.n_x, state.x.shape[0])
        n_y = jnp.minimum(state.n_y, state.y.shape[0])
        return self.kernel.resolve(state.x, state.y, n_x=n_x, n_y=n_y)

    def _statistics(self, state, kernel, **test_kwargs):
        return _exact.relabelled_statistics(
            state.x, state.y, kernel, n_x=state.n_x, n_y=state.n_y, tile=self.tile, mesh=self.mesh,
            data_axis=self.data_axis, precision=self.precision, draws_per_pass=self.draws_per_pass, **test_kwargs,
        )

    def finalize(self, state: ExactMMDState, bandwidths: jax.Array | None = None) -> ExactMMDResult:
        """Exact MMD²_u and MMD²_b of the buffered rows (NaN if a group has < 2 rows or overflowed)."""
        kernel = self.resolve_kernel(state, bandwidths)
        stats = self._statistics(state, kernel)
        return ExactMMDResult(stats.unbiased[0], stats.biased[0], kernel.bandwidths)

    def test(
        self,
        state: ExactMMDState,
        key: jax.Array,
        num_draws: int,
        method: str = "permutation",
        bandwidths: jax.Array | None = None,
    ) -> ExactMMDTestResult:
        """Exact MMD² plus a permutation (``'permutation'``) or paired sign-flip (``'sign_flip'``) test.

        The kernel (bandwidth) is fixed from the observed pooled sample and reused for every draw. See
        :mod:`.significance` for the tests' definitions.
        """
        if num_draws < 1:
            raise ValueError(f"ExactMMD.test: num_draws must be >= 1, got {num_draws}")
        kernel = self.resolve_kernel(state, bandwidths)
        stats = self._statistics(state, kernel, key=key, num_draws=num_draws, method=method)
        return ExactMMDTestResult(
            mmd2_unbiased=stats.unbiased[0],
            mmd2_biased=stats.biased[0],
            p_value_unbiased=_exact.permutation_p_value(stats.unbiased),
            p_value_biased=_exact.permutation_p_value(stats.biased),
            bandwidths=kernel.bandwidths,
        )


# ----------------------------------------------------------------------------------------------------------------
# Linear-time estimator


class LinearMMDState(NamedTuple):
    """Running moments of the linear-time h statistics (Chan et al.'s parallel merge of count/mean/M2).

    ``m2 = Σ (h_i - mean)²``; merging per-shard moments this way avoids the cancellation of Σh² - n·mean².
    """

    kernel: Kernel
    num_pairs: jax.Array
    mean: jax.Array
    m2: jax.Array


class LinearMMDResult(NamedTuple):
    """``mmd2`` = mean(h); ``variance`` = sample variance of h; ``p_value`` = 1 - Φ(mmd2 / sqrt(variance / pairs))."""

    mmd2: jax.Array
    variance: jax.Array
    num_pairs: jax.Array
    p_value: jax.Array


def linear_h_statistics(x: jax.Array, y: jax.Array, kernel: Kernel) -> jax.Array:
    """h_i for the pairs (2i, 2i+1) of equal-length x and y (an odd last row is ignored); shape ``(N // 2,)``.

    Distances here are direct row differences (no Gram expansion), so they are accurate for any offset.
    """
    _check_features(x, y, same_length=True, what="linear-time MMD")
    num_pairs = x.shape[0] // 2
    x_pairs = x[: 2 * num_pairs].reshape(num_pairs, 2, -1)
    y_pairs = y[: 2 * num_pairs].reshape(num_pairs, 2, -1)

    def k(a, b):
        diff = a - b
        return kernel.from_squared_distances(jnp.sum(diff * diff, axis=-1))

    x1, x2 = x_pairs[:, 0], x_pairs[:, 1]
    y1, y2 = y_pairs[:, 0], y_pairs[:, 1]
    return k(x1, x2) + k(y1, y2) - k(x1, y2) - k(x2, y1)


@dataclasses.dataclass(frozen=True)
class LinearTimeMMD:
    """Streaming linear-time MMD² (pairs are formed within each shard: rows 2i and 2i+1 of x and of y)."""

    def init(self, kernel: Kernel, dtype=jnp.float32) -> LinearMMDState:
        if not isinstance(kernel, Kernel):
            raise ValueError("LinearTimeMMD.init needs a concrete Kernel (resolve a KernelSpec on a first batch)")
        # Distinct buffers per leaf, so the state can be donated.
        num_pairs, mean, m2 = (jnp.zeros((), dtype) for _ in range(3))
        return LinearMMDState(kernel=kernel, num_pairs=num_pairs, mean=mean, m2=m2)

    def update(self, state: LinearMMDState, x_shard: jax.Array, y_shard: jax.Array) -> LinearMMDState:
        h = linear_h_statistics(x_shard, y_shard, state.kernel).astype(state.mean.dtype)
        if h.shape[0] == 0:  # a shard of 0 or 1 rows holds no pair
            return state
        count = jnp.asarray(h.shape[0], state.mean.dtype)
        shard_mean = jnp.mean(h)
        shard_m2 = jnp.sum((h - shard_mean) ** 2)
        total = state.num_pairs + count
        delta = shard_mean - state.mean
        return LinearMMDState(
            kernel=state.kernel,
            num_pairs=total,
            mean=state.mean + delta * count / total,
            m2=state.m2 + shard_m2 + delta * delta * state.num_pairs * count / total,
        )

    def finalize(self, state: LinearMMDState) -> LinearMMDResult:
        """Mean of h, its sample variance (ddof 1) and the one-sided normal-approximation p-value."""
        n = state.num_pairs
        variance = state.m2 / (n - 1.0)
        std_error = jnp.sqrt(variance / n)
        z = state.mean / jnp.where(std_error > 0, std_error, 1.0)
        # Zero variance: every h equal; the mean alone decides.
        p = jnp.where(std_error > 0, jax.scipy.stats.norm.sf(z), jnp.where(state.mean > 0, 0.0, 1.0))
        enough = n >= 2
        nan = jnp.asarray(jnp.nan, state.mean.dtype)
        return LinearMMDResult(
            mmd2=jnp.where(n >= 1, state.mean, nan),
            variance=jnp.where(enough, variance, nan),
            num_pairs=n,
            p_value=jnp.where(enough, p, nan).astype(state.mean.dtype),
        )


def mmd2_linear(x: jax.Array, y: jax.Array, kernel: KernelLike = KernelSpec()) -> LinearMMDResult:
    """Linear-time MMD² of paired-length x, y (consecutive pairs over the whole arrays) with its p-value."""
    _check_features(x, y, same_length=True, what="linear-time MMD")
    if x.shape[0] < 4:
        raise ValueError(f"linear-time MMD needs at least 4 rows (2 pairs) in x and y, got {x.shape[0]}")
    estimator = LinearTimeMMD()
    dtype = jnp.result_type(x.dtype, y.dtype)
    state = estimator.init(resolve_kernel(kernel, x, y), dtype=dtype)
    return estimator.finalize(estimator.update(state, x, y))


# ----------------------------------------------------------------------------------------------------------------
# Random Fourier features


class RFFState(NamedTuple):
    """Random-feature MMD state: O(R·D) for any number of samples.

    ``frequencies`` (R, D) are already divided by their component's σ; ``feature_scale`` (R,) is
    ``1/sqrt(R_k)`` for the R_k frequencies of component k; ``shift`` (D,) is subtracted from every input
    (the first update's pooled mean) so the cosine arguments stay small; ``sum_x``/``sum_y`` (2R,) are the
    running sums of φ.
    """

    frequencies: jax.Array
    feature_scale: jax.Array
    shift: jax.Array
    sum_x: jax.Array
    sum_y: jax.Array
    n_x: jax.Array
    n_y: jax.Array


class RFFResult(NamedTuple):
    """``unbiased``: U-statistic of the random-feature kernel (→ exact MMD²_u as R grows); ``biased``: ||μx-μy||².

    Both are in the units of the kernel sum (k(z, z) = number of bandwidths), like the exact estimators.
    """

    unbiased: jax.Array
    biased: jax.Array


@dataclasses.dataclass(frozen=True)
class RandomFeatureMMD:
    """Streaming random-Fourier-feature MMD² with ``num_features`` = R frequencies (2R features: cos and sin).

    For a kernel with K bandwidths the R frequencies are split across the components (R_k = R // K, the
    remainder to the first ones) and the features concatenated, so ``φ(x)·φ(y) ≈ Σ_k k_σk(x, y)``:

    * Gaussian σ: ω ~ N(0, I/σ²);  Laplace σ (Euclidean): ω = g / (σ|u|), g ~ N(0, I), u ~ N(0, 1)
      (multivariate Cauchy, the spectral measure of exp(-||d||/σ)).
    * φ_k(x) = [cos(ω_r·x), sin(ω_r·x)]_r / sqrt(R_k), so ||φ(x)||² = K = k(x, x) exactly.

    With μx = Σφ(x_i)/m, μy = Σφ(y_j)/n the estimate is the unbiased U-statistic of the approximate kernel,
    ``||μx - μy||² + (||μx||² - K)/(m - 1) + (||μy||² - K)/(n - 1)``, whose expectation over the frequencies is
    the exact MMD²_u; its error shrinks like 1/sqrt(R).
    """

    num_features: int = 1024
    precision: lax.Precision | str | None = DEFAULT_PRECISION

    def init(self, key: jax.Array, dim: int, kernel: Kernel, dtype=jnp.float32) -> RFFState:
        if not isinstance(kernel, Kernel):
            raise ValueError("RandomFeatureMMD.init needs a concrete Kernel (resolve a KernelSpec on a first batch)")
        num_kernels = kernel.num_bandwidths
        if self.num_features < num_kernels:
            raise ValueError(
                f"RandomFeatureMMD: num_features={self.num_features} is fewer than the {num_kernels} bandwidths"
            )
        base, remainder = divmod(self.num_features, num_kernels)
        per_kernel = np.asarray([base + (k < remainder) for k in range(num_kernels)])
        # Component of every frequency row, and its 1/sqrt(R_k) feature normalisation.
        sigma = jnp.repeat(kernel.bandwidths.astype(dtype), per_kernel, total_repeat_length=self.num_features)
        scale = jnp.asarray(np.repeat(1.0 / np.sqrt(per_kernel), per_kernel), dtype)
        normal_key, cauchy_key = jax.random.split(key)
        directions = jax.random.normal(normal_key, (self.num_features, dim), dtype)
        if kernel.kind == "laplace":
            sigma = sigma * jnp.abs(jax.random.normal(cauchy_key, (self.num_features,), dtype))
        # Distinct buffers per leaf, so the state can be donated.
        return RFFState(
            frequencies=directions / sigma[:, None],
            feature_scale=scale,
            shift=jnp.zeros((dim,), dtype),
            sum_x=jnp.zeros((2 * self.num_features,), dtype),
            sum_y=jnp.zeros((2 * self.num_features,), dtype),
            n_x=jnp.zeros((), jnp.int32),
            n_y=jnp.zeros((), jnp.int32),
        )

    def features(self, state: RFFState, rows: jax.Array) -> jax.Array:
        """φ(rows), shape ``(B, 2R)``."""
        angles = jnp.matmul(rows.astype(state.shift.dtype) - state.shift, state.frequencies.T, precision=self.precision)
        return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=1) * jnp.tile(state.feature_scale, 2)

    def update(self, state: RFFState, x_shard: jax.Array | None, y_shard: jax.Array | None) -> RFFState:
        """Add φ of a shard of X rows and/or Y rows to the running sums (either may be None)."""
        shards = [s for s in (x_shard, y_shard) if s is not None]
        for s in shards:
            if s.ndim != 2 or s.shape[1] != state.shift.shape[0]:
                raise ValueError(f"RandomFeatureMMD.update: shards must be (B, {state.shift.shape[0]}), got {s.shape}")
        if not shards:
            return state
        first = (state.n_x + state.n_y) == 0
        batch_mean = jnp.mean(jnp.concatenate(shards).astype(state.shift.dtype), axis=0)
        state = state._replace(shift=jnp.where(first, batch_mean, state.shift))
        if x_shard is not None:
            state = state._replace(
                sum_x=state.sum_x + jnp.sum(self.features(state, x_shard), axis=0), n_x=state.n_x + x_shard.shape[0]
            )
        if y_shard is not None:
            state = state._replace(
                sum_y=state.sum_y + jnp.sum(self.features(state, y_shard), axis=0), n_y=state.n_y + y_shard.shape[0]
            )
        return state

    def finalize(self, state: RFFState) -> RFFResult:
        dtype = state.sum_x.dtype
        m, n = state.n_x.astype(dtype), state.n_y.astype(dtype)
        mean_x, mean_y = state.sum_x / m, state.sum_y / n
        diagonal = jnp.sum(state.feature_scale**2)  # = K, ||φ(z)||² for every z
        diff = mean_x - mean_y
        biased = jnp.sum(diff * diff)
        unbiased = biased + (jnp.sum(mean_x**2) - diagonal) / (m - 1.0) + (jnp.sum(mean_y**2) - diagonal) / (n - 1.0)
        nan = jnp.asarray(jnp.nan, dtype)
        return RFFResult(
            unbiased=jnp.where((m >= 2) & (n >= 2), unbiased, nan),
            biased=jnp.where((m >= 1) & (n >= 1), biased, nan),
        )


def mmd2_rff(
    x: jax.Array,
    y: jax.Array,
    kernel: KernelLike = KernelSpec(),
    *,
    key: jax.Array,
    num_features: int = 1024,
    precision=DEFAULT_PRECISION,
) -> RFFResult:
    """Random-Fourier-feature MMD² of x and y (see :class:`RandomFeatureMMD`); frequencies drawn from ``key``."""
    _check_features(x, y, what="random-feature MMD")
    estimator = RandomFeatureMMD(num_features=num_features, precision=precision)
    dtype = jnp.result_type(x.dtype, y.dtype)
    state = estimator.init(key, x.shape[1], resolve_kernel(kernel, x, y), dtype=dtype)
    return estimator.finalize(estimator.update(state, x, y))
