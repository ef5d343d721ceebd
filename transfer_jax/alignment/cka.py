"""Centred kernel alignment (CKA), the second alignment measure: linear CKA and minibatch CKA.

Unlike MMD, CKA uses the pairing: row i of ``x`` and row i of ``y`` are two representations of the same input
(``x`` and ``y`` may have different feature dimensions). Both measures are 1 for identical features and invariant
to orthogonal transforms and isotropic scaling of either representation.

* Linear CKA (Kornblith et al. 2019), feature-space form with column-centred Xc, Yc:
  ``CKA = ||Ycᵀ Xc||²_F / (||Xcᵀ Xc||_F · ||Ycᵀ Yc||_F)``: O(N·D²) time, O(D²) memory, never an N×N Gram.
  Also streaming (:class:`LinearCKA`): the centred cross-products are accumulated exactly.
* Minibatch CKA (Nguyen, Raghu & Kornblith 2021): per minibatch of b >= 4 rows with linear Grams K = XXᵀ,
  L = YYᵀ, the unbiased HSIC of Song et al. (2007)

      HSIC₁(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((b-1)(b-2)) - 2/(b-2) · 1ᵀK̃L̃1] / (b(b-3)),

  with K̃, L̃ the Grams with zeroed diagonals; the three HSIC values (XY, XX, YY) are averaged over minibatches
  and ``CKA_mb = mean HSIC(K,L) / sqrt(mean HSIC(K,K) · mean HSIC(L,L))``.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from transfer_jax.alignment.kernels import DEFAULT_PRECISION


def _check_paired(x: jax.Array, y: jax.Array, what: str, min_rows: int) -> None:
    for name, a in (("x", x), ("y", y)):
        if a.ndim != 2:
            raise ValueError(f"{what}: {name} must be a 2-D (N, D) array, got shape {a.shape}")
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{what}: {name} must be a floating-point array, got dtype {a.dtype}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{what}: x and y must have the same number of rows (paired inputs), got {x.shape[0]} and {y.shape[0]}"
        )
    if x.shape[0] < min_rows:
        raise ValueError(f"{what}: needs at least {min_rows} rows, got {x.shape[0]}")


def _paired_as(x: jax.Array, y: jax.Array, dtype, what: str, min_rows: int) -> tuple[jax.Array, jax.Array]:
    """``x`` and ``y`` checked as paired (N, D) rows, cast to ``dtype`` (the accumulation dtype)."""
    _check_paired(x, y, what, min_rows)
    return x.astype(dtype), y.astype(dtype)


def _cross_products(xs: jax.Array, ys: jax.Array, precision) -> tuple[jax.Array, jax.Array, jax.Array]:
    """XsᵀXs, YsᵀYs, XsᵀYs of (shifted or centred) rows."""
    gram = lambda a, b: jnp.matmul(a.T, b, precision=precision)  # noqa: E731
    return gram(xs, xs), gram(ys, ys), gram(xs, ys)


def _cka_from_cross_products(xx: jax.Array, yy: jax.Array, xy: jax.Array) -> jax.Array:
    """CKA from centred cross-product matrices XcᵀXc, YcᵀYc, XcᵀYc."""
    return jnp.sum(xy * xy) / (jnp.linalg.norm(xx) * jnp.linalg.norm(yy))


def linear_cka(x: jax.Array, y: jax.Array, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """Linear CKA of paired features ``x (N, Dx)``, ``y (N, Dy)`` (feature-space form, column-centred)."""
    x, y = _paired_as(x, y, jnp.result_type(x.dtype, y.dtype), "linear CKA", min_rows=2)
    return _cka_from_cross_products(*_cross_products(x - jnp.mean(x, axis=0), y - jnp.mean(y, axis=0), precision))


class LinearCKAState(NamedTuple):
    """Shifted first and second moments: ``sum_x = Σ(x - shift_x)``, ``xy = Σ(x - shift_x)(y - shift_y)ᵀ``...

    The shifts are the first update's batch means, which keeps the final centring (a difference of these sums)
    from cancelling catastrophically when the features have a large mean.
    """

    shift_x: jax.Array
    shift_y: jax.Array
    count: jax.Array
    sum_x: jax.Array
    sum_y: jax.Array
    xx: jax.Array
    yy: jax.Array
    xy: jax.Array


@dataclasses.dataclass(frozen=True)
class LinearCKA:
    """Streaming exact linear CKA with O(Dx² + Dy² + Dx·Dy) state, for any number of rows."""

    precision: lax.Precision | str | None = DEFAULT_PRECISION

    def init(self, dim_x: int, dim_y: int, dtype=jnp.float32) -> LinearCKAState:
        return LinearCKAState(
            shift_x=jnp.zeros((dim_x,), dtype),
            shift_y=jnp.zeros((dim_y,), dtype),
            count=jnp.zeros((), jnp.int32),
            sum_x=jnp.zeros((dim_x,), dtype),
            sum_y=jnp.zeros((dim_y,), dtype),
            xx=jnp.zeros((dim_x, dim_x), dtype),
            yy=jnp.zeros((dim_y, dim_y), dtype),
            xy=jnp.zeros((dim_x, dim_y), dtype),
        )

    def update(self, state: LinearCKAState, x_batch: jax.Array, y_batch: jax.Array) -> LinearCKAState:
        x_batch, y_batch = _paired_as(x_batch, y_batch, state.sum_x.dtype, "LinearCKA.update", min_rows=1)
        first = state.count == 0
        shift_x = jnp.where(first, jnp.mean(x_batch, axis=0), state.shift_x)
        shift_y = jnp.where(first, jnp.mean(y_batch, axis=0), state.shift_y)
        xs, ys = x_batch - shift_x, y_batch - shift_y
        xx, yy, xy = _cross_products(xs, ys, self.precision)
        return LinearCKAState(
            shift_x=shift_x,
            shift_y=shift_y,
            count=state.count + x_batch.shape[0],
            sum_x=state.sum_x + jnp.sum(xs, axis=0),
            sum_y=state.sum_y + jnp.sum(ys, axis=0),
            xx=state.xx + xx,
            yy=state.yy + yy,
            xy=state.xy + xy,
        )

    def finalize(self, state: LinearCKAState) -> jax.Array:
        n = state.count.astype(state.sum_x.dtype)
        mean_x, mean_y = state.sum_x / n, state.sum_y / n
        xx = state.xx - n * jnp.outer(mean_x, mean_x)
        yy = state.yy - n * jnp.outer(mean_y, mean_y)
        xy = state.xy - n * jnp.outer(mean_x, mean_y)
        return jnp.where(n >= 2, _cka_from_cross_products(xx, yy, xy), jnp.nan)


def unbiased_hsic(k: jax.Array, l: jax.Array) -> jax.Array:  # noqa: E741 (K, L are the standard names)
    """Unbiased HSIC₁ of two (b, b) Gram matrices, b >= 4 (Song et al. 2007; formula in the module docstring)."""
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape != l.shape:
        raise ValueError(f"unbiased_hsic needs two square Gram matrices of the same shape, got {k.shape} and {l.shape}")
    b = k.shape[0]
    if b < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples, got {b}")
    off_diagonal = 1.0 - jnp.eye(b, dtype=k.dtype)
    k, l = k * off_diagonal, l * off_diagonal  # noqa: E741
    k_rows, l_rows = jnp.sum(k, axis=1), jnp.sum(l, axis=1)
    trace_term = jnp.sum(k * l)  # tr(K̃L̃) for symmetric Grams
    sum_term = jnp.sum(k_rows) * jnp.sum(l_rows) / ((b - 1.0) * (b - 2.0))
    cross_term = 2.0 / (b - 2.0) * jnp.dot(k_rows, l_rows)
    return (trace_term + sum_term - cross_term) / (b * (b - 3.0))


class MinibatchCKAState(NamedTuple):
    """Running sums of the unbiased HSIC values over minibatches, and the number of minibatches."""

    hsic_xy: jax.Array
    hsic_xx: jax.Array
    hsic_yy: jax.Array
    num_batches: jax.Array


@dataclasses.dataclass(frozen=True)
class MinibatchCKA:
    """Streaming minibatch linear CKA: each ``update`` is one minibatch (>= 4 paired rows)."""

    precision: lax.Precision | str | None = DEFAULT_PRECISION

    def init(self, dtype=jnp.float32) -> MinibatchCKAState:
        # Distinct buffers per leaf, so the state can be donated.
        return MinibatchCKAState(*(jnp.zeros((), dtype) for _ in range(4)))

    def update(self, state: MinibatchCKAState, x_batch: jax.Array, y_batch: jax.Array) -> MinibatchCKAState:
        x_batch, y_batch = _paired_as(x_batch, y_batch, state.hsic_xy.dtype, "MinibatchCKA.update", min_rows=4)
        # HSIC is translation invariant for linear Grams after centring; subtracting the batch mean first only
        # improves the conditioning of the Gram entries.
        x_batch = x_batch - jnp.mean(x_batch, axis=0)
        y_batch = y_batch - jnp.mean(y_batch, axis=0)
        k = jnp.matmul(x_batch, x_batch.T, precision=self.precision)
        l = jnp.matmul(y_batch, y_batch.T, precision=self.precision)  # noqa: E741
        return MinibatchCKAState(
            hsic_xy=state.hsic_xy + unbiased_hsic(k, l),
            hsic_xx=state.hsic_xx + unbiased_hsic(k, k),
            hsic_yy=state.hsic_yy + unbiased_hsic(l, l),
            num_batches=state.num_batches + 1.0,
        )

    def finalize(self, state: MinibatchCKAState) -> jax.Array:
        # The 1/num_batches of the means cancels in the ratio.
        cka = state.hsic_xy / jnp.sqrt(state.hsic_xx * state.hsic_yy)
        return jnp.where(state.num_batches > 0, cka, jnp.nan)


def minibatch_cka(x: jax.Array, y: jax.Array, batch_size: int, *, precision=DEFAULT_PRECISION) -> jax.Array:
    """Minibatch CKA over the consecutive minibatches ``x[i*b:(i+1)*b]``; a remainder of < b rows is dropped."""
    _check_paired(x, y, "minibatch CKA", min_rows=4)
    if batch_size < 4 or batch_size > x.shape[0]:
        raise ValueError(f"minibatch CKA: batch_size must be in [4, {x.shape[0]}], got {batch_size}")
    num_batches = x.shape[0] // batch_size
    used = num_batches * batch_size
    x_batches = x[:used].reshape(num_batches, batch_size, x.shape[1])
    y_batches = y[:used].reshape(num_batches, batch_size, y.shape[1])
    estimator = MinibatchCKA(precision=precision)

    def step(state, batch):
        return estimator.update(state, *batch), None

    state, _ = lax.scan(step, estimator.init(jnp.result_type(x.dtype, y.dtype)), (x_batches, y_batches))
    return estimator.finalize(state)
