"""The training augmentations of the upstream repositories, re-implemented in numpy (`data.augment.pipeline`).

* `upstream_profound`: pipiwang/ProFound (branch `demo`, `dataset/dataset_seg.py::get_transforms`, MONAI 1.5.0),
  after the intensity normalisation (done at preprocessing here), in this order:
  RandRotate (p 0.3, angle U(-30°, 30°) in the H-W plane, `keep_size=False`: the volume grows to hold the rotated
  one, bilinear / nearest, border padding) -> RandZoom (p 0.3, factors (1, U(0.9, 1.1), U(0.9, 1.1)),
  trilinear / nearest, `keep_size`: centre crop or edge padding back to the size) -> SpatialPad to
  round(1.2 * crop) (symmetric, zeros) -> RandSpatialCrop (uniform start) -> RandFlip W (p 0.5) ->
  RandScaleIntensity (p 0.8, x (1 + U(-0.1, 0.1)), one factor for all channels) -> RandShiftIntensity (p 0.8,
  + U(-0.1, 0.1)) -> RandBiasField (p 0.2, degree 3, coefficients U(0, 0.1)) -> RandGaussianSmooth (p 1.0,
  sigma per axis U(0.25, 1.5), erf kernel, zero padding). Image and masks share the geometry; masks are nearest.
* `upstream_provicnet`: pimed/ProViCNet (`util_functions/Prostate_DataGenerator.py`, albumentations 1.4.7 with
  OpenCV), the centre crop (upstream has no random crop: its volumes are prepared prostate-centred), every channel
  z-scored in the gland (upstream augments after this normalisation) and then, on every axial slice independently:
  ElasticTransform (p 0.3; alpha 0.2, sigma 15, alpha_affine 15: a random affine moving three control points by
  up to 15 pixels, then a displacement field of ~0.005 pixel that OpenCV 4's 1/32-pixel positions round away) ->
  RandomBrightnessContrast (p 0.3; x (1 + U(-0.2, 0.2)) + U(-0.2, 0.2), then clipped to [0, 1] as albumentations
  does for float images) -> GaussNoise (p 0.3; variance U(0, 15), per pixel and channel) -> Affine (p 0.3; the
  code passes `shear=2`, which albumentations 1.4.7 turns into a fixed 2° shear on both axes, not a range) ->
  GaussianBlur (p 0.3; kernel 1 (identity) or 3 (1/4, 1/2, 1/4), 1 : 2). A slice's channels are one
  multi-channel image: same geometry and brightness, independent noise; nothing mixes neighbouring slices.

Every random draw comes from the per-element generator the grain pipeline passes, in transform order, so a seed
fixes the result. Transforms that are not drawn cost nothing. The geometry of `upstream_profound` is evaluated
only where the crop needs it: RandRotate and RandZoom act on every slice alike (the zoom factor along D is 1,
i.e. the identity), so the crop's slices are picked first, and the rotated image is computed only at the rows and
columns the zoom reads; the values are those of the full sequential transforms (tests check this).

Sampling follows the libraries, not only their documentation: OpenCV 4's fixed-point positions (1/32 pixel for
bilinear; OpenCV 5 no longer rounds), MONAI's pixel-centre grids. `tests/fixtures/augment/` holds their outputs
(scripts/make_augment_fixtures.py). Known differences from upstream: the crop is taken inside the stored region
(`region_margin`, placed by `data.region_centre`) rather than anywhere in the whole volume; MONAI resamples in
float32 through a normalised grid (here float64 positions: differences ~1e-5); the random streams differ (torch /
numpy / Python `random` upstream).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import ndimage, special

from transfer_jax.data.augment import MASK_KEYS, center_crop, center_start
from transfer_jax.data.slices import zscore_in_gland

# ---------------------------------------------------------------------------------------------------------------
# 1-D sampling rules (torch.nn.functional.interpolate, OpenCV borders)
# ---------------------------------------------------------------------------------------------------------------


def _interpolate_taps(in_size: int, out_size: int, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch `interpolate(..., align_corners=False, recompute_scale_factor=True)` along one axis.

    Returns (low, high, weight of high): linear (order 1) takes src = max((o + 0.5) * in / out - 0.5, 0) and its
    two neighbours (the upper one clamped to the edge); nearest (order 0) takes floor(o * in / out).
    """
    out = np.arange(out_size, dtype=np.float64)
    scale = in_size / out_size
    if order == 0:
        index = np.minimum(np.floor(out * scale).astype(np.int64), in_size - 1)
        return index, index, np.zeros(out_size)
    src = np.maximum((out + 0.5) * scale - 0.5, 0.0)
    low = np.floor(src).astype(np.int64)
    return low, np.minimum(low + 1, in_size - 1), src - low


def _pad_or_crop_index(size: int, target: int) -> np.ndarray:
    """MONAI `ResizeWithPadOrCrop(mode="edge")` along one axis: index into the input for every output position
    (the centre crop and symmetric padding of `center_start`; padded positions repeat the edge voxel)."""
    return np.clip(np.arange(target) + center_start(size, target), 0, size - 1)


def _reflect101(index: np.ndarray, size: int) -> np.ndarray:
    """OpenCV BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba) for integer indices."""
    if size == 1:
        return np.zeros_like(index)
    if index.min(initial=0) >= 0 and index.max(initial=0) < size:
        return index
    period = 2 * (size - 1)
    index = np.abs(index) % period
    return np.where(index >= size, period - index, index)


# ---------------------------------------------------------------------------------------------------------------
# MONAI transforms (3-D, channels-last image (D, H, W, C), masks (D, H, W))
# ---------------------------------------------------------------------------------------------------------------


def rotated_shape(shape: tuple[int, int, int], angle: float) -> tuple[int, int, int]:
    """MONAI `Rotate(keep_size=False)` output shape for a rotation about axis 0: the box that holds the rotated
    [0, H] x [0, W] rectangle, each side rounded half up."""
    depth, height, width = shape
    cos, sin = abs(math.cos(angle)), abs(math.sin(angle))
    return depth, int(height * cos + width * sin + 0.5), int(height * sin + width * cos + 0.5)


def _rotation_source(shape, out_shape, angle: float, rows: np.ndarray, cols: np.ndarray):
    """Source (row, col) positions [len(rows), len(cols)] of output grid points, MONAI `Rotate` with
    `create_rotate(3, (angle, 0, 0))`: i = c_in + R (o - c_out), c = (size - 1) / 2, R = [[cos, -sin], [sin, cos]]
    on (H, W); border padding clamps the positions to the image."""
    cos, sin = math.cos(angle), math.sin(angle)
    r = rows[:, None] - (out_shape[1] - 1) / 2.0
    c = cols[None, :] - (out_shape[2] - 1) / 2.0
    y = np.clip((shape[1] - 1) / 2.0 + cos * r - sin * c, 0.0, shape[1] - 1)
    x = np.clip((shape[2] - 1) / 2.0 + sin * r + cos * c, 0.0, shape[2] - 1)
    return y, x


def _gather_plane(volume: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """volume[:, y, x] for integer index grids y, x of one shape, every slice (and trailing channel) alike."""
    flat = volume.reshape((volume.shape[0], volume.shape[1] * volume.shape[2]) + volume.shape[3:])
    out = np.take(flat, (y * volume.shape[2] + x).ravel(), axis=1)
    return out.reshape((volume.shape[0],) + y.shape + volume.shape[3:])


def _rotated_grid(volume: np.ndarray, angle: float, out_shape, rows: np.ndarray, cols: np.ndarray,
                  order: int) -> np.ndarray:
    """The MONAI-rotated volume (full output shape `out_shape`) at the grid rows x cols only."""
    y, x = _rotation_source(volume.shape, out_shape, angle, rows, cols)
    if order == 0:  # grid_sample "nearest" rounds half to even
        return _gather_plane(volume, np.rint(y).astype(np.int64), np.rint(x).astype(np.int64))
    y0, x0 = np.floor(y).astype(np.int64), np.floor(x).astype(np.int64)
    y1, x1 = np.minimum(y0 + 1, volume.shape[1] - 1), np.minimum(x0 + 1, volume.shape[2] - 1)
    wy, wx = (y - y0).astype(np.float32), (x - x0).astype(np.float32)
    extra = (None,) * (volume.ndim - 3)
    wy, wx = wy[(None, ...) + extra], wx[(None, ...) + extra]
    top = _gather_plane(volume, y0, x0) * (1 - wx) + _gather_plane(volume, y0, x1) * wx
    bottom = _gather_plane(volume, y1, x0) * (1 - wx) + _gather_plane(volume, y1, x1) * wx
    return (top * (1 - wy) + bottom * wy).astype(np.float32)


def rotate(volume: np.ndarray, angle: float, order: int) -> np.ndarray:
    """MONAI `Rotate(angle=(angle, 0, 0), keep_size=False, padding_mode="border", align_corners=False)`: a
    rotation in the H-W plane; order 1 = bilinear (float32 out), 0 = nearest (dtype kept)."""
    out_shape = rotated_shape(volume.shape[:3], angle)
    return _rotated_grid(volume, angle, out_shape, np.arange(out_shape[1]), np.arange(out_shape[2]), order)


def _zoom_axis(size: int, factor: float, order: int):
    """Taps of MONAI `Zoom(keep_size=True, padding_mode="edge")` along one axis: (low, high, weight) per output."""
    zoomed = int(math.floor(float(size) * factor))
    low, high, weight = _interpolate_taps(size, zoomed, order)
    index = _pad_or_crop_index(zoomed, size)
    return low[index], high[index], weight[index]


def _take(volume: np.ndarray, index: np.ndarray, axis: int) -> np.ndarray:
    """np.take, as a view when the indices are a run of step +-1 (crops and flips without resampling)."""
    if index.size > 1 and abs(index[1] - index[0]) == 1 and np.all(np.diff(index) == index[1] - index[0]):
        step = int(index[1] - index[0])
        stop = int(index[-1]) + step
        window = slice(int(index[0]), None if stop < 0 else stop, step)
        return volume[(slice(None),) * axis + (window,)]
    return np.take(volume, index, axis=axis)


def _resample_axis(volume: np.ndarray, axis: int, low, high, weight, order: int) -> np.ndarray:
    """Linear (order 1) or nearest (0, reads `low`) resampling along one axis from per-output taps."""
    if order == 0 or not np.any(weight):
        return _take(volume, low, axis)
    out = np.take(volume, low, axis=axis)
    shape = [1] * volume.ndim
    shape[axis] = -1
    weight = weight.astype(np.float32).reshape(shape)
    out *= 1 - weight
    out += np.take(volume, high, axis=axis) * weight
    return out


def zoom(volume: np.ndarray, factors, order: int) -> np.ndarray:
    """MONAI `Zoom(zoom=factors, keep_size=True, padding_mode="edge")` (trilinear for order 1, nearest for 0):
    torch interpolation to floor(size * factor), then centre crop or edge padding back to the size. Separable."""
    out = volume if order == 0 else volume.astype(np.float32)
    for axis, factor in enumerate(factors):
        if factor != 1.0:
            out = _resample_axis(out, axis, *_zoom_axis(volume.shape[axis], factor, order), order)
    return out


def bias_field(shape: tuple[int, int, int], coefficients: np.ndarray, degree: int = 3) -> np.ndarray:
    """MONAI `RandBiasField._generate_random_field` in 3-D: sum over i + j + k <= degree of c_ijk P_i P_j P_k
    (Legendre polynomials on linspace(-1, 1) per axis, terms in MONAI's loop order i, j, k), float64."""
    terms = [(i, j, k) for i in range(degree + 1) for j in range(degree + 1 - i) for k in range(degree + 1 - i - j)]
    if len(coefficients) != len(terms):
        raise ValueError(f"bias_field: degree {degree} needs {len(terms)} coefficients, got {len(coefficients)}")
    grid = np.zeros((degree + 1,) * 3)
    for (i, j, k), value in zip(terms, coefficients):
        grid[i, j, k] = value
    polys = [np.polynomial.legendre.legvander(np.linspace(-1.0, 1.0, n, dtype=np.float32).astype(np.float64),
                                              degree) for n in shape]
    return np.einsum("ijk,ai,bj,ck->abc", grid, *polys, optimize=True)


def gaussian_kernel_erf(sigma: float, truncated: float = 4.0) -> np.ndarray:
    """MONAI `gaussian_1d(approx="erf")`: the Gaussian integrated over each unit bin, +-int(max(4 sigma, 0.5) +
    0.5) taps, not renormalised."""
    tail = int(max(float(sigma) * truncated, 0.5) + 0.5)
    x = np.arange(-tail, tail + 1, dtype=np.float64)
    t = 0.70710678 / abs(sigma)
    return np.clip(0.5 * (special.erf(t * (x + 0.5)) - special.erf(t * (x - 0.5))), 0.0, None)


def gaussian_smooth(image: np.ndarray, sigmas) -> np.ndarray:
    """MONAI `GaussianSmooth(sigma, approx="erf")`: separable erf kernels along D, H, W, zero padding."""
    out = image.astype(np.float32)
    for axis, sigma in enumerate(sigmas):
        out = ndimage.correlate1d(out, gaussian_kernel_erf(sigma).astype(np.float32), axis=axis, mode="constant",
                                  cval=0.0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# upstream_profound
# ---------------------------------------------------------------------------------------------------------------

PROFOUND = dict(rotate_p=0.3, rotate_range=math.radians(30.0), zoom_p=0.3, zoom_range=(0.9, 1.1), pad_factor=1.2,
                flip_p=0.5, scale_p=0.8, scale=0.1, shift_p=0.8, shift=0.1, bias_p=0.2, bias_degree=3,
                bias_range=(0.0, 0.1), smooth_p=1.0, smooth_sigma=(0.25, 1.5))


def _bias_coefficient_count(degree: int) -> int:
    return int(np.prod([(degree + k) / k for k in range(1, 4)]))


def profound_params(region: tuple[int, int, int], crop_size: tuple[int, int, int], rng: np.random.Generator,
                    p: dict = PROFOUND) -> dict:
    """Draw every random choice of the ProFound pipeline, in transform order (None = transform not applied)."""
    angle = rng.uniform(-p["rotate_range"], p["rotate_range"]) if rng.random() < p["rotate_p"] else None
    factors = (1.0, *rng.uniform(*p["zoom_range"], 2)) if rng.random() < p["zoom_p"] else None
    shape = region if angle is None else rotated_shape(region, angle)
    padded = tuple(max(s, int(round(c * p["pad_factor"]))) for s, c in zip(shape, crop_size))
    start = tuple(int(rng.integers(0, s - c + 1)) for s, c in zip(padded, crop_size))
    flip = bool(rng.random() < p["flip_p"])
    scale = rng.uniform(-p["scale"], p["scale"]) if rng.random() < p["scale_p"] else None
    shift = rng.uniform(-p["shift"], p["shift"]) if rng.random() < p["shift_p"] else None
    bias = (rng.uniform(*p["bias_range"], _bias_coefficient_count(p["bias_degree"]))
            if rng.random() < p["bias_p"] else None)
    sigmas = tuple(rng.uniform(*p["smooth_sigma"], 3)) if rng.random() < p["smooth_p"] else None
    return dict(angle=angle, factors=factors, shape=shape, padded=padded, start=start, flip=flip, scale=scale,
                shift=shift, bias=bias, bias_degree=p["bias_degree"], sigmas=sigmas)


def _profound_geometry(volume: np.ndarray, params: dict, crop_size, order: int) -> np.ndarray:
    """Rotate -> zoom -> pad -> crop -> flip of one array, evaluated on the crop only (see the module docstring)."""
    shape, padded, start = params["shape"], params["padded"], params["start"]
    maps = []  # per axis: (valid output positions, low, high, weight) into the rotated (= zoomed) grid
    for axis in range(3):
        position = start[axis] + np.arange(crop_size[axis]) - (padded[axis] - shape[axis]) // 2
        if axis == 2 and params["flip"]:
            position = position[::-1]
        valid = (position >= 0) & (position < shape[axis])
        position = np.clip(position, 0, shape[axis] - 1)
        factor = 1.0 if params["factors"] is None else params["factors"][axis]
        if factor == 1.0:
            maps.append((valid, position, position, np.zeros(position.size)))
        else:
            low, high, weight = _zoom_axis(shape[axis], factor, order)
            maps.append((valid, low[position], high[position], weight[position]))
    (d_valid, d_index, _, _), h_map, w_map = maps
    volume = _take(volume, d_index, 0)
    if params["angle"] is None:  # separable: resample H, then W
        out = _resample_axis(volume, 1, *h_map[1:], order)
        out = np.array(_resample_axis(out, 2, *w_map[1:], order))  # a copy: never a view of the input
    else:  # the rotated image at the rows and columns the zoom reads, then the zoom
        rows, row_pos = np.unique(np.concatenate([h_map[1], h_map[2]]), return_inverse=True)
        cols, col_pos = np.unique(np.concatenate([w_map[1], w_map[2]]), return_inverse=True)
        grid = _rotated_grid(volume, params["angle"], shape, rows, cols, order)
        n_h, n_w = crop_size[1], crop_size[2]
        out = _resample_axis(grid, 1, row_pos[:n_h], row_pos[n_h:], h_map[3], order)
        out = _resample_axis(out, 2, col_pos[:n_w], col_pos[n_w:], w_map[3], order)
    if not (d_valid.all() and h_map[0].all() and w_map[0].all()):  # SpatialPad's zeros
        keep = d_valid[:, None, None] & h_map[0][None, :, None] & w_map[0][None, None, :]
        out = np.where(keep if out.ndim == 3 else keep[..., None], out, np.zeros((), out.dtype))
    return out.astype(np.float32, copy=False) if order == 1 else out.astype(volume.dtype, copy=False)


def profound_intensity(image: np.ndarray, params: dict) -> np.ndarray:
    """RandScaleIntensity -> RandShiftIntensity -> RandBiasField -> RandGaussianSmooth with drawn parameters."""
    if params["scale"] is not None:
        image = image * np.float32(1.0 + params["scale"])
    if params["shift"] is not None:
        image = image + np.float32(params["shift"])
    if params["bias"] is not None:
        field = np.exp(bias_field(image.shape[:3], params["bias"], params["bias_degree"]))
        image = (image * field[..., None]).astype(np.float32)
    if params["sigmas"] is not None:
        image = gaussian_smooth(image, params["sigmas"])
    return image.astype(np.float32, copy=False)


def upstream_profound(sample: dict, crop_size: tuple[int, int, int], rng: np.random.Generator,
                      p: dict = PROFOUND) -> dict:
    """ProFound's fine-tuning augmentation (segmentation train transforms) of a prepared sample."""
    params = profound_params(sample["image"].shape[:3], tuple(crop_size), rng, p)
    out = dict(sample)
    out["image"] = profound_intensity(_profound_geometry(sample["image"], params, crop_size, order=1), params)
    for key in MASK_KEYS:
        if sample.get(key) is not None:
            out[key] = _profound_geometry(sample[key], params, crop_size, order=0)
    return out


# ---------------------------------------------------------------------------------------------------------------
# albumentations transforms (one 2-D slice: image (H, W, C) float32, masks (H, W))
# ---------------------------------------------------------------------------------------------------------------

BORDER_CONSTANT, BORDER_REFLECT_101 = "constant", "reflect_101"


def _border_taps(y: np.ndarray, x: np.ndarray, height: int, width: int, border: str):
    """Flat indices of integer taps and, for BORDER_CONSTANT, whether each lies inside (else None)."""
    if border == BORDER_REFLECT_101:
        return _reflect101(y, height) * width + _reflect101(x, width), None
    inside = (y >= 0) & (y < height) & (x >= 0) & (x < width)
    return np.clip(y, 0, height - 1) * width + np.clip(x, 0, width - 1), inside


def remap_plan(map_y: np.ndarray, map_x: np.ndarray, shape: tuple[int, int], order: int, border: str) -> list:
    """The taps of OpenCV `remap` (out[r, c] = image[map_y[r, c], map_x[r, c]]) on an image of `shape` (H, W):
    [(flat index, inside or None, weight or None), ...], shared by every image sampled along the same map.

    Bilinear (order 1) positions are rounded to 1/32 pixel (OpenCV 4's INTER_TAB_SIZE); nearest (0) rounds half
    to even. Taps outside the image are reflected (BORDER_REFLECT_101) or 0 (BORDER_CONSTANT).
    """
    if order == 0:
        return _nearest_plan(np.rint(map_y).astype(np.int64), np.rint(map_x).astype(np.int64), shape, border)
    return _bilinear_plan(np.rint(map_y * 32.0).astype(np.int64), np.rint(map_x * 32.0).astype(np.int64), shape,
                          border)


def _nearest_plan(y: np.ndarray, x: np.ndarray, shape, border: str) -> list:
    return [_border_taps(y, x, shape[0], shape[1], border) + (None,)]


def _bilinear_plan(qy: np.ndarray, qx: np.ndarray, shape, border: str) -> list:
    """Taps of positions given in 1/32 pixel; taps of zero weight are dropped."""
    y0, x0 = qy >> 5, qx >> 5
    wy, wx = (qy & 31) / 32.0, (qx & 31) / 32.0
    plan = []
    for dy, weight_y in ((0, 1 - wy), (1, wy)):
        for dx, weight_x in ((0, 1 - wx), (1, wx)):
            weight = weight_y * weight_x
            if np.any(weight):
                plan.append(_border_taps(y0 + dy, x0 + dx, shape[0], shape[1], border) + (weight.astype(np.float32),))
    return plan


def warp_affine_plan(shape: tuple[int, int], matrix: np.ndarray, order: int, border: str) -> list:
    """The taps of OpenCV 4 `warpAffine(matrix)` on an image of `shape` (matrix: 2 x 3, source (x, y) ->
    destination (x, y), x = column): the inverse map in OpenCV's fixed point (1/1024 pixel per row and column
    term, rounded half to even, summed, then cut to 1/32 pixel for bilinear or to whole pixels for nearest)."""
    inverse = np.linalg.inv(np.vstack([matrix, [0.0, 0.0, 1.0]]))
    rows, cols = np.arange(shape[0], dtype=np.float64)[:, None], np.arange(shape[1], dtype=np.float64)[None, :]
    delta = 512 if order == 0 else 16
    x = np.rint((inverse[0, 1] * rows + inverse[0, 2]) * 1024).astype(np.int64) + delta \
        + np.rint(inverse[0, 0] * cols * 1024).astype(np.int64)
    y = np.rint((inverse[1, 1] * rows + inverse[1, 2]) * 1024).astype(np.int64) + delta \
        + np.rint(inverse[1, 0] * cols * 1024).astype(np.int64)
    if order == 0:
        return _nearest_plan(y >> 10, x >> 10, shape, border)
    return _bilinear_plan(y >> 5, x >> 5, shape, border)


def apply_plan(image: np.ndarray, plan: list) -> np.ndarray:
    """Sample an (H, W) or (H, W, C) image along a `remap_plan` (float32 for bilinear, the dtype for nearest)."""
    flat = image.reshape((image.shape[0] * image.shape[1],) + image.shape[2:])
    out = None
    for index, inside, weight in plan:
        values = np.take(flat, index, axis=0)
        if inside is not None:
            values = np.where(inside if values.ndim == 2 else inside[..., None], values, np.zeros((), image.dtype))
        if weight is None:
            return values
        term = values * (weight if values.ndim == 2 else weight[..., None])
        out = term if out is None else out + term
    return out.astype(np.float32, copy=False)


def remap(image: np.ndarray, map_y: np.ndarray, map_x: np.ndarray, order: int, border: str) -> np.ndarray:
    """OpenCV `remap` of one image (see `remap_plan`)."""
    return apply_plan(image, remap_plan(map_y, map_x, image.shape[:2], order, border))


def warp_affine(image: np.ndarray, matrix: np.ndarray, order: int, border: str) -> np.ndarray:
    """OpenCV `warpAffine(image, matrix)` (see `warp_affine_plan`)."""
    return apply_plan(image, warp_affine_plan(image.shape[:2], matrix, order, border))


def affine_from_points(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """OpenCV `getAffineTransform`: the 2 x 3 matrix taking three (x, y) points onto three others."""
    design = np.hstack([source, np.ones((3, 1))])
    return np.linalg.solve(design, target).T


def elastic_matrix(height: int, width: int, jitter: np.ndarray) -> np.ndarray:
    """ElasticTransform's random affine: three points around the centre moved by `jitter` (3 x 2). As upstream
    writes them, the points are built from (height, width) and read by OpenCV as (x, y)."""
    centre = np.array((height, width), dtype=np.float32) // 2
    half = min(height, width) // 3
    source = np.array([centre + half, [centre[0] + half, centre[1] - half], centre - half], dtype=np.float32)
    target = source + jitter.astype(np.float32)
    return affine_from_points(source.astype(np.float64), target.astype(np.float64))


def elastic_displacement(noise: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """`gaussian_filter(U(-1, 1) noise, sigma) * alpha` (scipy defaults: reflect border, truncate 4) as float32."""
    return np.float32(ndimage.gaussian_filter(noise, sigma) * alpha)


def elastic(image: np.ndarray, masks: list[np.ndarray], matrix: np.ndarray, dx: np.ndarray,
            dy: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """albumentations 1.4.7 `elastic_transform`: warpAffine by `matrix`, then remap by (x + dx, y + dy), both with
    BORDER_REFLECT_101; bilinear for the image, nearest for the masks."""
    shape = image.shape[:2]
    rows, cols = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    map_y, map_x = (rows + dy).astype(np.float32), (cols + dx).astype(np.float32)
    for linear, nearest in ((warp_affine_plan(shape, matrix, 1, BORDER_REFLECT_101),
                             warp_affine_plan(shape, matrix, 0, BORDER_REFLECT_101)),
                            (remap_plan(map_y, map_x, shape, 1, BORDER_REFLECT_101),
                             remap_plan(map_y, map_x, shape, 0, BORDER_REFLECT_101))):
        image = apply_plan(image, linear)
        masks = [apply_plan(m, nearest) for m in masks]
    return image, masks


def brightness_contrast(image: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """RandomBrightnessContrast on float32 (brightness_by_max: max value 1.0): image * alpha + beta, clipped to
    [0, 1] (albumentations' `clipped` wrapper)."""
    return np.clip(image * np.float32(alpha) + np.float32(beta), 0.0, 1.0).astype(np.float32)


def shear_matrix(height: int, width: int, degrees: float) -> np.ndarray:
    """albumentations 1.4.7 `Affine(shear=degrees, rotate=0, scale=None, translate_percent=None)`: x and y shear
    both equal to `degrees` (negated as the code does), composed through skimage about the pixel centre; 2 x 3."""
    t = math.tan(math.radians(degrees))
    linear = np.array([[1.0 - t * t, t], [-t, 1.0]])  # x-shear @ (rot(90) @ y-shear @ rot(-90))
    centre = np.array([width / 2 - 0.5, height / 2 - 0.5])
    return np.hstack([linear, (centre - linear @ centre)[:, None]])


def blur3(image: np.ndarray) -> np.ndarray:
    """OpenCV `GaussianBlur(ksize=3, sigma=0)`: the fixed kernel (1/4, 1/2, 1/4) on both axes, BORDER_REFLECT_101."""
    kernel = np.array([0.25, 0.5, 0.25], np.float32)
    out = ndimage.correlate1d(image, kernel, axis=0, mode="mirror")  # scipy "mirror" = OpenCV REFLECT_101
    return ndimage.correlate1d(out, kernel, axis=1, mode="mirror").astype(np.float32)


PROVICNET = dict(elastic_p=0.3, elastic_alpha=0.2, elastic_sigma=15.0, elastic_affine=15.0, contrast_p=0.3,
                 brightness=0.2, contrast=0.2, noise_p=0.3, noise_var=(0.0, 15.0), shear_p=0.3, shear=2.0,
                 blur_p=0.3, blur_limit=(1, 3))


def _blur_kernel_size(rng: np.random.Generator, low: int, high: int) -> int:
    """GaussianBlur's draw: randrange(low, high + 1); an even size becomes (size + 1) % (high + 1)."""
    size = int(rng.integers(low, high + 1))
    return (size + 1) % (high + 1) if size != 0 and size % 2 != 1 else size


def provicnet_params(shape: tuple[int, int], rng: np.random.Generator, p: dict = PROVICNET) -> dict:
    """Draw every random choice of ProViCNet's Compose for one (H, W) slice, in transform order (None = not
    applied; blur: the kernel size, 1 being the identity)."""
    height, width = shape
    params = dict.fromkeys(("elastic", "contrast", "noise", "shear", "blur"))
    if rng.random() < p["elastic_p"]:
        jitter = rng.uniform(-p["elastic_affine"], p["elastic_affine"], (3, 2))
        noise = [rng.random((height, width)) * 2 - 1 for _ in range(2)]
        params["elastic"] = (elastic_matrix(height, width, jitter),
                             *(elastic_displacement(n, p["elastic_alpha"], p["elastic_sigma"]) for n in noise))
    if rng.random() < p["contrast_p"]:
        params["contrast"] = (1.0 + rng.uniform(-p["contrast"], p["contrast"]),
                              rng.uniform(-p["brightness"], p["brightness"]))
    if rng.random() < p["noise_p"]:
        params["noise"] = rng.uniform(*p["noise_var"]) ** 0.5
    if rng.random() < p["shear_p"]:
        params["shear"] = shear_matrix(height, width, p["shear"])
    if rng.random() < p["blur_p"]:
        params["blur"] = _blur_kernel_size(rng, *p["blur_limit"])
    return params


def provicnet_slice(image: np.ndarray, masks: list[np.ndarray], params: dict,
                    rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """Apply drawn `provicnet_params` to one slice (image (H, W, C), masks (H, W)); `rng` draws the noise."""
    if params["elastic"] is not None:
        image, masks = elastic(image, masks, *params["elastic"])
    if params["contrast"] is not None:
        image = brightness_contrast(image, *params["contrast"])
    if params["noise"] is not None:
        image = (image + rng.normal(0.0, params["noise"], image.shape)).astype(np.float32)
    if params["shear"] is not None:
        image = warp_affine(image, params["shear"], 1, BORDER_CONSTANT)
        nearest = warp_affine_plan(image.shape[:2], params["shear"], 0, BORDER_CONSTANT)
        masks = [apply_plan(m, nearest) for m in masks]
    if params["blur"] == 3:
        image = blur3(image)
    return image, masks


def zscore_channels_in_gland(image: np.ndarray, gland: np.ndarray | None) -> np.ndarray:
    """Every channel z-scored with the mean / std of its gland voxels (upstream's normalisation, which precedes
    its augmentation); unchanged without gland voxels (or with a constant gland). float32, a new array."""
    if gland is None or not np.any(gland == 1):
        return image.astype(np.float32, copy=True)
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[-1]):
        try:
            out[..., c] = zscore_in_gland(image[..., c], gland)
        except ValueError:  # constant inside the gland
            out[..., c] = image[..., c]
    return out


def upstream_provicnet(sample: dict, crop_size: tuple[int, int, int], rng: np.random.Generator,
                       p: dict = PROVICNET) -> dict:
    """ProViCNet's training augmentation: the centre crop, z-scored in the gland as upstream does before it
    augments (so that the [0, 1] clip and the noise act on the same scale), then every axial slice on its own.
    A task that z-scores in the gland afterwards (the ProViCNet tasks) re-standardises the augmented volume."""
    out = center_crop(sample, tuple(crop_size))
    keys = [k for k in MASK_KEYS if out.get(k) is not None]
    image = zscore_channels_in_gland(out["image"], out.get("gland"))
    masks = {k: out[k].copy() for k in keys}
    for d in range(image.shape[0]):
        params = provicnet_params(image.shape[1:3], rng, p)
        image[d], slice_masks = provicnet_slice(image[d], [masks[k][d] for k in keys], params, rng)
        for k, m in zip(keys, slice_masks):
            masks[k][d] = m
    out["image"] = image
    out.update(masks)
    return out


PIPELINES: dict[str, Callable[[dict, tuple[int, int, int], np.random.Generator], dict]] = {
    "upstream_profound": upstream_profound,
    "upstream_provicnet": upstream_provicnet,
}
