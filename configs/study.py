"""The transfer study: every (backbone, task, init) fine-tuning run, then statistics and a report.

    python -m transfer_jax.study --config=configs/study.py:smoke --workdir=studies/smoke
    python -m transfer_jax.study --config=configs/study.py:cpu --workdir=studies/cpu     # tiny models, for a CPU
    python -m transfer_jax.study --config=configs/study.py:full --workdir=studies/full   # real sizes, accelerators
    python -m transfer_jax.study --config=configs/study.py:control --workdir=studies/control   # positive control
    # a subset, and overrides applied to every run:
    python -m transfer_jax.study --config=configs/study.py:smoke --workdir=DIR \
        --config.study.tasks="('seg',)" --config.study.backbones="('profound_conv',)" \
        --config.study.overrides.total_steps=8

Re-running with the same workdir skips finished runs and resumes unfinished ones from their checkpoints.

Fields of `study`:
  tasks, backbones, inits: the matrix (task keys are `configs/<task>.py` names).
  seeds: replicates of every run (default 1). Seed s adds s to the task config's `seed`, which draws the head's
    initialisation, the data order and the augmentation; the pretrained weights and the cohort stay the same.
    Pretrained seed s is paired with scratch seed s. Raising it later trains only the new seeds' runs.
  arms: ("finetune",), or ("finetune", "probe") to add a linear-probe run per backbone x task x seed: the
    pretrained backbone frozen (`optimizer.freeze_backbone`), only the head trained; its gap to fine-tuning is
    reported beside MMD² (which is 0 by construction for a frozen backbone).
  preset: the preset each task config is built with (`configs/<task>.py:<backbone>,<preset>`).
  overrides: config fields set on every run after the preset, as dotted keys (`{'optimizer.lr': 3e-4}`) or
    nested (`overrides.optimizer.lr`). `init.*` is owned by the study (use `inits` / `pretrained_checkpoints`).
  task_overrides: task -> overrides of that task's runs only, applied after `overrides`.
  pretrained_checkpoints: backbone -> converted-weights artifact directory for the "pretrained" runs.
  pretraining: backbone -> the JAX pretraining config (`configs/<name>.py`, arguments after a colon; the study's
    preset is appended) the study runs first, for a backbone not in pretrained_checkpoints; its artifact
    initialises that backbone's pretrained runs. A backbone in neither keeps its task config's `init.checkpoint`.
  pretraining_overrides: like overrides, for the pretraining runs.
  bootstrap: resamples for the BCa confidence intervals of the correlations (0 = no intervals).
  permutations: random pairings for a correlation's permutation p-value when it has more than 8 points (up to 8
    the test enumerates all of them and is exact).
  seed: seeds the bootstrap and the permutations (not the runs).
  control: the positive control (transfer_jax/study/control.py), run after the matrix when `enabled`: `backbone`
    fine-tuned on `task` from an aligned source (its backbone trained on `task` itself, that run changed by
    `aligned_overrides`), a related one (`pretraining[backbone]`), an unrelated one (`unrelated`, a pretraining
    config: FCMAE regressing noise) and random weights; the report and control.csv say whether MMD², gain and
    steps to 95 % order them as expected. Presets: `control` (the cpu preset's sizes, its matrix cut to the
    control's cell) and `smoke,control` (each run a few steps, for a test).
"""
import os

import ml_collections

from transfer_jax.study import BACKBONES, INITS, TASKS

STUDY_PRESETS = ("smoke", "cpu", "full")

# Where the full preset expects converted release weights (python -m transfer_jax.convert profound|provicnet
# --output=...).
ARTIFACTS_ROOT = os.environ.get("TRANSFER_JAX_ARTIFACTS", "artifacts")


def _dotted_dict(values: dict | None = None) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(values or {}, allow_dotted_keys=True)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tokens = [t.strip() for t in (arg or "cpu").split(",") if t.strip()]
    control = "control" in tokens
    presets = [t for t in tokens if t != "control"] or ["cpu"]
    preset = presets[0]
    if len(presets) > 1 or preset not in STUDY_PRESETS:
        raise ValueError(f"configs/study.py argument {arg!r} is not a study preset {STUDY_PRESETS}, optionally "
                         "with ',control'")
    c = ml_collections.ConfigDict()
    c.study = ml_collections.ConfigDict()
    c.study.name = preset
    c.study.tasks = TASKS
    c.study.backbones = BACKBONES
    c.study.inits = INITS
    c.study.arms = ("finetune",)
    c.study.seeds = 1
    c.study.preset = "smoke"
    c.study.overrides = _dotted_dict()
    c.study.task_overrides = ml_collections.ConfigDict()
    c.study.pretrained_checkpoints = _dotted_dict()
    # Each backbone's own pretraining objective: FCMAE (ProFound-Conv), MAE (ProFound-ViT), patch contrastive
    # (ProViCNet; label-guided + self-supervised, since small phantom crops have few all-cancer patches).
    c.study.pretraining = _dotted_dict({"profound_conv": "pretrain_fcmae", "profound_vit": "pretrain_mae",
                                        "provicnet": "pretrain_contrastive:both"})
    c.study.pretraining_overrides = _dotted_dict()
    c.study.bootstrap = 2000
    c.study.permutations = 9999
    c.study.seed = 0
    c.study.control = ml_collections.ConfigDict(dict(
        enabled=control, backbone="profound_conv", task="seg", unrelated="pretrain_fcmae:noise_target",
        aligned_overrides=_dotted_dict()))

    if preset == "smoke":
        # CI: each task's own smoke preset (tiny models, 4 steps on a few tiny phantom volumes).
        pass
    elif preset == "cpu":
        # 3 backbones x 5 tasks x 2 inits = 30 runs small enough for a CPU: the tiny smoke models, 60 steps with
        # an evaluation (and alignment probe) every 10 steps, so the convergence measure (first evaluation with
        # 95 % of the run's improvement over step 0) has six points to choose from. The scratch runs reuse the pretrained runs' compiled
        # steps through the compilation cache of `python -m transfer_jax.study`.
        # The pretrained runs start from each backbone's JAX pretraining (`pretraining`) on its own phantom cohort
        # (16 cases drawn with another seed than the fine-tuning cases), unless
        # --config.study.pretrained_checkpoints.<backbone>=DIR points at (small) converted weights.
        c.study.pretraining_overrides = _dotted_dict({
            "total_steps": 150,
            "eval_every": 50,
            "log_every": 25,
            "checkpoint_every": 150,
            "optimizer.warmup_steps": 10,
            "data.phantom.num_cases": 16,
            "data.phantom.num_val": 2,
            "data.phantom.num_test": 0,
        })
        c.study.overrides = _dotted_dict({
            "total_steps": 60,
            "eval_every": 10,
            "log_every": 10,
            "checkpoint_every": 30,
            "optimizer.warmup_steps": 5,
            "data.phantom.num_cases": 10,
            "data.phantom.num_val": 3,
            "data.phantom.num_test": 1,
        })
        # A macro AUROC over 4 classes needs more than 3 validation cases: 12 (every class present).
        c.study.task_overrides.cls = _dotted_dict({
            "data.phantom.num_cases": 24,
            "data.phantom.num_val": 12,
        })
        # Super-resolution is scored by PSNR inside the gland but trained on the whole crop: unweighted, 60 steps
        # improve the crop and not the gland, so its runs never beat their step-0 (identity) value. Weighting gland
        # voxels 5x aligns the loss with the metric. (Distortion correction improves the gland unweighted.)
        c.study.task_overrides.sr = _dotted_dict({"task.gland_loss_weight": 4.0})
        # Distortion correction: a 3-voxel field on these small crops leaves ~0.005 dB for 60 steps to recover
        # (ProFound-Conv from scratch); at 6 voxels the same run gains 0.09 dB.
        c.study.task_overrides.distortion = _dotted_dict({"task.max_shift": 6.0})
    elif preset == "full":
        # Published model sizes and geometry; the pretrained runs start from the converted release weights.
        # To pretrain in JAX instead, empty a backbone's entry: --config.study.pretrained_checkpoints.<backbone>=''
        c.study.preset = "full"
        c.study.pretrained_checkpoints = _dotted_dict({
            backbone: os.path.join(ARTIFACTS_ROOT, backbone) for backbone in BACKBONES})
    if control:
        # The matrix cut to the control's cell (its pretrained and scratch runs beside the control's sources).
        c.study.name = f"{preset}-control"
        c.study.tasks = (c.study.control.task,)
        c.study.backbones = (c.study.control.backbone,)
        c.study.task_overrides = ml_collections.ConfigDict()
    return c
