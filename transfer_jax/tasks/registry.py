"""Tasks by the name used in `config.task.name`."""
from __future__ import annotations

from transfer_jax.tasks.anatomy import AnatomySegmentationTask
from transfer_jax.tasks.base import Task
from transfer_jax.tasks.classification import ClassificationTask
from transfer_jax.tasks.contrastive_pretraining import ContrastivePretrainTask
from transfer_jax.tasks.pretraining import FCMAEPretrainTask, MAEPretrainTask
from transfer_jax.tasks.restoration import DistortionTask, SuperResolutionTask, SynthesisTask
from transfer_jax.tasks.segmentation import SegmentationTask
from transfer_jax.tasks.slice_classification import SliceClassificationTask
from transfer_jax.tasks.slice_restoration import SliceDistortionTask, SliceSuperResolutionTask, SliceSynthesisTask
from transfer_jax.tasks.slice_segmentation import SliceSegmentationTask

TASKS: dict[str, type[Task]] = {
    SegmentationTask.name: SegmentationTask,
    AnatomySegmentationTask.name: AnatomySegmentationTask,
    ClassificationTask.name: ClassificationTask,
    SuperResolutionTask.name: SuperResolutionTask,
    DistortionTask.name: DistortionTask,
    SynthesisTask.name: SynthesisTask,
    SliceSegmentationTask.name: SliceSegmentationTask,
    SliceClassificationTask.name: SliceClassificationTask,
    SliceSuperResolutionTask.name: SliceSuperResolutionTask,
    SliceDistortionTask.name: SliceDistortionTask,
    SliceSynthesisTask.name: SliceSynthesisTask,
    MAEPretrainTask.name: MAEPretrainTask,
    FCMAEPretrainTask.name: FCMAEPretrainTask,
    ContrastivePretrainTask.name: ContrastivePretrainTask,
}


def get_task(config) -> Task:
    name = config.task.name
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} in config.task.name; available: {sorted(TASKS)}")
    return TASKS[name](config)
