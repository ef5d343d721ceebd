"""Masked-reconstruction pretraining on the one training loop: ProFound-ViT MAE and ProFound-Conv FCMAE.

Both objectives hide a random `mask_ratio` share of the patches of a crop and regress the hidden patches' voxels
(optionally normalised per patch, `norm_pix_loss`); the loss is the per-patch MSE averaged over hidden patches.

* Data: the prepared, augmented crop is the input and the target; the per-patch masking noise is drawn in the data
  workers from a generator seeded by (`config.seed`, case index, CRC of the crop) and travels in the batch as
  `noise` (N, patches). Training crops are randomised by the augmentation, so every draw gets a new mask; the
  evaluation centre crop gets the same mask at every evaluation, so the validation loss is comparable over steps.
* Noise targets (`task.target="noise"`, `configs/pretrain_fcmae.py:noise_target`): the hidden patches regress
  Gaussian noise drawn per sample instead of the voxels, an objective unrelated to the images by construction (the
  study's positive control, `configs/study.py:control`). The encoder still sees the images and is trained.
* Metric: `recon_loss` (primary, lower is better) = the mean over validation cases of each case's loss.
* Export: at the end of the run the weights are written as a pretrained artifact (`<workdir>/pretrained`, the
  format of `transfer_jax.convert.artifact`) that the task configs load with `init.mode="pretrained"` and
  `init.checkpoint=<workdir>/pretrained`. The MAE artifact keeps its decoder (as released MAE checkpoints do);
  the FCMAE artifact holds the encoder only (as a converted FCMAE checkpoint does).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfer_jax.models.convnext import ConvNeXtConfig
from transfer_jax.models.fcmae import FCMAE, FCMAEConfig
from transfer_jax.models.profound_vit import MAE, MAEDecoderConfig, ViTConfig, mae_loss
from transfer_jax.models.registry import dataclass_from_dict, encoder_feature_sites
from transfer_jax.tasks.base import PretrainedExport, Task, require

TARGETS = ("image", "noise")  # what the hidden patches regress


class MaskedReconstructionTask(Task):
    primary_metric = "recon_loss"
    direction = "min"
    patch_size: tuple[int, int, int]  # voxels per masked patch, set by subclasses
    norm_pix_loss: bool

    def __init__(self, config):
        super().__init__(config)
        self.channels = tuple(config.data.channels)
        self.crop_size = tuple(int(c) for c in config.data.crop_size)
        self.target = config.task.get("target", "image")
        if self.target not in TARGETS:
            raise ValueError(f"task.target must be one of {TARGETS}, got {self.target!r}")

    # -- subclasses -------------------------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        raise NotImplementedError

    def per_sample_loss(self, outputs, images: jax.Array) -> jax.Array:
        """[B] reconstruction loss of each batch element (the model's loss is over the whole batch)."""
        return jax.vmap(lambda x, p, m: mae_loss(x[None], p[None], m[None], self.patch_size, self.norm_pix_loss))(
            images, outputs.pred, outputs.mask)

    # -- Task -------------------------------------------------------------------------------------------------
    def validate_case(self, case, prepared) -> None:
        require(prepared.image.shape[-1] == len(self.channels),
                f"prepared image has {prepared.image.shape[-1]} channels, data.channels names {len(self.channels)}",
                case)

    def make_sample(self, sample: dict) -> dict[str, np.ndarray]:
        image = np.ascontiguousarray(sample["image"], np.float32)
        rng = self.sample_rng(sample)
        noise = rng.random(self.num_patches, dtype=np.float32)
        if self.target == "image":
            return {"image": image, "noise": noise}
        return {"image": image, "noise": noise, "target": rng.standard_normal(image.shape, dtype=np.float32)}

    def forward(self, model, batch, compute_dtype):
        return model(batch["image"].astype(compute_dtype), noise=batch["noise"])

    def loss(self, outputs, batch):
        if self.target == "image":
            return outputs.loss, {"loss_recon": outputs.loss}
        # Every sample has as many hidden patches (a fixed mask ratio), so the mean of per-sample losses is the
        # loss over the batch.
        loss = jnp.mean(self.per_sample_loss(outputs, batch["target"]))
        return loss, {"loss_recon": loss}

    def eval_stats(self, outputs, batch):
        return {"recon_loss": self.per_sample_loss(outputs, batch.get("target", batch["image"]))}

    def summarize(self, stats):
        values = np.asarray(stats["recon_loss"], np.float64)
        return {"recon_loss": float(values.mean()) if values.size else float("nan")}

    def probe_features(self, model, images):
        return encoder_feature_sites(model.encoder, images)


class MAEPretrainTask(MaskedReconstructionTask):
    """ProFound-ViT: MAE with the ViT encoder of `model.backbone_options` and the decoder of `model.decoder_options`."""

    name = "pretrain_mae"

    def __init__(self, config):
        super().__init__(config)
        if config.model.backbone != "profound_vit":
            raise ValueError(f"pretrain_mae pretrains profound_vit, config.model.backbone is {config.model.backbone!r}")
        self.encoder_config = dataclass_from_dict(ViTConfig, config.model.backbone_options.to_dict())
        self.decoder_config = dataclass_from_dict(MAEDecoderConfig, config.model.decoder_options.to_dict())
        if self.encoder_config.img_size != self.crop_size:
            raise ValueError(f"model.backbone_options.img_size {self.encoder_config.img_size} must equal "
                             f"data.crop_size {self.crop_size} (the position table is tied to it)")
        self.patch_size = tuple(self.encoder_config.patch_size)
        self.norm_pix_loss = self.decoder_config.norm_pix_loss

    @property
    def num_patches(self) -> int:
        return self.encoder_config.num_patches

    def build_model(self, rngs: nnx.Rngs) -> MAE:
        return MAE(self.encoder_config, self.decoder_config, rngs=rngs)

    def pretrained_export(self) -> Optional[PretrainedExport]:
        config = {"encoder": dataclasses.asdict(self.encoder_config),
                  "decoder": dataclasses.asdict(self.decoder_config), "head": None}
        return PretrainedExport(self.config.model.backbone, config)


class FCMAEPretrainTask(MaskedReconstructionTask):
    """ProFound-Conv: FCMAE (dense emulation of the sparse encoder) with the ConvNeXt-V2 of `backbone_options`."""

    name = "pretrain_fcmae"

    def __init__(self, config):
        super().__init__(config)
        if config.model.backbone != "profound_conv":
            raise ValueError(f"pretrain_fcmae pretrains profound_conv, config.model.backbone is "
                             f"{config.model.backbone!r}")
        self.encoder_config = dataclass_from_dict(ConvNeXtConfig, config.model.backbone_options.to_dict())
        self.fcmae_config = dataclass_from_dict(FCMAEConfig, config.model.decoder_options.to_dict())
        stride = self.encoder_config.total_stride
        if any(c % s for c, s in zip(self.crop_size, stride)):
            raise ValueError(f"data.crop_size {self.crop_size} must be a multiple of the encoder's total stride "
                             f"{stride} (one masking patch per final-stage voxel)")
        self.patch_size = tuple(stride)
        self.norm_pix_loss = self.fcmae_config.norm_pix_loss
        self.grid_size = tuple(c // s for c, s in zip(self.crop_size, stride))

    @property
    def num_patches(self) -> int:
        return int(np.prod(self.grid_size))

    def build_model(self, rngs: nnx.Rngs) -> FCMAE:
        return FCMAE(self.encoder_config, self.fcmae_config, rngs=rngs)

    def pretrained_export(self) -> Optional[PretrainedExport]:
        def encoder_only(flat):
            return {k: v for k, v in flat.items() if k.startswith("encoder.")}

        config = {"encoder": dataclasses.asdict(self.encoder_config), "head": None}
        return PretrainedExport(self.config.model.backbone, config, encoder_only)
