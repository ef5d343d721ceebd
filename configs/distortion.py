"""DWI distortion correction: DWI and ADC warped along the phase-encode axis (rows, axis 1) by a smooth random
displacement field with Jacobian intensity modulation, T2 kept clean as the anatomical reference; the network
restores the undistorted DWI/ADC (UPerNet dense decoder, residual, L1; PSNR primary, SSIM, MAE inside the gland).
Evaluation fields are deterministic per case. See transfer_jax/tasks/restoration.py.

    python -m transfer_jax.main --config=configs/distortion.py --workdir=runs/distortion
    python -m transfer_jax.main --config=configs/distortion.py:profound_vit ...
    python -m transfer_jax.main --config=configs/distortion.py:smoke ...
    python -m transfer_jax.main --config=configs/distortion.py:full ...
    python -m transfer_jax.main --config=configs/distortion.py:provicnet[,smoke|full] ...  # slice-wise ProViCNet

`:provicnet` (task `provicnet_distortion`, tasks/slice_restoration.py): each slice's (T2, distorted DWI, distorted
ADC) as the 3 input channels, the undistorted DWI and ADC slice out, residual.
"""
import ml_collections

from transfer_jax.config import base_config, parse_arg, restoration_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone, preset = parse_arg(arg)
    c = base_config()
    # max_shift / smoothness in voxels of the crop grid (rows); max_slope < 1 keeps the warp invertible.
    c.task = ml_collections.ConfigDict(dict(
        name="distortion", distort_channels=("dwi", "adc"), max_shift=3.0, smoothness=16.0, max_slope=0.5))
    restoration_defaults(c, backbone, preset)
    if preset == "full":
        c.task.max_shift = 8.0  # ~4 mm at 0.5 mm rows
        c.task.smoothness = 48.0
    return c
