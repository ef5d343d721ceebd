"""Image-to-image tasks on one shared base: through-plane super-resolution, DWI distortion correction, ADC synthesis.

Common to all three (`RestorationTask`):

* Data: the prepared (per-channel z-scored, cropped, augmented) volume is the clean reference. `degrade` turns it
  into the network input `image` (D, H, W, C_in) and the `target` (D, H, W, C_out), in numpy inside the data
  workers. Randomness (distortion fields) comes from a per-sample `np.random.Generator` seeded by
  (`config.seed`, the case index, a CRC of the cropped sample): training crops are randomised by the augmentation,
  so every training draw gets a new field, while the deterministic centre crop used for evaluation gets the same
  field for a case at every evaluation and in every run.
* Model: the UPerNet dense decoder of the segmentation task (`tasks/dense.py::build_dense_model`, same code, same
  ViT adapter for ProFound-ViT) with `out_channels = C_out`, regressing intensities at the input resolution; no
  auxiliary head by default (`model.head_options.use_auxiliary_head=True` adds the FCN head, trained with the same
  L1 times `task.aux_weight`).
* Prediction: *residual* for SR and distortion correction (prediction = degraded input channels + network output,
  and the final 1x1 convs start at zero (`task.zero_init_residual`, default True), so the untrained network is
  exactly the identity baseline) and *direct* for synthesis (the target sequence is not
  among the inputs).
* Loss: L1 over every voxel and target channel, voxels inside the gland weighted `1 + task.gland_loss_weight`
  (default 0 = plain L1; synthesis uses 9: a direct prediction otherwise settles on the background value).
  Metrics (`tasks/metrics.py`, jitted per sample): `psnr` (primary), `ssim`, `mae` inside the gland mask,
  `psnr_volume` over the whole crop, and for the residual tasks the same for the degraded input itself
  (`psnr_input`, `ssim_input`, `mae_input`: the do-nothing baseline). PSNR/SSIM use the
  per-case target range (max - min over the crop) as data range. Cases without a gland mask are measured over the
  whole crop (documented fallback; `task.require_gland_mask=True` makes a missing mask a pre-flight error instead);
  a case whose centre crop holds no gland voxel gives NaN and is left out of the means.

Task specifics (channel names refer to `data.channels`, default ("t2", "dwi", "adc")):

* `super_resolution`: input = `thick_slice_degrade(volume, task.sr_factor)` on every channel (the whole study
  acquired with `sr_factor`-times thicker slices, resampled back to the grid); target = all channels.
  `task.sr_factor` must divide the crop depth (checked when the task is built).
* `distortion`: a smooth random displacement field along the phase-encode axis (axis 1, rows) of at most
  `task.max_shift` voxels (`random_displacement`, wavelength >= `task.smoothness` voxels, slope <= `task.max_slope`)
  warps the channels `task.distort_channels` (default DWI and ADC: both come from the same EPI readout) with
  Jacobian intensity modulation (`distort`); T2 (spin echo, no EPI distortion) stays clean as the anatomical
  reference in the input. Target = the undistorted `distort_channels`. (Modulating the ADC map by the Jacobian is a
  simplification: a real ADC computed from two equally modulated DWIs would only be shifted.)
* `synthesis`: target = `task.target` (ADC); input = the image with the target channel set to zero, i.e. T2 and
  high-b DWI in their usual slots. Keeping three input channels keeps a pretrained 3-channel stem usable; the
  alignment probe sees the same zeroed channel.

ProViCNet runs these tasks slice-wise through subclasses (`slice_restoration.py`) that replace the clean volume
(`clean_volume`), the model inputs (`network_inputs`, `residual_base`), the model and its forward pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfer_jax.models.registry import encoder_feature_sites
from transfer_jax.models.upernet import SegmentationOutput
from transfer_jax.tasks.base import Task, require
from transfer_jax.tasks.degradations import distort, random_displacement, synthesis_split, thick_slice_degrade
from transfer_jax.tasks.dense import build_dense_model
from transfer_jax.tasks.metrics import mae, psnr, ssim3d


def zero_layer(layer: nnx.Module) -> None:
    """Zero a final conv's kernel and bias, so a residual model starts exactly at the identity (degraded input)."""
    layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
    layer.bias[...] = jnp.zeros_like(layer.bias[...])


class RestorationTask(Task):
    primary_metric = "psnr"
    direction = "max"
    residual = True

    def __init__(self, config):
        super().__init__(config)
        self.channels = tuple(config.data.channels)
        self.require_gland_mask = bool(config.task.get("require_gland_mask", False))
        self.ssim_window = int(config.task.get("ssim_window", 7))
        self.gland_loss_weight = float(config.task.get("gland_loss_weight", 0.0))
        if not self.gland_loss_weight >= 0.0:
            raise ValueError(f"task.gland_loss_weight must be >= 0, got {self.gland_loss_weight!r}")

    # -- subclasses -------------------------------------------------------------------------------------------
    @property
    def target_channels(self) -> tuple[str, ...]:
        return self.channels

    def degrade(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(network input, target) from a clean (D, H, W, C) crop."""
        raise NotImplementedError

    # -- helpers ----------------------------------------------------------------------------------------------
    def _channel_indices(self, names, field: str) -> list[int]:
        unknown = [n for n in names if n not in self.channels]
        if unknown or not names:
            raise ValueError(f"{field}={tuple(names)}: every entry must be one of data.channels {self.channels}")
        return [self.channels.index(n) for n in names]

    @property
    def target_index(self) -> list[int]:
        """Positions of the target channels among the input channels (where the residual's base comes from)."""
        return [self.channels.index(n) for n in self.target_channels]

    @property
    def zero_init(self) -> bool:
        return self.residual and bool(self.config.task.get("zero_init_residual", True))

    def residual_base(self, batch: dict[str, jax.Array]) -> jax.Array:
        """The degraded input channels the residual is added to (same order as the targets)."""
        return batch["image"][..., self.target_index].astype(jnp.float32)

    def clean_volume(self, sample: dict) -> np.ndarray:
        """The clean (D, H, W, C) reference the degradation starts from."""
        return np.asarray(sample["image"], np.float32)

    def network_inputs(self, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The degraded (D, H, W, C) volume -> the sample arrays the model reads."""
        return {"image": np.ascontiguousarray(inputs, np.float32)}

    # -- Task -------------------------------------------------------------------------------------------------
    def validate_case(self, case, prepared) -> None:
        if self.require_gland_mask:
            require(case.gland_mask is not None and prepared.gland is not None,
                    f"{self.name} with task.require_gland_mask=True measures PSNR/SSIM/MAE inside the gland, but the "
                    "'gland_mask' cell is empty (set task.require_gland_mask=False to measure over the whole crop)",
                    case)
        image = prepared.image
        require(image.shape[-1] == len(self.channels),
                f"prepared image has {image.shape[-1]} channels, data.channels names {len(self.channels)}", case)

    def make_sample(self, sample: dict) -> dict[str, np.ndarray]:
        image = self.clean_volume(sample)
        inputs, target = self.degrade(image, self.sample_rng(sample))
        gland = sample.get("gland")
        mask = np.ones(image.shape[:3], np.uint8) if gland is None else (np.asarray(gland) > 0).astype(np.uint8)
        return {**self.network_inputs(inputs), "target": np.ascontiguousarray(target, np.float32), "mask": mask}

    def build_model(self, rngs: nnx.Rngs):
        model = build_dense_model(self.config.model, len(self.target_channels), rngs)
        if self.zero_init:
            for head in (model.decode_head, model.auxiliary_head):
                if head is not None:
                    zero_layer(head.classifier)
        return model

    def forward(self, model, batch, compute_dtype):
        out = model(batch["image"].astype(compute_dtype))
        base = self.residual_base(batch) if self.residual else 0.0
        aux = None if out.aux_logits is None else out.aux_logits.astype(jnp.float32) + base
        return SegmentationOutput(logits=out.logits.astype(jnp.float32) + base, aux_logits=aux)

    def _weighted_l1(self, prediction: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
        return jnp.sum(jnp.abs(prediction - target) * weights) / (jnp.sum(weights) * target.shape[-1])

    def loss(self, outputs: SegmentationOutput, batch):
        target = batch["target"].astype(jnp.float32)
        weights = 1.0 + self.gland_loss_weight * batch["mask"].astype(jnp.float32)[..., None]
        main = self._weighted_l1(outputs.logits, target, weights)
        metrics = {"loss_l1": main}
        total = main
        if outputs.aux_logits is not None:
            aux = self._weighted_l1(outputs.aux_logits, target, weights)
            total = main + float(self.config.task.get("aux_weight", 0.4)) * aux
            metrics["loss_aux"] = aux
        return total, metrics

    def _quality(self, pred, target, mask, data_range, suffix: str = "") -> dict[str, jax.Array]:
        return {
            f"psnr{suffix}": psnr(pred, target, data_range, mask),
            f"ssim{suffix}": ssim3d(pred, target, data_range, mask, window=self.ssim_window),
            f"mae{suffix}": mae(pred, target, mask),
            f"psnr_volume{suffix}": psnr(pred, target, data_range),
        }

    def eval_stats(self, outputs: SegmentationOutput, batch):
        target = batch["target"].astype(jnp.float32)
        mask = batch["mask"]
        axes = tuple(range(1, target.ndim))
        data_range = jnp.maximum(jnp.max(target, axis=axes) - jnp.min(target, axis=axes), 1e-6)
        stats = self._quality(outputs.logits, target, mask, data_range)
        if self.residual:
            stats.update(self._quality(self.residual_base(batch), target, mask, data_range, "_input"))
        return stats

    def summarize(self, stats):
        metrics = {}
        for key, values in stats.items():
            values = np.asarray(values, np.float64)
            finite = values[np.isfinite(values)]
            metrics[key] = float(finite.mean()) if finite.size else float("nan")
        return metrics


class SuperResolutionTask(RestorationTask):
    """Through-plane SR: thick-slice input, original slices as target, every channel."""

    name = "super_resolution"

    def __init__(self, config):
        super().__init__(config)
        factor = config.task.sr_factor
        depth = int(tuple(config.data.crop_size)[0])
        if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 2:
            raise ValueError(f"task.sr_factor must be an int >= 2 (slice-thickness factor), got {factor!r}")
        if depth % factor:
            raise ValueError(f"task.sr_factor={factor} must divide the crop depth data.crop_size[0]={depth}; "
                             f"choose a factor of {depth} or a crop depth that is a multiple of {factor}")
        self.sr_factor = int(factor)

    def degrade(self, image, rng):
        return thick_slice_degrade(image, self.sr_factor), image


class DistortionTask(RestorationTask):
    """EPI distortion correction along the phase-encode axis (axis 1) of the DWI-derived channels."""

    name = "distortion"
    AXIS = 1

    def __init__(self, config):
        super().__init__(config)
        task = config.task
        self.distorted = tuple(task.get("distort_channels", ("dwi", "adc")))
        self.distorted_index = self._channel_indices(self.distorted, "task.distort_channels")
        self.max_shift = float(task.get("max_shift", 3.0))
        self.smoothness = float(task.get("smoothness", 16.0))
        self.max_slope = float(task.get("max_slope", 0.5))

    @property
    def target_channels(self):
        return self.distorted

    def displacement(self, shape3d, rng):
        return random_displacement(shape3d, rng, self.max_shift, self.smoothness, axis=self.AXIS,
                                   max_slope=self.max_slope)

    def degrade(self, image, rng):
        field = self.displacement(image.shape[:3], rng)
        target = image[..., self.distorted_index]
        inputs = image.copy()
        inputs[..., self.distorted_index] = distort(target, field, axis=self.AXIS)
        return inputs, target


class SynthesisTask(RestorationTask):
    """ADC from T2 + high-b DWI: target channel zeroed in the input, predicted directly."""

    name = "synthesis"
    residual = False

    def __init__(self, config):
        super().__init__(config)
        self.target = str(config.task.get("target", "adc"))
        self.inputs = tuple(config.task.get("inputs", ("t2", "dwi")))
        self._channel_indices((self.target,), "task.target")
        self.input_index = self._channel_indices(self.inputs, "task.inputs")
        if self.target in self.inputs:
            raise ValueError(f"task.target={self.target!r} is also in task.inputs={self.inputs}")

    @property
    def target_channels(self):
        return (self.target,)

    def input_mask(self) -> np.ndarray:
        """1 for the channels the network may see, 0 elsewhere (the target and unused channels)."""
        keep = np.zeros(len(self.channels), np.float32)
        keep[self.input_index] = 1.0
        return keep

    def degrade(self, image, rng):
        inputs, target = synthesis_split(image, self.channels, self.inputs, self.target)
        network_input = np.zeros_like(image)
        network_input[..., self.input_index] = inputs
        return network_input, target

    def probe_features(self, model, images):
        return encoder_feature_sites(model.encoder, images * jnp.asarray(self.input_mask(), images.dtype))
