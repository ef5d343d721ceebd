"""Multi-class anatomy segmentation from T2 alone: upstream ProFound's anatomy UPerNet (9 output channels).

Upstream feeds the model [T2, 0, 0] (the DWI and ADC channels zero) and trains a softmax head on an integer label
map 0..8 with MONAI `DiceCELoss(to_onehot_y, softmax, include_background=False)`; the prediction is the argmax.
Here:

* the label map is the manifest's `gland_mask` with its values kept (`data.graded_masks = ("gland",)`,
  `data.gland_labels` = every foreground value, 1..8 upstream): value k is class k; the region is centred on all
  labelled structures together;
* `task.input_channels` (default ("t2",)) names the channels of `data.channels` the model sees; the others are
  zeroed in `forward`, so training, evaluation, `predict` and the alignment probe all see [T2, 0, 0] (the manifest
  still needs `adc` / `dwi` cells: any file on the T2's grid, e.g. the T2 itself, since its values are dropped);
* `task.classes` names the foreground classes in label order (upstream does not name its 8; default generic names).

Loss, metrics (Dice and HD95 per class per case) and `predict`'s output are the softmax `SegmentationTask`'s.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from transfer_jax.tasks.base import require
from transfer_jax.tasks.segmentation import SegmentationTask


class AnatomySegmentationTask(SegmentationTask):
    name = "anatomy_segmentation"

    def __init__(self, config):
        super().__init__(config)
        if self.activation != "softmax":
            raise ValueError("anatomy_segmentation is a softmax head; task.activation must be 'softmax'")
        if "gland" not in tuple(config.data.get("graded_masks", ())):
            raise ValueError("anatomy_segmentation reads its label map from the gland_mask's values: set "
                             "data.graded_masks = ('gland',)")
        expected = tuple(range(1, self.num_classes))
        if tuple(config.data.gland_labels) != expected:
            raise ValueError(f"data.gland_labels {tuple(config.data.gland_labels)} must list the label values "
                             f"{expected} of task.classes {tuple(config.task.classes)}")
        channels = tuple(config.data.channels)
        kept = tuple(config.task.get("input_channels", ("t2",)))
        missing = [c for c in kept if c not in channels]
        if missing or not kept:
            raise ValueError(f"task.input_channels {kept} must name channels of data.channels {channels}")
        self.channel_mask = np.array([c in kept for c in channels], np.float32)

    def check_classes(self, classes: tuple[str, ...]) -> None:
        if not classes or len(set(classes)) != len(classes):
            raise ValueError(f"task.classes {classes} must name each foreground class once")

    def validate_case(self, case, prepared) -> None:
        require(case.path("gland_mask") is not None,
                "anatomy segmentation reads the label map from 'gland_mask', but the cell is empty", case)

    def make_sample(self, sample: dict) -> dict[str, np.ndarray]:
        return {"image": sample["image"], "label": np.asarray(sample["gland"], np.int32)}

    def forward(self, model, batch, compute_dtype):
        image = batch["image"] * jnp.asarray(self.channel_mask, batch["image"].dtype)
        return model(image.astype(compute_dtype))

    def probe_inputs(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(images) * self.channel_mask
