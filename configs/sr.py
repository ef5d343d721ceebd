"""Through-plane super-resolution: a thick-slice version of the volume (`task.sr_factor` x thicker slices,
resampled back to the grid) in, the original volume out (all channels), UPerNet dense decoder predicting the residual,
L1 loss, PSNR (primary) / SSIM / MAE inside the gland (see transfer_jax/tasks/restoration.py).

    python -m transfer_jax.main --config=configs/sr.py --workdir=runs/sr                     # ProFound-Conv
    python -m transfer_jax.main --config=configs/sr.py:profound_vit --workdir=runs/sr_vit
    python -m transfer_jax.main --config=configs/sr.py:smoke ...    # CI-sized
    python -m transfer_jax.main --config=configs/sr.py:full ...     # published crops

`task.sr_factor` must divide the crop depth `data.crop_size[0]` (checked when the task is built).

`:provicnet[,smoke|full]` runs the slice variant `provicnet_super_resolution` (tasks/slice_restoration.py): the
3-slice stack of the thick-slice T2 (`task.sequence`) in, the clean T2 slice out, residual; sr_factor 4 (crops of
16 / 20 slices), 2 for the 4-slice smoke crops.
"""
import ml_collections

from transfer_jax.config import base_config, parse_arg, restoration_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    backbone, preset = parse_arg(arg)
    c = base_config()
    c.task = ml_collections.ConfigDict(dict(name="super_resolution", sr_factor=4))
    restoration_defaults(c, backbone, preset)
    if backbone == "provicnet" and preset == "smoke":
        c.task.sr_factor = 2  # the smoke crops have 4 slices: a factor of 4 would leave one thick slice
    return c
