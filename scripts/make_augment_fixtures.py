"""Write tests/fixtures/augment/upstream_transforms.npz: the upstream augmentation transforms on small inputs.

    PYTHONPATH=/path/to/opencv4 /work/torchvenv/bin/python scripts/make_augment_fixtures.py

in a side venv with torch, monai 1.5.0, albumentations 1.4.7 and scikit-image, and OpenCV 4 (upstream pins
4.9.0.80; `pip install --target /path/to/opencv4 opencv-python-headless==4.10.0.84`, the first 4.x with numpy 2
wheels): OpenCV 5 no longer rounds bilinear sample positions to 1/32 pixel, which upstream's results depend on.

Every transform is called with fixed parameters (the random draws are tested in tests/test_augment_upstream.py), so
the outputs are what `transfer_jax/data/augment_upstream.py` must reproduce:

* MONAI 1.5.0 (ProFound's versions), channel-first (C, D, H, W) in, stored channels-last: `Rotate` about axis 0
  (`keep_size=False`, bilinear and nearest, border padding), `Zoom` (1, z_h, z_w) with `keep_size` (trilinear and
  nearest, edge padding; one factor zooms out, one in), `GaussianSmooth` (erf kernels), `RandBiasField` with set
  coefficients.
* albumentations 1.4.7 (ProViCNet's version) on one (H, W, C) float32 slice and a uint8 mask: `elastic_transform`
  (its random state's draws are stored as inputs), `Affine(shear=2)`, `GaussianBlur` kernel 3,
  `brightness_contrast_adjust`.
"""
from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no version check over the network
OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "augment", "upstream_transforms.npz")


def monai_fixtures(rng: np.random.Generator) -> dict:
    import torch
    from monai.transforms import GaussianSmooth, RandBiasField, Rotate, Zoom

    volume = rng.normal(size=(2, 5, 18, 22)).astype(np.float32)  # (C, D, H, W)
    labels = rng.integers(0, 3, (1, 5, 18, 22)).astype(np.float32)
    out = {"volume": volume.transpose(1, 2, 3, 0), "labels": labels[0].astype(np.uint8)}
    angle = 0.37
    out["rotate_angle"] = np.float64(angle)
    rotate = Rotate(angle=(angle, 0.0, 0.0), keep_size=False)
    out["rotate_image"] = np.asarray(rotate(torch.from_numpy(volume), mode="bilinear")).transpose(1, 2, 3, 0)
    out["rotate_labels"] = np.asarray(rotate(torch.from_numpy(labels), mode="nearest"))[0]
    factors = (1.0, 0.91, 1.08)
    out["zoom_factors"] = np.asarray(factors)
    zoom = Zoom(zoom=factors, keep_size=True, padding_mode="edge")
    out["zoom_image"] = np.asarray(zoom(torch.from_numpy(volume), mode="trilinear")).transpose(1, 2, 3, 0)
    out["zoom_labels"] = np.asarray(zoom(torch.from_numpy(labels), mode="nearest"))[0]
    sigmas = (0.3, 0.8, 1.45)
    out["smooth_sigmas"] = np.asarray(sigmas)
    out["smooth_image"] = np.asarray(GaussianSmooth(sigma=sigmas)(torch.from_numpy(volume))).transpose(1, 2, 3, 0)
    coefficients = rng.uniform(0.0, 0.1, 20)
    bias = RandBiasField(prob=1.0)
    bias._coeff = coefficients.tolist()  # the draw `randomize` makes
    bias._do_transform = True
    out["bias_coefficients"] = coefficients
    out["bias_image"] = np.asarray(bias(torch.from_numpy(volume), randomize=False)).transpose(1, 2, 3, 0)
    return out


def albumentations_fixtures(rng: np.random.Generator) -> dict:
    import cv2

    if int(cv2.__version__.split(".")[0]) != 4:
        raise SystemExit(f"OpenCV {cv2.__version__}: the fixtures need OpenCV 4 (see the docstring)")
    import albumentations as A
    from albumentations.augmentations import functional as F
    from albumentations.augmentations.blur import functional as FB
    from albumentations.augmentations.geometric import functional as FG

    image = rng.normal(size=(26, 30, 2)).astype(np.float32)
    mask = rng.integers(0, 4, (26, 30)).astype(np.uint8)
    out = {"slice": image, "slice_mask": mask}
    seed = 1234
    state = np.random.RandomState(seed)  # the draws elastic_transform makes, in its order
    out["elastic_jitter"] = state.uniform(-15.0, 15.0, (3, 2))
    out["elastic_noise_x"] = state.rand(26, 30) * 2 - 1
    out["elastic_noise_y"] = state.rand(26, 30) * 2 - 1
    args = dict(alpha=0.2, sigma=15.0, alpha_affine=15.0, border_mode=cv2.BORDER_REFLECT_101)
    out["elastic_image"] = FG.elastic_transform(image, interpolation=cv2.INTER_LINEAR,
                                                random_state=np.random.RandomState(seed), **args)
    out["elastic_mask"] = FG.elastic_transform(mask, interpolation=cv2.INTER_NEAREST,
                                               random_state=np.random.RandomState(seed), **args)
    shear = A.Affine(scale=None, translate_percent=None, rotate=0, shear=2, p=1.0)
    sheared = shear(image=image, mask=mask)
    out["shear_image"], out["shear_mask"] = sheared["image"], sheared["mask"]
    out["blur_image"] = FB.gaussian_blur(image, 3, sigma=0)
    out["contrast_alpha"], out["contrast_beta"] = np.float64(1.13), np.float64(-0.07)
    out["contrast_image"] = F.brightness_contrast_adjust(image, 1.13, -0.07, True)
    return out


def main() -> None:
    rng = np.random.default_rng(20261204)
    arrays = {**monai_fixtures(rng), **albumentations_fixtures(rng)}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {os.path.normpath(OUT)}: {sorted(arrays)}")


if __name__ == "__main__":
    main()
