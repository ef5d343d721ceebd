"""Input degradations of the restoration and synthesis tasks (numpy; they run inside the data-loader workers).

* Through-plane super-resolution: :func:`thick_slice_degrade` simulates slices ``factor`` times thicker and brings
  them back to the original grid, so the network maps a blurred-through-plane volume to the original.
* Distortion correction: :func:`random_displacement` draws a smooth displacement field along the phase-encode axis,
  :func:`distort` applies it like a susceptibility artefact (geometric shift plus intensity pile-up / dilution) and
  :func:`undistort` inverts it when the field is known.
* ADC synthesis: :func:`synthesis_split` picks the input channels and the target channel of a multi-sequence image.

Everything is deterministic: randomness comes only from the ``np.random.Generator`` passed in.
Volumes are channels-last ``(D, H, W)`` or ``(D, H, W, C)``; axis 0 is the slice (through-plane) axis, axis 1 the
rows (anterior-posterior, the usual DWI phase-encode direction), axis 2 the columns.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _float_dtype(dtype) -> np.dtype:
    """float64 stays float64; every other input (float32/16, integers) is processed and returned as float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _as_volume(volume, name: str = "volume") -> np.ndarray:
    array = np.asarray(volume)
    if array.ndim not in (3, 4):
        raise ValueError(f"{name} must be (D, H, W) or (D, H, W, C), got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    return array


# ---------------------------------------------------------------------------------------------------------------
# Through-plane super-resolution
# ---------------------------------------------------------------------------------------------------------------


def thick_slice_degrade(volume, factor: int) -> np.ndarray:
    """Simulate a ``factor``-times thicker slice acquisition and resample it back to the original slice grid.

    1. Thick slices with a box slice profile: ``thick[g] = mean(volume[g*f : (g+1)*f])``, ``G = D / f`` of them.
    2. Thick slice ``g`` is centred at original slice coordinate ``c_g = g*f + (f - 1) / 2``.
    3. Linear interpolation along axis 0 back to ``z = 0..D-1``: ``u = (z - (f - 1) / 2) / f`` in thick-slice
       units, clamped to ``[0, G - 1]`` (the ``(f - 1) / 2`` outermost slices at each end copy the nearest thick
       slice instead of extrapolating).

    In-plane content is untouched (a volume constant along D comes back unchanged); detail along D above the thick
    slices' Nyquist frequency is gone. Returns the input's shape, float32 (float64 stays float64).

    Raises ``ValueError`` (naming the config field ``task.sr_factor``) unless ``factor`` is an int >= 2 dividing D.
    """
    volume = _as_volume(volume)
    depth = volume.shape[0]
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 2:
        raise ValueError(f"task.sr_factor must be an int >= 2 (slice-thickness factor), got {factor!r}")
    if depth % factor:
        raise ValueError(f"task.sr_factor={factor} must divide the number of slices D={depth} "
                         f"(volume shape {volume.shape}); pick a factor of D or crop D to a multiple of it")
    dtype = _float_dtype(volume.dtype)
    groups = depth // factor
    thick = volume.reshape(groups, factor, *volume.shape[1:]).mean(axis=1, dtype=np.float64)
    if groups == 1:
        return np.broadcast_to(thick, volume.shape).astype(dtype)
    position = np.clip((np.arange(depth) - (factor - 1) / 2.0) / factor, 0.0, groups - 1)
    lower = np.minimum(np.floor(position).astype(np.int64), groups - 2)
    fraction = (position - lower).reshape(-1, *([1] * (volume.ndim - 1)))
    resampled = thick[lower] * (1.0 - fraction) + thick[lower + 1] * fraction
    return resampled.astype(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Susceptibility-like distortion along the phase-encode axis
# ---------------------------------------------------------------------------------------------------------------


def _check_axis(axis) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2 (a spatial axis of (D, H, W)), got {axis!r}")
    return int(axis)


def displacement_slope(displacement: np.ndarray, axis: int) -> np.ndarray:
    """``d d / d axis`` by central differences (one-sided at the two ends); the warp's Jacobian is ``1 + slope``."""
    return np.gradient(np.asarray(displacement, dtype=np.float64), axis=axis)


def random_displacement(shape3d: Sequence[int], rng: np.random.Generator, max_shift_voxels: float,
                        smoothness: float, *, axis: int = 1, max_slope: float = 0.5,
                        num_waves: int = 8) -> np.ndarray:
    """A smooth random displacement field (in voxels, along ``axis``) of shape ``shape3d``, float32.

    ``d(r) = s * sum_j a_j cos(2 pi k_j . r + phi_j)`` over ``num_waves`` plane waves with amplitudes
    ``a_j ~ N(0, 1)``, phases ``phi_j ~ U(0, 2 pi)`` and wave vectors (cycles per voxel) with every component
    ``~ U(-1/smoothness, 1/smoothness)``: no component oscillates faster than one period per ``smoothness``
    voxels along any axis. ``s`` first scales the peak ``max |d|`` to ``max_shift_voxels``; if the field is then
    steeper than ``max_slope`` along ``axis`` (central or forward differences), it is scaled down further until
    ``max |d d/d axis| == max_slope``. Hence always ``max |d| <= max_shift_voxels`` and ``|d d/d axis| <= max_slope``
    with ``max_slope < 1``, which keeps the warp ``x -> x + d(x)`` monotone along ``axis`` (no fold-over) so that
    :func:`undistort` can invert it.
    """
    shape3d = tuple(int(n) for n in shape3d)
    if len(shape3d) != 3 or min(shape3d) < 1:
        raise ValueError(f"shape3d must be three positive ints (D, H, W), got {shape3d!r}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not (np.isfinite(max_shift_voxels) and max_shift_voxels >= 0):
        raise ValueError(f"max_shift_voxels must be a finite number >= 0, got {max_shift_voxels!r}")
    if not (np.isfinite(smoothness) and smoothness > 0):
        raise ValueError(f"smoothness must be a positive wavelength in voxels, got {smoothness!r}")
    if not 0 < max_slope < 1:
        raise ValueError(f"max_slope must be in (0, 1) so the warp cannot fold over, got {max_slope!r}")
    if isinstance(num_waves, bool) or not isinstance(num_waves, (int, np.integer)) or num_waves < 1:
        raise ValueError(f"num_waves must be a positive int, got {num_waves!r}")
    axis = _check_axis(axis)

    amplitudes = rng.normal(size=num_waves)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=num_waves)
    wave_vectors = rng.uniform(-1.0 / smoothness, 1.0 / smoothness, size=(num_waves, 3))
    if max_shift_voxels == 0:
        return np.zeros(shape3d, np.float32)
    # cos(k.r + phi) = Re(e^{i phi} e^{i k_z z} e^{i k_y y} e^{i k_x x}): the sum over waves factorises into a
    # (D*H, J) @ (J, W) complex matrix product instead of J full-volume cosines.
    factors = [np.exp(2j * np.pi * wave_vectors[:, a, None] * np.arange(n)[None, :]) for a, n in enumerate(shape3d)]
    depth_rows = (amplitudes * np.exp(1j * phases))[:, None, None] * factors[0][:, :, None] * factors[1][:, None, :]
    field = (depth_rows.reshape(num_waves, -1).T @ factors[2]).real.reshape(shape3d)

    peak = np.abs(field).max()
    if peak == 0:
        return np.zeros(shape3d, np.float32)
    field *= max_shift_voxels / peak
    steepest = _steepest_slope(field, axis)
    if steepest > max_slope:
        field *= max_slope / steepest
    return field.astype(np.float32)


def _steepest_slope(field: np.ndarray, axis: int) -> float:
    """Largest |slope| along ``axis`` by central differences (the Jacobian) and forward differences (monotonicity)."""
    if field.shape[axis] < 2:
        return 0.0
    return float(max(np.abs(displacement_slope(field, axis)).max(), np.abs(np.diff(field, axis=axis)).max()))


def _check_displacement(volume: np.ndarray, displacement, axis: int) -> np.ndarray:
    displacement = np.asarray(displacement, dtype=np.float64)
    if displacement.shape != volume.shape[:3]:
        raise ValueError(f"displacement must have the volume's spatial shape {volume.shape[:3]}, "
                         f"got {displacement.shape}")
    if not np.isfinite(displacement).all():
        raise ValueError("displacement must be finite everywhere")
    if volume.shape[axis] < 2:
        raise ValueError(f"the volume needs at least 2 voxels along axis={axis} to interpolate, got {volume.shape}")
    return displacement


def _expand_for_channels(array: np.ndarray, volume: np.ndarray) -> np.ndarray:
    return array[..., None] if volume.ndim == 4 else array


def distort(volume, displacement, axis: int = 1) -> np.ndarray:
    """Warp ``volume`` by ``displacement`` (voxels along ``axis``) like an EPI susceptibility artefact.

    ``out(x) = volume(x + d(x) e_axis) * max(1 + d d/d axis (x), 0)``: intensities are pulled from ``x + d(x)``
    along the axis with linear interpolation (positions clamped to the first/last voxel, i.e. edge extension), and
    multiplied by the Jacobian of the warp, computed by :func:`displacement_slope`. The Jacobian factor conserves the
    signal along each line (``sum_x out(x) ~= sum_y volume(y)`` for content away from the ends), piling it up where
    the lines are compressed and diluting it where they are stretched. A channel axis is warped with the same field.

    Zero displacement returns the volume exactly. Returns float32 (float64 stays float64).
    """
    volume = _as_volume(volume)
    axis = _check_axis(axis)
    displacement = _check_displacement(volume, displacement, axis)
    length = volume.shape[axis]
    coordinate_shape = [1, 1, 1]
    coordinate_shape[axis] = length
    coordinate = np.arange(length).reshape(coordinate_shape)
    position = np.clip(coordinate + displacement, 0.0, length - 1)
    lower = np.minimum(np.floor(position).astype(np.int64), length - 2)
    dtype = _float_dtype(volume.dtype)
    weight = (position - lower).astype(dtype)
    # Gather whole channel rows with flat indices: voxel x's own flat index moved by (lower - x) steps along axis.
    stride = int(np.prod(volume.shape[axis + 1:3], dtype=np.int64))
    flat_lower = (np.arange(displacement.size).reshape(displacement.shape) + (lower - coordinate) * stride).ravel()
    rows = volume.reshape(displacement.size, -1).astype(dtype, copy=False)
    below, above = rows[flat_lower], rows[flat_lower + stride]
    weight = weight.reshape(-1, 1)
    jacobian = np.maximum(1.0 + displacement_slope(displacement, axis), 0.0).astype(dtype).reshape(-1, 1)
    # (1 - w) a + w b rather than a + w (b - a): exact at w = 0 and w = 1, so a zero field is exactly the identity.
    return ((below * (1 - weight) + above * weight) * jacobian).reshape(volume.shape)


def undistort(distorted, displacement, axis: int = 1) -> np.ndarray:
    """Invert :func:`distort` for a known ``displacement``.

    ``distorted(x) / J(x)`` (``J = 1 + d d/d axis``) is the original sampled at ``f(x) = x + d(x)``. Along every line
    ``f`` is strictly increasing when the forward differences of ``d`` exceed -1, so the original at the grid points
    ``y`` is recovered by piecewise-linear interpolation through the points ``(f(x), distorted(x) / J(x))`` - the
    monotone inverse of the warp (``x(y)`` solving ``x + d(x) = y``) without iterations. Grid points outside
    ``[f(0), f(n - 1)]`` take the nearest end value; content that :func:`distort` pushed past the ends of the axis is
    lost, so the inverse is accurate away from the ends.

    Raises ``ValueError`` when the field folds over (a forward difference ``<= -1`` along ``axis``); fields from
    :func:`random_displacement` never do.
    """
    distorted = _as_volume(distorted, "distorted")
    axis = _check_axis(axis)
    displacement = _check_displacement(distorted, displacement, axis)
    if (np.diff(displacement, axis=axis) <= -1.0).any():
        raise ValueError(f"displacement folds over along axis={axis} (a step d[i+1] - d[i] <= -1), so the warp has "
                         f"no inverse; limit its slope below 1 (random_displacement's max_slope)")
    length = distorted.shape[axis]
    jacobian = 1.0 + displacement_slope(displacement, axis)  # > 0 here: central differences average two steps > -1
    samples = distorted.astype(np.float64) / _expand_for_channels(jacobian, distorted)

    # Work on lines: move the axis last and flatten the others -> (lines, length[, C]).
    sample_points = np.moveaxis(np.arange(length).reshape([length if a == axis else 1 for a in range(3)])
                                + displacement, axis, -1).reshape(-1, length)
    samples = np.moveaxis(samples, axis, 2).reshape(sample_points.shape[0], length, -1)
    num_lines = sample_points.shape[0]

    # One searchsorted over all lines at once: offsetting each line by a multiple of a span larger than its value
    # range keeps the concatenation sorted. Fractions are then computed in local coordinates, so a zero field gives
    # fractions of exactly 0 and the identity.
    low = min(sample_points.min(), 0.0)
    span = max(sample_points.max(), length - 1.0) - low + 2.0
    line_offset = (np.arange(num_lines) * span)[:, None]
    keys = (sample_points - low + line_offset).ravel()
    queries = (np.arange(length, dtype=np.float64)[None, :] - low + line_offset).ravel()
    segment = np.searchsorted(keys, queries, side="right").reshape(num_lines, length) - 1
    segment -= (np.arange(num_lines) * length)[:, None]
    segment = np.clip(segment, 0, length - 2)

    start = np.take_along_axis(sample_points, segment, axis=1)
    end = np.take_along_axis(sample_points, segment + 1, axis=1)
    fraction = np.clip((np.arange(length)[None, :] - start) / (end - start), 0.0, 1.0)[..., None]
    below = np.take_along_axis(samples, segment[..., None], axis=1)
    above = np.take_along_axis(samples, segment[..., None] + 1, axis=1)
    lines = below * (1.0 - fraction) + above * fraction

    spatial = list(distorted.shape[:3])
    moved_shape = [n for a, n in enumerate(spatial) if a != axis] + [length]
    restored = np.moveaxis(lines.reshape(*moved_shape, -1), 2, axis)
    if distorted.ndim == 3:
        restored = restored[..., 0]
    return restored.astype(_float_dtype(distorted.dtype))


# ---------------------------------------------------------------------------------------------------------------
# ADC synthesis
# ---------------------------------------------------------------------------------------------------------------


def synthesis_split(image, channels: Sequence[str] = ("t2", "dwi", "adc"), inputs: Sequence[str] = ("t2", "dwi"),
                    target: str = "adc") -> tuple[np.ndarray, np.ndarray]:
    """Split a multi-sequence image ``(D, H, W, C)`` into network input ``(D, H, W, len(inputs))`` (channels in the
    order of ``inputs``) and target ``(D, H, W, 1)``. ``channels`` names the image's channels in order. The target
    may not also be an input (that would leak the answer). Returns copies in the image's dtype.
    """
    image = np.asarray(image)
    channels, inputs = tuple(channels), tuple(inputs)
    if image.ndim != 4:
        raise ValueError(f"image must be channels-last (D, H, W, C), got shape {image.shape}")
    if len(set(channels)) != len(channels):
        raise ValueError(f"channels must be distinct names, got {channels}")
    if image.shape[-1] != len(channels):
        raise ValueError(f"image has {image.shape[-1]} channels but channels names {len(channels)}: {channels}")
    if not inputs:
        raise ValueError("inputs must name at least one channel")
    unknown = [name for name in inputs if name not in channels]
    if unknown:
        raise ValueError(f"inputs {unknown} are not among the image channels {channels}")
    if len(set(inputs)) != len(inputs):
        raise ValueError(f"inputs must be distinct, got {inputs}")
    if target not in channels:
        raise ValueError(f"target {target!r} is not among the image channels {channels}")
    if target in inputs:
        raise ValueError(f"target {target!r} is also listed in inputs {inputs}; the network would see the answer")
    input_index = [channels.index(name) for name in inputs]
    target_index = channels.index(target)
    return image[..., input_index], image[..., target_index:target_index + 1].copy()
