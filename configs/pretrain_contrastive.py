"""ProViCNet-style contrastive pretraining (tasks/contrastive_pretraining.py): patch-level cosine loss on the
DINO-style projection head `CL_Head`, either label-guided (upstream's cancer / normal patch pairs from the lesion
masks) or self-supervised (the same patch in two photometric views is the positive, a patch two steps away the
negative), or both. The model sizes and slice geometry match `configs/seg.py:provicnet[,preset]`, so the artifact
(`<workdir>/pretrained`) loads there with init.mode=pretrained.

    python -m transfer_jax.main --config=configs/pretrain_contrastive.py --workdir=runs/pretrain_cl
    python -m transfer_jax.main --config=configs/pretrain_contrastive.py:self_supervised ...
    python -m transfer_jax.main --config=configs/pretrain_contrastive.py:both,smoke ...
    python -m transfer_jax.main --config=configs/pretrain_contrastive.py:full --config.data.manifest=cohort.csv ...
    # then:
    python -m transfer_jax.main --config=configs/seg.py:provicnet --config.init.mode=pretrained \
        --config.init.checkpoint=runs/pretrain_cl/pretrained --workdir=runs/seg_provicnet_pretrained

The label-guided variant needs lesion masks in the manifest (cases without lesions give no pairs); the
self-supervised one needs none beyond the gland mask every ProViCNet input is normalised with.
"""
import ml_collections

from transfer_jax.config import apply_pretraining, apply_provicnet, base_config, parse_options
from transfer_jax.tasks.contrastive_pretraining import VARIANTS


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, variants = parse_options(arg, "configs/pretrain_contrastive.py", VARIANTS)
    if len(variants) > 1:
        raise ValueError(f"configs/pretrain_contrastive.py argument: one variant at a time, got {variants}")
    variant = variants[0] if variants else "label_guided"
    c = base_config()
    c.task = ml_collections.ConfigDict(dict(
        name="pretrain_contrastive", variant=variant, contrastive_alpha=1.0, contrastive_max_pairs=30,
        contrastive_upper=62, contrastive_lower=2, contrastive_margin=0.5, ssl_intensity=0.2, ssl_noise=0.1,
        class_weights=(), eval_class_weights=()))
    apply_provicnet(c, preset)
    apply_pretraining(c, preset)
    c.optimizer.lr = 3e-4  # at 1e-3 the loss rises over the first steps
    if preset != "full":
        # Upstream's 62 / 64 is for 8 x 8 blocks of 0.5 mm label pixels; the reduced presets' labels are 1-1.5 mm,
        # so a block covers 4-9x the area: at 62 only 3 of 32 default-preset phantom cases have an anchor, at 48
        # 11 of 32.
        c.task.contrastive_upper = 48
    return c
