"""The upstream augmentation pipelines (`data.augment.pipeline`): each transform against its library's output
(fixtures from MONAI 1.5.0 / albumentations 1.4.7 with OpenCV 4, scripts/make_augment_fixtures.py), the random
draws (probabilities within binomial tolerances, ranges), the windowed ProFound geometry against the sequential
transforms, masks staying in their label set, identities at p = 0, and ProViCNet's slice independence."""
import math
import os

import numpy as np
import pytest

from transfer_jax.data import augment_upstream as up
from transfer_jax.data.augment import AugmentConfig, center_crop

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "augment", "upstream_transforms.npz")


@pytest.fixture(scope="module")
def fixtures():
    with np.load(FIXTURES) as z:
        return dict(z)


def _sample(rng, region=(10, 30, 34), channels=2):
    return {"image": rng.normal(size=region + (channels,)).astype(np.float32),
            "gland": (rng.random(region) > 0.5).astype(np.uint8),
            "lesion": (rng.random(region) > 0.8).astype(np.uint8), "case_index": np.int32(3)}


def _within_binomial(hits: int, trials: int, p: float, name: str) -> None:
    tolerance = 4.5 * math.sqrt(trials * p * (1 - p)) + 1
    assert abs(hits - trials * p) <= tolerance, f"{name}: {hits}/{trials} applied, expected p = {p}"


# -- against the libraries ------------------------------------------------------------------------------------


def test_monai_transforms_match_monai(fixtures):
    volume, labels = fixtures["volume"], fixtures["labels"]
    angle = float(fixtures["rotate_angle"])
    np.testing.assert_allclose(up.rotate(volume, angle, 1), fixtures["rotate_image"], atol=1e-4)
    np.testing.assert_array_equal(up.rotate(labels, angle, 0), fixtures["rotate_labels"])
    np.testing.assert_allclose(up.zoom(volume, fixtures["zoom_factors"], 1), fixtures["zoom_image"], atol=1e-5)
    np.testing.assert_array_equal(up.zoom(labels, fixtures["zoom_factors"], 0), fixtures["zoom_labels"])
    np.testing.assert_allclose(up.gaussian_smooth(volume, fixtures["smooth_sigmas"]), fixtures["smooth_image"],
                               atol=1e-5)
    field = np.exp(up.bias_field(volume.shape[:3], fixtures["bias_coefficients"]))
    np.testing.assert_allclose(volume * field[..., None], fixtures["bias_image"], atol=1e-5)


def test_albumentations_transforms_match_albumentations(fixtures):
    image, mask = fixtures["slice"], fixtures["slice_mask"]
    height, width = mask.shape
    matrix = up.elastic_matrix(height, width, fixtures["elastic_jitter"])
    dx, dy = (up.elastic_displacement(fixtures[k], 0.2, 15.0) for k in ("elastic_noise_x", "elastic_noise_y"))
    warped, (warped_mask,) = up.elastic(image, [mask], matrix, dx, dy)
    np.testing.assert_allclose(warped, fixtures["elastic_image"], atol=1e-5)
    np.testing.assert_array_equal(warped_mask, fixtures["elastic_mask"])
    shear = up.shear_matrix(height, width, 2.0)
    np.testing.assert_allclose(up.warp_affine(image, shear, 1, up.BORDER_CONSTANT), fixtures["shear_image"],
                               atol=1e-5)
    np.testing.assert_array_equal(up.warp_affine(mask, shear, 0, up.BORDER_CONSTANT), fixtures["shear_mask"])
    np.testing.assert_allclose(up.blur3(image), fixtures["blur_image"], atol=1e-6)
    contrast = up.brightness_contrast(image, float(fixtures["contrast_alpha"]), float(fixtures["contrast_beta"]))
    np.testing.assert_array_equal(contrast, fixtures["contrast_image"])
    assert contrast.min() == 0.0 and contrast.max() == 1.0  # the float clip to [0, 1]


# -- single transforms: semantics --------------------------------------------------------------------------------


def _orientation(plane: np.ndarray) -> float:
    """Angle (radians, from the W axis towards H) of the principal axis of a non-negative 2-D pattern."""
    rows, cols = np.indices(plane.shape)
    weight = plane / plane.sum()
    r, c = rows - (weight * rows).sum(), cols - (weight * cols).sum()
    crr, ccc, crc = (weight * r * r).sum(), (weight * c * c).sum(), (weight * r * c).sum()
    return 0.5 * math.atan2(2 * crc, ccc - crr)


@pytest.mark.parametrize("degrees", [-27.0, -8.0, 13.0, 29.0])
def test_rotation_angle_is_recovered_from_a_rotated_pattern(degrees):
    rows, cols = np.indices((41, 41)) - 20.0
    bar = np.exp(-(rows / 2.5) ** 2 - (cols / 12.0) ** 2)  # elongated along W
    volume = np.broadcast_to(bar, (2, 41, 41))[..., None].astype(np.float32)
    rotated = up.rotate(volume, math.radians(degrees), 1)
    assert rotated.shape[:3] == up.rotated_shape((2, 41, 41), math.radians(degrees))
    assert math.degrees(_orientation(rotated[1, ..., 0])) == pytest.approx(degrees, abs=0.3)
    np.testing.assert_array_equal(rotated[0], rotated[1])  # every slice alike: nothing along D


def test_rotated_shape_holds_the_rotated_box():
    assert up.rotated_shape((4, 40, 40), math.radians(30)) == (4, 55, 55)  # 40 (cos 30 + sin 30) = 54.6
    assert up.rotated_shape((4, 20, 50), 0.0) == (4, 20, 50)
    assert up.rotated_shape((4, 20, 50), math.radians(90)) == (4, 50, 20)


def test_zoom_keeps_the_size_and_scales_a_ramp_about_the_centre():
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[:, None], (3, 40, 16))[..., None]
    for factor in (0.9, 1.1):
        zoomed = up.zoom(ramp, (1.0, factor, 1.0), 1)[1, :, 5, 0]
        assert zoomed.shape == (40,)
        interior = zoomed[5:-5]
        np.testing.assert_allclose(np.diff(interior), 1.0 / factor, rtol=1e-3)  # slope 1 / zoom
        assert abs(zoomed[20] - 19.5) <= 1.0 / factor  # centred
    padded = up.zoom(ramp, (1.0, 0.9, 1.0), 1)[1, :, 5, 0]  # 36 zoomed rows, 2 edge rows either side
    assert padded[0] == padded[1] == padded[2] < padded[3] and padded[-1] == padded[-2] == padded[-3] > padded[-4]
    np.testing.assert_array_equal(up.zoom(ramp, (1.0, 1.0, 1.0), 1), ramp)


def test_gaussian_smooth_and_bias_field_follow_their_definitions():
    kernel = up.gaussian_kernel_erf(1.0)
    assert kernel.size == 9 and kernel.sum() == pytest.approx(1.0, abs=1e-4)  # +-4 sigma, integrated bins
    assert kernel[4] == pytest.approx(math.erf(0.5 / math.sqrt(2)), abs=1e-7)
    impulse = np.zeros((9, 9, 9, 1), np.float32)
    impulse[4, 4, 4] = 1.0
    smoothed = up.gaussian_smooth(impulse, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(smoothed[:, 4, 4, 0], kernel * kernel[4] ** 2, rtol=1e-5)
    assert up.gaussian_kernel_erf(0.25).size == 3
    constant = np.zeros(20)
    constant[0] = 0.05  # the P0 P0 P0 term: a uniform gain exp(0.05)
    np.testing.assert_allclose(up.bias_field((3, 4, 5), constant), 0.05)
    linear = np.zeros(20)
    linear[1] = 0.1  # (i, j, k) = (0, 0, 1): P1 along W
    np.testing.assert_allclose(up.bias_field((2, 2, 5), linear)[0, 0], 0.1 * np.linspace(-1, 1, 5), atol=1e-7)
    with pytest.raises(ValueError, match="20 coefficients"):
        up.bias_field((2, 2, 2), np.zeros(10))


def test_shear_is_a_fixed_two_degree_shear_about_the_centre():
    matrix = up.shear_matrix(21, 31, 2.0)
    t = math.tan(math.radians(2.0))
    np.testing.assert_allclose(matrix[:, :2], [[1 - t * t, t], [-t, 1]])
    centre = np.array([15.0, 10.0, 1.0])
    np.testing.assert_allclose(matrix @ centre, centre[:2])  # the centre stays
    assert np.linalg.det(matrix[:, :2]) == pytest.approx(1.0)


def test_blur_kernel_sizes_are_one_or_three():
    rng = np.random.default_rng(0)
    sizes = [up._blur_kernel_size(rng, 1, 3) for _ in range(3000)]
    assert set(sizes) == {1, 3}
    _within_binomial(sizes.count(3), 3000, 2 / 3, "kernel 3")


# -- draws -------------------------------------------------------------------------------------------------------


def test_profound_draws_apply_with_upstream_probabilities_and_ranges():
    region, crop, trials = (20, 40, 40), (16, 32, 32), 3000
    draws = [up.profound_params(region, crop, np.random.default_rng(seed)) for seed in range(trials)]
    p = up.PROFOUND
    for key, prob in (("angle", p["rotate_p"]), ("factors", p["zoom_p"]), ("scale", p["scale_p"]),
                      ("shift", p["shift_p"]), ("bias", p["bias_p"]), ("sigmas", p["smooth_p"])):
        _within_binomial(sum(d[key] is not None for d in draws), trials, prob, key)
    _within_binomial(sum(d["flip"] for d in draws), trials, p["flip_p"], "flip")
    angles = np.array([d["angle"] for d in draws if d["angle"] is not None])
    assert np.abs(angles).max() <= math.radians(30) and np.abs(angles).max() > math.radians(29)
    assert abs(angles.mean()) < 0.05
    factors = np.array([d["factors"] for d in draws if d["factors"] is not None])
    assert np.all(factors[:, 0] == 1.0) and factors[:, 1:].min() >= 0.9 and factors[:, 1:].max() <= 1.1
    assert factors[:, 1:].min() < 0.91 and factors[:, 1:].max() > 1.09 and factors[0, 1] != factors[0, 2]
    for key, bound in (("scale", 0.1), ("shift", 0.1)):
        values = np.array([d[key] for d in draws if d[key] is not None])
        assert np.abs(values).max() <= bound and values.min() < -0.09 and values.max() > 0.09
    coefficients = np.concatenate([d["bias"] for d in draws if d["bias"] is not None])
    assert coefficients.size % 20 == 0 and coefficients.min() >= 0.0 and coefficients.max() <= 0.1
    sigmas = np.array([d["sigmas"] for d in draws])
    assert sigmas.min() >= 0.25 and sigmas.max() <= 1.5
    for d in draws:
        assert all(0 <= s <= max(r, round(1.2 * c)) - c for s, r, c in zip(d["start"], d["shape"], crop))


def test_provicnet_draws_apply_with_upstream_probabilities_and_ranges():
    trials = 3000
    rng = np.random.default_rng(1)
    draws = [up.provicnet_params((6, 7), rng) for _ in range(trials)]
    for key in ("elastic", "contrast", "noise", "shear", "blur"):
        _within_binomial(sum(d[key] is not None for d in draws), trials, 0.3, key)
    contrast = np.array([d["contrast"] for d in draws if d["contrast"] is not None])
    assert contrast[:, 0].min() >= 0.8 and contrast[:, 0].max() <= 1.2
    assert np.abs(contrast[:, 1]).max() <= 0.2 and contrast[:, 1].min() < -0.19
    noise = np.array([d["noise"] for d in draws if d["noise"] is not None])
    assert noise.min() >= 0.0 and noise.max() <= math.sqrt(15) and noise.max() > 3.8  # std = sqrt(U(0, 15))
    displacement = np.concatenate([np.ravel(d["elastic"][1]) for d in draws if d["elastic"] is not None])
    assert np.abs(displacement).max() < 0.2  # alpha 0.2 times smoothed U(-1, 1) noise


# -- pipelines ---------------------------------------------------------------------------------------------------


def _sequential_profound(sample, crop, params):
    """The ProFound geometry the long way: every transform on the whole array, in upstream order."""
    def geometry(volume, order):
        out = volume if params["angle"] is None else up.rotate(volume, params["angle"], order)
        if params["factors"] is not None:
            out = up.zoom(out, params["factors"], order)
        pad = [((p - s) // 2, p - s - (p - s) // 2) for p, s in zip(params["padded"], out.shape[:3])]
        out = np.pad(out, pad + [(0, 0)] * (out.ndim - 3))
        out = out[tuple(slice(s, s + c) for s, c in zip(params["start"], crop))]
        return out[:, :, ::-1] if params["flip"] else out

    result = {"image": up.profound_intensity(geometry(sample["image"], 1), params)}
    result.update({k: geometry(sample[k], 0) for k in ("gland", "lesion")})
    return result


def test_profound_pipeline_equals_the_sequential_transforms():
    rng = np.random.default_rng(2)
    sample = _sample(rng)
    crop = (8, 24, 26)
    seeds = [s for s in range(400) if
             (lambda d: d["angle"] is not None and d["factors"] is not None)(
                 up.profound_params(sample["image"].shape[:3], crop, np.random.default_rng(s)))][:4]
    seeds += [0, 1, 2]  # whatever they draw
    for seed in seeds:
        out = up.upstream_profound(sample, crop, np.random.default_rng(seed))
        params = up.profound_params(sample["image"].shape[:3], crop, np.random.default_rng(seed))
        expected = _sequential_profound(sample, crop, params)
        np.testing.assert_allclose(out["image"], expected["image"], atol=1e-5)
        for key in ("gland", "lesion"):
            np.testing.assert_array_equal(out[key], expected[key])
            assert out[key].dtype == np.uint8 and set(np.unique(out[key])) <= {0, 1}
        assert out["image"].shape == crop + (2,) and out["case_index"] == 3


def test_profound_pipeline_without_draws_is_a_window_of_the_region():
    rng = np.random.default_rng(3)
    sample = _sample(rng, region=(12, 30, 30))
    never = {**up.PROFOUND, **{k: 0.0 for k in up.PROFOUND if k.endswith("_p")}}
    crop = (8, 20, 20)
    out = up.upstream_profound(sample, crop, np.random.default_rng(5), never)
    params = up.profound_params((12, 30, 30), crop, np.random.default_rng(5), never)
    window = tuple(slice(s, s + c) for s, c in zip(params["start"], crop))
    np.testing.assert_array_equal(out["image"], sample["image"][window])
    np.testing.assert_array_equal(out["gland"], sample["gland"][window])
    assert not any(np.shares_memory(out[k], sample[k]) for k in ("image", "gland", "lesion"))


def test_provicnet_pipeline_without_draws_is_the_centre_crop_zscored_in_the_gland():
    rng = np.random.default_rng(4)
    sample = _sample(rng)
    sample["image"] = sample["image"] * 3.0 + 5.0
    never = {**up.PROVICNET, **{k: 0.0 for k in up.PROVICNET if k.endswith("_p")}}
    out = up.upstream_provicnet(sample, (8, 24, 24), np.random.default_rng(0), never)
    expected = center_crop(sample, (8, 24, 24))
    for key in ("gland", "lesion"):
        np.testing.assert_array_equal(out[key], expected[key])
    inside = out["image"][expected["gland"] == 1]
    np.testing.assert_allclose(inside.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(inside.std(axis=0), 1.0, atol=1e-5)
    scale = expected["image"][expected["gland"] == 1].std(axis=0)
    np.testing.assert_allclose(np.diff(out["image"], axis=2), np.diff(expected["image"], axis=2) / scale, atol=1e-4)
    no_gland = {**sample, "gland": None}
    out = up.upstream_provicnet(no_gland, (8, 24, 24), np.random.default_rng(0), never)
    np.testing.assert_array_equal(out["image"], center_crop(no_gland, (8, 24, 24))["image"])


def test_provicnet_pipeline_acts_on_each_slice_alone():
    rng = np.random.default_rng(5)
    sample = _sample(rng)
    crop = (8, 24, 24)
    always = {**up.PROVICNET, **{k: 1.0 for k in up.PROVICNET if k.endswith("_p")}}
    # region slice 5 = crop slice 4; outside the gland, so that the gland statistics of the z-score stay
    changed = {**sample, "image": sample["image"].copy(), "lesion": sample["lesion"].copy()}
    changed["image"][5][sample["gland"][5] == 0] += 3.0
    changed["lesion"][5] = 1 - changed["lesion"][5]
    for p in (always, up.PROVICNET):
        a = up.upstream_provicnet(sample, crop, np.random.default_rng(9), p)
        b = up.upstream_provicnet(changed, crop, np.random.default_rng(9), p)
        differs = [not np.array_equal(a["image"][d], b["image"][d]) for d in range(crop[0])]
        assert differs == [d == 4 for d in range(crop[0])]
        assert [not np.array_equal(a["lesion"][d], b["lesion"][d]) for d in range(crop[0])] == differs
        for key in ("gland", "lesion"):
            assert a[key].dtype == np.uint8 and set(np.unique(a[key])) <= {0, 1}
    centre = center_crop(sample, crop)
    assert not np.array_equal(a["image"], centre["image"])


@pytest.mark.parametrize("name", sorted(up.PIPELINES))
def test_pipelines_are_deterministic_per_seed(name):
    sample = _sample(np.random.default_rng(6))
    run = lambda seed: up.PIPELINES[name](sample, (8, 24, 24), np.random.default_rng(seed))  # noqa: E731
    np.testing.assert_array_equal(run(3)["image"], run(3)["image"])
    assert not np.array_equal(run(3)["image"], run(4)["image"])
    assert sample["image"].flags.writeable and run(3)["image"].dtype == np.float32


def test_augment_config_names_the_pipeline():
    from transfer_jax.config import base_config
    from transfer_jax.data.augment import PIPELINES
    from transfer_jax.data.dataset import augment_config

    assert set(PIPELINES) == {"ours", *up.PIPELINES}
    config = base_config()
    assert augment_config(config.data).pipeline == "ours"
    config.data.augment.pipeline = "upstream_provicnet"
    assert augment_config(config.data).pipeline == "upstream_provicnet"
    with pytest.raises(ValueError, match="data.augment.pipeline must be one of"):
        AugmentConfig(pipeline="monai")
    with pytest.raises(ValueError, match=r"data.augment.zoom, flip_axes set, but pipeline 'upstream_profound'"):
        AugmentConfig(pipeline="upstream_profound", zoom=0.2, flip_axes=(1, 2))
    assert AugmentConfig(pipeline="ours", zoom=0.2).zoom == 0.2


@pytest.mark.parametrize("pipeline", ["upstream_profound", "upstream_provicnet"])
def test_train_dataset_runs_the_chosen_pipeline(tmp_path, pipeline):
    from helpers import smoke_config, tiny_manifest
    from transfer_jax.data.manifest import read_manifest
    from transfer_jax.data.pipeline import train_dataset
    from transfer_jax.data.preprocess import PreprocessConfig, preprocess_cases
    from transfer_jax.tasks.registry import get_task

    cases = read_manifest(tiny_manifest(str(tmp_path / "data"), num_cases=3))
    report = preprocess_cases(cases, PreprocessConfig(spacing=(3.0, 2.0, 2.0), crop_size=(16, 32, 32)),
                              str(tmp_path / "cache"))
    paths = [report.paths[c.case_id] for c in cases if c.split == "train"]

    def batches():
        it = iter(train_dataset(paths, get_task(smoke_config()), crop_size=(16, 32, 32),
                                augment=AugmentConfig(pipeline=pipeline), per_process_batch=1, seed=2))
        return [next(it)["image"] for _ in range(2)]

    first, again = batches(), batches()
    assert first[0].shape == (1, 16, 32, 32, 3)
    np.testing.assert_array_equal(first[1], again[1])
