"""Gland and lesion segmentation: label map 0 = background, 1 = gland, 2 = lesion (lesion wins where they overlap).

Two heads (`task.activation`):
* "softmax" (default): one logit per class (background included). Loss: MONAI-style DiceCE (softmax; soft Dice per
  sample and foreground class, smooth 1e-5; CE over all classes); prediction: the argmax.
* "sigmoid": upstream ProFound's binary lesion model (`configs/seg.py:lesion`): `task.classes` = ("lesion",), ONE
  output channel. Loss: MONAI `DiceCELoss(sigmoid=True)` = soft Dice of sigmoid(logit) per sample (the one channel
  is the foreground, so nothing is excluded; smooth 1e-5) + BCE-with-logits averaged over voxels, weights
  `task.lambda_dice` / `task.lambda_ce` (upstream 1 / 1); prediction: sigmoid > `task.threshold` (upstream 0.5).

Both: the loss on the main logits plus `aux_weight` x the same on the auxiliary head (upstream: 0.4). Metric: Dice
per class per case on the predicted label map, cases with an empty ground truth skipped for that class (MONAI ignore_empty); with
`task.hd95` (default True) also HD95 (mm) per class per case, computed on the host from the fetched argmax maps at
the evaluation cadence (`hd95/<class>`, see `SegmentationTask.hd95_per_case`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfer_jax.models.upernet import SegmentationOutput, UPerNet
from transfer_jax.tasks.base import Task, require
from transfer_jax.tasks.dense import build_dense_model
from transfer_jax.tasks.metrics import hausdorff95_per_class

SMOOTH = 1e-5


def soft_dice_loss(probs: jax.Array, onehot: jax.Array, *, include_background: bool,
                   class_weights: jax.Array | None = None, sample_weights: jax.Array | None = None) -> jax.Array:
    """1 - (2 sum(p g) + s) / (sum(p) + sum(g) + s) per (sample, class), weighted mean over classes and batch.

    `sample_weights` (B,) of 0 / 1 give the loss of the batch without the zero-weight samples."""
    spatial = tuple(range(1, probs.ndim - 1))
    intersection = jnp.sum(probs * onehot, axis=spatial)
    denominator = jnp.sum(probs, axis=spatial) + jnp.sum(onehot, axis=spatial)
    dice = 1.0 - (2.0 * intersection + SMOOTH) / (denominator + SMOOTH)
    if class_weights is not None:
        dice = dice * class_weights
    if not include_background:
        dice = dice[:, 1:]
    if sample_weights is None:
        return jnp.mean(dice)
    per_sample = jnp.mean(dice, axis=-1)
    return jnp.sum(sample_weights * per_sample) / jnp.maximum(jnp.sum(sample_weights), 1e-12)


def cross_entropy(log_probs: jax.Array, onehot: jax.Array, class_weights: jax.Array | None = None,
                  sample_weights: jax.Array | None = None) -> jax.Array:
    """Mean voxel CE; with class weights the weighted mean sum(w_y nll) / sum(w_y), as torch does.

    The label is picked with the one-hot map, not a gather: XLA:CPU builds the gather's indices and its scatter
    gradient at full resolution, which makes a `take_along_axis` step slower (benchmarks/RESULTS.md §2c).
    """
    nll = -jnp.sum(onehot * log_probs, axis=-1)
    if class_weights is None and sample_weights is None:
        return jnp.mean(nll)
    w = jnp.ones_like(nll) if class_weights is None else jnp.sum(onehot * class_weights, axis=-1)
    if sample_weights is not None:
        w = w * sample_weights.reshape(sample_weights.shape + (1,) * (nll.ndim - 1))
    return jnp.sum(w * nll) / jnp.maximum(jnp.sum(w), 1e-12)


def dice_ce_loss(logits: jax.Array, labels: jax.Array, *, include_background: bool = False,
                 class_weights: jax.Array | None = None, sample_weights: jax.Array | None = None) -> jax.Array:
    logits = logits.astype(jnp.float32)
    onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    dice = soft_dice_loss(jnp.exp(log_probs), onehot, include_background=include_background,
                          class_weights=class_weights, sample_weights=sample_weights)
    return dice + cross_entropy(log_probs, onehot, class_weights, sample_weights)


def sigmoid_dice_ce_loss(logits: jax.Array, labels: jax.Array, *, lambda_dice: float = 1.0,
                         lambda_ce: float = 1.0) -> jax.Array:
    """MONAI `DiceCELoss(sigmoid=True)` on a one-channel head: (..., 1) logits, (...) labels, foreground = label > 0.

    MONAI takes the BCE branch (not CE) when the prediction has one channel; BCE-with-logits is written in its
    stable form max(x, 0) - x t + log(1 + exp(-|x|))."""
    logits = logits.astype(jnp.float32)
    target = (labels > 0).astype(jnp.float32)[..., None]
    dice = soft_dice_loss(jax.nn.sigmoid(logits), target, include_background=True)
    bce = jnp.mean(jnp.maximum(logits, 0.0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits))))
    return lambda_dice * dice + lambda_ce * bce


def dice_counts(pred: jax.Array, labels: jax.Array, num_classes: int) -> dict[str, jax.Array]:
    """Per-sample, per-class |P & G|, |P| and |G| of hard label maps: (B, K) each."""
    spatial = tuple(range(1, pred.ndim))
    p = jax.nn.one_hot(pred, num_classes, dtype=jnp.float32)
    g = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    axes = tuple(a for a in spatial)
    return {
        "intersection": jnp.sum(p * g, axis=axes),
        "pred_sum": jnp.sum(p, axis=axes),
        "target_sum": jnp.sum(g, axis=axes),
    }


def dice_from_counts(stats: dict[str, np.ndarray]) -> np.ndarray:
    """(cases, K) Dice with NaN where the ground truth is empty (skipped in means)."""
    inter, pred, target = stats["intersection"], stats["pred_sum"], stats["target_sum"]
    with np.errstate(invalid="ignore", divide="ignore"):
        dice = 2.0 * inter / (pred + target)
    return np.where(target > 0, dice, np.nan)


ACTIVATIONS = ("softmax", "sigmoid")


class SegmentationTask(Task):
    name = "segmentation"
    primary_metric = "dice_mean"
    direction = "max"

    def __init__(self, config):
        super().__init__(config)
        self.class_names = ("background",) + tuple(config.task.classes)
        self.check_classes(tuple(config.task.classes))
        self.num_classes = len(self.class_names)
        self.activation = str(config.task.get("activation", "softmax"))
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"task.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "sigmoid" and self.num_classes != 2:
            raise ValueError(f"task.activation='sigmoid' is a one-channel (binary) head; task.classes must name one "
                             f"class, got {tuple(config.task.classes)}")
        # Logits per voxel: one per class, or the single foreground logit of the sigmoid head.
        self.out_channels = 1 if self.activation == "sigmoid" else self.num_classes
        self.threshold = float(config.task.get("threshold", 0.5))
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"task.threshold must be in (0, 1), got {self.threshold}")
        self.hd95 = bool(config.task.get("hd95", True))
        weights = config.task.get("class_weights")
        self.class_weights = None if not weights else tuple(float(w) for w in weights)
        if self.class_weights is not None and self.activation == "sigmoid":
            raise ValueError("task.class_weights applies to the softmax head; the sigmoid head's MONAI loss has none")
        if self.class_weights is not None and len(self.class_weights) != self.num_classes:
            raise ValueError(f"task.class_weights has {len(self.class_weights)} entries; expected "
                             f"{self.num_classes} for classes {self.class_names}")

    def check_classes(self, classes: tuple[str, ...]) -> None:
        unknown = [c for c in classes if c not in ("gland", "lesion")]
        if unknown:
            raise ValueError(f"task.classes: unknown class(es) {unknown}; segmentation supports 'gland', 'lesion'")

    def validate_case(self, case, prepared) -> None:
        for cls in self.config.task.classes:
            column = f"{cls}_mask"
            require(case.path(column) is not None,
                    f"segmentation of {cls!r} needs a {column!r} in the manifest, but the cell is empty", case)
        require(prepared.gland is None or prepared.gland.any() or "gland" not in self.config.task.classes,
                "the gland mask is empty inside the cropped region", case, case.gland_mask)

    def make_sample(self, sample: dict) -> dict[str, np.ndarray]:
        return {"image": sample["image"],
                "label": label_map(sample, self.config.task.classes, sample["image"].shape[:3])}

    def build_model(self, rngs: nnx.Rngs) -> UPerNet:
        # ProFound-Conv stage maps, or ProFound-ViT token levels through the ViT adapter (tasks/dense.py).
        return build_dense_model(self.config.model, self.out_channels, rngs)

    def predicted_labels(self, logits):
        """(..., out_channels) logits -> (...) int32 label map: sigmoid > threshold, or the argmax class. Works on
        jax and numpy arrays alike (`predict` calls it on the blended whole-volume logits)."""
        xp = jnp if isinstance(logits, jax.Array) else np
        if self.activation == "sigmoid":
            # sigmoid(x) > t  <=>  x > log(t / (1 - t)): no sigmoid of the whole map needed.
            return (logits[..., 0] > np.log(self.threshold / (1.0 - self.threshold))).astype(xp.int32)
        return xp.argmax(logits, axis=-1).astype(xp.int32)

    def probabilities(self, logits) -> np.ndarray:
        """(..., K) class probabilities (numpy): the softmax, or [1 - p, p] of the sigmoid head."""
        logits = jnp.asarray(logits, jnp.float32)
        if self.activation == "sigmoid":
            p = jax.nn.sigmoid(logits[..., 0])
            return np.asarray(jnp.stack([1.0 - p, p], axis=-1))
        return np.asarray(jax.nn.softmax(logits, axis=-1))

    def _loss_one(self, logits, labels):
        if self.activation == "sigmoid":
            return sigmoid_dice_ce_loss(logits, labels, lambda_dice=float(self.config.task.get("lambda_dice", 1.0)),
                                        lambda_ce=float(self.config.task.get("lambda_ce", 1.0)))
        weights = None if self.class_weights is None else jnp.asarray(self.class_weights, jnp.float32)
        return dice_ce_loss(logits, labels, include_background=False, class_weights=weights)

    def loss(self, outputs: SegmentationOutput, batch):
        main = self._loss_one(outputs.logits, batch["label"])
        metrics = {"loss_main": main}
        total = main
        if outputs.aux_logits is not None:
            aux = self._loss_one(outputs.aux_logits, batch["label"])
            total = main + self.config.task.aux_weight * aux
            metrics["loss_aux"] = aux
        return total, metrics

    def eval_stats(self, outputs: SegmentationOutput, batch):
        pred = self.predicted_labels(outputs.logits)
        stats = dice_counts(pred, batch["label"], self.num_classes)
        if self.hd95:  # label maps for the host-side HD95 (fetched once per evaluation; small crops)
            stats["pred_labels"] = pred.astype(jnp.int8)
            stats["target_labels"] = batch["label"].astype(jnp.int8)
        return stats

    def hd95_per_case(self, stats) -> np.ndarray:
        """(cases, K - 1) HD95 in mm per foreground class (tasks/metrics.py::hausdorff95_per_class): NaN where a
        class is absent from both maps (skipped in means); a class present in only one map (HD95 = inf) counts as
        the diagonal of the evaluated volume (`case_hd95`)."""
        spacing = tuple(float(s) for s in self.config.data.spacing)
        pred, target = np.asarray(stats["pred_labels"]), np.asarray(stats["target_labels"])
        if not len(pred):
            return np.zeros((0, self.num_classes - 1))
        return np.stack([case_hd95(p, t, self.num_classes, spacing) for p, t in zip(pred, target)])

    def summarize(self, stats):
        hd95 = self.hd95_per_case(stats) if "pred_labels" in stats else None
        return summarize_cases(dice_from_counts(stats), hd95, self.class_names)


def label_map(masks: dict, classes, shape) -> np.ndarray:
    """The int32 label map of `shape` from masks by class name: class `k` (1-based position in `classes`) where
    `masks[classes[k - 1]]` is set, later classes winning where masks overlap; 0 elsewhere."""
    label = np.zeros(tuple(shape), np.int32)
    for index, cls in enumerate(classes, start=1):
        label[np.asarray(masks[cls]) > 0] = index
    return label


def case_hd95(pred_labels, target_labels, num_classes: int, spacing) -> np.ndarray:
    """(K - 1,) HD95 in mm per foreground class of one case (tasks/metrics.py::hausdorff95_per_class): NaN where a
    class is absent from both maps; a class present in only one map (HD95 = inf) counts as the volume's diagonal,
    the largest distance it allows, so that means stay finite."""
    pred, target = np.asarray(pred_labels).astype(np.int64), np.asarray(target_labels).astype(np.int64)
    values = hausdorff95_per_class(pred, target, num_classes, spacing)
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
    return np.where(np.isinf(values), diagonal, values)


def summarize_cases(dice: np.ndarray, hd95, class_names) -> dict[str, float]:
    """Per-case Dice (cases, K) and HD95 (cases, K - 1) or None -> `dice/<class>`, `dice_mean` (over the classes
    with a value) and `hd95/<class>`: means over the cases where the value is defined."""
    metrics = {}
    per_class = []
    for k, name in enumerate(class_names[1:], start=1):
        column = dice[:, k]
        value = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
        metrics[f"dice/{name}"] = value
        per_class.append(value)
    finite = [v for v in per_class if np.isfinite(v)]
    metrics["dice_mean"] = float(np.mean(finite)) if finite else float("nan")
    if hd95 is not None:
        for k, name in enumerate(class_names[1:]):
            column = hd95[:, k]
            metrics[f"hd95/{name}"] = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
    return metrics
