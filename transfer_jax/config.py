"""Blocks shared by every task config: data, optimizer, mesh, logging, run length.

Each `configs/<task>.py` starts from `base_config()` and fills in `task` and `model`. The config argument
(`configs/seg.py:ARG`) is a comma-separated list: a backbone name and/or a size preset, e.g.
`configs/seg.py:profound_conv,smoke` or `configs/seg.py:full`.
"""
from __future__ import annotations

import ml_collections

BACKBONES = ("profound_conv", "provicnet")
PRESETS = ("default", "smoke", "full")


def parse_arg(arg: str | None, default_backbone: str = "profound_conv") -> tuple[str, str]:
    backbone, preset = default_backbone, "default"
    for token in filter(None, (arg or "").split(",")):
        if token in BACKBONES:
            backbone = token
        elif token in PRESETS:
            preset = token
        else:
            raise ValueError(f"config argument {token!r} is neither a backbone {BACKBONES} nor a preset {PRESETS}")
    return backbone, preset


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 4  # global, over all devices and processes
    c.eval_batch_size = 4
    c.total_steps = 300
    c.log_every = 25
    c.eval_every = 50
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.early_stopping_patience = 0  # evaluations without improvement before stopping; 0 = off

    c.data = ml_collections.ConfigDict()
    c.data.manifest = ""  # CSV (see README); empty = the embedded synthetic phantom dataset
    c.data.phantom = ml_collections.ConfigDict(dict(num_cases=24, num_val=4, num_test=4, seed=0))
    c.data.spacing = (2.0, 1.0, 1.0)  # mm along (D, H, W); ProFound: (1.0, 0.5, 0.5)
    c.data.crop_size = (32, 64, 64)  # (D, H, W); ProFound: (64, 224, 224)
    c.data.region_margin = 1.25
    c.data.channels = ("t2", "dwi", "adc")
    c.data.on_bad_case = "error"  # "error": stop before training, listing every bad case; "skip": leave them out
    c.data.cache_dir = ""  # prepared cases; empty = <workdir>/preprocessed
    c.data.preprocess_workers = 0
    c.data.workers = 0  # grain worker processes for augmentation
    c.data.prefetch = 2
    c.data.augment = ml_collections.ConfigDict(dict(
        zoom=0.1, translate=0.1, flip_axes=(2,), intensity_scale=0.1, intensity_shift=0.1))

    c.init = ml_collections.ConfigDict()
    c.init.mode = "scratch"  # "scratch" or "pretrained"
    c.init.checkpoint = ""  # converted artifact folder (scripts/convert_*.py) for mode="pretrained"
    c.init.dont_load = ()  # regexes of parameter paths left at initialisation (e.g. a head with other classes)

    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, min_lr=0.0, warmup_steps=20, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
        layer_decay=1.0, layer_decay_scheme="group", freeze_backbone=False, frozen_patterns=(), grad_clip=0.0))

    # strategy "fsdp" splits parameters (and optimizer moments) of >= fsdp_min_size elements over the fsdp axis
    # num_devices: 0 = every visible device; N = the first N (single-process runs only)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, strategy="replicate", fsdp_min_size=4096,
                                            num_devices=0))
    c.distributed = ml_collections.ConfigDict(dict(
        auto=False, coordinator_address="", num_processes=0, process_id=-1))
    # Alignment between the initial and the current weights, measured at every evaluation on a fixed probe set.
    c.alignment = ml_collections.ConfigDict(dict(
        enabled=True, probe_size=32, sites=("pooled", "stage1", "stage2", "stage3", "stage4"),
        estimators=("unbiased",), kernel="gaussian", bandwidth="median", multipliers=(1.0,), permutations=200,
        tests=("permutation",), cka=True))
    c.logging = ml_collections.ConfigDict(dict(tensorboard=True, progress_bar=True))
    c.debug = ml_collections.ConfigDict(dict(preempt_after_step=0))
    return c


def apply_smoke(c: ml_collections.ConfigDict) -> None:
    """A few steps on a handful of tiny phantom volumes: what CI and tests run end to end.

    The batch of 8 splits evenly over the 8 simulated CPU devices the tests use.
    """
    c.batch_size = 8
    c.eval_batch_size = 8
    c.total_steps = 4
    c.log_every = 2
    c.eval_every = 2
    c.checkpoint_every = 2
    c.optimizer.warmup_steps = 1
    c.data.phantom.num_cases = 6
    c.data.phantom.num_val = 2
    c.data.phantom.num_test = 1
    c.data.crop_size = (16, 32, 32)
    c.data.spacing = (3.0, 2.0, 2.0)
    c.alignment.probe_size = 16
    c.alignment.permutations = 50
    c.logging.progress_bar = False


def apply_full(c: ml_collections.ConfigDict) -> None:
    """The published geometry (0.5 x 0.5 x 1 mm, 64 x 224 x 224 crops): for GPUs and TPUs."""
    c.data.spacing = (1.0, 0.5, 0.5)
    c.data.crop_size = (64, 224, 224)
    c.batch_size = 8
    c.eval_batch_size = 8
    c.total_steps = 20000
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.optimizer.lr = 1e-4
    c.optimizer.warmup_steps = 1000
    c.data.workers = 8
