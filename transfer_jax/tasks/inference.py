"""Whole-volume inference: a dense task's model over the whole prepared region of a case, by sliding window.

The one definition of "the model's output for a case" that the end-of-run evaluation (`train/evaluator.py`) and
`predict` share, so that the numbers a run reports are the numbers of the files `predict` writes. The volume is
the prepared region (`data/preprocess.py`: `crop_size * region_margin` voxels on the training grid, placed by
`data.region_centre`), never a crop chosen from it; windows of `data.crop_size` overlap by `overlap` and are
blended with MONAI's Gaussian importance map (`tasks/sliding_window.py`).

Dense 3-D tasks only (segmentation, super-resolution, distortion, synthesis). Case-level classification and the
ProViCNet slice tasks keep their own views (the centre crop; the model's fixed in-plane window).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from transfer_jax.tasks.classification import ClassificationTask
from transfer_jax.tasks.restoration import RestorationTask
from transfer_jax.tasks.segmentation import SegmentationTask
from transfer_jax.tasks.sliding_window import sliding_window_inference
from transfer_jax.tasks.slice_segmentation import SliceTask


def whole_volume_applies(task) -> bool:
    """True for the dense 3-D tasks, whose outputs cover every voxel of the prepared region."""
    return (isinstance(task, (SegmentationTask, RestorationTask))
            and not isinstance(task, (SliceTask, ClassificationTask)))


def network_input(task, element: dict) -> np.ndarray:
    """The model input of a whole prepared case: the image, or for the image-to-image tasks its degraded form
    (no target or label is needed)."""
    if isinstance(task, RestorationTask):
        return task.make_sample(element)["image"]
    return np.asarray(element["image"], np.float32)


def whole_volume_outputs(task, model, image: jax.Array, *, roi: Sequence[int], overlap: float = 0.5,
                         batch_size: int = 2, compute_dtype: Any = jnp.float32,
                         mesh: Optional[Mesh] = None) -> jax.Array:
    """(D, H, W, C) image -> (D, H, W, K) blended model output (segmentation logits, restored intensities).

    `model` is an eval-mode module (e.g. `graph.merge(params, rest, training=False)` inside a jitted function);
    each window goes through `task.forward`, so a residual task's windows already hold input + correction.
    """
    def apply(windows):
        return task.forward(model, {"image": windows}, compute_dtype).logits.astype(jnp.float32)

    return sliding_window_inference(apply, image, roi=tuple(int(r) for r in roi), overlap=overlap,
                                    batch_size=batch_size, mesh=mesh)
