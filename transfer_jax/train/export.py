"""A pretraining run's weights as a pretrained artifact (the converted-checkpoint format of `convert/artifact.py`).

Written by process 0 at the end of every run whose task defines `pretrained_export()` (the `pretrain_*` configs),
into `<workdir>/pretrained`, replacing what an earlier call wrote there, so task configs can start from it with
`--config.init.mode=pretrained --config.init.checkpoint=<workdir>/pretrained`. `export_backbone` does the same
afterwards for the backbone of a finished fine-tuning run.
"""
from __future__ import annotations

import os
from typing import Any

import jax
from flax import nnx

from transfer_jax.convert.artifact import save_converted
from transfer_jax.convert.table import flatten
from transfer_jax.tasks.base import PretrainedExport

EXPORT_DIR = "pretrained"


def model_arrays(params, rest):
    """(params, rest) without RNG streams: the arrays an artifact may hold (still on device)."""
    return params, nnx.filter_state(rest, nnx.Not(nnx.RngState))


def write_pretrained(export: PretrainedExport, host_params, host_rest, workdir: str, *,
                     report: dict[str, Any]) -> str:
    """Save the selected host arrays of the model as `<workdir>/pretrained`; returns the directory."""
    flat = {**flatten(nnx.to_pure_dict(host_params)), **flatten(nnx.to_pure_dict(host_rest))}
    selected = export.select(flat)
    if not selected:
        raise ValueError(f"pretrained export of {export.model_name}: the selection kept no array of the model")
    directory = os.path.join(workdir, EXPORT_DIR)
    if jax.process_index() == 0:
        save_converted(directory, export.model_name, export.config, selected,
                       {**report, "arrays": len(selected)}, overwrite=True)
    return directory


def export_backbone(run_workdir: str, *, checkpoint: str = "best") -> str:
    """Write the backbone of a finished fine-tuning run (its `checkpoint`: "best", "latest" or a step) as the
    pretrained artifact `<run_workdir>/pretrained`; returns its directory. Other runs can then start from a
    backbone trained on that task (the study's aligned control source). Only the task's backbone paths
    (`task.backbone_prefix`) are kept; the artifact's config is the run's encoder options, which
    `init.mode="pretrained"` adopts."""
    from transfer_jax.predict import load_run  # the checkpoint reader `predict` uses

    config, task, _, params, rest, step, chosen = load_run(run_workdir, checkpoint)
    prefix = task.backbone_prefix
    export = PretrainedExport(config.model.backbone,
                              {"encoder": config.model.backbone_options.to_dict(), "head": None},
                              lambda flat: {k: v for k, v in flat.items() if k.startswith(prefix)})
    host_params, host_rest = jax.device_get(model_arrays(params, rest))
    report = {"source": "transfer_jax fine-tuning run (backbone only)", "task": config.task.name,
              "workdir": os.path.abspath(run_workdir), "steps": int(step), "checkpoint": chosen}
    return write_pretrained(export, host_params, host_rest, run_workdir, report=report)
