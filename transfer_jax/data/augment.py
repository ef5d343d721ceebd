"""Crops and augmentations on prepared cases (numpy, per sample, run inside grain workers).

A sample is a dict: `image` (D, H, W, C) float32 plus optional `gland` / `lesion` (D, H, W) uint8 masks and
scalar fields. Spatial transforms move the image and the masks together (linear for images, nearest for masks)
and record in `slice_coordinate` (D,) float32 where along the stored region's slices each output slice was sampled
(the slice models' position inputs count from the volume's first slice: `data/slices.py:crop_positions`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

MASK_KEYS = ("gland", "lesion")
# "ours": `random_crop` with the fields below; the others: the upstream pipelines of `augment_upstream.py`, which
# use none of the fields (and refuse changed ones).
PIPELINES = ("ours", "upstream_profound", "upstream_provicnet")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    pipeline: str = "ours"
    zoom: float = 0.1  # isotropic scale factor drawn from U(1 - zoom, 1 + zoom)
    translate: float = 0.1  # centre shift, as a fraction of the crop size, drawn per axis from U(-t, t)
    flip_axes: tuple[int, ...] = (2,)  # spatial axes (0=D, 1=H, 2=W) flipped with probability 1/2 each
    intensity_scale: float = 0.1  # per channel x (1 + U(-s, s))
    intensity_shift: float = 0.1  # per channel + U(-s, s)

    def __post_init__(self):
        if self.pipeline not in PIPELINES:
            raise ValueError(f"data.augment.pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if self.pipeline != "ours":
            changed = [f.name for f in dataclasses.fields(self)
                       if f.name != "pipeline" and getattr(self, f.name) != f.default]
            if changed:
                raise ValueError(f"data.augment.{', '.join(changed)} set, but pipeline {self.pipeline!r} uses none "
                                 "of the `ours` fields: leave them at their defaults")


def center_start(size: int, roi: int) -> int:
    """Start of a centred window of `roi` in `size` voxels, as MONAI `CenterSpatialCrop` (`Crop.compute_slices`)
    places it: centre size // 2, start centre - roi // 2. It differs from floor((size - roi) / 2) when `size` is
    even and `roi` odd (one voxel later), and from rounding half to even whenever size - roi is odd. An axis
    shorter than `roi` is kept whole and `SpatialPad` (symmetric) puts (roi - size) // 2 zeros before it: the
    window starts that far before the volume."""
    if size < roi:
        return -((roi - size) // 2)
    return size // 2 - roi // 2


def center_crop(sample: dict, crop_size: tuple[int, int, int]) -> dict:
    """The deterministic evaluation view: the crop at the centre of the stored region, placed
    as MONAI's `CenterSpatialCrop` places it (`center_start`)."""
    region = sample["image"].shape[:3]
    if any(r < c for r, c in zip(region, crop_size)):
        raise ValueError(f"crop {crop_size} is larger than the stored region {region}")
    start = [center_start(r, c) for r, c in zip(region, crop_size)]
    window = tuple(slice(s, s + c) for s, c in zip(start, crop_size))
    out = dict(sample)
    out["image"] = np.ascontiguousarray(sample["image"][window])
    out["slice_coordinate"] = np.arange(start[0], start[0] + crop_size[0], dtype=np.float32)
    for key in MASK_KEYS:
        if sample.get(key) is not None:
            out[key] = np.ascontiguousarray(sample[key][window])
    return out


def _axis_sampling(size: int, coords: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Source indices and weights along one axis, as `scipy.ndimage.affine_transform(mode="constant", cval=0)`.

    Points outside [0, size - 1] are cval; inside, order 1 blends the two neighbours (a neighbour past the edge
    weighs nothing) and order 0 takes the nearest, halves rounding up. Returns (low, high, weight of high) for
    order 1 and (index, inside, None) for order 0.
    """
    inside = (coords >= 0.0) & (coords <= size - 1)
    if order == 0:
        return np.clip(np.floor(coords + 0.5).astype(np.int64), 0, size - 1), inside, None
    low = np.floor(coords)
    frac = coords - low
    low = low.astype(np.int64)
    w_low = np.where(inside, 1.0 - frac, 0.0)
    w_high = np.where(inside & (low + 1 <= size - 1), frac, 0.0)
    return np.clip(low, 0, size - 1), np.minimum(low + 1, size - 1), np.stack([w_low, w_high])


def axis_aligned_warp(volume: np.ndarray, scale: np.ndarray, offset: np.ndarray, output_shape: tuple[int, ...],
                      order: int) -> np.ndarray:
    """`output[o] = volume[offset + scale * o]` over the first len(output_shape) axes (trailing axes ride along).

    The same samples as `ndimage.affine_transform` with the diagonal matrix `scale` (order 0 or 1, constant 0
    outside, no prefilter), computed one axis at a time: an axis-aligned map is separable, which makes it several
    times cheaper than the general 3-D interpolation for the crops of every training step
    (benchmarks/RESULTS.md §3a).
    """
    if order not in (0, 1):
        raise ValueError(f"axis_aligned_warp: order must be 0 (nearest) or 1 (linear), got {order}")
    out = volume if order == 0 else volume.astype(np.float32, copy=False)
    for axis, size in enumerate(output_shape):
        coords = offset[axis] + scale[axis] * np.arange(size, dtype=np.float64)
        first, second, weights = _axis_sampling(volume.shape[axis], coords, order)
        shape = [1] * out.ndim
        shape[axis] = size
        if order == 0:
            out = np.take(out, first, axis=axis) * second.reshape(shape).astype(out.dtype)
        else:
            weights = weights.astype(np.float32)
            low = np.take(out, first, axis=axis)
            low *= weights[0].reshape(shape)
            high = np.take(out, second, axis=axis)
            high *= weights[1].reshape(shape)
            low += high
            out = low
    return out


def random_crop(sample: dict, crop_size: tuple[int, int, int], config: AugmentConfig,
                rng: np.random.Generator) -> dict:
    """Zoom + translation + flips + intensity jitter, sampling the crop straight from the stored region."""
    region = np.asarray(sample["image"].shape[:3], dtype=np.float64)
    crop = np.asarray(crop_size, dtype=np.float64)
    scale = rng.uniform(1.0 - config.zoom, 1.0 + config.zoom)
    shift = rng.uniform(-config.translate, config.translate, 3) * crop
    flips = np.array([(axis in config.flip_axes) and rng.random() < 0.5 for axis in range(3)])
    # output index o -> region index: centre + (o - crop_centre) * scale * (+-1 per flipped axis)
    direction = np.where(flips, -1.0, 1.0) * scale
    offset = (region - 1) / 2.0 + shift - direction * (crop - 1) / 2.0
    image = axis_aligned_warp(sample["image"], direction, offset, crop_size, order=1)
    channels = image.shape[-1]
    gain = 1.0 + rng.uniform(-config.intensity_scale, config.intensity_scale, channels)
    bias = rng.uniform(-config.intensity_shift, config.intensity_shift, channels)
    out = dict(sample)
    out["slice_coordinate"] = (offset[0] + direction[0] * np.arange(crop_size[0])).astype(np.float32)
    image *= gain.astype(np.float32)
    image += bias.astype(np.float32)
    out["image"] = image
    for key in MASK_KEYS:
        if sample.get(key) is not None:
            out[key] = axis_aligned_warp(sample[key], direction, offset, crop_size, order=0).astype(np.uint8)
    return out
