"""ProViCNet contrastive pretraining on the one training loop (`configs/pretrain_contrastive.py`).

The slices, labels and model are those of ProViCNet fine-tuning (`slice_segmentation.py`): 3-slice stacks of one
sequence, the DINOv2-with-registers ViT with its slice-position tokens, and `CL_Head`, the DINO-style projection
head (trained here, unlike upstream fine-tuning). Only the contrastive objective is optimised; the segmentation
head is built (so the exported artifact is a complete ProViCNet) but receives no gradient. `task.variant`:

* `label_guided`: upstream's patch-level loss (`provicnet_contrastive.mine_contrastive_pairs` +
  `pair_loss`): anchors are >= `contrastive_upper` / 64 cancer label blocks, positives cancer neighbours,
  negatives distant >= normal neighbours. Pairs are drawn per case (up to `contrastive_max_pairs` of each sign per
  case; upstream draws them per batch); a case without an anchor adds nothing.
* `self_supervised`: no labels. Each case is seen twice with independent photometric augmentations (per-slice
  gain and offset within +-`ssl_intensity` and Gaussian noise of sd `ssl_noise`, in the data workers, so the two
  views keep the same geometry); the positive of an anchor patch is the same patch in the other view, its
  negative the patch two steps away in the other view (`provicnet_contrastive.view_pairs`).
* `both`: the sum of the two.

Metric: `contrastive_loss` (primary, lower is better) = mean over validation cases that have pairs of the case's
loss, with a fixed pair draw per case; `cases_with_pairs` is the share of cases that had any. The final weights are
written as a `provicnet` artifact (`<workdir>/pretrained`), which `configs/seg.py:provicnet` loads with
`init.mode="pretrained"`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from transfer_jax.models.provicnet import ProViCNet
from transfer_jax.tasks import provicnet_contrastive as contrastive
from transfer_jax.tasks.base import PretrainedExport
from transfer_jax.tasks.slice_segmentation import (HEAD_UPSAMPLING, SliceSegmentationTask, build_provicnet,
                                                   provicnet_config)

VARIANTS = ("label_guided", "self_supervised", "both")


class ContrastiveOutput(NamedTuple):
    per_case: jax.Array  # [B] loss of each case (0 where it has no pair)
    has_pairs: jax.Array  # [B] bool


class ContrastivePretrainTask(SliceSegmentationTask):
    name = "pretrain_contrastive"
    primary_metric = "contrastive_loss"
    direction = "min"

    def __init__(self, config):
        super().__init__(config)
        task = config.task
        self.variant = task.variant
        if self.variant not in VARIANTS:
            raise ValueError(f"task.variant must be one of {VARIANTS}, got {self.variant!r}")
        self.max_pairs = int(task.contrastive_max_pairs)
        self.margin = float(task.contrastive_margin)
        self.ssl_intensity = float(task.ssl_intensity)
        self.ssl_noise = float(task.ssl_noise)

    @property
    def label_guided(self) -> bool:
        return self.variant in ("label_guided", "both")

    @property
    def self_supervised(self) -> bool:
        return self.variant in ("self_supervised", "both")

    # -- data ---------------------------------------------------------------------------------------------------
    def photometric_view(self, stacks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """[S, s, s, 3] -> the same slices with per-slice gain / offset and additive Gaussian noise."""
        count = stacks.shape[0]
        gain = 1.0 + rng.uniform(-self.ssl_intensity, self.ssl_intensity, (count, 1, 1, 1))
        offset = rng.uniform(-self.ssl_intensity, self.ssl_intensity, (count, 1, 1, 1))
        noise = rng.normal(0.0, self.ssl_noise, stacks.shape)
        return (stacks * gain + offset + noise).astype(np.float32)

    def make_sample(self, sample: dict) -> dict[str, np.ndarray]:
        out = super().make_sample(sample)
        if self.self_supervised:
            rng = self.sample_rng(sample)
            out["image"], out["view2"] = (self.photometric_view(out["image"], rng),
                                          self.photometric_view(out["image"], rng))
        return out

    # -- model --------------------------------------------------------------------------------------------------
    def build_model(self, rngs) -> ProViCNet:
        return build_provicnet(self.config.model.backbone_options.to_dict(), rngs, num_classes=self.num_classes,
                               contrastive_head=True)

    def _feature_vectors(self, model, images, positions, cases: int) -> jax.Array:
        """Final-norm patch tokens of every slice, grouped per case: [B, S * gy * gx, width] (float32)."""
        tokens = model.forward_features(images, positions).patch_tokens.astype(jnp.float32)
        return tokens.reshape(cases, -1, tokens.shape[-1])

    def _case_losses(self, model, vectors: jax.Array, pairs: contrastive.ContrastivePairs) -> jax.Array:
        """Per-case pair loss [B] from per-case vectors [B, T, width] and per-case pairs (fields [B, 2P])."""
        anchor = jnp.take_along_axis(vectors, pairs.anchor[..., None], axis=1)
        other = jnp.take_along_axis(vectors, pairs.other[..., None], axis=1)
        return jax.vmap(lambda a, o, p: contrastive.pair_loss(a, o, p, self.margin))(
            model.project(anchor), model.project(other), pairs)

    def forward(self, model, batch, compute_dtype) -> ContrastiveOutput:
        images, positions, labels = self._flatten_slices(batch)
        cases, slices = batch["image"].shape[:2]
        vectors = self._feature_vectors(model, images.astype(compute_dtype), positions, cases)
        keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(self.config.seed), seed))(batch["pair_seed"])
        total = jnp.zeros((cases,), jnp.float32)
        has_pairs = jnp.zeros((cases,), bool)
        if self.label_guided:
            task = self.config.task
            per_case_labels = labels.reshape((cases, slices) + labels.shape[1:])
            pairs = jax.vmap(lambda key, lab: contrastive.mine_contrastive_pairs(
                key, lab, max_pairs=self.max_pairs, upper=int(task.contrastive_upper),
                lower=int(task.contrastive_lower), distant_negative=True, patch_pixels=HEAD_UPSAMPLING))(
                keys, per_case_labels)
            total = total + self._case_losses(model, vectors, pairs)
            has_pairs = has_pairs | pairs.valid.any(axis=-1)
        if self.self_supervised:
            view2, _, _ = self._flatten_slices({**batch, "image": batch["view2"]})
            both = jnp.concatenate([vectors, self._feature_vectors(model, view2.astype(compute_dtype), positions,
                                                                   cases)], axis=1)
            grid = (slices,) + model.config.backbone.patch_grid(images.shape[1], images.shape[2])
            pairs = jax.vmap(lambda key: contrastive.view_pairs(jax.random.fold_in(key, 1), grid,
                                                                 max_pairs=self.max_pairs))(keys)
            total = total + self._case_losses(model, both, pairs)
            has_pairs = has_pairs | pairs.valid.any(axis=-1)
        return ContrastiveOutput(per_case=total, has_pairs=has_pairs)

    # -- loss and metrics ---------------------------------------------------------------------------------------
    def loss(self, outputs: ContrastiveOutput, batch):
        counted = outputs.has_pairs.astype(jnp.float32)
        value = jnp.sum(outputs.per_case * counted) / jnp.maximum(jnp.sum(counted), 1.0)
        return value, {"loss_contrastive": value, "cases_with_pairs": jnp.mean(counted)}

    def eval_stats(self, outputs: ContrastiveOutput, batch):
        return {"contrastive_loss": jnp.where(outputs.has_pairs, outputs.per_case, jnp.nan),
                "has_pairs": outputs.has_pairs.astype(jnp.float32)}

    def summarize(self, stats):
        losses = np.asarray(stats["contrastive_loss"], np.float64)
        finite = losses[np.isfinite(losses)]
        return {"contrastive_loss": float(finite.mean()) if finite.size else float("nan"),
                "cases_with_pairs": float(np.mean(stats["has_pairs"])) if len(stats["has_pairs"]) else 0.0}

    def pretrained_export(self) -> Optional[PretrainedExport]:
        options = self.config.model.backbone_options.to_dict()
        config = provicnet_config(options, num_classes=self.num_classes, contrastive_head=True).to_dict()
        return PretrainedExport(self.config.model.backbone, config)
