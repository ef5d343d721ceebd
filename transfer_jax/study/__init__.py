"""The transfer study: the matrix of fine-tuning runs (backbone x task x init), its statistics and its report.

    python -m transfer_jax.study --config=configs/study.py:smoke --workdir=studies/smoke

`transfer_jax.study.runner.run_study(config, study_dir)` is the one function entry points call. The study sits
above the trainer (it imports `transfer_jax.train`, never the other way round). This module stays import-light
(no JAX) so configs can read the names below.
"""

# The study's task keys are the names of the task config files, `configs/<task>.py`.
TASKS = ("seg", "cls", "sr", "distortion", "synthesis")
BACKBONES = ("profound_conv", "profound_vit", "provicnet")
INITS = ("pretrained", "scratch")
# Per-run presets understood by every task config (`transfer_jax.config.PRESETS`).
RUN_PRESETS = ("default", "smoke", "full")
