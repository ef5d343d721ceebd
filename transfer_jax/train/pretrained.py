"""Initialising a run from a converted or pretrained artifact (`init.mode="pretrained"`, `init.checkpoint=DIR`).

Every array of the artifact whose path exists in the model with the same shape is loaded (parameters and
BatchNorm statistics alike); paths matching `init.dont_load` are left at their fresh initialisation (e.g. a
classifier with another number of classes). Shape mismatches outside `dont_load` are errors, listed together.
The artifact's encoder architecture (depths, widths, ...) replaces the config's, so sizes need not be repeated.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from transfer_jax.convert.artifact import load_converted, read_metadata
from transfer_jax.convert.table import flatten, unflatten

# Options that describe how to run the encoder, not what it is: a checkpoint never overrides them.
RUNTIME_OPTIONS = ("dtype", "drop_path_rate", "depthwise_impl", "remat", "remat_policy", "conv_impl")


class PretrainedMismatch(ValueError):
    pass


def check_init(init) -> str:
    """How the `init` block starts the backbone: "scratch", "pretrained" (from `init.checkpoint`), or
    "pretrained-random-standin" (mode "pretrained" without a checkpoint, only with `init.allow_random=True`: a
    pretrained run that silently trains from random weights would be reported as a transfer result)."""
    if init.mode not in ("scratch", "pretrained"):
        raise ValueError(f"init.mode must be 'scratch' or 'pretrained', got {init.mode!r}")
    if init.mode == "scratch" or init.checkpoint:
        return init.mode
    if not init.get("allow_random", False):
        raise ValueError("init.mode='pretrained' needs init.checkpoint (a converted or pretrained artifact folder: "
                         "python -m transfer_jax.convert, configs/pretrain_*.py); set init.allow_random=True to "
                         "train from random weights instead")
    return "pretrained-random-standin"


@dataclasses.dataclass
class LoadReport:
    directory: str
    model_name: str
    loaded: list[str]
    kept_initialised: list[str]
    not_used: list[str]
    skipped_by_dont_load: list[str]

    def describe(self) -> str:
        return (f"pretrained weights from {self.directory} ({self.model_name}): {len(self.loaded)} arrays loaded, "
                f"{len(self.kept_initialised)} kept at initialisation, {len(self.not_used)} in the checkpoint but "
                f"not in this model, {len(self.skipped_by_dont_load)} skipped by init.dont_load")


def adopt_architecture(config) -> list[str]:
    """Copy the artifact's encoder (and head) sizes into `config.model`; returns the changed fields.

    The number of classes is the task's business and is never copied.
    """
    stored = read_metadata(config.init.checkpoint).get("config") or {}
    encoder = stored.get("encoder") if isinstance(stored.get("encoder"), dict) else stored
    head = stored.get("head") if isinstance(stored.get("head"), dict) else {}
    changed = []
    with config.unlocked():
        for block_name, values in (("backbone_options", encoder), ("head_options", head)):
            block = config.model.get(block_name)
            if block is None:
                continue
            for key, value in values.items():
                if key in RUNTIME_OPTIONS + ("type", "num_classes") or key not in block:
                    continue
                value = tuple(value) if isinstance(value, list) else value
                current = block[key]
                current = tuple(current) if isinstance(current, list) else current
                if current != value:
                    changed.append(f"model.{block_name}.{key}: {current} -> {value}")
                    block[key] = value
    return changed


def _flat(state: nnx.State) -> dict[str, Any]:
    return flatten(nnx.to_pure_dict(state))


def load_into(params: nnx.State, rest: nnx.State, directory: str, *, dont_load: tuple[str, ...],
              shardings: Callable[[Any], Any]) -> tuple[nnx.State, nnx.State, LoadReport]:
    """Return (params, rest) with the artifact's arrays filled in and placed with `shardings((params, rest))`."""
    artifact = load_converted(directory)
    source = flatten(artifact.state)
    skip = [re.compile(p) for p in dont_load]
    updated, problems = [], []
    report = LoadReport(directory, artifact.model_name, [], [], [], [])
    for state in (params, rest):
        flat = _flat(state)
        for path, current in flat.items():
            if path not in source:
                if not path.endswith((".count", ".key")):  # RNG streams are never part of a checkpoint
                    report.kept_initialised.append(path)
                continue
            if any(r.search(path) for r in skip):
                report.skipped_by_dont_load.append(path)
                continue
            value = np.asarray(source[path])
            if value.shape != tuple(current.shape):
                problems.append(f"{path}: checkpoint {value.shape}, model {tuple(current.shape)}")
                continue
            flat[path] = value.astype(current.dtype)
            report.loaded.append(path)
        updated.append(unflatten(flat))
    model_paths = set(_flat(params)) | set(_flat(rest))
    report.not_used = sorted(p for p in source if p not in model_paths)
    if problems:
        raise PretrainedMismatch(
            f"{directory}: {len(problems)} array(s) do not fit the model (add their paths to init.dont_load to "
            "re-initialise them):\n  " + "\n  ".join(problems))
    if not report.loaded:
        raise PretrainedMismatch(f"{directory}: no array of the checkpoint matches this model's parameter paths "
                                 f"(checkpoint model {artifact.model_name!r}, e.g. {sorted(source)[:3]})")
    new_params, new_rest = params, rest
    nnx.replace_by_pure_dict(new_params, updated[0])
    nnx.replace_by_pure_dict(new_rest, updated[1])
    placed = jax.device_put((new_params, new_rest), shardings((new_params, new_rest)))
    return placed[0], placed[1], report
