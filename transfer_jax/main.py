"""Fine-tune a prostate-MRI foundation model on one task.

    python -m transfer_jax.main --config=configs/seg.py --workdir=runs/seg [--config.optimizer.lr=3e-4]

Re-running with the same workdir resumes from its latest checkpoint.
"""
import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/seg.py[:ARG].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, summary); default "
                               "runs/<task>-<backbone>.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # library INFO chatter (Orbax, XLA) would drown the run log
    import jax

    jax.config.config_with_absl()
    from transfer_jax.train.loop import train_and_evaluate

    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", f"{config.task.name}-{config.model.backbone}")
    train_and_evaluate(config, workdir)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
