"""Case-level PI-RADS classification with ProViCNet (`configs/cls.py:provicnet`, task `provicnet_classification`).

Slices as in `slice_segmentation.py`: every slice of the crop (whole slices in-plane) becomes a 3-slice stack of
`task.sequence` z-scored in the gland, with its slice-position tokens (j, n) of the volume. The model (`SliceClassifier`) runs
ProViCNet's ViT on the case's S slices, averages their final-norm cls tokens over the slices and applies ProFound's
MLP head (`models/classifier.py::ClassifierHead`, as for the 3-D backbones). Upstream ProViCNet has no
classification head: the slice average is this port's choice (every slice of the crop counts, gland or not).

Targets, loss (cross-entropy), per-case statistics, metrics and the primary metric (`auroc_macro`, binary
`auroc`) are `ClassificationTask`'s. A pretrained ProViCNet artifact loads into `backbone.*` and the slice tokens;
its segmentation head (`head.segmentation_conv.*`) has no counterpart here and is left out.
"""
from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from transfer_jax.models.classifier import ClassifierHead
from transfer_jax.models.provicnet import ProViCNet, ProViCNetConfig
from transfer_jax.tasks.classification import ClassificationTask
from transfer_jax.models.registry import compute_dtype
from transfer_jax.data.slices import crop_positions
from transfer_jax.tasks.slice_segmentation import SliceTask, normalise_in_gland, provicnet_config, slice_stacks


class SliceClassifier(ProViCNet):
    """ProViCNet's ViT + slice tokens; the slices' cls tokens averaged per case -> `ClassifierHead` logits [B, K].

    A subclass so `forward_features` and the alignment sites are ProViCNet's and the parameter paths match a
    ProViCNet artifact; `head` is the classifier (the conv head the parent builds is dropped at construction).
    """

    def __init__(self, config: ProViCNetConfig, num_classes: int, *, bottleneck_dim: int, dtype, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, rngs=rngs)
        self.head = ClassifierHead(config.backbone.width, num_classes, bottleneck_dim=bottleneck_dim, dtype=dtype,
                                   rngs=rngs)

    def __call__(self, images: jax.Array, slice_position: jax.Array) -> jax.Array:
        """images [B, S, s, s, C], slice_position [B, S, 2] -> logits [B, K]."""
        cases, slices = images.shape[:2]
        flat = images.reshape((cases * slices,) + images.shape[2:])
        cls = self.forward_features(flat, slice_position.reshape(cases * slices, 2)).cls_token
        return self.head(cls.reshape(cases, slices, -1).mean(axis=1))


class SliceClassificationTask(SliceTask, ClassificationTask):
    name = "provicnet_classification"

    def validate_case(self, case, prepared) -> None:
        super().validate_case(case, prepared)
        self.require_gland(case, prepared)

    def make_sample(self, sample: dict) -> dict[str, np.ndarray]:
        out = super().make_sample(sample)
        volume = normalise_in_gland(sample["image"][..., self.channel], sample["gland"])
        stacks = slice_stacks(volume, self.image_size, self.edge, self.stack_channels)[0]
        return {**out, "image": stacks, "slice_position": crop_positions(sample, stacks.shape[0])}

    def build_model(self, rngs: nnx.Rngs) -> SliceClassifier:
        options = self.config.model.backbone_options.to_dict()
        return SliceClassifier(provicnet_config(options, num_classes=self.num_classes, contrastive_head=False),
                               self.num_classes, bottleneck_dim=int(self.config.task.get("bottleneck_dim", 256)),
                               dtype=compute_dtype(options), rngs=rngs)

    def forward(self, model: SliceClassifier, batch, compute_dtype):
        return model(batch["image"].astype(compute_dtype), batch["slice_position"])
