"""A pretraining run's weights as a pretrained artifact (the converted-checkpoint format of `convert/artifact.py`).

Written by process 0 at the end of every run whose task defines `pretrained_export()` (the `pretrain_*` configs),
into `<workdir>/pretrained`, replacing what an earlier call wrote there, so task configs can start from it with
`--config.init.mode=pretrained --config.init.checkpoint=<workdir>/pretrained`.
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
