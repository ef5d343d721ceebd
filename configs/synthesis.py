"""ADC synthesis from T2 + high-b DWI: the input is the 3-channel image with the ADC channel set to zero (so a
pretrained 3-channel stem still fits), the target the ADC channel; UPerNet dense decoder predicting ADC directly,
L1 with gland voxels weighted x10 (`task.gland_loss_weight`); PSNR (primary), SSIM, MAE inside the gland. See
transfer_jax/tasks/restoration.py.

    python -m transfer_jax.main --config=configs/synthesis.py --workdir=runs/synthesis
    python -m transfer_jax.main --config=configs/synthesis.py:profound_vit ...
    python -m transfer_jax.main --config=configs/synthesis.py:smoke ...
    python -m transfer_jax.main --config=configs/synthesis.py:full ...
    python -m transfer_jax.main --config=configs/synthesis.py:provicnet[,smoke|full] ...  # slice-wise ProViCNet

`:provicnet` (task `provicnet_synthesis`, tasks/slice_restoration.py): each slice's (T2, DWI, 0) as the 3 input
channels, its ADC out, direct.
"""
import ml_collections

from transfer_jax.config import base_config, parse_arg, restoration_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone, preset = parse_arg(arg)
    c = base_config()
    c.task = ml_collections.ConfigDict(dict(name="synthesis", inputs=("t2", "dwi"), target="adc"))
    restoration_defaults(c, backbone, preset)
    # The gland is a small part of a crop whose ADC is nearly constant elsewhere: plain L1 settles on that
    # background value and the gland's PSNR falls; weighting gland voxels x10 makes the gland drive the loss.
    c.task.gland_loss_weight = 9.0
    return c
