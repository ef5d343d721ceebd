"""Tiled kernel sums between labelled groups of a pooled sample: the engine of the exact estimators and tests.

Everything exact (the unbiased and biased MMD², the permutation and sign-flip tests) reduces to three quadratic
forms of the pooled Gram matrix K₀ (diagonal set to zero) per *labelling* of the pooled points: with 0/1 group
indicators ``a`` (points labelled "X") and ``b`` (points labelled "Y"),

    xx = aᵀ K₀ a = Σ_{i≠j∈X} k(z_i, z_j),  yy = bᵀ K₀ b,  xy = aᵀ K₀ b = Σ_{i∈X, j∈Y} k(z_i, z_j).

The observed statistic is one labelling; a permutation or sign-flip test is B more, evaluated all at once as
extra columns of the indicator matrices (``K₀ @ [A, B]`` is a matmul). Padding rows and rows of a partially filled
buffer simply get zero indicators, so no other masking is needed.

K₀ is never materialised. The pooled points are split into tiles of ``tile`` rows; for every tile pair the
(tile × tile) kernel block is formed from ``||z_i||² + ||z_j||² - 2 z_i·z_j`` (one matmul), multiplied into the
indicator columns, and reduced to per-labelling sums. Memory is O(tile² + tile·C) beyond the inputs, for C
labellings. On one device only the tile pairs j ≥ i are visited (K₀ is symmetric), which is the minimal
work: about (N_pooled)²/2 kernel evaluations. The sums over tile pairs use Kahan compensation so that
float32 accumulation over thousands of tiles stays at float32 rounding level.

With a mesh (:func:`sharded_group_sums`), each device owns the pooled rows of its shard and visits its rows
against all (gathered, O(N·D)) columns; the partial sums are ``psum``-ed, so no device ever holds more than its
row slice of K₀ tiles and the work is split evenly.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from transfer_jax.alignment.kernels import DEFAULT_PRECISION, Kernel, squared_norms

DEFAULT_TILE = 1024


class GroupSums(NamedTuple):
    """Off-diagonal kernel sums per labelling, each of shape ``(C,)``: see the module docstring."""

    xx: jax.Array
    yy: jax.Array
    xy: jax.Array


class _Tiles(NamedTuple):
    points: jax.Array  # (T, t, D)
    sq_norms: jax.Array  # (T, t)
    ids: jax.Array  # (T, t) global point ids; equal ids mark the diagonal of K
    labels: jax.Array  # (T, t, 2C): [X indicators | Y indicators]


def _to_tiles(points: jax.Array, ids: jax.Array, labels: jax.Array, tile: int) -> _Tiles:
    """Pad to a multiple of ``tile`` rows (zero points, zero labels, id -1) and reshape to tiles."""
    n = points.shape[0]
    num_tiles = -(-n // tile)
    pad = num_tiles * tile - n
    if pad:
        points = jnp.pad(points, ((0, pad), (0, 0)))
        ids = jnp.pad(ids, (0, pad), constant_values=-1)
        labels = jnp.pad(labels, ((0, pad), (0, 0)))
    return _Tiles(
        points=points.reshape(num_tiles, tile, -1),
        sq_norms=squared_norms(points).reshape(num_tiles, tile),
        ids=ids.reshape(num_tiles, tile),
        labels=labels.reshape(num_tiles, tile, -1),
    )


def _kahan_add(total: jax.Array, compensation: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array]:
    corrected = value - compensation
    new_total = total + corrected
    return new_total, (new_total - total) - corrected


def _accumulate(
    rows: _Tiles, cols: _Tiles, kernel: Kernel, *, symmetric: bool, precision, varying_axis: str | None = None
) -> jax.Array:
    """Σ over tile pairs of the per-labelling sums; returns a ``(3, C)`` array [xx, yy, xy].

    ``symmetric``: rows and cols are the same tiles; only pairs j ≥ i are visited and the mirrored block
    (j, i) is accounted for analytically. ``varying_axis``: inside ``shard_map``, the mesh axis along which
    the loop carry differs between devices.
    """
    num_labellings = rows.labels.shape[-1] // 2
    dtype = rows.points.dtype

    def block_sums(i, j):
        def tile_of(tiles: _Tiles, index) -> _Tiles:
            return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, index, keepdims=False), tiles)

        row, col = tile_of(rows, i), tile_of(cols, j)
        cross = jnp.matmul(row.points, col.points.T, precision=precision)
        sq_dists = jnp.maximum(row.sq_norms[:, None] + col.sq_norms[None, :] - 2.0 * cross, 0.0)
        # Identical points get exactly k(z, z) excluded, whatever rounding the expansion above produced.
        block = jnp.where(row.ids[:, None] == col.ids[None, :], 0.0, kernel.from_squared_distances(sq_dists))
        projected = jnp.matmul(block, col.labels, precision=precision)  # (t, 2C): K₀ [A_j | B_j]
        row_x, row_y = row.labels[:, :num_labellings], row.labels[:, num_labellings:]
        k_a, k_b = projected[:, :num_labellings], projected[:, num_labellings:]
        xx = jnp.sum(row_x * k_a, axis=0)
        yy = jnp.sum(row_y * k_b, axis=0)
        xy = jnp.sum(row_x * k_b, axis=0)
        if symmetric:
            # The mirrored block (j, i) = block(i, j)ᵀ adds the same xx and yy and the swapped cross term.
            off_diagonal = (i != j).astype(dtype)
            yx = jnp.sum(row_y * k_a, axis=0)
            xx = xx * (1.0 + off_diagonal)
            yy = yy * (1.0 + off_diagonal)
            xy = xy + off_diagonal * yx
        return jnp.stack([xx, yy, xy])

    num_row_tiles, num_col_tiles = rows.points.shape[0], cols.points.shape[0]

    def row_loop(i, carry):
        def col_loop(j, carry):
            total, compensation = carry
            return _kahan_add(total, compensation, block_sums(i, j))

        first_col = i if symmetric else 0
        return lax.fori_loop(first_col, num_col_tiles, col_loop, carry)

    zeros = jnp.zeros((3, num_labellings), dtype)
    if varying_axis is not None:
        zeros = lax.pcast(zeros, (varying_axis,), to="varying")
    total, _ = lax.fori_loop(0, num_row_tiles, row_loop, (zeros, zeros))
    return total


def group_sums(
    points: jax.Array,
    x_labels: jax.Array,
    y_labels: jax.Array,
    kernel: Kernel,
    *,
    tile: int = DEFAULT_TILE,
    precision=DEFAULT_PRECISION,
) -> GroupSums:
    """Single-program (one device, or replicated under jit) group sums of the pooled ``points``.

    Args:
      points: ``(N, D)`` pooled sample (centre it first for accuracy).
      x_labels, y_labels: ``(N, C)`` 0/1 indicators of the X and Y group for C labellings.
    """
    _check_tile(tile)
    n = points.shape[0]
    tile = min(tile, n)
    labels = jnp.concatenate([x_labels, y_labels], axis=1).astype(points.dtype)
    tiles = _to_tiles(points, jnp.arange(n, dtype=jnp.int32), labels, tile)
    xx, yy, xy = _accumulate(tiles, tiles, kernel, symmetric=True, precision=precision)
    return GroupSums(xx, yy, xy)


def sharded_group_sums(
    x_points: jax.Array,
    y_points: jax.Array,
    x_side_labels: jax.Array,
    y_side_labels: jax.Array,
    kernel: Kernel,
    *,
    mesh: Mesh,
    data_axis: str = "data",
    tile: int = DEFAULT_TILE,
    precision=DEFAULT_PRECISION,
) -> GroupSums:
    """Data-parallel group sums with the rows of X and Y sharded over ``mesh`` axis ``data_axis``.

    Args:
      x_points, y_points: ``(cap_x, D)``, ``(cap_y, D)``; both row counts divisible by the axis size.
      x_side_labels, y_side_labels: ``(cap_x, 2C)``, ``(cap_y, 2C)``: ``[X indicators | Y indicators]`` for
        the rows of ``x_points`` and of ``y_points``.

    Each device gathers the full pooled sample (O(N·D), never a Gram matrix), visits its own rows against all
    columns, and the (3, C) partial sums are summed with ``psum``.
    """
    _check_tile(tile)
    axis_size = mesh.shape[data_axis]
    cap_x, cap_y = x_points.shape[0], y_points.shape[0]
    if cap_x % axis_size or cap_y % axis_size:
        raise ValueError(
            f"sharded MMD needs row counts divisible by the '{data_axis}' axis size {axis_size}, "
            f"got {cap_x} and {cap_y}"
        )
    local_x, local_y = cap_x // axis_size, cap_y // axis_size
    num_labellings = x_side_labels.shape[1] // 2
    row_tile = min(tile, local_x + local_y)
    col_tile = min(tile, cap_x + cap_y)
    dtype = x_points.dtype

    def per_device(x_rows, y_rows, x_labels, y_labels, bandwidths):
        local_kernel = Kernel(bandwidths=bandwidths, kind=kernel.kind)
        shard = lax.axis_index(data_axis)
        ids = jnp.concatenate(
            [shard * local_x + jnp.arange(local_x), cap_x + shard * local_y + jnp.arange(local_y)]
        ).astype(jnp.int32)
        points = jnp.concatenate([x_rows, y_rows])
        labels = jnp.concatenate([x_labels, y_labels]).astype(dtype)
        rows = _to_tiles(points, ids, labels, row_tile)
        cols = _to_tiles(
            lax.all_gather(points, data_axis, tiled=True),
            lax.all_gather(ids, data_axis, tiled=True),
            lax.all_gather(labels, data_axis, tiled=True),
            col_tile,
        )
        partial = _accumulate(rows, cols, local_kernel, symmetric=False, precision=precision, varying_axis=data_axis)
        return lax.psum(partial, data_axis)

    spec = P(data_axis, None)
    total = jax.shard_map(
        per_device, mesh=mesh, in_specs=(spec, spec, spec, spec, P(None)), out_specs=P(None, None)
    )(x_points, y_points, x_side_labels, y_side_labels, kernel.bandwidths)
    assert total.shape == (3, num_labellings)
    return GroupSums(total[0], total[1], total[2])


def _check_tile(tile: int) -> None:
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile must be a positive int, got {tile!r}")
