"""Gland + lesion segmentation with a UPerNet head (ProFound-Conv by default).

    python -m transfer_jax.main --config=configs/seg.py --workdir=runs/seg
    python -m transfer_jax.main --config=configs/seg.py:smoke ...      # CI-sized
    python -m transfer_jax.main --config=configs/seg.py:full ...       # ConvNeXt-V2 Tiny at 64x224x224
"""
import ml_collections

from transfer_jax.config import apply_full, apply_smoke, base_config, parse_arg

TINY_CONVNEXT = dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone, preset = parse_arg(arg)
    c = base_config()
    c.task = ml_collections.ConfigDict(dict(
        name="segmentation", classes=("gland", "lesion"), aux_weight=0.4, class_weights=()))
    c.model = ml_collections.ConfigDict()
    c.model.backbone = backbone
    c.model.backbone_options = ml_collections.ConfigDict(dict(
        depths=(1, 1, 2, 1), dims=(16, 32, 64, 128), drop_path_rate=0.1, dtype="float32"))
    c.model.head_options = ml_collections.ConfigDict(dict(
        hidden_size=32, auxiliary_channels=16, pool_scales=(1, 2, 3, 6), use_auxiliary_head=True))
    # Upstream's optimiser never sees UPerNet's hidden_norm (not in its parameter groups): keep it at init.
    c.optimizer.frozen_patterns = (r"^hidden_norm\.",)
    if preset == "smoke":
        apply_smoke(c)
        c.model.backbone_options.depths = (1, 1, 1, 1)
        c.model.backbone_options.dims = (8, 16, 16, 32)
        c.model.head_options.hidden_size = 8
        c.model.head_options.auxiliary_channels = 8
    elif preset == "full":
        apply_full(c)
        c.model.backbone_options.update(TINY_CONVNEXT)
        c.model.head_options.hidden_size = 512
        c.model.head_options.auxiliary_channels = 256
        c.optimizer.layer_decay = 0.6
    return c
