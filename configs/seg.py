"""Gland + lesion segmentation with a UPerNet head (ProFound-Conv by default).

    python -m transfer_jax.main --config=configs/seg.py --workdir=runs/seg
    python -m transfer_jax.main --config=configs/seg.py:smoke ...      # CI-sized
    python -m transfer_jax.main --config=configs/seg.py:full ...       # ConvNeXt-V2 Tiny at 64x224x224
    python -m transfer_jax.main --config=configs/seg.py:profound_vit[,smoke|full] ...  # ProFound-ViT + ViT adapter
    python -m transfer_jax.main --config=configs/seg.py:lesion[,smoke|full] ...     # binary lesion, sigmoid head
    python -m transfer_jax.main --config=configs/seg.py:anatomy[,smoke|full] ...    # 9 classes from [T2, 0, 0]
    python -m transfer_jax.main --config=configs/seg.py:provicnet ...  # ProViCNet 2.5-D slices (see provicnet_config)
    python -m transfer_jax.main --config=configs/seg.py:provicnet,graded ...  # ISUP-graded lesions: indolent/csPCa
    python -m transfer_jax.main --config=configs/seg.py:provicnet,trus ...  # TRUS: 9-slice stacks, ChannelReducer
"""
import ml_collections

from transfer_jax.config import (apply_dense_head, apply_profound_recipe, apply_provicnet, base_config, parse_arg,
                                 provicnet_finetuning)
from transfer_jax.data.slices import TRUS_CHANNELS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants, arg = _variants(arg)
    backbone, preset = parse_arg(arg)
    allowed = PROVICNET_VARIANTS if backbone == "provicnet" else DENSE_VARIANTS
    if variants - set(allowed) or ({"lesion", "anatomy"} <= variants):
        raise ValueError(f"configs/seg.py variants {sorted(variants)} for backbone {backbone!r}: expected at most one "
                         f"of 'lesion' / 'anatomy' (UPerNet backbones) or any of {PROVICNET_VARIANTS} (provicnet)")
    if backbone == "provicnet":
        c = provicnet_config(preset)
        if "graded" in variants:  # ISUP-graded lesion masks: grade 1 indolent, >= 2 csPCa (upstream's rule)
            c.data.graded_masks = ("lesion",)
        if "trus" in variants:
            trus(c)
        return c
    c = base_config()
    # activation: "softmax" (one logit per class, argmax) or "sigmoid" (one foreground logit, > threshold; loss
    # MONAI DiceCELoss(sigmoid=True) with lambda_dice / lambda_ce); see tasks/segmentation.py.
    c.task = ml_collections.ConfigDict(dict(
        name="segmentation", classes=("gland", "lesion"), aux_weight=0.4, class_weights=(), hd95=True,
        activation="softmax", threshold=0.5, lambda_dice=1.0, lambda_ce=1.0))
    if "lesion" in variants:  # upstream ProFound's lesion UPerNet: 1 channel, sigmoid, DiceCE-BCE, threshold 0.5
        c.task.update(dict(classes=("lesion",), activation="sigmoid"))
    if "anatomy" in variants:  # upstream ProFound's anatomy UPerNet: 9 channels from [T2, 0, 0], softmax, argmax
        anatomy(c)
    # profound_vit: UPerNet reads the token levels `out_indices` through the ViT adapter.
    apply_dense_head(c, backbone, preset, auxiliary_head=True)
    if preset == "full":  # upstream's parameter groups and layer decay (docs/recipes.md)
        apply_profound_recipe(c, "segmentation", backbone)
    return c


DENSE_VARIANTS = ("lesion", "anatomy")
PROVICNET_VARIANTS = ("graded", "trus")
ANATOMY_CLASSES = tuple(f"structure_{k}" for k in range(1, 9))  # upstream names none of its 8 classes


def anatomy(c: ml_collections.ConfigDict) -> None:
    """tasks/anatomy.py: the label map is gland_mask's values 1..8 (`data.graded_masks`), the model sees T2 only."""
    c.task.update(dict(name="anatomy_segmentation", classes=ANATOMY_CLASSES, input_channels=("t2",)))
    c.data.graded_masks = ("gland",)
    c.data.gland_labels = tuple(range(1, len(ANATOMY_CLASSES) + 1))


def trus(c: ml_collections.ConfigDict) -> None:
    """TRUS_best.pth's model (`ProViCNet_contrastive_US`): 9-slice stacks through the 1x1 ChannelReducer (9 -> 3).
    The TRUS volume goes in the manifest's `t2` column (`task.sequence` "t2"); upstream's edge rule needs 18 slices
    per crop, shorter crops clamp."""
    c.model.backbone_options.reducer_in_channels = TRUS_CHANNELS
    c.task.edge = "shift" if c.data.crop_size[0] >= 2 * TRUS_CHANNELS else "clamp"


def _variants(arg: str | None) -> tuple[set[str], str | None]:
    """Split the task variants off the config argument; the rest (backbone, preset) goes to `parse_arg`."""
    tokens = [t for t in (arg or "").split(",") if t]
    known = DENSE_VARIANTS + PROVICNET_VARIANTS
    return {t for t in tokens if t in known}, ",".join(t for t in tokens if t not in known) or None


def provicnet_config(preset: str) -> ml_collections.ConfigDict:
    """ProViCNet (pimed/ProViCNet) fine-tuned on slices of one sequence (tasks/slice_segmentation.py).

    Every slice of a crop (whole slices in-plane) becomes a 3-slice stack resized to `task.image_size`; labels stay at the
    crop's in-plane size, which must be the output size 8 * image_size / 14. Presets:
    * smoke: ViT width 32, depth 2, 112 px input (8 x 8 patches) -> 64 x 64 labels, 4 slices per case; CPU tests.
    * default: ViT width 128, depth 4, 112 px -> 64 x 64 labels (1 mm), 16 slices (3 mm) per case, batch 2 cases
      = 32 slices per step, sized for a CPU. Reduced sizes; not the released geometry.
    * full: the released ViT-S/14 at 448 px with 256 x 256 labels (0.5 mm) and 20 slices (3 mm), upstream's data
      geometry; pair it with init.checkpoint = a converted T2_best.pth (python -m transfer_jax.convert provicnet).
    Loss: MONAI-1.3.1 DiceCE with upstream's class weights (train [0.02, 0.04, 0.5, 0.5], eval [0, 0, 0.5, 0.5]);
    `task.contrastive_alpha` > 0 adds the label-guided patch contrastive loss (upstream 0.05);
    `data.graded_masks=("lesion",)` (variant `graded`) keeps lesion grades: 1 indolent, >= 2 csPCa, and
    `task.indolent_as_cspca` maps 1 to csPCa as upstream does for PI-CAI files;
    `task.background_keep` < 1 leaves a random share of a case's slices without gland out of the training loss
    (upstream 0.8); `task.skip_no_cancer` skips training batches without a cancer pixel. Optimiser: Adam (weight
    decay 0), the backbone at 0.05 x lr like upstream, CL_Head frozen as upstream never optimises it. `full` is
    upstream's recipe (`provicnet_upstream_training`).
    """
    c = base_config()
    c.task = ml_collections.ConfigDict(dict(
        name="provicnet_segmentation", class_weights=(0.02, 0.04, 0.5, 0.5), eval_class_weights=(0.0, 0.0, 0.5, 0.5),
        contrastive_alpha=0.0, contrastive_max_pairs=30, contrastive_upper=62, contrastive_lower=2,
        contrastive_margin=0.5, background_keep=1.0, skip_no_cancer=False, indolent_as_cspca=False))
    apply_provicnet(c, preset)
    provicnet_finetuning(c)
    if preset == "full":
        provicnet_upstream_training(c)
    return c


def provicnet_upstream_training(c: ml_collections.ConfigDict) -> None:
    """pimed/ProViCNet train.py's defaults: Adam at 1e-3 (backbone x 0.05 = 5e-5) without warm-up, reduced by
    ReduceLROnPlateau(min, factor 0.9, patience 3, min_lr 1e-6) on the validation loss after every epoch (here:
    every evaluation; set eval_every to the steps of an epoch), the contrastive term at alpha 0.05, 80 % of the
    background slices of a case kept in the loss, and batches without a cancer pixel skipped."""
    c.optimizer.update(dict(lr=1e-3, warmup_steps=0, schedule="plateau", skip_zero_gradient_steps=True))
    c.optimizer.plateau.update(dict(metric="loss", mode="min", factor=0.9, patience=3, threshold=1e-4, cooldown=0,
                                    min_lr=1e-6))
    c.task.update(dict(contrastive_alpha=0.05, background_keep=0.8, skip_no_cancer=True))
