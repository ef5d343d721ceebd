"""Crops and augmentations on prepared cases (numpy, per sample, run inside grain workers).

A sample is a dict: `image` (D, H, W, C) float32 plus optional `gland` / `lesion` (D, H, W) uint8 masks and
scalar fields. Spatial transforms move the image and the masks together (linear for images, nearest for masks).
"""
from __future__ import annotations

import dataclasses

import numpy as np
from scipy import ndimage

MASK_KEYS = ("gland", "lesion")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    zoom: float = 0.1  # isotropic scale factor drawn from U(1 - zoom, 1 + zoom)
    translate: float = 0.1  # centre shift, as a fraction of the crop size, drawn per axis from U(-t, t)
    flip_axes: tuple[int, ...] = (2,)  # spatial axes (0=D, 1=H, 2=W) flipped with probability 1/2 each
    intensity_scale: float = 0.1  # per channel x (1 + U(-s, s))
    intensity_shift: float = 0.1  # per channel + U(-s, s)


def center_crop(sample: dict, crop_size: tuple[int, int, int]) -> dict:
    """The deterministic evaluation view: the crop at the centre of the stored (gland-centred) region."""
    region = sample["image"].shape[:3]
    start = [(r - c) // 2 for r, c in zip(region, crop_size)]
    window = tuple(slice(s, s + c) for s, c in zip(start, crop_size))
    if any(s < 0 for s in start):
        raise ValueError(f"crop {crop_size} is larger than the stored region {region}")
    out = dict(sample)
    out["image"] = np.ascontiguousarray(sample["image"][window])
    for key in MASK_KEYS:
        if sample.get(key) is not None:
            out[key] = np.ascontiguousarray(sample[key][window])
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
    matrix = np.diag(direction)

    def warp(volume: np.ndarray, order: int) -> np.ndarray:
        return ndimage.affine_transform(volume, matrix, offset=offset, output_shape=crop_size, order=order,
                                        mode="constant", cval=0.0, prefilter=False)

    image = np.stack([warp(sample["image"][..., c], 1) for c in range(sample["image"].shape[-1])], axis=-1)
    channels = image.shape[-1]
    gain = 1.0 + rng.uniform(-config.intensity_scale, config.intensity_scale, channels)
    bias = rng.uniform(-config.intensity_shift, config.intensity_shift, channels)
    out = dict(sample)
    out["image"] = (image * gain + bias).astype(np.float32)
    for key in MASK_KEYS:
        if sample.get(key) is not None:
            out[key] = warp(sample[key], 0).astype(np.uint8)
    return out
