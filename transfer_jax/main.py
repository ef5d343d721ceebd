"""Fine-tune a prostate-MRI foundation model on one task.

    python -m transfer_jax.main --config=configs/seg.py --workdir=runs/seg [--config.optimizer.lr=3e-4]

Re-running with the same workdir resumes from its latest checkpoint.
"""
import os
import sys

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


def parse_flags(argv):
    """absl parsing, with config mistakes reported as one line instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # config-file errors arrive with a traceback
            lines = [lines[0], lines[-1]]
        sys.exit("error: " + "\n".join(lines) + "\nPass --helpfull to list the flags.")
    except (AttributeError, KeyError) as exc:
        # ml_collections raises these for --config.<field> overrides that name no field of the (locked) config.
        name = str(exc).strip("\"'")
        sys.exit(f"error: unknown config field {name!r} in a --config.* override; the config file defines no such "
                 "field (check the spelling and the enclosing block, e.g. --config.optimizer.lr)")
    except ValueError as exc:  # a config file's get_config(arg) rejecting its argument, or a bad override value
        sys.exit(f"error: {exc}")


def run():
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
