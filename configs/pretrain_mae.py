"""ProFound-ViT masked-autoencoder pretraining (tasks/pretraining.py): 75 % of the patches hidden, the MAE decoder
regresses their voxels (MSE on hidden patches; `norm_pix` normalises each target patch by its mean and unbiased
variance). The encoder sizes and crop match `configs/<task>.py:profound_vit[,preset]`, so the artifact it writes
(`<workdir>/pretrained`) loads into every task config with init.mode=pretrained.

    python -m transfer_jax.main --config=configs/pretrain_mae.py --workdir=runs/pretrain_mae
    python -m transfer_jax.main --config=configs/pretrain_mae.py:norm_pix ...
    python -m transfer_jax.main --config=configs/pretrain_mae.py:smoke ...
    python -m transfer_jax.main --config=configs/pretrain_mae.py:full --config.data.manifest=cohort.csv ...
    # then, e.g.:
    python -m transfer_jax.main --config=configs/seg.py:profound_vit --config.init.mode=pretrained \
        --config.init.checkpoint=runs/pretrain_mae/pretrained --workdir=runs/seg_vit_pretrained
"""
import ml_collections

from transfer_jax.config import apply_full, apply_pretraining, apply_smoke, apply_vit, base_config, parse_options

# MAE decoder per preset; `full` is ProFound-ViT's (384 wide, 8 blocks, 16 heads).
DECODER_SIZES = {
    "default": dict(width=48, depth=2, num_heads=2),
    "smoke": dict(width=24, depth=1, num_heads=2),
    "full": dict(width=384, depth=8, num_heads=16),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, options = parse_options(arg, "configs/pretrain_mae.py", ("norm_pix",))
    c = base_config()
    c.task = ml_collections.ConfigDict(dict(name="pretrain_mae"))
    c.model = ml_collections.ConfigDict()
    c.model.backbone = "profound_vit"
    if preset == "smoke":
        apply_smoke(c)
    elif preset == "full":
        apply_full(c)
    apply_vit(c, preset)
    c.model.decoder_options = ml_collections.ConfigDict(dict(
        mlp_ratio=4.0, layer_norm_eps=1e-6, mask_ratio=0.75, norm_pix_loss="norm_pix" in options,
        **DECODER_SIZES[preset]))
    apply_pretraining(c, preset)
    return c
