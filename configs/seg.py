"""Gland + lesion segmentation with a UPerNet head (ProFound-Conv by default).

    python -m transfer_jax.main --config=configs/seg.py --workdir=runs/seg
    python -m transfer_jax.main --config=configs/seg.py:smoke ...      # CI-sized
    python -m transfer_jax.main --config=configs/seg.py:full ...       # ConvNeXt-V2 Tiny at 64x224x224
    python -m transfer_jax.main --config=configs/seg.py:profound_vit[,smoke|full] ...  # ProFound-ViT + ViT adapter
    python -m transfer_jax.main --config=configs/seg.py:provicnet ...  # ProViCNet 2.5-D slices (see provicnet_config)
"""
import ml_collections

from transfer_jax.config import apply_dense_head, apply_provicnet, base_config, parse_arg, provicnet_finetuning


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone, preset = parse_arg(arg)
    if backbone == "provicnet":
        return provicnet_config(preset)
    c = base_config()
    c.task = ml_collections.ConfigDict(dict(
        name="segmentation", classes=("gland", "lesion"), aux_weight=0.4, class_weights=(), hd95=True))
    # profound_vit: UPerNet reads the token levels `out_indices` through the ViT adapter.
    apply_dense_head(c, backbone, preset, auxiliary_head=True)
    if preset == "full":
        c.optimizer.layer_decay = 0.6
    return c


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
    `task.contrastive_alpha` > 0 adds the label-guided patch contrastive loss (upstream 0.05). Optimiser: Adam
    (weight decay 0), the backbone at 0.05 x lr like upstream (1e-3 head, 5e-5 backbone), CL_Head frozen as
    upstream never optimises it.
    """
    c = base_config()
    c.task = ml_collections.ConfigDict(dict(
        name="provicnet_segmentation", class_weights=(0.02, 0.04, 0.5, 0.5), eval_class_weights=(0.0, 0.0, 0.5, 0.5),
        contrastive_alpha=0.0, contrastive_max_pairs=30, contrastive_upper=62, contrastive_lower=2,
        contrastive_margin=0.5))
    apply_provicnet(c, preset)
    provicnet_finetuning(c)
    return c
