"""The converted-weights artifact: one directory that training configs and the extract command point at.

Layout of `DIR` (written by `save_converted`, read by `load_converted`):

* `DIR/state/`: an Orbax `StandardCheckpointer` checkpoint of the nested pure dict of the model state
  (parameters *and* non-trainable variables such as BatchNorm statistics or a fixed position embedding), in the
  `nnx.to_pure_dict` layout: attribute names as keys, list indices as (stringified) integers.
* `DIR/model.json`: `{"format_version": 1, "model": <model name>, "config": {...}, "conversion": {...}}`, where
  `config` rebuilds the Flax module (the converter's model registry knows how) and `conversion` is the report of
  what was converted, dropped and initialised. It is written last, so a directory without it is incomplete.

Training configs reference it as `--config.init.checkpoint=DIR`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, NamedTuple

import numpy as np

from transfer_jax.convert.table import flatten, unflatten

__all__ = ["FORMAT_VERSION", "ArtifactError", "ConvertedArtifact", "save_converted", "load_converted",
           "read_metadata", "is_artifact"]

FORMAT_VERSION = 1
_METADATA = "model.json"
_STATE = "state"


class ArtifactError(ValueError):
    """The directory is not a (complete, readable) converted-weights artifact."""

    def __init__(self, directory: str | os.PathLike, message: str):
        self.directory = os.fspath(directory)
        super().__init__(f"{self.directory}: {message}")


class ConvertedArtifact(NamedTuple):
    model_name: str
    config: dict[str, Any]
    state: dict[Any, Any]  # nested pure dict of numpy arrays, int keys for list indices


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"{type(value).__name__} value {value!r} cannot be stored in model.json")


def is_artifact(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(directory, _METADATA))


def save_converted(
    directory: str | os.PathLike,
    model_name: str,
    model_config: Mapping[str, Any],
    state: Mapping[Any, Any],
    report: Mapping[str, Any],
    *,
    overwrite: bool = False,
) -> str:
    """Write the artifact; `state` may be flat (dotted keys) or nested. Returns the absolute directory path.

    An existing artifact is replaced only with `overwrite=True`; a non-empty directory that is not an artifact is
    never touched.
    """
    directory = os.path.abspath(os.fspath(directory))
    if os.path.isdir(directory) and os.listdir(directory):
        if not is_artifact(directory) and os.listdir(directory) != [_STATE]:
            raise ArtifactError(directory, "exists, is not empty and is not a converted-weights artifact; refusing "
                                           "to write into it")
        if not overwrite:
            raise ArtifactError(directory, "already holds an artifact (pass overwrite=True / --overwrite)")
        if os.path.exists(os.path.join(directory, _METADATA)):
            os.remove(os.path.join(directory, _METADATA))
        shutil.rmtree(os.path.join(directory, _STATE), ignore_errors=True)
    os.makedirs(directory, exist_ok=True)

    flat = flatten(state)
    bad = [k for k, v in flat.items() if not hasattr(v, "shape")]
    if bad:
        raise ArtifactError(directory, f"state entries that are not arrays: {bad[:10]}")
    # Orbax wants string keys; numeric components are restored to ints by `load_converted`.
    nested = _stringify_keys(unflatten({k: np.asarray(v) for k, v in flat.items()}))
    metadata = {
        "format_version": FORMAT_VERSION,
        "model": model_name,
        "config": _jsonable(model_config),
        "conversion": _jsonable(report),
    }
    json.dumps(metadata)  # fail before writing anything big if the metadata is not serialisable

    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, _STATE), nested)
    checkpointer.wait_until_finished()
    with open(os.path.join(directory, _METADATA), "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=1)
        handle.write("\n")
    return directory


def _stringify_keys(tree: Mapping[Any, Any]) -> dict[str, Any]:
    return {str(k): _stringify_keys(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """`model.json` of an artifact, checked for its format version."""
    directory = os.fspath(directory)
    path = os.path.join(directory, _METADATA)
    if not os.path.isdir(directory):
        raise ArtifactError(directory, "no such directory")
    if not os.path.isfile(path):
        raise ArtifactError(directory, f"not a converted-weights artifact: {_METADATA} is missing (write one with "
                                       "python -m transfer_jax.convert)")
    try:
        with open(path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except ValueError as exc:
        raise ArtifactError(directory, f"{_METADATA} is not valid JSON ({exc})") from exc
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(directory, f"{_METADATA} has format_version {version!r}, this code reads "
                                       f"{FORMAT_VERSION}")
    for key in ("model", "config"):
        if key not in metadata:
            raise ArtifactError(directory, f"{_METADATA} lacks the {key!r} field")
    return metadata


def load_converted(directory: str | os.PathLike) -> ConvertedArtifact:
    """`(model_name, config dict, nested numpy state)` of an artifact written by `save_converted`."""
    directory = os.path.abspath(os.fspath(directory))
    metadata = read_metadata(directory)
    state_dir = os.path.join(directory, _STATE)
    if not os.path.isdir(state_dir):
        raise ArtifactError(directory, f"the {_STATE}/ checkpoint directory is missing")
    import orbax.checkpoint as ocp

    try:
        restored = ocp.StandardCheckpointer().restore(state_dir)
    except Exception as exc:  # Orbax raises a variety of types for unreadable directories
        raise ArtifactError(directory, f"cannot restore {_STATE}/ ({type(exc).__name__}: {exc})") from exc
    state = unflatten({k: np.asarray(v) for k, v in flatten(restored).items()})
    return ConvertedArtifact(metadata["model"], metadata["config"], state)
