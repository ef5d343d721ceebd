"""Exact MMD² statistics for the observed labelling and for random relabellings (permutation / sign-flip tests).

Shared engine of :mod:`transfer_jax.alignment.mmd` and :mod:`transfer_jax.alignment.significance`.

The inputs are two row buffers ``x (cap_x, D)`` and ``y (cap_y, D)`` of which only the first ``n_x`` / ``n_y``
rows are data (static shapes with traced counts, so a streaming buffer and a plain array go through the same
code). Draw 0 is always the observed labelling (X rows → group X, Y rows → group Y); draws 1..B are random
relabellings of the valid pooled points. For each draw the three off-diagonal group sums are computed by the
tiled engine in :mod:`._tiled`, and turned into

    unbiased = xx / (m(m-1)) + yy / (n(n-1)) - 2 xy / (m n)
    biased   = (xx + m k₀) / m² + (yy + n k₀) / n² - 2 xy / (m n),     k₀ = k(z, z) = number of bandwidths.

Draws are evaluated ``draws_per_pass`` at a time: every pass recomputes the Gram tiles once and projects them
onto all its draws with one matmul, so the device memory is O(tile² + N·draws_per_pass) — never O(N²) — and the
cost is ``passes × N²·D`` (Gram) plus ``N²·B`` (projections) flops.
"""
from __future__ import annotations

from typing import NamedTuple

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh

from transfer_jax.alignment import _tiled
from transfer_jax.alignment.kernels import Kernel

RELABELLING_METHODS: tuple[str, ...] = ("permutation", "sign_flip")
DEFAULT_DRAWS_PER_PASS = 1024


class ExactStatistics(NamedTuple):
    """Unbiased and biased MMD², shape ``(1 + B,)``: entry 0 observed, entries 1..B under relabellings."""

    unbiased: jax.Array
    biased: jax.Array


def valid_mask(capacity: int, count: jax.Array) -> jax.Array:
    return jnp.arange(capacity) < count


def permutation_labels(key: jax.Array, valid_x: jax.Array, valid_y: jax.Array, n_x: jax.Array) -> jax.Array:
    """Group-X indicator of a uniformly random relabelling: ``n_x`` of the valid pooled points become X.

    Random scores for the valid points (invalid ones score above all of them), ranked; the ``n_x`` lowest
    ranks are X. Returns a bool ``(cap_x + cap_y,)`` vector.
    """
    valid = jnp.concatenate([valid_x, valid_y])
    scores = jnp.where(valid, jax.random.uniform(key, valid.shape), 2.0)
    ranks = jnp.argsort(jnp.argsort(scores))
    return ranks < n_x


def sign_flip_labels(key: jax.Array, valid_x: jax.Array, valid_y: jax.Array) -> jax.Array:
    """Group-X indicator after swapping each pair (x_i, y_i) independently with probability 1/2."""
    swap = jax.random.bernoulli(key, 0.5, valid_x.shape)
    return jnp.concatenate([valid_x & ~swap, valid_y & swap])


def statistics_from_sums(sums: _tiled.GroupSums, m, n, diagonal_value: int) -> ExactStatistics:
    """Unbiased and biased MMD² from off-diagonal group sums (see the module docstring)."""
    dtype = sums.xx.dtype
    m = jnp.asarray(m, dtype)
    n = jnp.asarray(n, dtype)
    cross = 2.0 * sums.xy / (m * n)
    unbiased = sums.xx / (m * (m - 1.0)) + sums.yy / (n * (n - 1.0)) - cross
    biased = (sums.xx + m * diagonal_value) / (m * m) + (sums.yy + n * diagonal_value) / (n * n) - cross
    return ExactStatistics(unbiased=unbiased, biased=biased)


# Jitted here so that eager calls compile once instead of dispatching the tile loops op by op; inside a caller's
# jit it is simply inlined.
@functools.partial(
    jax.jit,
    static_argnames=("num_draws", "method", "tile", "mesh", "data_axis", "precision", "draws_per_pass"),
)
def relabelled_statistics(
    x: jax.Array,
    y: jax.Array,
    kernel: Kernel,
    *,
    n_x: jax.Array | int | None = None,
    n_y: jax.Array | int | None = None,
    key: jax.Array | None = None,
    num_draws: int = 0,
    method: str = "permutation",
    tile: int = _tiled.DEFAULT_TILE,
    mesh: Mesh | None = None,
    data_axis: str = "data",
    precision=None,
    draws_per_pass: int = DEFAULT_DRAWS_PER_PASS,
) -> ExactStatistics:
    """Observed (entry 0) and ``num_draws`` relabelled exact MMD² statistics; see the module docstring.

    Invalid counts (fewer than 2 points in a group, more points than the buffer holds, or unequal counts for
    the sign-flip method) give NaN statistics rather than an exception, because counts can be traced values.
    """
    if method not in RELABELLING_METHODS:
        raise ValueError(f"relabelling method must be one of {RELABELLING_METHODS}, got {method!r}")
    if num_draws < 0:
        raise ValueError(f"num_draws must be >= 0, got {num_draws}")
    if num_draws and key is None:
        raise ValueError("a PRNG key is needed for permutation / sign-flip draws")
    if draws_per_pass < 1:
        raise ValueError(f"draws_per_pass must be >= 1, got {draws_per_pass}")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"exact MMD needs two (N, D) arrays with the same D, got {x.shape} and {y.shape}")
    if method == "sign_flip" and num_draws and x.shape[0] != y.shape[0]:
        raise ValueError(
            f"the sign-flip test pairs x_i with y_i and needs as many X as Y rows, got {x.shape[0]} and {y.shape[0]}"
        )
    dtype = jnp.result_type(x.dtype, y.dtype)
    x, y = x.astype(dtype), y.astype(dtype)
    cap_x, cap_y = x.shape[0], y.shape[0]
    n_x = jnp.asarray(cap_x if n_x is None else n_x)
    n_y = jnp.asarray(cap_y if n_y is None else n_y)
    valid_x, valid_y = valid_mask(cap_x, n_x), valid_mask(cap_y, n_y)

    # Centre on the pooled valid mean: distances are unchanged and ||a||²+||b||²-2a·b loses far less accuracy.
    # Unused buffer rows are zeroed (with `where`, so even NaN garbage there cannot leak into the sums).
    total = jnp.sum(jnp.where(valid_x[:, None], x, 0.0), axis=0) + jnp.sum(jnp.where(valid_y[:, None], y, 0.0), axis=0)
    centre = total / jnp.maximum(n_x + n_y, 1).astype(dtype)
    x = jnp.where(valid_x[:, None], x - centre, 0.0)
    y = jnp.where(valid_y[:, None], y - centre, 0.0)

    observed = jnp.concatenate([valid_x, jnp.zeros_like(valid_y)])
    if method == "permutation":
        draw_labels = lambda k: permutation_labels(k, valid_x, valid_y, n_x)  # noqa: E731
    else:
        draw_labels = lambda k: sign_flip_labels(k, valid_x, valid_y)  # noqa: E731

    total_draws = 1 + num_draws
    num_passes = -(-total_draws // draws_per_pass)
    per_pass = -(-total_draws // num_passes)
    valid = jnp.concatenate([valid_x, valid_y])

    def one_pass(pass_index):
        draw_index = pass_index * per_pass + jnp.arange(per_pass)
        if num_draws:
            keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(draw_index)
            random_labels = jax.vmap(draw_labels)(keys)
            in_x = jnp.where((draw_index == 0)[:, None], observed[None, :], random_labels)
        else:
            in_x = jnp.broadcast_to(observed, (per_pass, observed.shape[0]))
        in_y = valid[None, :] & ~in_x
        x_labels, y_labels = in_x.T.astype(dtype), in_y.T.astype(dtype)  # (cap_x + cap_y, per_pass)
        sums = _pooled_group_sums(x, y, x_labels, y_labels, kernel, tile, mesh, data_axis, precision)
        return jnp.stack(sums)  # (3, per_pass)

    if num_passes == 1:
        stacked = one_pass(0)
    else:
        stacked = lax.map(one_pass, jnp.arange(num_passes))  # (passes, 3, per_pass)
        stacked = jnp.moveaxis(stacked, 1, 0).reshape(3, -1)
    stacked = stacked[:, :total_draws]
    stats = statistics_from_sums(_tiled.GroupSums(*stacked), n_x, n_y, kernel.diagonal_value)

    counts_ok = (n_x >= 2) & (n_y >= 2) & (n_x <= cap_x) & (n_y <= cap_y)
    if method == "sign_flip" and num_draws:
        counts_ok &= n_x == n_y
    nan = jnp.asarray(jnp.nan, dtype)
    return ExactStatistics(*(jnp.where(counts_ok, s, nan) for s in stats))


def _pooled_group_sums(x, y, x_labels, y_labels, kernel, tile, mesh, data_axis, precision) -> _tiled.GroupSums:
    cap_x = x.shape[0]
    kwargs = dict(tile=tile) if precision is None else dict(tile=tile, precision=precision)
    if mesh is None:
        return _tiled.group_sums(jnp.concatenate([x, y]), x_labels, y_labels, kernel, **kwargs)
    x_side = jnp.concatenate([x_labels[:cap_x], y_labels[:cap_x]], axis=1)
    y_side = jnp.concatenate([x_labels[cap_x:], y_labels[cap_x:]], axis=1)
    # Zero rows with zero labels are inert, so padding to a multiple of the axis size changes nothing.
    axis_size = mesh.shape[data_axis]
    x, x_side = _pad_rows(x, axis_size), _pad_rows(x_side, axis_size)
    y, y_side = _pad_rows(y, axis_size), _pad_rows(y_side, axis_size)
    return _tiled.sharded_group_sums(x, y, x_side, y_side, kernel, mesh=mesh, data_axis=data_axis, **kwargs)


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
    pad = -a.shape[0] % multiple
    return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


def permutation_p_value(statistics: jax.Array) -> jax.Array:
    """``p = (1 + #{T_b >= T}) / (B + 1)`` from ``[T, T_1, ..., T_B]`` (NaN if T is NaN)."""
    observed, null = statistics[0], statistics[1:]
    exceed = jnp.sum(null >= observed)
    p = (1.0 + exceed) / (null.shape[0] + 1.0)
    return jnp.where(jnp.isnan(observed), jnp.nan, p).astype(statistics.dtype)
