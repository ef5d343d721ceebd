"""NIfTI reading, geometry, resampling, the phantom generator and the grain pipeline."""
import os

import nibabel as nib
import numpy as np
import pytest

from helpers import sample_case, tiny_manifest, write_manifest_for
from transfer_jax.data.augment import AugmentConfig, center_crop, random_crop
from transfer_jax.data.manifest import read_manifest
from transfer_jax.data.nifti import Grid, read_volume, resample
from transfer_jax.data.phantom import PhantomConfig, generate_phantom_dataset
from transfer_jax.data.preprocess import PreprocessConfig, prepare_case, zscore_nonzero


def test_real_sample_through_manifest(sample_dir, tmp_path):
    manifest = write_manifest_for(str(tmp_path), [sample_case(sample_dir)])
    (case,) = read_manifest(manifest)
    assert case.t2 == os.path.join(sample_dir, "sample_t2.nii.gz")  # relative path resolved

    t2 = read_volume(case.t2)
    assert t2.array.shape == (20, 256, 256)  # (D, H, W) = reversed NIfTI (256, 256, 20)
    np.testing.assert_allclose(t2.grid.spacing, (3.0, 0.5, 0.5), atol=1e-5)
    raw = np.asarray(nib.load(case.t2).dataobj)
    np.testing.assert_array_equal(t2.array, raw.transpose(2, 1, 0))  # no reorientation
    assert nib.aff2axcodes(t2.grid.affine) == ("L", "P", "S")

    native = prepare_case(case, PreprocessConfig(spacing=None, crop_size=(16, 128, 128), region_margin=1.25))
    assert native.image.shape == (20, 160, 160, 3)
    assert native.image.dtype == np.float32
    assert int(native.gland.sum()) == 46897 and int(native.lesion.sum()) == 6589  # every mask voxel kept
    np.testing.assert_allclose(native.region_grid.spacing, (3.0, 0.5, 0.5), atol=1e-5)

    resampled = prepare_case(case, PreprocessConfig())  # ProFound: 1 x 0.5 x 0.5 mm, 64 x 224 x 224 crops
    assert resampled.image.shape == (80, 280, 280, 3)
    np.testing.assert_allclose(resampled.region_grid.spacing, (1.0, 0.5, 0.5), atol=1e-5)
    # the gland volume in mm^3 is preserved by the 3 mm -> 1 mm resampling (nearest-neighbour masks)
    assert abs(resampled.gland.sum() * 0.25 - 46897 * 0.75) / (46897 * 0.75) < 0.05
    for c in range(3):  # z-scored over non-zero voxels of the whole volume, channel order T2, DWI, ADC
        channel = native.image[..., c]
        assert abs(float(channel[channel != 0].mean())) < 0.5


def test_resampling_onto_t2_grid_is_affine_aware():
    """A linear ramp on a coarse, shifted grid must be reproduced exactly on the fine grid (trilinear is exact)."""
    coarse_affine = np.diag([2.0, 2.0, 3.0, 1.0])
    coarse_affine[:3, 3] = (-1.0, 0.5, 3.0)
    i, j, k = np.meshgrid(np.arange(12), np.arange(10), np.arange(8), indexing="ij")
    world = np.stack([i, j, k, np.ones_like(i)], -1) @ coarse_affine.T
    ramp = 0.5 * world[..., 0] - 0.25 * world[..., 1] + world[..., 2]
    source = Grid(shape=(8, 10, 12), affine=coarse_affine)
    fine_affine = np.diag([1.0, 1.0, 1.5, 1.0])
    fine_affine[:3, 3] = (2.0, 3.0, 6.0)
    target = Grid(shape=(6, 8, 10), affine=fine_affine)
    from transfer_jax.data.nifti import Volume

    out = resample(Volume(ramp.transpose(2, 1, 0).astype(np.float32), source, "ramp"), target)
    d, h, w = np.meshgrid(np.arange(6), np.arange(8), np.arange(10), indexing="ij")
    fine_world = np.stack([w, h, d, np.ones_like(d)], -1) @ fine_affine.T
    expected = 0.5 * fine_world[..., 0] - 0.25 * fine_world[..., 1] + fine_world[..., 2]
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_with_spacing_keeps_origin_and_direction():
    rotation = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.5, 0.5, 3.0])
    affine[:3, 3] = (10.0, -5.0, 2.0)
    grid = Grid((20, 256, 256), affine)
    fine = grid.with_spacing((1.0, 1.0, 1.0))
    assert fine.shape == (60, 128, 128)
    np.testing.assert_allclose(fine.affine[:3, 3], affine[:3, 3])
    np.testing.assert_allclose(fine.spacing, (1.0, 1.0, 1.0), atol=1e-9)
    np.testing.assert_allclose(fine.affine[:3, :3] / 1.0, rotation, atol=1e-9)


def test_zscore_nonzero_matches_monai_semantics():
    x = np.array([0.0, 1.0, 2.0, 3.0, 0.0], np.float32)
    z = zscore_nonzero(x)
    assert z[0] == 0 and z[-1] == 0
    np.testing.assert_allclose(z[1:4], (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3]), rtol=1e-6)
    np.testing.assert_array_equal(zscore_nonzero(np.zeros(3, np.float32)), 0)
    np.testing.assert_array_equal(zscore_nonzero(np.array([0, 5, 5], np.float32)), [0, 0, 0])


def test_phantom_is_deterministic_and_consistent(tmp_path):
    config = PhantomConfig(num_cases=3, num_val=1, num_test=1, seed=7)
    a = generate_phantom_dataset(str(tmp_path / "a"), config)
    b = generate_phantom_dataset(str(tmp_path / "b"), config)
    cases_a, cases_b = read_manifest(a), read_manifest(b)
    assert [c.split for c in cases_a] == ["train", "val", "test"]
    for ca, cb in zip(cases_a, cases_b):
        assert ca.label == cb.label
        for role in ("t2", "adc", "dwi", "gland_mask", "lesion_mask"):
            ia, ib = nib.load(ca.path(role)), nib.load(cb.path(role))
            np.testing.assert_array_equal(np.asarray(ia.dataobj), np.asarray(ib.dataobj))
            np.testing.assert_array_equal(ia.affine, ib.affine)
    other = generate_phantom_dataset(str(tmp_path / "c"), PhantomConfig(num_cases=3, num_val=1, num_test=1, seed=8))
    assert not np.array_equal(np.asarray(nib.load(read_manifest(other)[0].t2).dataobj),
                              np.asarray(nib.load(cases_a[0].t2).dataobj))

    # ADC/DWI live on their own coarser grid and still line up with T2 after preprocessing: the gland is
    # brighter than its surroundings on ADC (peripheral zone) and lesions are brightest on DWI.
    t2 = nib.load(cases_a[0].t2)
    adc = nib.load(cases_a[0].adc)
    assert t2.shape != adc.shape and not np.allclose(t2.affine, adc.affine)
    prepared = prepare_case(cases_a[0], PreprocessConfig(spacing=(3.0, 1.0, 1.0), crop_size=(16, 64, 64)))
    assert prepared.gland.sum() > 1000
    if prepared.lesion.any():
        dwi = prepared.image[..., 1]
        assert dwi[prepared.lesion > 0].mean() > dwi[(prepared.gland > 0) & (prepared.lesion == 0)].mean() + 0.5


def test_labels_follow_lesions(tmp_path):
    manifest = generate_phantom_dataset(str(tmp_path / "p"), PhantomConfig(num_cases=12, num_val=1, num_test=1))
    labels, volumes = [], []
    for case in read_manifest(manifest):
        labels.append(int(case.label))
        volumes.append(int(np.asarray(nib.load(case.lesion_mask).dataobj).sum()))
    labels, volumes = np.array(labels), np.array(volumes)
    assert set(labels) <= {0, 1, 2, 3} and len(set(labels)) >= 3
    np.testing.assert_array_equal(labels == 0, volumes == 0)  # label 0 exactly when no lesion was drawn
    assert np.mean(volumes[labels == labels.max()]) > np.mean(volumes[(labels > 0) & (labels < labels.max())])


def test_crops_and_augmentation_are_deterministic_per_seed():
    rng = np.random.default_rng(0)
    sample = {"image": rng.normal(size=(20, 40, 40, 3)).astype(np.float32),
              "gland": (rng.random((20, 40, 40)) > 0.5).astype(np.uint8), "lesion": None}
    crop = center_crop(sample, (16, 32, 32))
    np.testing.assert_array_equal(crop["image"], sample["image"][2:18, 4:36, 4:36])
    config = AugmentConfig()
    a = random_crop(sample, (16, 32, 32), config, np.random.default_rng(5))
    b = random_crop(sample, (16, 32, 32), config, np.random.default_rng(5))
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["image"].shape == (16, 32, 32, 3) and a["gland"].shape == (16, 32, 32)
    assert set(np.unique(a["gland"])) <= {0, 1}
    identity = AugmentConfig(zoom=0.0, translate=0.0, flip_axes=(), intensity_scale=0.0, intensity_shift=0.0)
    same = random_crop(sample, (16, 32, 32), identity, np.random.default_rng(1))
    np.testing.assert_allclose(same["image"], crop["image"], atol=1e-5)
    np.testing.assert_array_equal(same["gland"], crop["gland"])
    # Where along the region's slices each crop slice was sampled (the slice models' positions).
    np.testing.assert_array_equal(crop["slice_coordinate"], np.arange(2, 18))
    np.testing.assert_allclose(same["slice_coordinate"], crop["slice_coordinate"], atol=1e-5)


def test_axis_aligned_warp_samples_like_ndimage_affine_transform():
    from scipy import ndimage
    from transfer_jax.data.augment import axis_aligned_warp
    rng = np.random.default_rng(3)
    for trial in range(60):
        region, crop = tuple(rng.integers(6, 18, 3)), tuple(int(n) for n in rng.integers(5, 18, 3))
        scale = np.where(rng.random(3) < 0.5, -1.0, 1.0) * rng.uniform(0.7, 1.3, 3)
        offset = (np.asarray(region) - 1) / 2 + rng.uniform(-5, 5, 3) - scale * (np.asarray(crop) - 1) / 2
        if trial % 4 == 0:  # whole and half voxel positions: the edges and the nearest-neighbour ties
            offset, scale = np.round(offset * 2) / 2, np.sign(scale)
        image = rng.normal(size=region + (2,)).astype(np.float32)
        mask = rng.integers(0, 3, region).astype(np.uint8)
        reference = lambda a, order: ndimage.affine_transform(  # noqa: E731
            a, scale, offset=offset, output_shape=crop, order=order, mode="constant", cval=0.0, prefilter=False)
        expected = np.stack([reference(image[..., c], 1) for c in range(2)], axis=-1)
        np.testing.assert_allclose(axis_aligned_warp(image, scale, offset, crop, order=1), expected, atol=2e-6)
        np.testing.assert_array_equal(axis_aligned_warp(mask, scale, offset, crop, order=0), reference(mask, 0))
    with pytest.raises(ValueError, match="order must be 0"):
        axis_aligned_warp(mask, scale, offset, crop, order=3)


def test_epoch_shuffle_permutes_every_epoch_anew_and_reproducibly():
    import grain
    from transfer_jax.data.pipeline import EpochShuffle
    shuffled = EpochShuffle(grain.MapDataset.range(10), seed=4).repeat()
    epochs = [[shuffled[e * 10 + i] for i in range(10)] for e in range(3)]
    assert all(sorted(order) == list(range(10)) for order in epochs)
    assert len({tuple(order) for order in epochs}) == 3 and epochs[0] != list(range(10))
    again = EpochShuffle(grain.MapDataset.range(10), seed=4).repeat()
    assert [again[i] for i in (25, 3, 17)] == [epochs[2][5], epochs[0][3], epochs[1][7]]  # any order of access
    assert [shuffled[i] for i in range(10)] != [EpochShuffle(grain.MapDataset.range(10), seed=5)[i] for i in range(10)]


def _prepared_phantom_cases(tmp_path, split: str | None = "train"):
    """(prepared-case paths of 5 phantom cases, `split` only unless None; the smoke config's task)."""
    from transfer_jax.data.preprocess import preprocess_cases
    from helpers import smoke_config
    from transfer_jax.tasks.registry import get_task

    cases = read_manifest(tiny_manifest(str(tmp_path / "data"), num_cases=5))
    report = preprocess_cases(cases, PreprocessConfig(spacing=(3.0, 2.0, 2.0), crop_size=(16, 32, 32)),
                              str(tmp_path / "cache"))
    paths = [report.paths[c.case_id] for c in cases if split is None or c.split == split]
    return paths, get_task(smoke_config())


def test_train_pipeline_resumes_exactly(tmp_path):
    from transfer_jax.data.pipeline import train_dataset

    paths, task = _prepared_phantom_cases(tmp_path)

    def make():
        return iter(train_dataset(paths, task, crop_size=(16, 32, 32), augment=AugmentConfig(), per_process_batch=2,
                                  seed=3))

    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_memory_cache_gives_the_same_stream_and_keeps_within_its_budget(tmp_path):
    import pickle

    from transfer_jax.data.pipeline import PreparedCaseSource, train_dataset

    paths, task = _prepared_phantom_cases(tmp_path)

    def batches(memory_cache_bytes):
        it = iter(train_dataset(paths, task, crop_size=(16, 32, 32), augment=AugmentConfig(), per_process_batch=2,
                                seed=3, memory_cache_bytes=memory_cache_bytes))
        return [next(it) for _ in range(3 * len(paths))]  # several epochs: later ones come from the cache

    for want, got in zip(batches(0), batches(1 << 30)):
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])

    one_case = sum(v.nbytes for v in PreparedCaseSource(paths)[0].values() if isinstance(v, np.ndarray))
    source = PreparedCaseSource(paths, memory_cache_bytes=int(1.5 * one_case))
    for index in range(len(paths)):
        source[index]
    assert source.cached_cases == 1  # a second case would exceed the budget
    cached = source[0]
    assert not cached["image"].flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        cached["image"][0] = 0.0
    np.testing.assert_array_equal(cached["image"], PreparedCaseSource(paths)[0]["image"])
    copy = pickle.loads(pickle.dumps(source))  # what a grain worker process receives
    assert copy.cached_cases == 0 and copy.memory_cache_bytes == source.memory_cache_bytes
    assert PreparedCaseSource(paths)[0]["image"].flags.writeable  # no cache: arrays as loaded


def test_evaluation_reads_each_case_once_with_a_memory_cache(tmp_path, monkeypatch):
    from transfer_jax.data import pipeline

    paths, task = _prepared_phantom_cases(tmp_path, split=None)
    loads = []
    load = pipeline.PreparedCase.load
    monkeypatch.setattr(pipeline.PreparedCase, "load", staticmethod(lambda path: loads.append(path) or load(path)))

    def evaluation(source):
        return list(pipeline.eval_batches(source, task, crop_size=(16, 32, 32), per_process_batch=2))

    cached = pipeline.PreparedCaseSource(paths, memory_cache_bytes=1 << 30)
    first, second = evaluation(cached), evaluation(cached)
    assert sorted(loads) == sorted(paths)  # the second evaluation read nothing from disk
    uncached = evaluation(pipeline.PreparedCaseSource(paths))
    assert len(loads) == 2 * len(paths)
    for a, b, c in zip(first, second, uncached):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
            np.testing.assert_array_equal(a[key], c[key])


def test_memory_cache_size_must_be_a_non_negative_number(tmp_path):
    from helpers import smoke_config
    from transfer_jax.train.loop import train_and_evaluate

    config = smoke_config()
    config.data.memory_cache_mb = -1
    with pytest.raises(ValueError, match="config.data.memory_cache_mb must be a number of MiB >= 0"):
        train_and_evaluate(config, str(tmp_path / "run"))
    assert not os.path.exists(str(tmp_path / "run" / "checkpoints"))
