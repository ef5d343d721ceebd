"""Fine-tune (or pretrain) a prostate-MRI foundation model on one task, or run the whole transfer study.

    python -m transfer_jax.main --config=configs/seg.py:smoke --workdir=/tmp/smoke
    python -m transfer_jax.main --config=configs/cls.py:profound_vit,full --workdir=runs/cls_vit \\
        --config.data.manifest=/data/cohort.csv --config.optimizer.lr=3e-4 --jax_platforms=cuda

--config=FILE[:ARG] is a config file of the repository's configs/ folder; ARG is a comma-separated backbone and/or
size preset (files that take other options say so in their docstring). Re-running with the same --workdir resumes
from its latest checkpoint. The last line of a run starts with "done:".
"""
import ast
import os
import re
import sys
import textwrap

from absl import app, flags
from ml_collections import config_flags

from transfer_jax.cli import prepare_runtime, run_absl
from transfer_jax.config import BACKBONES, PRESETS

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and its argument, FILE[:ARG], e.g. "
                                          "configs/seg.py:provicnet,smoke.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output folder (checkpoints, metrics, summary); default "
                               "runs/<task>-<backbone>.")
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _summary(path: str) -> str:
    """The first phrase of a config file's docstring (read, not executed)."""
    try:
        with open(path, encoding="utf-8") as source:
            doc = ast.get_docstring(ast.parse(source.read())) or ""
    except (OSError, SyntaxError):
        return ""
    first = " ".join(doc.split("\n\n")[0].split())
    return re.split(r"[.:] ", first + " ")[0].rstrip(".")


def config_help() -> str:
    """What --config takes: the backbones, the presets, the config files beside the package, the config fields."""
    presets = ", ".join(p for p in PRESETS if p != "default")
    lines = [f"Config arguments: backbones {', '.join(BACKBONES)} (default {BACKBONES[0]}); presets {presets} "
             "(none: the CPU default size)."]
    if os.path.isdir(CONFIGS_DIR):
        names = sorted(n for n in os.listdir(CONFIGS_DIR) if n.endswith(".py") and not n.startswith("_"))
        width = max(len(n) for n in names) + len("configs/")
        lines.append("Config files:")
        lines += [f"  {'configs/' + n:<{width}}  {_summary(os.path.join(CONFIGS_DIR, n))}" for n in names]
    else:
        lines.append("Config files: configs/*.py of the source repository (not part of an installed package).")
    lines.append("Config fields (--config.<block>.<field>=VALUE): the run length and the blocks data, model, init, "
                 "optimizer, mesh, distributed, alignment and logging are defined in transfer_jax/config.py "
                 "(base_config), the task block in the config file.")
    return "\n".join(textwrap.fill(line, width=116, subsequent_indent=" " * (len(line) - len(line.lstrip()) + 2))
                     for line in lines)


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
    from transfer_jax.train.pretrained import check_init

    try:
        check_init(config.init)  # before a workdir is made
    except ValueError as error:
        sys.exit(f"error: {error}")
    workdir = _WORKDIR.value or os.path.join("runs", f"{config.task.name}-{config.model.backbone}")
    train_and_evaluate(config, workdir)


def run():
    """The `transfer-jax-train` console script and `python -m transfer_jax.main`."""
    run_absl(main, f"{__doc__.strip()}\n\n{config_help()}", ["config", "workdir"], required=["config"])


if __name__ == "__main__":
    run()
