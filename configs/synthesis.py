"""ADC synthesis from T2 + high-b DWI: the input is the 3-channel image with the ADC channel set to zero (so a
pretrained 3-channel stem still fits), the target the ADC channel; UPerNet dense decoder predicting ADC directly,
L1; PSNR (primary), SSIM, MAE inside the gland. See transfer_jax/tasks/restoration.py.

    python -m transfer_jax.main --config=configs/synthesis.py --workdir=runs/synthesis
    python -m transfer_jax.main --config=configs/synthesis.py:profound_vit ...
    python -m transfer_jax.main --config=configs/synthesis.py:smoke ...
    python -m transfer_jax.main --config=configs/synthesis.py:full ...
"""
import ml_collections

from transfer_jax.config import apply_backbone, base_config, parse_arg
from transfer_jax.config import restoration_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone, preset = parse_arg(arg)
    c = base_config()
    c.task = ml_collections.ConfigDict(dict(name="synthesis", inputs=("t2", "dwi"), target="adc"))
    restoration_defaults(c, preset)
    apply_backbone(c, backbone, preset)
    return c
