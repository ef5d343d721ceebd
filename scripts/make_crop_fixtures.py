"""Fixtures for tests/test_crops.py from MONAI itself: where ProFound's validation / test transform
(`CenterSpatialCrop(crop)` then `SpatialPad(crop)`, symmetric zero padding) takes its window.

* `starts`: the first source voxel of the window along one axis of `size` voxels for a crop of `roi` (negative:
  that many padded zeros come first), for odd and even margins and for axes shorter than the crop;
* `volume`: a (D, H, W) volume of voxel numbers 1..N through the transform; each output voxel holds the number of
  the source voxel it came from (0 = padding).

Run in the side venv that has torch and monai (1.5.0, as ProFound pins):

    /work/torchvenv/bin/python scripts/make_crop_fixtures.py
"""
import json
import os

import torch

STARTS = [(82, 64), (83, 64), (81, 64), (82, 63), (83, 63), (64, 64), (65, 64), (60, 64), (61, 64), (5, 8),
          (5, 9), (6, 9), (63, 64)]
VOLUME_SHAPE = (9, 6, 13)
VOLUME_CROP = (6, 9, 8)  # an even and an odd margin, and an axis shorter than the crop


def upstream_view(volume: torch.Tensor, roi) -> torch.Tensor:
    from monai.transforms import CenterSpatialCrop, Compose, SpatialPad
    return Compose([CenterSpatialCrop(roi), SpatialPad(roi)])(volume)


def start(size: int, roi: int) -> int:
    numbers = torch.arange(1, size + 1, dtype=torch.float32).reshape(1, size, 1, 1)
    out = upstream_view(numbers, (roi, 1, 1))[0, :, 0, 0]
    first = int(torch.nonzero(out)[0, 0])
    return int(out[first]) - 1 - first


def main() -> None:
    import monai
    numbers = torch.arange(1, 1 + int(torch.tensor(VOLUME_SHAPE).prod()), dtype=torch.float32).reshape(1, *VOLUME_SHAPE)
    payload = {
        "monai": monai.__version__,
        "starts": [dict(size=s, roi=r, start=start(s, r)) for s, r in STARTS],
        "volume": dict(shape=VOLUME_SHAPE, crop=VOLUME_CROP,
                       numbers=upstream_view(numbers, VOLUME_CROP)[0].to(torch.int64).tolist()),
    }
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "crops", "monai.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)
    print(f"wrote {os.path.normpath(path)}")


if __name__ == "__main__":
    main()
