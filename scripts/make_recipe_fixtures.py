"""Fixtures for tests/test_recipes.py from torch and MONAI themselves:

* plateau.json: the learning rates torch's `ReduceLROnPlateau` gives two parameter groups over a sequence of
  validation values (min and max mode, with and without cooldown, a min_lr floor);
* monai.json: where MONAI's `CenterSpatialCrop` starts its window for odd and even margins, and
  `sliding_window_inference` outputs with constant and Gaussian blending for a model that reads its whole window.

Run in the side venv that has torch and monai (1.5.0, as ProFound pins):

    /work/torchvenv/bin/python scripts/make_recipe_fixtures.py
"""
import json
import os

import torch

VALUES = [1.0, 0.9, 0.95, 0.9, 0.91, 0.8999, 0.8, 0.81, 0.82, 0.83, 0.84, 0.85, 0.79, 0.7999, 0.80, 0.9, 0.9,
          0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
CASES = [
    # ProViCNet's train.py settings, lrs 1e-3 / 5e-5 (head / backbone)
    dict(mode="min", factor=0.9, patience=3, cooldown=0, min_lr=1e-6, lrs=[1e-3, 5e-5]),
    dict(mode="max", factor=0.5, patience=1, cooldown=0, min_lr=0.0, lrs=[1e-3, 1e-4]),
    dict(mode="min", factor=0.5, patience=0, cooldown=2, min_lr=2e-4, lrs=[1e-3, 4e-4]),
]


def run(case: dict) -> list[list[float]]:
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in case["lrs"]]
    optimizer = torch.optim.Adam([{"params": [p], "lr": lr} for p, lr in zip(params, case["lrs"])])
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=case["mode"], factor=case["factor"], patience=case["patience"], cooldown=case["cooldown"],
        min_lr=case["min_lr"])
    lrs = []
    for value in VALUES:
        scheduler.step(value)
        lrs.append([g["lr"] for g in optimizer.param_groups])
    return lrs


CROPS = [(82, 64), (83, 64), (82, 63), (83, 63), (81, 64), (81, 63), (64, 64), (65, 64)]


def crop_start(size: int, roi: int) -> int:
    from monai.transforms import CenterSpatialCrop
    volume = torch.arange(size, dtype=torch.float32).reshape(1, size, 1, 1)
    return int(CenterSpatialCrop((roi, 1, 1))(volume)[0, 0, 0, 0])


def window_model(x: torch.Tensor) -> torch.Tensor:
    """A model whose output depends on the whole window: 2 x + the window's mean (per window, channel)."""
    return 2.0 * x + x.mean(dim=(2, 3, 4), keepdim=True)


def sliding(volume: torch.Tensor, roi, mode: str) -> list:
    from monai.inferers import sliding_window_inference
    out = sliding_window_inference(volume, roi, 1, window_model, overlap=0.5, mode=mode, sigma_scale=0.125)
    return out[0, 0].tolist()


def write(name: str, payload: dict) -> None:
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "recipes", name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    print(f"wrote {os.path.normpath(path)}")


def main() -> None:
    import monai
    write("plateau.json", {"torch": torch.__version__, "values": VALUES,
                           "cases": [dict(case, expected=run(case)) for case in CASES]})
    volume = torch.from_numpy(__import__("numpy").random.default_rng(0).normal(size=(1, 1, 7, 9, 6))).float()
    roi = (4, 6, 4)
    write("monai.json", {
        "monai": monai.__version__,
        "crops": [dict(size=s, roi=r, start=crop_start(s, r)) for s, r in CROPS],
        "sliding": dict(volume=volume[0, 0].tolist(), roi=roi, overlap=0.5,
                        constant=sliding(volume, roi, "constant"), gaussian=sliding(volume, roi, "gaussian")),
    })


if __name__ == "__main__":
    main()
