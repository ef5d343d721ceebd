"""The image-to-image tasks with ProViCNet (`configs/{sr,distortion,synthesis}.py:provicnet`): slice-wise.

One batch element is one case's S = D slices, as in `slice_segmentation.py`. Each slice variant *is* its 3-D task
(`restoration.py`, subclassed behind the `SliceTask` mixin), so the degradations (`degrade`), the target channels,
the gland-weighted L1 (`task.gland_loss_weight`), the metrics (`psnr` primary, `ssim`, `mae` in the gland,
`psnr_volume`, the `_input` baselines) and their reduction are the 3-D task's code. What differs:

* Normalisation: every channel of the clean crop (raw intensities, `data.intensity = "raw"`) is z-scored with its
  gland statistics (`normalise_in_gland`, ProViCNet's preprocessing; crops without gland voxels fall back to the
  whole crop) *before* `degrade`, so inputs, targets and metrics share one scale (the 3-D tasks use the per-case
  non-zero z-score of the data pipeline).
* Inputs per slice j ([D, s, s, 3], resized to `task.image_size`), slice-position tokens (j, n) of the volume as
  upstream (`slices.crop_positions`):
  - `provicnet_super_resolution`: the 3-slice stack (j-1, j, j+1) of `task.sequence` (default T2) of the
    thick-slice volume; target = that sequence's clean slice j (one sequence, unlike the 3-D task's all-channel
    target). ProViCNet's only through-plane context is this +-1 neighbour stack: with `sr_factor` f the network
    sees 3 of the f-times-blurred slices, not the whole column.
  - `provicnet_distortion`: the sequences as channels, (T2 clean, distorted DWI, distorted ADC) of slice j;
    target = undistorted DWI and ADC. The displacement is in-plane (rows), so a slice holds all it needs.
  - `provicnet_synthesis`: (T2, DWI, 0) of slice j; target ADC, predicted directly.
  Sequence-as-channel inputs (distortion, synthesis) deviate from the released models, whose 3 channels are
  neighbouring slices of one sequence: pretrained patch embeddings see channels with another meaning.
* Model: the whole ProViCNet (ViT + slice tokens + `conv_head8`) with `out channels = #targets`, regressing
  intensities at the label resolution 8 * image_size / 14 = the crop's in-plane size. SR and distortion predict a
  residual on the degraded input slices (stored at label resolution as `degraded`) with the last conv
  (`head.segmentation_conv[9]`) zero-initialised, so step 0 is the identity baseline; synthesis is direct.
  A pretrained artifact's last conv has 4 classes: the configs put it in `init.dont_load`.
* Predictions are put back together as the [D, H, W, C] volume, so metrics are the 3-D task's (3-D SSIM; the
  smoke preset's 4-slice crops use a 3-voxel window).
* `task.edge` must be "clamp": every slice is the centre of exactly one stack, so the predictions form the volume.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from transfer_jax.data import slices as slice_data
from transfer_jax.models.provicnet import ProViCNet
from transfer_jax.models.upernet import SegmentationOutput
from transfer_jax.tasks.restoration import DistortionTask, SuperResolutionTask, SynthesisTask, zero_layer
from transfer_jax.tasks.slice_segmentation import SliceTask, normalise_in_gland


def channel_slices(volume: np.ndarray, image_size: int) -> np.ndarray:
    """[D, H, W, C] -> every slice with its channels, resized: [D, s, s, C]."""
    resized = slice_data.resize_bilinear(volume.transpose(0, 3, 1, 2), (image_size, image_size))
    return np.ascontiguousarray(resized.transpose(0, 2, 3, 1))


class SliceRestoration(SliceTask):
    """Mixin turning a `RestorationTask` subclass into its ProViCNet slice variant (bases: this, then the task)."""

    def __init__(self, config):
        super().__init__(config)
        if self.edge != "clamp":
            raise ValueError(f"{self.name} needs task.edge='clamp' (one stack per slice, so predictions form the "
                             f"volume), got {self.edge!r}")
        in_channels = int(config.model.backbone_options.backbone.get("in_channels", 3))
        if len(self.channels) != in_channels:
            raise ValueError(f"{self.name}: data.channels {self.channels} must be the model's {in_channels} input "
                             "channels")

    def clean_volume(self, sample: dict) -> np.ndarray:
        image = np.asarray(sample["image"], np.float32)
        gland = sample.get("gland")
        gland = np.zeros(image.shape[:3], np.uint8) if gland is None else np.asarray(gland)
        return np.stack([normalise_in_gland(image[..., c], gland) for c in range(image.shape[-1])], axis=-1)

    def make_sample(self, sample: dict) -> dict[str, np.ndarray]:
        out = super().make_sample(sample)
        return {**out, "slice_position": slice_data.crop_positions(sample, out["image"].shape[0])}

    def network_inputs(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        out = {"image": self.slice_inputs(inputs)}  # slice positions: make_sample
        if self.residual:
            out["degraded"] = np.ascontiguousarray(inputs[..., self.target_index], np.float32)
        return out

    def residual_base(self, batch):
        return batch["degraded"].astype(jnp.float32)

    def build_model(self, rngs) -> ProViCNet:
        model = self.provicnet(rngs, num_classes=len(self.target_channels))
        if self.zero_init:
            zero_layer(model.head.segmentation_conv[-1])
        return model

    def forward(self, model: ProViCNet, batch, compute_dtype) -> SegmentationOutput:
        images, positions = self.slice_batch(batch)
        out = model(images.astype(compute_dtype), positions).astype(jnp.float32)
        cases, slices = batch["image"].shape[:2]
        out = out.reshape((cases, slices) + out.shape[1:])  # back to the volume [B, D, H, W, C_out]
        base = self.residual_base(batch) if self.residual else 0.0
        return SegmentationOutput(logits=out + base, aux_logits=None)


class SliceSuperResolutionTask(SliceRestoration, SuperResolutionTask):
    name = "provicnet_super_resolution"

    @property
    def target_channels(self):
        return (self.channels[self.channel],)

    def degrade(self, image, rng):
        inputs, target = super().degrade(image, rng)
        return inputs, target[..., self.target_index]


class SliceDistortionTask(SliceRestoration, DistortionTask):
    name = "provicnet_distortion"

    def slice_inputs(self, volume: np.ndarray) -> np.ndarray:
        return channel_slices(volume, self.image_size)


class SliceSynthesisTask(SliceRestoration, SynthesisTask):
    name = "provicnet_synthesis"

    def slice_inputs(self, volume: np.ndarray) -> np.ndarray:
        # `degrade` has zeroed the target already; the mask matters for the (clean) alignment probe crops.
        return channel_slices(volume * self.input_mask(), self.image_size)
