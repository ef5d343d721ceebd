"""Case-level PI-RADS classification (4 classes, PI-RADS 2..5 = manifest label 0..3) or its csPCa binary variant.

    python -m transfer_jax.main --config=configs/cls.py --workdir=runs/cls                  # ProFound-Conv
    python -m transfer_jax.main --config=configs/cls.py:profound_vit --workdir=runs/cls_vit
    python -m transfer_jax.main --config=configs/cls.py:binary ...      # csPCa: label >= 2 (PI-RADS >= 4) -> 1
    python -m transfer_jax.main --config=configs/cls.py:smoke ...       # CI-sized
    python -m transfer_jax.main --config=configs/cls.py:full ...        # ConvNeXt-V2 Tiny / ViT-B, published crops
    python -m transfer_jax.main --config=configs/cls.py:provicnet[,smoke|full] ...  # slice-wise ProViCNet

The argument is `[backbone][,preset][,binary]`; `--config.task.binary=True` works too. Model: backbone + ProFound's
MLP head (Linear -> BatchNorm1d -> ReLU -> Linear) on the pooled (conv) / cls (ViT) feature; loss CE; primary
metric `auroc_macro` (one-vs-rest), `auroc` for the binary variant (see transfer_jax/tasks/classification.py).
`:provicnet` (task `provicnet_classification`, tasks/slice_classification.py): ProViCNet's final-norm cls token of
every T2 slice stack, averaged over the case's slices, into the same head.
"""
import ml_collections

from transfer_jax.config import apply_backbone, apply_full, apply_profound_recipe, apply_smoke, base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = [t for t in (arg or "").split(",") if t]
    binary = "binary" in tokens
    backbone, preset = parse_arg(",".join(t for t in tokens if t != "binary"))
    c = base_config()
    c.task = ml_collections.ConfigDict(dict(name="classification", binary=binary, bottleneck_dim=64))
    c.model = ml_collections.ConfigDict()
    c.total_steps = 200
    c.eval_every = 25
    c.data.phantom.num_val = 6  # AUROC needs both ends of the label range among the validation cases
    if preset == "smoke":
        apply_smoke(c)
        c.task.bottleneck_dim = 16
        c.data.phantom.num_cases = 8  # 3 train, 4 val (PI-RADS labels 1, 3, 1, 1: both binary classes), 1 test
        c.data.phantom.num_val = 4
    elif preset == "full":
        apply_full(c)
        c.task.bottleneck_dim = 256  # upstream
    apply_backbone(c, backbone, preset)
    if preset == "full" and backbone != "provicnet":  # upstream's parameter groups, layer decay, sampler
        apply_profound_recipe(c, "classification", backbone)
    return c
