"""ProViCNet's one data path: slice positions and intensities in training, evaluation and prediction are upstream's.

A small NIfTI case of 20 slices goes through the prepared-case pipeline (training: augmented crop, evaluation:
centre crop) and through `predict`'s path (`slices.case_slices`): every slice gets (j, 20) with j its index in the
volume, and a voxel that is 0 in the source (air in the ADC map, padding) gets upstream's -mean / std of the gland.
"""
import os

import nibabel as nib
import numpy as np
import pytest

from transfer_jax.data import slices
from transfer_jax.data.augment import AugmentConfig, center_crop, random_crop
from transfer_jax.data.dataset import preprocess_config
from transfer_jax.data.manifest import Case
from transfer_jax.data.pipeline import PreparedCaseSource
from transfer_jax.data.preprocess import prepare_case
from transfer_jax.tasks.registry import get_task
from helpers import config_for

SLICES, SIDE, SPACING = 20, 64, (1.5, 1.5, 3.0)  # NIfTI (x, y, z): the smoke preset's spacing and slice size
GLAND_SLICES = (8, 10)  # [start, stop)


def write_case(folder) -> Case:
    """T2 whose slice k has intensities 100 (k + 1) + pattern; ADC zero (air) outside a disc; a small gland."""
    affine = np.diag([*SPACING, 1.0])
    x, y = np.meshgrid(np.arange(SIDE), np.arange(SIDE), indexing="ij")
    disc = (x - 32) ** 2 + (y - 32) ** 2 < 24 ** 2
    pattern = (x % 7 + y % 5).astype(np.float32)
    k = np.arange(SLICES)[None, None, :]
    arrays = {
        "t2": 100.0 * (k + 1) + pattern[..., None],
        "adc": np.where(disc[..., None], 800.0 + 40 * pattern[..., None] + 5 * k, 0.0),
        "dwi": np.where(disc[..., None], 20.0 + pattern[..., None] + k, 0.0),
        "gland": np.zeros((SIDE, SIDE, SLICES)),
    }
    arrays["gland"][20:36, 30:42, GLAND_SLICES[0]:GLAND_SLICES[1]] = 1  # off the slices' centre
    paths = {}
    for name, array in arrays.items():
        paths[name] = os.path.join(folder, f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(array.astype(np.uint16), affine), paths[name])
    return Case("case", paths["t2"], paths["adc"], paths["dwi"], "val", gland_mask=paths["gland"])


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    return write_case(str(tmp_path_factory.mktemp("provicnet_path")))


def element(case, folder, config):
    """The training / evaluation pipeline's element of a case (what PreparedCaseSource reads from the cache)."""
    path = os.path.join(folder, "prepared.npz")
    prepare_case(case, preprocess_config(config.data)).save(path)
    return PreparedCaseSource([path])[0]


def upstream_zero_value(case, sequence):
    """Upstream's value of a source voxel equal to 0: (0 - mean) / std of the raw voxels in the gland."""
    raw = np.asarray(nib.load(case.path(sequence)).dataobj, np.float64)
    inside = raw[np.asarray(nib.load(case.gland_mask).dataobj) == 1]
    return -inside.mean() / inside.std()


@pytest.mark.parametrize("depth", [4, 8, SLICES])
def test_positions_count_from_the_volume_in_train_eval_and_predict(case, tmp_path, depth):
    config = config_for("seg", "provicnet,smoke")
    config.data.crop_size = (depth, 64, 64)
    task = get_task(config)
    sample = element(case, str(tmp_path), config)

    evaluation = center_crop(sample, tuple(config.data.crop_size))
    positions = task.make_sample(evaluation)["slice_position"]
    np.testing.assert_array_equal(positions[:, 1], SLICES)
    # j is the volume slice the crop slice holds: T2 slice k is 100 (k + 1) + a pattern of at most 10.
    held = np.floor(evaluation["image"][..., 0].max(axis=(1, 2)) / 100) - 1
    np.testing.assert_array_equal(positions[:, 0], held)
    # In-plane the evaluation crop is the whole native slice (upstream's input), not re-centred on the gland.
    t2 = np.asarray(nib.load(case.t2).dataobj).transpose(2, 1, 0)
    np.testing.assert_array_equal(evaluation["image"][..., 0], t2[held.astype(int)])
    if depth == SLICES:  # a volume that fits the crop goes in whole, as upstream's
        np.testing.assert_array_equal(held, np.arange(SLICES))

    no_zoom = AugmentConfig(zoom=0.0, translate=0.2, flip_axes=(), intensity_scale=0.0, intensity_shift=0.0)
    for seed in range(3):
        training = random_crop(sample, tuple(config.data.crop_size), no_zoom, np.random.default_rng(seed))
        positions = task.make_sample(training)["slice_position"]
        np.testing.assert_array_equal(positions[:, 1], SLICES)
        np.testing.assert_array_equal(np.diff(positions[:, 0]), 1)
        assert abs(positions[0, 0] - held[0]) <= 0.2 * depth + 1

    whole_volume = np.stack([np.arange(SLICES), np.full(SLICES, SLICES)], 1)
    predicted = slices.case_slices(case, "t2", image_size=task.image_size)
    np.testing.assert_array_equal(predicted.slice_position, whole_volume)
    # A run trained at another in-plane spacing predicts on the T2 grid resampled to it: same slices.
    coarse = slices.case_slices(case, "t2", spacing=(3.0, 3.0, 3.0), image_size=task.image_size)
    assert coarse.volume_shape == (SLICES, SIDE // 2, SIDE // 2)
    np.testing.assert_array_equal(coarse.slice_position, whole_volume)


def test_zero_voxels_get_upstreams_value_in_eval_and_predict(case, tmp_path):
    config = config_for("seg", "provicnet,smoke")
    config.task.sequence = "adc"
    task = get_task(config)
    expected = upstream_zero_value(case, "adc")
    sample = center_crop(element(case, str(tmp_path), config), tuple(config.data.crop_size))
    assert sample["gland"].sum() == np.asarray(nib.load(case.gland_mask).dataobj).sum(), "whole gland in the crop"
    images = task.make_sample(sample)["image"]
    # Air and padding are the lowest input: every tap of those pixels is a zero voxel.
    assert images.min() == pytest.approx(expected, abs=1e-5)
    assert np.isclose(images, expected, atol=1e-5).mean() > 0.2

    stack = slices.case_slices(case, "adc", image_size=task.image_size)
    assert stack.images.min() == pytest.approx(expected, abs=1e-5)
    assert np.isclose(stack.images, expected, atol=1e-5).mean() > 0.1


def test_prediction_without_a_gland_mask_is_a_clear_error(case):
    import dataclasses

    from transfer_jax.data.errors import DataError

    with pytest.raises(DataError, match="'case'.*gland_mask"):
        slices.case_slices(dataclasses.replace(case, gland_mask=None), "t2")
