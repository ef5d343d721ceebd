"""ProViCNet fine-tuning: 2.5-D slice-wise segmentation of one MRI sequence into 4 classes (spec `provicnet.md` §3).

Classes: 0 background, 1 gland without cancer, 2 indolent cancer, 3 csPCa. By default the prepared cases' lesion
masks are binary and taken as csPCa (class 3). With graded lesion masks (`data.graded_masks = ("lesion",)`, the
mask's values kept, e.g. ISUP grade per voxel) upstream's rule applies (`slices.map_cancer_labels`): value 1 is
indolent (class 2), values >= 2 csPCa (class 3), so ISUP 1 / ISUP >= 2 split as upstream's GG1 / GG >= 2;
`task.indolent_as_cspca` counts 1 as csPCa too (upstream does so for PI-CAI files, whose lesions are csPCa only).

One batch element is one prepared case: every axial slice of a window of `data.crop_size[0]` slices becomes a
3-slice stack of ONE sequence (`task.sequence`, a channel of `data.channels`; upstream trains one model per
sequence, fusion is not trained here). With `data.region_centre="whole_slices"` the evaluation crop is the whole
slice (and the whole volume) where it fits the crop: upstream's prepared data (0.5 x 0.5 x 3 mm, 256 x 256, 20
slices in the `full` preset) goes in whole; larger data is resampled and cut around the gland, as upstream's
offline preparation (`region_centre="gland"` centres every axis on the gland instead). `predict` and `extract` run upstream's
inference on the files as they are (`data/slices.py:case_slices`). `make_sample` (numpy, data workers), on the augmented training crop or the
deterministic evaluation centre crop alike:

1. take the sequence's channel [D, H, W] of raw intensities (`data.intensity = "raw"`: no z-score before this one)
   and z-score it with the mean / std of the gland voxels (`zscore_in_gland`, upstream §3.2), so a voxel that is 0
   in the source (air in ADC / DWI, padding) ends at -mean / std as upstream's; crops without a gland voxel fall
   back to the whole crop's statistics;
2. resize every slice, image only, from the native H x W to `task.image_size` (cv2-style bilinear);
3. stack each slice with its neighbours (`task.edge`: "shift" = upstream's rule, the default; "clamp" = every
   slice is the centre of its own stack, needed by crops shorter than 6 slices and the image-to-image tasks);
4. labels stay at the native grid, which must be the model's output size 8 * image_size / 14 (448 -> 256); under
   "shift" a stack's label is its moved centre's, as upstream;
5. slice positions (j, n), raw floats as upstream: j the slice of the *volume* each crop slice was sampled at (its
   index counted from the volume's first slice) and n the volume's slice count (`slices.crop_positions`), so a
   20-slice volume gives (j, 20) whatever the crop, as in `predict`.

Sample arrays: `image` [S, s, s, 3] float32 (S = D stacks), `label` [S, L, L] int32, `slice_position` [S, 2]
float32, `pair_seed` int32 (a hash of the sample, seeds the contrastive pair draw). The model sees the S slices of
the B cases of a batch as one batch of B * S slices.

Loss (MONAI 1.3.1 `DiceCELoss(softmax, to_onehot_y, weight=w)`, include_background=True): soft Dice per (slice,
class) times w[c], averaged over slices and classes, plus CE weighted as torch does. Weights: training
`task.class_weights` (upstream [0.02, 0.04, 0.5, 0.5]), evaluation `task.eval_class_weights` (upstream
[0, 0, 0.5, 0.5]). With `task.contrastive_alpha` = a > 0 the training loss is (1 - a) DiceCE + a L_con, the
label-guided patch contrastive loss (`provicnet_contrastive.py`, upstream a = 0.05) on the final-norm patch tokens
through `CL_Head` (built only then; upstream never optimises it: `configs/seg.py` freezes it). Training only:
`task.background_keep` < 1 weighs out all but floor(keep * n) of a case's n slices without gland
(`background_slice_keep`, upstream's `filterBackground` 0.8), and `task.skip_no_cancer` makes the loss 0 for a
batch without a cancer pixel, which `optimizer.skip_zero_gradient_steps` turns into no optimizer step.

Metrics: Dice per class per case (intersections and sums added over the case's slices, cases with an empty ground
truth skipped for that class); `dice_mean` (primary) = mean over the foreground classes present in the
validation set (gland and csPCa on the phantom data); `dice_cancer` = mean over indolent / csPCa present.

`SliceTask` holds what the other ProViCNet tasks share with this one (slice geometry and its checks, slice inputs,
flattening, the alignment probe): `slice_classification.py`, `slice_restoration.py`.
"""
from __future__ import annotations

import zlib
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfer_jax.data import slices as slice_data
from transfer_jax.models.provicnet import ContrastiveHeadConfig, ProViCNet, ProViCNetConfig
from transfer_jax.models.registry import compute_dtype, encoder_feature_sites
from transfer_jax.tasks import provicnet_contrastive as contrastive
from transfer_jax.tasks.base import Task, require
from transfer_jax.tasks.segmentation import dice_ce_loss, dice_counts, dice_from_counts

CLASS_NAMES = slice_data.CLASS_NAMES  # background, gland, indolent, csPCa
CANCER_CLASSES = (2, 3)  # upstream skips a training batch whose labels hold none of them (`Label[:, 2:4]`)
# Model options that say how to run the model, not what it is (stripped before building ProViCNetConfig).
RUNTIME_OPTIONS = ("dtype",)
# Output pixels per patch token along each axis (conv_head8: three x2 up-samplings).
HEAD_UPSAMPLING = 8


class SliceOutput(NamedTuple):
    logits: jax.Array  # [B * S, L, L, 4]
    contrastive: Optional[jax.Array]  # scalar L_con (training with contrastive_alpha > 0), else None
    training: bool


def provicnet_config(options: dict, *, num_classes: int, contrastive_head: bool) -> ProViCNetConfig:
    """`model.backbone_options` (ProViCNetConfig fields, nested like an artifact's config, + runtime options)."""
    values = {k: v for k, v in dict(options).items() if k not in RUNTIME_OPTIONS}
    values["num_classes"] = num_classes
    if contrastive_head:
        values["contrastive_head"] = values.get("contrastive_head") or ContrastiveHeadConfig().__dict__
    else:
        values["contrastive_head"] = None
    return ProViCNetConfig.from_dict(values)


def build_provicnet(options: dict, rngs: nnx.Rngs, *, num_classes: int, contrastive_head: bool) -> ProViCNet:
    """ProViCNet from `model.backbone_options`, computing in their `dtype`."""
    return ProViCNet(provicnet_config(options, num_classes=num_classes, contrastive_head=contrastive_head),
                     dtype=compute_dtype(options), rngs=rngs)


def background_slice_keep(key: jax.Array, labels: jax.Array, seeds: jax.Array, keep: float) -> jax.Array:
    """[B, S] 0 / 1 weights of a batch's slices for the training loss: every slice with gland (or cancer) and, per
    case, floor(keep * n) of its n background slices drawn at random without replacement (upstream's
    `filterBackground`, which drops the other background slices from the training set). `seeds` [B] (the
    samples' `pair_seed`) make each case's draw its own."""
    background = ~jnp.any(labels > 0, axis=(2, 3))  # [B, S]
    count = jnp.floor(jnp.sum(background, axis=1) * keep)  # [B]

    def one_case(seed, is_background, n_keep):
        scores = jax.random.uniform(jax.random.fold_in(key, seed), is_background.shape)
        order = jnp.argsort(jnp.where(is_background, scores, jnp.inf))
        rank = jnp.argsort(order)  # rank of each slice among the background slices, by score
        return (~is_background) | (rank < n_keep)

    return jax.vmap(one_case)(seeds, background, count).astype(jnp.float32)


def label_size(image_size: int, patch: int) -> int:
    if image_size % patch:
        raise ValueError(f"task.image_size={image_size} is not a multiple of the ViT patch size {patch}")
    return HEAD_UPSAMPLING * (image_size // patch)


def normalise_in_gland(volume: np.ndarray, gland: np.ndarray) -> np.ndarray:
    """Gland z-score (upstream); crops that lost the gland (or a constant gland) use the whole crop's statistics."""
    try:
        return slice_data.zscore_in_gland(volume, gland)
    except ValueError:
        volume = volume.astype(np.float64)
        std = volume.std()
        return ((volume - volume.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def slice_stacks(volume: np.ndarray, image_size: int, edge: str,
                 num_channels: int = slice_data.MRI_CHANNELS) -> tuple[np.ndarray, np.ndarray]:
    """Normalised [D, H, W] -> (NHWC stacks [D, s, s, C], label slice per stack [D]); C = 3 (MRI) or 9 (TRUS)."""
    depth = volume.shape[0]
    resized = slice_data.resize_bilinear(volume, (image_size, image_size))
    channels, label_slice = slice_data.stack_layout(depth, np.arange(depth), num_channels, edge)
    return np.ascontiguousarray(resized[channels].transpose(0, 2, 3, 1)), label_slice


def slice_positions(count: int) -> np.ndarray:
    """[count, 2] raw (j, n) floats, j = 0..count-1, n = count: a crop that is its own volume (probe crops)."""
    return slice_data.crop_positions({}, count)


class SliceTask:
    """What every ProViCNet task shares (mixin; put it before the `Task` subclass it adapts): the slice geometry
    (`task.sequence`, `task.image_size`, `task.edge`, the crop's in-plane size = the model's output size), the
    per-slice inputs, the [B, S, ...] -> [B * S, ...] flattening and the alignment probe (sites `cls` and
    `mean_patch` of every slice)."""

    backbone_prefix = "backbone."

    def __init__(self, config):
        super().__init__(config)
        task, model = config.task, config.model
        channels = tuple(config.data.channels)
        if task.sequence not in channels:
            raise ValueError(f"task.sequence={task.sequence!r} is not one of data.channels {channels}")
        self.channel = channels.index(task.sequence)
        self.image_size = int(task.image_size)
        patch = int(model.backbone_options.backbone.get("patch", 14))
        self.label_size = label_size(self.image_size, patch)
        crop = tuple(int(c) for c in config.data.crop_size)
        if crop[1:] != (self.label_size, self.label_size):
            raise ValueError(
                f"data.crop_size {crop}: the in-plane size must equal the model's output size {self.label_size} "
                f"(= 8 * task.image_size / patch = 8 * {self.image_size} / {patch}); labels are never resized")
        self.edge = task.edge
        if self.edge not in slice_data.EDGE_RULES:
            raise ValueError(f"task.edge must be one of {slice_data.EDGE_RULES}, got {self.edge!r}")
        # Slices per stack: the TRUS model's ChannelReducer input (9 -> 3), else 3 (MRI).
        self.stack_channels = int(model.backbone_options.get("reducer_in_channels") or slice_data.MRI_CHANNELS)
        if self.edge == "shift" and crop[0] < 2 * self.stack_channels:
            raise ValueError(f"task.edge='shift' needs at least {2 * self.stack_channels} slices per crop "
                             f"({self.stack_channels}-slice stacks), data.crop_size has {crop[0]}")

    def require_gland(self, case, prepared) -> None:
        require(case.path("gland_mask") is not None,
                "ProViCNet needs a gland mask (its inputs are z-scored inside the gland), but the cell is empty", case)
        require(prepared.gland is not None and bool(prepared.gland.any()),
                "the gland mask is empty inside the cropped region", case, case.gland_mask)

    def slice_inputs(self, volume: np.ndarray) -> np.ndarray:
        """Normalised crop [D, H, W, C] -> the model inputs [D, s, s, stack_channels]: stacks of `task.sequence`."""
        return slice_stacks(volume[..., self.channel], self.image_size, self.edge, self.stack_channels)[0]

    def provicnet(self, rngs: nnx.Rngs, *, num_classes: int, contrastive_head: bool = False) -> ProViCNet:
        return build_provicnet(self.config.model.backbone_options.to_dict(), rngs, num_classes=num_classes,
                               contrastive_head=contrastive_head)

    @staticmethod
    def slice_batch(batch) -> tuple[jax.Array, jax.Array]:
        """(images [B * S, s, s, C], slice positions [B * S, 2]): the model sees a batch's slices as one batch."""
        images = batch["image"]
        count = images.shape[0] * images.shape[1]
        return images.reshape((count,) + images.shape[2:]), batch["slice_position"].reshape(count, 2)

    def probe_inputs(self, images: np.ndarray) -> np.ndarray:
        """Probe crops [N, D, H, W, C] -> [N, D, s, s, 3] slice inputs.

        The probe crops carry no gland mask, so each channel of each crop is z-scored over its own voxels.
        """
        out = []
        for crop in images:
            volume = crop.astype(np.float64)
            axes = tuple(range(volume.ndim - 1))
            volume = (volume - volume.mean(axis=axes)) / np.maximum(volume.std(axis=axes), 1e-6)
            out.append(self.slice_inputs(volume.astype(np.float32)))
        return np.ascontiguousarray(np.stack(out))

    def probe_features(self, model: ProViCNet, images: jax.Array) -> dict[str, jax.Array]:
        """Sites `cls` and `mean_patch`, one row per slice: [N * D, width]."""
        count = images.shape[0] * images.shape[1]
        positions = jnp.tile(jnp.asarray(slice_positions(images.shape[1])), (images.shape[0], 1))
        return encoder_feature_sites(model, images.reshape((count,) + images.shape[2:]), slice_position=positions)


class SliceSegmentationTask(SliceTask, Task):
    name = "provicnet_segmentation"
    primary_metric = "dice_mean"
    direction = "max"

    def __init__(self, config):
        super().__init__(config)
        task = config.task
        self.class_names = CLASS_NAMES
        self.num_classes = len(CLASS_NAMES)
        self.class_weights = self._weights(task.class_weights, "task.class_weights")
        self.eval_class_weights = self._weights(task.eval_class_weights, "task.eval_class_weights")
        self.alpha = float(task.contrastive_alpha)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"task.contrastive_alpha must be in [0, 1], got {self.alpha}")
        self.background_keep = float(task.get("background_keep", 1.0))
        if not 0.0 <= self.background_keep <= 1.0:
            raise ValueError(f"task.background_keep must be in [0, 1], got {self.background_keep}")
        self.graded_lesions = "lesion" in tuple(config.data.get("graded_masks", ()))
        self.indolent_as_cspca = bool(task.get("indolent_as_cspca", False))
        self.skip_no_cancer = bool(task.get("skip_no_cancer", False))
        if self.skip_no_cancer and not config.optimizer.get("skip_zero_gradient_steps", False):
            raise ValueError("task.skip_no_cancer=True needs optimizer.skip_zero_gradient_steps=True (the skipped "
                             "batches' zero gradients must leave the optimizer state as it is)")

    def _weights(self, values, name):
        if not values:
            return None
        weights = tuple(float(w) for w in values)
        if len(weights) != self.num_classes:
            raise ValueError(f"{name} has {len(weights)} entries; expected {self.num_classes} for {CLASS_NAMES}")
        return weights

    # -- data ---------------------------------------------------------------------------------------------------
    def validate_case(self, case, prepared) -> None:
        self.require_gland(case, prepared)

    def cancer_codes(self, lesion, shape) -> np.ndarray:
        """Upstream's cancer codes (0 none, 1 indolent, 2 csPCa) of a prepared lesion mask: a binary mask is all
        csPCa; a graded one goes through upstream's rule (`slices.map_cancer_labels`)."""
        if lesion is None:
            return np.zeros(shape, np.uint8)
        if self.graded_lesions:
            return slice_data.map_cancer_labels(lesion, indolent_as_cspca=self.indolent_as_cspca)
        return np.where(lesion > 0, 2, 0).astype(np.uint8)

    def make_sample(self, sample: dict) -> dict[str, np.ndarray]:
        volume = sample["image"][..., self.channel]
        gland = sample["gland"]
        depth, height, width = volume.shape
        if (height, width) != (self.label_size, self.label_size):
            raise ValueError(f"slice size {height}x{width} differs from the label size {self.label_size}")
        images, label_slice = slice_stacks(normalise_in_gland(volume, gland), self.image_size, self.edge,
                                           self.stack_channels)
        labels = slice_data.four_class_labels(gland, self.cancer_codes(sample.get("lesion"), volume.shape))
        labels = labels[label_slice].astype(np.int32)
        seed = zlib.crc32(np.ascontiguousarray(images[:, ::7, ::7]).tobytes()) & 0x7FFFFFFF
        return {"image": images, "label": labels, "slice_position": slice_data.crop_positions(sample, depth),
                "pair_seed": np.int32(seed)}

    # -- model --------------------------------------------------------------------------------------------------
    def build_model(self, rngs: nnx.Rngs) -> ProViCNet:
        return self.provicnet(rngs, num_classes=self.num_classes, contrastive_head=self.alpha > 0)

    def _flatten_slices(self, batch):
        images, positions = self.slice_batch(batch)
        return images, positions, batch["label"].reshape((images.shape[0],) + batch["label"].shape[2:])

    def forward(self, model: ProViCNet, batch, compute_dtype) -> SliceOutput:
        images, positions, labels = self._flatten_slices(batch)
        training = not model.head.segmentation_conv[2].use_running_average
        images = images.astype(compute_dtype)
        if not (training and self.alpha > 0):
            return SliceOutput(model(images, positions), None, training)
        logits, feature_map = model(images, positions, return_features=True)
        task = self.config.task
        key = jax.random.fold_in(jax.random.key(self.config.seed), jnp.sum(batch["pair_seed"]))
        pairs = contrastive.mine_contrastive_pairs(
            key, labels, max_pairs=int(task.contrastive_max_pairs), upper=int(task.contrastive_upper),
            lower=int(task.contrastive_lower), distant_negative=True, patch_pixels=HEAD_UPSAMPLING)
        term = contrastive.label_guided_contrastive_loss(model.project, feature_map.astype(jnp.float32), pairs,
                                                         margin=float(task.contrastive_margin))
        return SliceOutput(logits, term, training)

    # -- loss and metrics ---------------------------------------------------------------------------------------
    def loss(self, outputs: SliceOutput, batch):
        labels = batch["label"].reshape((-1,) + batch["label"].shape[2:])
        weights = self.class_weights if outputs.training else self.eval_class_weights
        weights = None if weights is None else jnp.asarray(weights, jnp.float32)
        keep = None
        if outputs.training and self.background_keep < 1.0:
            key = jax.random.key(self.config.seed + 11)
            keep = background_slice_keep(key, batch["label"], batch["pair_seed"], self.background_keep).reshape(-1)
        dice_ce = dice_ce_loss(outputs.logits, labels, include_background=True, class_weights=weights,
                               sample_weights=keep)
        metrics = {"loss_dice_ce": dice_ce}
        total = dice_ce
        if outputs.contrastive is not None:
            total = (1.0 - self.alpha) * dice_ce + self.alpha * outputs.contrastive
            metrics["loss_contrastive"] = outputs.contrastive
        if outputs.training and self.skip_no_cancer:
            cancer = labels >= CANCER_CLASSES[0]
            if keep is not None:
                cancer = cancer & (keep[:, None, None] > 0)
            has_cancer = jnp.any(cancer)
            # A zero loss gives zero gradients, which `optimizer.skip_zero_gradient_steps` turns into no step.
            total = jnp.where(has_cancer, total, 0.0)
            metrics["skipped"] = 1.0 - has_cancer.astype(jnp.float32)
        return total, metrics

    def eval_stats(self, outputs: SliceOutput, batch):
        pred = jnp.argmax(outputs.logits, axis=-1).reshape(batch["label"].shape)
        return dice_counts(pred, batch["label"], self.num_classes)  # summed over the case's slices: [B, K]

    def summarize(self, stats):
        dice = dice_from_counts(stats)
        metrics = {}
        for k, name in enumerate(self.class_names[1:], start=1):
            column = dice[:, k]
            metrics[f"dice/{name}"] = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")

        def mean(names):
            finite = [metrics[f"dice/{n}"] for n in names if np.isfinite(metrics[f"dice/{n}"])]
            return float(np.mean(finite)) if finite else float("nan")

        metrics["dice_mean"] = mean(self.class_names[1:])
        metrics["dice_cancer"] = mean(self.class_names[2:])
        return metrics
