"""ProFound-Conv FCMAE pretraining (tasks/pretraining.py, models/fcmae.py): 60 % of the 16^3-voxel patches hidden,
the ConvNeXt-V2 encoder run as a dense emulation of upstream's sparse convolutions (the visibility mask applied
after every spatial operation, batch-pooled GRN), the FCMAE decoder (1x1 projection, mask tokens, one ConvNeXt-V2
block, 1x1 prediction) regressing the hidden patches (MSE; `norm_pix` normalises each target patch). The encoder
sizes and crop match `configs/<task>.py[:preset]` (ProFound-Conv), so the artifact (`<workdir>/pretrained`,
encoder only) loads into every task config with init.mode=pretrained.

    python -m transfer_jax.main --config=configs/pretrain_fcmae.py --workdir=runs/pretrain_fcmae
    python -m transfer_jax.main --config=configs/pretrain_fcmae.py:norm_pix ...
    python -m transfer_jax.main --config=configs/pretrain_fcmae.py:smoke ...
    # the study's unrelated control: hidden patches regress Gaussian noise (task.target="noise")
    python -m transfer_jax.main --config=configs/pretrain_fcmae.py:noise_target ...
    python -m transfer_jax.main --config=configs/pretrain_fcmae.py:full --config.data.manifest=cohort.csv ...
    # then, e.g.:
    python -m transfer_jax.main --config=configs/seg.py --config.init.mode=pretrained \
        --config.init.checkpoint=runs/pretrain_fcmae/pretrained --workdir=runs/seg_pretrained
"""
import ml_collections

from transfer_jax.config import apply_backbone, apply_full, apply_pretraining, apply_smoke, base_config, parse_options

# FCMAE decoder width per preset; `full` is upstream's 512.
DECODER_DIM = {"default": 64, "smoke": 16, "full": 512}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset, options = parse_options(arg, "configs/pretrain_fcmae.py", ("norm_pix", "noise_target"))
    c = base_config()
    # noise_target: the hidden patches regress Gaussian noise (the study's unrelated control source)
    c.task = ml_collections.ConfigDict(dict(name="pretrain_fcmae",
                                            target="noise" if "noise_target" in options else "image"))
    c.model = ml_collections.ConfigDict()
    if preset == "smoke":
        apply_smoke(c)
    elif preset == "full":
        apply_full(c)
    apply_backbone(c, "profound_conv", preset)
    c.model.backbone_options.drop_path_rate = 0.0  # upstream pretrains without drop path
    c.model.decoder_options = ml_collections.ConfigDict(dict(
        mask_ratio=0.6, decoder_dim=DECODER_DIM[preset], decoder_depth=1, norm_pix_loss="norm_pix" in options))
    apply_pretraining(c, preset)
    return c
