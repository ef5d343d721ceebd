"""ProFound's validation / test view: MONAI `CenterSpatialCrop` + `SpatialPad` of the whole volume (fixtures from
MONAI: scripts/make_crop_fixtures.py), reproduced by `region_centre="volume"` and used by the `full` presets and by
feature extraction."""
import json
import os

import numpy as np
import pytest

from helpers import fixture_path, load_config, write_manifest_for, write_nifti
from transfer_jax.data.augment import center_crop, center_start
from transfer_jax.data.dataset import preprocess_config
from transfer_jax.data.manifest import Case
from transfer_jax.data.preprocess import PreprocessConfig, prepare_case, volume_region_start, zscore_nonzero
from transfer_jax.features.profound import read_manifest_volumes


def _fixture():
    with open(fixture_path("crops", "monai.json"), encoding="utf-8") as f:
        return json.load(f)


def _case(directory, image: np.ndarray, gland: np.ndarray) -> Case:
    """A case whose T2 / DWI / ADC are `image` (D, H, W) on an identity grid, with the gland mask `gland`."""
    t2 = write_nifti(os.path.join(directory, "image.nii.gz"), image.transpose(2, 1, 0))
    mask = write_nifti(os.path.join(directory, "gland.nii.gz"), gland.transpose(2, 1, 0), dtype=np.uint8)
    return Case(case_id="c0", t2=t2, adc=t2, dwi=t2, split="val", gland_mask=mask)


def _upstream_view(volume: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """What MONAI's transform made of `volume`: the source voxel each output voxel came from, zeros for padding."""
    flat = np.concatenate([[0], volume.ravel()])
    return flat[numbers]


def test_center_start_is_monai_crop_then_pad_on_odd_even_and_short_axes():
    starts = _fixture()["starts"]
    assert {(s["size"] - s["roi"]) % 2 for s in starts} == {0, 1}
    assert any(s["size"] < s["roi"] for s in starts) and any(s["size"] > s["roi"] for s in starts)
    for s in starts:
        assert center_start(s["size"], s["roi"]) == s["start"], s
    # 82 slices, crop 64: MONAI starts at 9 where rounding half to even from the centre 40.5 gives 8.
    assert center_start(82, 64) == 9 and center_start(83, 64) == 9 and center_start(61, 64) == -1


@pytest.mark.parametrize("margin", [1.0, 1.25, 1.3])
def test_volume_region_centre_crop_is_upstream_validation_view(tmp_path, margin):
    fixture = _fixture()["volume"]
    shape, crop = tuple(fixture["shape"]), tuple(fixture["crop"])
    numbers = np.asarray(fixture["numbers"])
    volume = np.random.default_rng(0).uniform(1.0, 2.0, shape).astype(np.float32)
    config = PreprocessConfig(spacing=None, crop_size=crop, region_margin=margin, channels=("t2",),
                              intensity="raw", region_centre="volume")
    corner = np.zeros(shape, np.uint8)
    corner[:2, :2, :2] = 1  # far from the middle: a gland-centred region would sit elsewhere
    os.makedirs(tmp_path / "a")
    prepared = prepare_case(_case(str(tmp_path / "a"), volume, corner), config)
    view = center_crop({"image": prepared.image}, crop)["image"][..., 0]
    np.testing.assert_array_equal(view, _upstream_view(volume, numbers))

    # The region does not depend on the mask: another gland (or none) gives the same arrays.
    other = np.zeros(shape, np.uint8)
    other[-3:, -2:, -4:] = 1
    os.makedirs(tmp_path / "b")
    again = prepare_case(_case(str(tmp_path / "b"), volume, other), config)
    np.testing.assert_array_equal(again.image, prepared.image)
    np.testing.assert_array_equal(again.region_grid.affine, prepared.region_grid.affine)
    gland_centred = prepare_case(_case(str(tmp_path / "b"), volume, other),
                                 PreprocessConfig(**{**config.__dict__, "region_centre": "gland"}))
    assert not np.array_equal(gland_centred.image, prepared.image)


def test_region_without_a_gland_is_placed_as_the_volume_view():
    for size, crop, region in [(82, 64, 80), (83, 64, 80), (60, 64, 80), (61, 63, 79), (300, 224, 280)]:
        (start,) = volume_region_start((size,), (region,), (crop,))
        assert start + center_start(region, crop) == center_start(size, crop)


@pytest.mark.parametrize("arg", ["profound_conv,full", "profound_vit,full"])
@pytest.mark.parametrize("name", ["seg", "cls"])
def test_profound_full_presets_evaluate_on_the_volume_centre(name, arg):
    config = load_config(name, arg)
    assert preprocess_config(config.data).region_centre == "volume"
    assert load_config(name, arg.replace("full", "smoke")).data.region_centre == "gland"


def test_extraction_crops_as_upstream_validation(tmp_path):
    fixture = _fixture()["volume"]
    shape, crop = tuple(fixture["shape"]), tuple(fixture["crop"])
    volume = np.random.default_rng(1).uniform(1.0, 2.0, shape).astype(np.float32)
    gland = np.zeros(shape, np.uint8)
    gland[:2, :2, :2] = 1
    manifest = write_manifest_for(str(tmp_path), [_case(str(tmp_path), volume, gland)])
    case_ids, images = read_manifest_volumes(manifest, crop, spacing=None)
    assert case_ids == ["c0"] and images.shape == (1, *crop, 3)
    expected = _upstream_view(zscore_nonzero(volume), np.asarray(fixture["numbers"]))
    for channel in range(3):
        np.testing.assert_allclose(images[0, ..., channel], expected, rtol=1e-6)


def test_gland_region_centres_on_the_nearest_voxel_halves_up(tmp_path):
    """Gland-centred regions place the centroid's voxel (halves up) where MONAI's centre crop puts its centre,
    region // 2; a case without a gland is placed as the volume view."""
    shape = (9, 6, 13)
    volume = np.ones(shape, np.float32)
    gland = np.zeros(shape, np.uint8)
    gland[4:6, 3, 6] = 1  # centroid (4.5, 3, 6)
    config = PreprocessConfig(spacing=None, crop_size=(4, 5, 5), region_margin=1.0, channels=("t2",),
                              intensity="raw")
    prepared = prepare_case(_case(str(tmp_path), volume, gland), config)
    np.testing.assert_array_equal(np.argwhere(prepared.gland), [[1, 2, 2], [2, 2, 2]])  # voxel 5 at 4 // 2

    fixture = _fixture()["volume"]
    numbers, crop = np.asarray(fixture["numbers"]), tuple(fixture["crop"])
    varied = np.random.default_rng(2).uniform(1.0, 2.0, shape).astype(np.float32)
    no_gland = prepare_case(_case(str(tmp_path), varied, 0 * gland),
                            PreprocessConfig(**{**config.__dict__, "crop_size": crop, "region_margin": 1.25}))
    view = center_crop({"image": no_gland.image}, crop)["image"][..., 0]
    np.testing.assert_array_equal(view, _upstream_view(varied, numbers))
