"""Sliding-window inference over a whole volume, with MONAI ``sliding_window_inference`` semantics, in JAX.

The window grid is static (computed on the host from the volume shape, the ROI and the overlap), so the whole
inference traces to one program per volume shape: windows are gathered with ``lax.dynamic_slice``, the model runs
on fixed-size batches of windows inside a ``lax.scan`` (the last batch is padded with repeats of a real window whose
contribution is masked out, so ``apply_fn`` is traced and compiled once), each window's output is accumulated
multiplied by an importance map, and the sum is divided by the accumulated importance at the end::

    @jax.jit
    def predict(params, rest, volume):  # volume (D, H, W, C) -> logits (D, H, W, K)
        model = graph.merge(params, rest, training=False)
        return sliding_window_inference(lambda x: model(x).logits, volume, roi=(64, 224, 224), overlap=0.5,
                                        batch_size=4, mode="gaussian", mesh=mesh)

``apply_fn`` must be pure (an eval-mode NNX module closed over, or a merged graph as above) and map
``(batch_size, *roi, C)`` to ``(batch_size, *roi, K)``.

MONAI conventions reproduced (``monai.inferers.sliding_window_inference``):

* a spatial axis shorter than the ROI is zero-padded (``pad_value``) to the ROI, ``diff // 2`` before and the rest
  after, and the padding is cropped from the output;
* per axis the scan interval is ``int(roi * (1 - overlap))`` (at least 1; the full ROI when the ROI equals the
  axis), windows start at multiples of it until one reaches the end, and the last start is moved back so that
  window ends flush with the volume (:func:`window_starts`);
* blending ``mode="constant"`` (the default, MONAI's and upstream's): uniform weights; ``mode="gaussian"``:
  ``prod_axes exp(-x^2 / (2 (sigma_scale * roi)^2))`` over window-centred coordinates ``x``, floored at 1e-3
  (:func:`importance_map`);
* output = ``sum_windows(out_w * map) / sum_windows(map)``.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BLEND_MODES = ("gaussian", "constant")
# MONAI's default blending, the one upstream's anatomy test (`sliding_window_inference(img, roi, 1, model,
# overlap=0.5)`) runs with; pass mode="gaussian" for Gaussian weights.
DEFAULT_BLEND_MODE = "constant"
# MONAI floors the Gaussian importance map so that window corners still carry some weight.
MIN_IMPORTANCE = 1e-3


def _check_roi(roi, ndim: int = 3) -> tuple[int, ...]:
    values = tuple(roi) if isinstance(roi, Sequence) else (roi,)
    if len(values) != ndim or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0
                                      for v in values):
        raise ValueError(f"roi must be {ndim} positive ints (window size along D, H, W), got {roi!r}")
    return tuple(int(v) for v in values)


def _check_shape(shape, ndim: int = 3) -> tuple[int, ...]:
    values = tuple(shape)
    if len(values) != ndim or not all(isinstance(v, (int, np.integer)) and v > 0 for v in values):
        raise ValueError(f"volume_shape3d must be {ndim} positive ints, got {shape!r}")
    return tuple(int(v) for v in values)


def _check_overlap(overlap, ndim: int = 3) -> tuple[float, ...]:
    values = tuple(overlap) if isinstance(overlap, Sequence) else (overlap,) * ndim
    if len(values) != ndim or not all(isinstance(v, (int, float, np.floating)) and 0.0 <= v < 1.0 for v in values):
        raise ValueError(f"overlap must be a fraction in [0, 1) (or one per axis), got {overlap!r}")
    return tuple(float(v) for v in values)


def roi_padding(volume_shape3d: Sequence[int], roi: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """``(before, after)`` zero padding per axis that brings every axis up to at least the ROI: for an axis shorter
    by ``diff`` voxels, ``(diff // 2, diff - diff // 2)`` (MONAI's symmetric padding), otherwise ``(0, 0)``."""
    shape, roi = _check_shape(volume_shape3d), _check_roi(roi)
    return tuple((max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(shape, roi))


def _axis_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window starts along one axis of (already padded) length ``size >= roi``, as MONAI ``dense_patch_slices``."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    # The first window index whose end reaches the end of the axis is the last one.
    count = next(i for i in range(math.ceil(size / interval)) if i * interval + roi >= size) + 1
    return [min(i * interval, size - roi) for i in range(count)]


def window_starts(volume_shape3d: Sequence[int], roi: Sequence[int], overlap: float | Sequence[float] = 0.5
                  ) -> list[tuple[int, int, int]]:
    """Start corners of all windows, in the coordinates of the volume padded by :func:`roi_padding`.

    Per axis (padded length ``n``): interval ``s = int(roi * (1 - overlap))``, at least 1, or ``roi`` when
    ``roi == n``; starts ``0, s, 2s, ...`` up to the first one whose window reaches ``n``, that last one moved back to
    ``n - roi``. The grid is the Cartesian product, the first axis varying slowest (MONAI's order).
    """
    shape, roi, overlap = _check_shape(volume_shape3d), _check_roi(roi), _check_overlap(overlap)
    padded = [max(n, r) for n, r in zip(shape, roi)]
    per_axis = [_axis_starts(n, r, o) for n, r, o in zip(padded, roi, overlap)]
    return [tuple(start) for start in itertools.product(*per_axis)]


def importance_map(roi: Sequence[int], mode: str = "gaussian", sigma_scale: float | Sequence[float] = 0.125
                   ) -> jax.Array:
    """Blending weights of one window, shape ``roi``, float32 (MONAI ``compute_importance_map``).

    ``"gaussian"``: ``prod_a exp(-x_a^2 / (2 sigma_a^2))`` with ``x_a = i - (roi_a - 1) / 2`` and
    ``sigma_a = sigma_scale_a * roi_a`` (not normalised: 1 at the centre of an odd window), then floored at 1e-3.
    ``"constant"``: ones. Built from 1-D factors by broadcasting, so inside a jitted program it is computed rather
    than embedded as a ROI-sized constant.
    """
    roi = _check_roi(roi)
    if mode not in BLEND_MODES:
        raise ValueError(f"mode must be one of {BLEND_MODES}, got {mode!r}")
    if mode == "constant":
        return jnp.ones(roi, jnp.float32)
    scales = tuple(sigma_scale) if isinstance(sigma_scale, Sequence) else (sigma_scale,) * len(roi)
    if len(scales) != len(roi) or not all(s > 0 for s in scales):
        raise ValueError(f"sigma_scale must be positive (or one per axis), got {sigma_scale!r}")
    weights = jnp.ones((), jnp.float32)
    for axis, (size, scale) in enumerate(zip(roi, scales)):
        offsets = np.arange(size, dtype=np.float32) - np.float32((size - 1) / 2.0)
        factor = np.exp(offsets ** 2 / np.float32(-2.0 * (scale * size) ** 2)).astype(np.float32)
        shape = [1] * len(roi)
        shape[axis] = size
        weights = weights * jnp.asarray(factor).reshape(shape)
    return jnp.maximum(weights, MIN_IMPORTANCE)


def _batch_sharding(mesh: Mesh | None, batch_size: int) -> NamedSharding | None:
    if mesh is None:
        return None
    devices = mesh.devices.size
    if batch_size % devices:
        raise ValueError(f"batch_size={batch_size} must be a multiple of the {devices} devices of the mesh to shard "
                         f"the window batch")
    # The window batch's leading axis is split over every mesh axis, like the training batch.
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def sliding_window_inference(apply_fn: Callable[[jax.Array], jax.Array], volume: jax.Array, roi: Sequence[int],
                             overlap: float | Sequence[float] = 0.5, batch_size: int = 4,
                             mode: str = DEFAULT_BLEND_MODE,
                             sigma_scale: float | Sequence[float] = 0.125, mesh: Mesh | None = None,
                             pad_value: float = 0.0) -> jax.Array:
    """Run ``apply_fn`` over overlapping ROI windows of ``volume`` (D, H, W, C) and blend: (D, H, W, K) float32.

    ``apply_fn``: ``(batch_size, *roi, C) -> (batch_size, *roi, K)``, called on every batch of windows (all of the
    same shape, so it compiles once). Windows: :func:`window_starts` on the volume padded by :func:`roi_padding`
    with ``pad_value``; blending with :func:`importance_map` (``mode``, ``sigma_scale``). With ``mesh`` the window
    batch is sharded over all mesh axes (``batch_size`` must be a multiple of the device count; use Auto axis types,
    as ``transfer_jax.train.mesh.create_mesh`` does) and the blended output is replicated.

    Works eagerly or inside ``jit``; the window grid depends only on static shapes.
    """
    volume = jnp.asarray(volume)
    if volume.ndim != 4:
        raise ValueError(f"volume must be channels-last (D, H, W, C), got shape {volume.shape}")
    roi = _check_roi(roi)
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    sharding = _batch_sharding(mesh, batch_size)
    weights = importance_map(roi, mode, sigma_scale)

    padding = roi_padding(volume.shape[:3], roi)
    padded = jnp.pad(volume, padding + ((0, 0),), constant_values=pad_value)
    starts = np.asarray(window_starts(padded.shape[:3], roi, overlap), np.int32)
    num_windows = starts.shape[0]
    num_batches = -(-num_windows // batch_size)
    filler = num_batches * batch_size - num_windows
    # Filler windows repeat the last real window (a valid slice) and are masked out of the sums.
    starts = np.concatenate([starts, np.repeat(starts[-1:], filler, axis=0)])
    is_real = np.arange(num_batches * batch_size) < num_windows

    channels = padded.shape[-1]
    window_shape = (batch_size, *roi, channels)
    out_struct = jax.eval_shape(apply_fn, jax.ShapeDtypeStruct(window_shape, padded.dtype))
    if not hasattr(out_struct, "shape") or out_struct.ndim != 5 or out_struct.shape[:4] != window_shape[:4]:
        got = getattr(out_struct, "shape", type(out_struct).__name__)
        raise ValueError(f"apply_fn must map windows {window_shape} to (batch, *roi, K) = "
                         f"({batch_size}, {', '.join(map(str, roi))}, K) in one array, got {got}")
    num_outputs = out_struct.shape[-1]

    def gather(start):
        return lax.dynamic_slice(padded, (start[0], start[1], start[2], 0), (*roi, channels))

    def accumulate_window(start, window_output, window_weight, sums):
        output_sum, weight_sum = sums
        corner = (start[0], start[1], start[2], 0)
        output_sum = lax.dynamic_update_slice(
            output_sum, lax.dynamic_slice(output_sum, corner, (*roi, num_outputs)) + window_output, corner)
        weight_sum = lax.dynamic_update_slice(
            weight_sum, lax.dynamic_slice(weight_sum, corner, (*roi, 1)) + window_weight, corner)
        return output_sum, weight_sum

    def process_batch(sums, batch):
        batch_starts, batch_real = batch
        windows = jax.vmap(gather)(batch_starts)
        if sharding is not None:
            windows = lax.with_sharding_constraint(windows, sharding)
        outputs = apply_fn(windows).astype(jnp.float32)
        if sharding is not None:  # accumulation indexes single windows: bring the batch back to every device
            outputs = lax.with_sharding_constraint(outputs, NamedSharding(mesh, P()))
        window_weights = jnp.where(batch_real[:, None, None, None, None], weights[None, ..., None], 0.0)
        # where, not multiply: a filler window's output is dropped even if it is inf/nan.
        weighted = jnp.where(batch_real[:, None, None, None, None], outputs * weights[None, ..., None], 0.0)

        def body(i, carry):
            return accumulate_window(batch_starts[i], weighted[i], window_weights[i], carry)

        return lax.fori_loop(0, batch_size, body, sums), None

    initial = (jnp.zeros((*padded.shape[:3], num_outputs), jnp.float32),
               jnp.zeros((*padded.shape[:3], 1), jnp.float32))
    batches = (jnp.asarray(starts.reshape(num_batches, batch_size, 3)),
               jnp.asarray(is_real.reshape(num_batches, batch_size)))
    (output_sum, weight_sum), _ = lax.scan(process_batch, initial, batches)
    # Every voxel of the padded volume is covered by at least one window, so weight_sum >= 1e-3 everywhere.
    blended = output_sum / weight_sum
    depth, height, width = volume.shape[:3]
    (d0, _), (h0, _), (w0, _) = padding
    return blended[d0:d0 + depth, h0:h0 + height, w0:w0 + width]
