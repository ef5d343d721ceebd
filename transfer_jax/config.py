"""Blocks shared by every task config: data, optimizer, mesh, logging, run length.

Each `configs/<task>.py` starts from `base_config()` and fills in `task` and `model`. The config argument
(`configs/seg.py:ARG`) is a comma-separated list: a backbone name and/or a size preset, e.g.
`configs/seg.py:profound_conv,smoke` or `configs/seg.py:full`.
"""
from __future__ import annotations

import ml_collections

BACKBONES = ("profound_conv", "profound_vit", "provicnet")
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


def parse_options(arg: str | None, config_name: str, options: tuple[str, ...]) -> tuple[str, list[str]]:
    """`"[preset][,option...]"` -> (preset, options given), for configs whose argument names options, not backbones."""
    tokens = [t for t in (arg or "").split(",") if t]
    unknown = [t for t in tokens if t not in PRESETS + options]
    if unknown:
        raise ValueError(f"{config_name} argument {unknown[0]!r}: expected a preset {PRESETS} and/or one of "
                         f"{options}")
    return next((t for t in tokens if t in PRESETS), "default"), [t for t in tokens if t in options]


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 4  # global, over all devices and processes
    c.eval_batch_size = 4
    c.total_steps = 300
    c.log_every = 25
    c.eval_every = 50
    c.checkpoint_every = 100
    c.keep_checkpoints = 2  # latest checkpoints kept for resuming; the best one (primary metric) is kept as well
    # End of run: the final and the best checkpoint's metrics on whole validation volumes (and the test split, once),
    # by the sliding window of `predict`, its windows overlapping by this fraction.
    c.eval_overlap = 0.5
    c.early_stopping_patience = 0  # evaluations without improvement before stopping; 0 = off

    c.data = ml_collections.ConfigDict()
    c.data.manifest = ""  # CSV (see README); empty = the embedded synthetic phantom dataset
    c.data.phantom = ml_collections.ConfigDict(dict(num_cases=24, num_val=4, num_test=4, seed=0))
    c.data.spacing = (2.0, 1.0, 1.0)  # mm along (D, H, W); ProFound: (1.0, 0.5, 0.5)
    c.data.crop_size = (32, 64, 64)  # (D, H, W); ProFound: (64, 224, 224)
    c.data.region_margin = 1.25
    c.data.channels = ("t2", "dwi", "adc")
    # Mask label maps: the mask values that mean the structure; 0 and *_background_labels are background, any other
    # value fails the pre-flight check. Zonal masks: gland_labels=(1, 2); ISUP-graded lesions counted from grade 3:
    # lesion_labels=(3, 4, 5), lesion_background_labels=(2,).
    c.data.gland_labels = (1,)
    c.data.gland_background_labels = ()
    c.data.lesion_labels = (1, 2, 3, 4, 5)
    c.data.lesion_background_labels = ()
    # Masks that keep their label values instead of 0 / 1 (e.g. ("lesion",) for ISUP-graded lesions, which the
    # ProViCNet task splits into indolent / csPCa); the values in *_labels stay, background values become 0.
    c.data.graded_masks = ()
    # The case label: the manifest column read as it and, for classification, how its values map to classes
    # ("" = PI-RADS - 2 in 'label'; a name in tasks/classification.py LABEL_MAPS such as "isup_cspca", or
    # "value:class,..."). The map's classes set the task's: 2 = binary (csPCa), 4 = PI-RADS.
    c.data.label_column = "label"
    c.data.label_map = ""
    c.data.intensity = "zscore_nonzero"  # per-channel z-score over non-zero voxels; "raw": as read (ProViCNet)
    # Where the prepared region sits: "gland" (its centroid); "volume": the whole volume's centre, so that the
    # evaluation crop is MONAI's CenterSpatialCrop + SpatialPad of it (ProFound `full` presets: upstream's val/test
    # view); "whole_slices": axes that fit the crop kept whole (ProViCNet: native slices)
    c.data.region_centre = "gland"
    c.data.sampler = "shuffle"  # "shuffle": every case once per epoch; "class_balanced": upstream's weighted draw
    c.data.on_bad_case = "error"  # "error": stop before training, listing every bad case; "skip": leave them out
    # Prepared cases, shared by every run; empty = $TRANSFER_JAX_CACHE_DIR, else $XDG_CACHE_HOME (~/.cache)
    # /transfer_jax/prepared
    c.data.cache_dir = ""
    c.data.preprocess_workers = -1  # processes preparing cases; -1 = CPU cores - 1 (at most 8), 0 = this process
    c.data.workers = 0  # grain worker processes for augmentation
    c.data.prefetch = 2
    c.data.memory_cache_mb = 1024  # prepared cases kept in memory after their first read, per data process and split
    # pipeline: "ours" (the fields below) or upstream's training augmentation, "upstream_profound" /
    # "upstream_provicnet" (data/augment_upstream.py; the fields below then keep their defaults)
    c.data.augment = ml_collections.ConfigDict(dict(
        pipeline="ours", zoom=0.1, translate=0.1, flip_axes=(2,), intensity_scale=0.1, intensity_shift=0.1))

    c.init = ml_collections.ConfigDict()
    c.init.mode = "scratch"  # "scratch" or "pretrained"
    c.init.checkpoint = ""  # converted artifact folder (python -m transfer_jax.convert) for mode="pretrained"
    c.init.allow_random = False  # mode="pretrained" without a checkpoint: True trains from random weights, else error
    c.init.dont_load = ()  # regexes of parameter paths left at initialisation (e.g. a head with other classes)

    # schedule: "cosine" (linear warm-up, half-cycle cosine to min_lr) or "plateau" (warm-up, then constant and
    # reduced as torch's ReduceLROnPlateau on the evaluation metric `plateau.metric`; one evaluation = one epoch).
    # no_decay_rule: backbone parameters without weight decay, "names" (1-D, biases, GRN gamma/beta, tokens) or
    # "ndim" (1-D only, MAE's param_groups_lrd); head parameters follow "names" and decay by head_weight_decay
    # (None = weight_decay). skip_zero_gradient_steps: a step whose gradients are all zero leaves the optimizer
    # as it is (a task's way to skip a batch). See docs/recipes.md.
    c.optimizer = ml_collections.ConfigDict(dict(
        lr=1e-3, min_lr=0.0, warmup_steps=20, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
        layer_decay=1.0, layer_decay_scheme="group", freeze_backbone=False, frozen_patterns=(), grad_clip=0.0,
        lr_scale_patterns=(),  # ((regex, factor), ...): multiplies the lr of matching parameter paths
        schedule="cosine", no_decay_rule="names", head_weight_decay=None, skip_zero_gradient_steps=False,
        plateau=dict(metric="loss", mode="min", factor=0.1, patience=10, threshold=1e-4, cooldown=0, min_lr=0.0)))

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
    # peak_tflops: per-device peak for the logged MFU; 0 = the bf16 datasheet peak of a known GPU/TPU (none on CPU).
    c.logging = ml_collections.ConfigDict(dict(tensorboard=True, progress_bar=True, peak_tflops=0.0))
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


# Upstream fine-tuning recipes per (task, backbone) for the `full` presets (docs/recipes.md lists the sources):
# ProFound-Conv's `get_parameter_groups` ("group" ids, weight decay off for 1-D / bias / GRN), ProFound-ViT's
# `param_groups_lrd` (weight decay off for 1-D only; segmentation omits the argument: ld 0.75), and for
# classification a head without weight decay and inverse-class-frequency sampling.
PROFOUND_RECIPES = {
    ("segmentation", "profound_conv"): dict(layer_decay=0.6, layer_decay_scheme="group", no_decay_rule="names"),
    ("segmentation", "profound_vit"): dict(layer_decay=0.75, no_decay_rule="ndim"),
    ("classification", "profound_conv"): dict(layer_decay=0.6, layer_decay_scheme="group", no_decay_rule="names",
                                              head_weight_decay=0.0),
    ("classification", "profound_vit"): dict(layer_decay=0.6, no_decay_rule="ndim", head_weight_decay=0.0),
}


def apply_profound_recipe(c: ml_collections.ConfigDict, task: str, backbone: str) -> None:
    """Upstream's optimiser groups (and, for classification, its class-balanced sampler) for a ProFound backbone,
    and its evaluation view: validation, test, predict and extract see the centre crop of the whole volume
    (`data.region_centre="volume"`), never a mask. Upstream trains on random crops of the whole (padded) volume,
    so training crops are taken around the volume centre too. lr 1e-4 / weight decay 0.05 / warm-up + cosine come
    from `apply_full` and `base_config`."""
    recipe = PROFOUND_RECIPES.get((task, backbone))
    if recipe is None:
        raise ValueError(f"no upstream recipe for task {task!r} with backbone {backbone!r}; "
                         f"known: {sorted(PROFOUND_RECIPES)}")
    c.optimizer.update(recipe)
    c.data.region_centre = "volume"
    if task == "classification":
        c.data.sampler = "class_balanced"


# Backbone sizes per preset for the task configs (through `apply_backbone`). Call after apply_smoke / apply_full
# (crop size).
CONV_SIZES = {
    "default": dict(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128)),
    "smoke": dict(depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)),
    "full": dict(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),  # ConvNeXt-V2 Tiny (ProFound-Conv)
}
VIT_SIZES = {  # out_indices: the blocks a dense (UPerNet) head reads; width: a multiple of 6 (3-D sin-cos table)
    "default": dict(patch_size=(8, 16, 16), width=96, depth=4, num_heads=4, out_indices=(0, 1, 2, 3)),
    "smoke": dict(patch_size=(8, 16, 16), width=48, depth=4, num_heads=2, out_indices=(0, 1, 2, 3)),
    "full": dict(patch_size=(16, 32, 32), width=768, depth=12, num_heads=12, out_indices=(3, 5, 7, 11)),  # ViT-B
}
ALIGNMENT_SITES = {
    "profound_conv": ("pooled", "stage1", "stage2", "stage3", "stage4"),
    "profound_vit": ("cls", "mean_patch"),
}


def apply_vit(c: ml_collections.ConfigDict, preset: str) -> None:
    """ProFound-ViT encoder options: img_size tied to the crop (the position table is), sizes per preset."""
    crop = tuple(c.data.crop_size)
    if preset == "full":
        c.data.crop_size = crop = (64, 256, 256)  # ProFound-ViT's pretraining geometry (patch 16x32x32)
    c.model.backbone_options = ml_collections.ConfigDict(dict(
        img_size=crop, in_channels=len(c.data.channels), mlp_ratio=4.0, dtype="float32", remat=False,
        remat_policy="nothing_saveable", **VIT_SIZES[preset]))
    c.alignment.sites = ALIGNMENT_SITES["profound_vit"]
    c.optimizer.no_decay_rule = "ndim"  # param_groups_lrd: only 1-D tensors skip weight decay (the cls token decays)


def apply_backbone(c: ml_collections.ConfigDict, backbone: str, preset: str) -> None:
    """`c.model.backbone` + `c.model.backbone_options` (+ the alignment sites it provides) for a preset."""
    c.model.backbone = backbone
    if backbone == "profound_conv":
        c.model.backbone_options = ml_collections.ConfigDict(dict(
            drop_path_rate=0.1, dtype="float32", remat=False, remat_policy="nothing_saveable", **CONV_SIZES[preset]))
        c.alignment.sites = ALIGNMENT_SITES["profound_conv"]
    elif backbone == "profound_vit":
        apply_vit(c, preset)
    elif backbone == "provicnet":
        apply_provicnet_task(c, preset)
    else:
        raise ValueError(f"backbone {backbone!r} is not supported by this config; use one of {BACKBONES}")


def apply_dense_head(c: ml_collections.ConfigDict, backbone: str, preset: str, *, auxiliary_head: bool) -> None:
    """The UPerNet dense decoder (with or without its FCN auxiliary head) sized for a preset, then the size preset
    itself and the backbone (`apply_backbone`); for the segmentation and image-to-image configs."""
    c.model = ml_collections.ConfigDict()
    c.model.head_options = ml_collections.ConfigDict(dict(
        hidden_size=32, auxiliary_channels=16, pool_scales=(1, 2, 3, 6), use_auxiliary_head=auxiliary_head))
    # Upstream's optimiser never sees UPerNet's hidden_norm (not in its parameter groups): keep it at init.
    c.optimizer.frozen_patterns = (r"^hidden_norm\.",)
    if preset == "smoke":
        apply_smoke(c)
        c.model.head_options.hidden_size = 8
        c.model.head_options.auxiliary_channels = 8
    elif preset == "full":
        apply_full(c)
        c.model.head_options.hidden_size = 512
        c.model.head_options.auxiliary_channels = 256
    apply_backbone(c, backbone, preset)


def restoration_defaults(c: ml_collections.ConfigDict, backbone: str, preset: str) -> None:
    """Shared blocks of the image-to-image configs (sr, distortion, synthesis): the UPerNet dense decoder without
    its auxiliary head (3-D backbones), the gland-mask fallback, run length, the size preset and the backbone."""
    c.task.update(dict(require_gland_mask=False, ssim_window=7, aux_weight=0.4, gland_loss_weight=0.0))
    c.total_steps = 200
    c.eval_every = 25
    apply_dense_head(c, backbone, preset, auxiliary_head=False)
    if backbone == "provicnet":
        # A ProViCNet artifact's last head conv has 4 class channels, these heads one per target channel.
        c.init.dont_load = (r"^head\.segmentation_conv\.9\.",)
        c.task.edge = "clamp"  # one stack centred on every slice, so the predictions form the volume
        if preset == "smoke":  # 4-slice crops: the 3-D SSIM window must fit along D
            c.task.ssim_window = 3


def apply_pretraining(c: ml_collections.ConfigDict, preset: str) -> None:
    """Shared blocks of the `configs/pretrain_*.py` configs: their own phantom cohort, run length, optimiser.

    The phantom cohort uses another seed than the task configs' (seed 0), so pretraining never sees the cases the
    tasks are evaluated on. Alignment probing is off: it compares a run with its own random initialisation.
    Call after apply_smoke / apply_full.
    """
    c.data.phantom.seed = 1
    c.alignment.enabled = False
    c.optimizer.update(dict(b2=0.95, weight_decay=0.05))
    if preset == "default":
        c.data.phantom.num_cases = 32
        c.total_steps = 400
        c.log_every = 25
        c.eval_every = 100
        c.checkpoint_every = 100
        c.optimizer.warmup_steps = 40
    elif preset == "full":
        # FCMAE / MAE recipe: absolute lr 1e-3 (FCMAE's blr is used unscaled), AdamW (0.9, 0.95), wd 0.05, warmup
        # 5 % of the run, half-cycle cosine to 0, no gradient clipping.
        c.optimizer.lr = 1e-3
        c.total_steps = 40000
        c.optimizer.warmup_steps = 2000
        c.eval_every = 2000
        c.checkpoint_every = 2000


# ProViCNet slice model sizes per preset (DINOv2 ViT with 4 registers; `full` = the released ViT-S/14).
PROVICNET_SIZES = {
    "smoke": dict(image_size=112, crop=(4, 64, 64), spacing=(3.0, 1.5, 1.5),
                  vit=dict(width=32, depth=2, num_heads=2, pos_grid=8), head=(16, 8),
                  cl=dict(hidden=64, bottleneck=16, out_dim=128, num_layers=3)),
    "default": dict(image_size=112, crop=(16, 64, 64), spacing=(3.0, 1.0, 1.0),
                    vit=dict(width=128, depth=4, num_heads=2, pos_grid=8), head=(32, 16),
                    cl=dict(hidden=256, bottleneck=64, out_dim=1024, num_layers=3)),
    "full": dict(image_size=448, crop=(20, 256, 256), spacing=(3.0, 0.5, 0.5),
                 vit=dict(width=384, depth=12, num_heads=6, pos_grid=37), head=(128, 64),
                 cl=dict(hidden=2048, bottleneck=256, out_dim=65536, num_layers=3)),
}


def provicnet_model(c: ml_collections.ConfigDict, preset: str) -> None:
    """The ProViCNet slice model, its slice geometry (task.sequence / image_size / edge), crop and spacing.

    Sets `c.model` and the slicing fields of `c.task` (create `c.task` first); `data.crop_size`'s in-plane size is
    the model's output size 8 * image_size / 14, labels are never resized; `data.intensity` "raw" (the slice tasks
    z-score inside the gland); `data.region_centre` "whole_slices"; `task.edge` upstream's "shift" where crops have
    >= 6 slices. Call after apply_smoke / apply_full.
    """
    sizes = PROVICNET_SIZES[preset]
    # Upstream's edge rule ("shift") needs 6 slices per crop; the smoke preset's 4-slice crops clamp instead.
    edge = "clamp" if sizes["crop"][0] < 6 else "shift"
    c.task.update(dict(sequence="t2", image_size=sizes["image_size"], edge=edge))
    c.model = ml_collections.ConfigDict()
    c.model.backbone = "provicnet"
    # ProViCNetConfig fields, nested as in a converted artifact's config (init.checkpoint adopts them).
    c.model.backbone_options = ml_collections.ConfigDict(dict(
        backbone=dict(patch=14, num_registers=4, mlp_ratio=4.0, in_channels=3, **sizes["vit"]),
        head_channels=sizes["head"], reducer_in_channels=None, contrastive_head=sizes["cl"], dtype="float32",
        remat=preset == "full", remat_policy="nothing_saveable"))
    # remat at full size: the blocks' activations recomputed in the backward pass. The step is memory-bound on
    # accelerators, and recomputing costs FLOPs it has to spare: compiled for v5e-8 (bf16, one case per chip) it
    # moves 55.0 instead of 62.7 GB per step (roofline MFU 31.8 % instead of 27.9 %), peak 1.9 instead of 5.6 GiB.
    c.model.head_options = ml_collections.ConfigDict()
    c.alignment.sites = ("cls", "mean_patch")
    c.data.crop_size = sizes["crop"]
    c.data.spacing = sizes["spacing"]
    c.data.intensity = "raw"  # the task z-scores the raw intensities inside the gland, as upstream
    # Whole slices (and volumes) where they fit the crop, as upstream feeds its prepared 256 x 256 data; "gland"
    # re-centres the crop on the gland instead.
    c.data.region_centre = "whole_slices"


def provicnet_batches(c: ml_collections.ConfigDict, preset: str) -> None:
    """Cases per batch (each a whole crop of slices) for the default and full presets."""
    if preset == "full":
        c.batch_size = 4  # cases: 4 x 20 = 80 slices of 448 x 448 per step (upstream: 72)
        c.eval_batch_size = 4
    elif preset == "default":
        c.batch_size = 2  # 2 x 16 = 32 slices per step
        c.eval_batch_size = 4
        c.alignment.probe_size = 8


def provicnet_finetuning(c: ml_collections.ConfigDict) -> None:
    """Upstream train.py's optimiser for fine-tuning: Adam without weight decay, the heads and slice tokens at lr,
    the DINOv2 backbone at lr x DINO_learning_rate (0.05), CL_Head (where built) never optimised."""
    c.optimizer.weight_decay = 0.0
    c.optimizer.frozen_patterns = (r"^CL_Head\.",)
    c.optimizer.lr_scale_patterns = ((r"^backbone\.", 0.05),)


def apply_provicnet_task(c: ml_collections.ConfigDict, preset: str) -> None:
    """`configs/{cls,sr,distortion,synthesis}.py:provicnet`: the slice variant of the task (`provicnet_<name>`,
    tasks/slice_classification.py, tasks/slice_restoration.py) with ProViCNet's model, geometry and fine-tuning
    optimiser; the task config's run length and preset stay. Call after apply_smoke / apply_full."""
    c.task.name = f"provicnet_{c.task.name}"
    provicnet_batches(c, preset)
    provicnet_model(c, preset)
    provicnet_finetuning(c)


def apply_provicnet(c: ml_collections.ConfigDict, preset: str) -> None:
    """ProViCNet segmentation / pretraining configs: the slice model and geometry (`provicnet_model`) and run sizes
    per preset."""
    if preset == "smoke":
        apply_smoke(c)
    elif preset == "full":
        apply_full(c)
    else:
        c.total_steps = 150
        c.log_every = 25
        c.eval_every = 50
        c.checkpoint_every = 150
        c.optimizer.warmup_steps = 10
    provicnet_batches(c, preset)
    provicnet_model(c, preset)
