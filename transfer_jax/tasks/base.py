"""What every downstream task provides to the one training loop.

A task turns prepared cases into numeric samples (`make_sample`, numpy, in the data workers), builds the model for
a backbone (`build_model`), and defines the loss (`loss`, jittable), the per-case evaluation statistics
(`eval_stats`, jittable, small arrays) and how those reduce to reported metrics (`summarize`, host, at the eval
cadence). The primary metric and its direction drive checkpoint selection, early stopping and the study.
"""
from __future__ import annotations

import abc
import zlib
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
from flax import nnx

from transfer_jax.data.errors import DataError
from transfer_jax.data.manifest import Case
from transfer_jax.models.registry import encoder_feature_sites


class PretrainedExport(NamedTuple):
    """What a pretraining task's weights become at the end of its run: a pretrained artifact
    (`transfer_jax.convert.artifact`) whose `model_name` and `config` rebuild the module the converters know, and
    `select`, which keeps the entries of the flat (dotted path -> array) model state that belong in it (default:
    all of them; RNG streams never reach it)."""

    model_name: str
    config: dict[str, Any]
    select: Callable[[dict[str, Any]], dict[str, Any]] = dict


class Task(abc.ABC):
    name: str = ""
    primary_metric: str = ""
    direction: str = "max"  # "max" or "min"
    backbone_prefix: str = "encoder."  # parameter paths of the pretrained backbone (freezing, lr decay)

    def __init__(self, config):
        self.config = config

    # -- data (numpy) -----------------------------------------------------------------------------------------
    def validate_case(self, case: Case, prepared: Any) -> None:
        """Raise DataError when a case cannot serve this task (e.g. no mask for segmentation)."""

    @abc.abstractmethod
    def make_sample(self, sample: dict) -> dict[str, np.ndarray]:
        """From an (augmented) prepared-case dict to the arrays one batch element holds; must keep `image`."""

    def sample_rng(self, sample: dict) -> np.random.Generator:
        """Deterministic per sample: the run seed, the case index and a CRC of the (cropped, augmented) image, so
        training draws change with the augmentation while an evaluation crop gets the same draw every time."""
        crc = zlib.crc32(np.ascontiguousarray(sample["image"]).tobytes())
        return np.random.default_rng([int(self.config.seed), int(sample.get("case_index", 0)), crc])

    # -- model ------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        ...

    # -- jitted -----------------------------------------------------------------------------------------------
    def forward(self, model: nnx.Module, batch: dict[str, jax.Array], compute_dtype) -> Any:
        """Run the model on a batch (tasks whose models take more than the image override this)."""
        return model(batch["image"].astype(compute_dtype))

    def probe_inputs(self, images: np.ndarray) -> np.ndarray:
        """Alignment probe crops (N, D, H, W, C) -> the model inputs `probe_features` takes (default: unchanged)."""
        return images

    def probe_features(self, model: nnx.Module, images: jax.Array) -> dict[str, jax.Array]:
        """Encoder features at the alignment sites (pretrained vs fine-tuned comparisons use these)."""
        return encoder_feature_sites(model.encoder, images)

    @abc.abstractmethod
    def loss(self, outputs: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        ...

    @abc.abstractmethod
    def eval_stats(self, outputs: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-sample statistics, leading axis = batch (padding rows are dropped on the host via `valid`)."""

    # -- host -------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def summarize(self, stats: dict[str, np.ndarray]) -> dict[str, float]:
        """Reduce the concatenated per-case statistics of a full evaluation to scalar metrics."""

    def pretrained_export(self) -> Optional[PretrainedExport]:
        """Pretraining tasks: how to write the final weights as an artifact task configs can start from."""
        return None

    def is_better(self, value: float, best: float | None) -> bool:
        if best is None or not np.isfinite(best):
            return bool(np.isfinite(value))
        return value > best if self.direction == "max" else value < best


def require(condition: bool, message: str, case: Case, path: str | None = None) -> None:
    if not condition:
        raise DataError(message, case_id=case.case_id, path=path)
