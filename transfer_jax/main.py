"""Fine-tune a prostate-MRI foundation model on one task.

    python -m transfer_jax.main --config=configs/seg.py --workdir=runs/seg [--config.optimizer.lr=3e-4]

Re-running with the same workdir resumes from its latest checkpoint. The process re-executes itself once with
tcmalloc preloaded when it is installed (`transfer_jax/allocator.py`; TRANSFER_JAX_ALLOCATOR=system turns it off).
"""
import os

from absl import app, flags
from ml_collections import config_flags

from transfer_jax.allocator import apply_host_allocator
from transfer_jax.cli import parse_flags, prepare_runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/seg.py[:ARG].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, summary); default "
                               "runs/<task>-<backbone>.")


def main(argv):
    prepare_runtime(argv)
    config = _CONFIG.value
    if "study" in config:  # configs/study.py: the whole backbone x task x init matrix
        from transfer_jax.study.runner import run_study_command

        if not _WORKDIR.value:
            raise app.UsageError("a study needs --workdir")
        run_study_command(config, _WORKDIR.value)
        return
    from transfer_jax.train.loop import train_and_evaluate

    workdir = _WORKDIR.value or os.path.join("runs", f"{config.task.name}-{config.model.backbone}")
    train_and_evaluate(config, workdir)


def run():
    apply_host_allocator()
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
