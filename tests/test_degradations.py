"""Degradations of the super-resolution, distortion-correction and synthesis tasks."""
import numpy as np
import pytest

from transfer_jax.tasks import degradations as G


def _smooth_volume(shape):
    """A smooth, rippled blob well inside the volume (about 0.3 % of its peak at the faces)."""
    grid = np.indices(shape).astype(np.float64)
    centre = [(n - 1) / 2 for n in shape]
    radius = [n / 7 for n in shape]
    blob = np.exp(-sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius)) / 2)
    ripple = 1 + 0.3 * np.cos(grid[0] / 3.5) * np.sin(grid[1] / 3.0) * np.cos(grid[2] / 4.0)
    return (blob * ripple).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------------
# Thick-slice degradation
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 5, 6), (12, 5, 6, 3)])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_thick_slice_keeps_shape_and_dtype(shape, factor):
    volume = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    out = G.thick_slice_degrade(volume, factor)
    assert out.shape == volume.shape and out.dtype == np.float32
    assert G.thick_slice_degrade(volume.astype(np.float64), factor).dtype == np.float64
    assert G.thick_slice_degrade(volume.astype(np.int16), factor).dtype == np.float32


def test_thick_slice_matches_hand_computed_profile():
    # One line along D: thick slices of factor 2 are the pair means, centred at 0.5, 2.5, 4.5.
    line = np.array([0.0, 2.0, 4.0, 4.0, 10.0, 6.0])
    volume = np.broadcast_to(line[:, None, None], (6, 2, 2))
    out = G.thick_slice_degrade(volume, 2)[:, 0, 0]
    thick = [1.0, 4.0, 8.0]
    # z=0 lies before the first centre (clamped), z=1: 1/4 of the way from centre 0.5 to 2.5, ...
    expected = [thick[0], thick[0] + 0.25 * 3, thick[0] + 0.75 * 3, thick[1] + 0.25 * 4, thick[1] + 0.75 * 4,
                thick[2]]
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_thick_slice_removes_through_plane_detail_but_not_in_plane_detail():
    rng = np.random.default_rng(1)
    in_plane = rng.normal(size=(1, 16, 16)).astype(np.float32)
    # A slice-alternating pattern vanishes for an even factor: every thick slice averages +1 and -1.
    alternating = np.where(np.arange(16) % 2 == 0, 1.0, -1.0)[:, None, None] * in_plane
    np.testing.assert_allclose(G.thick_slice_degrade(alternating, 2), 0.0, atol=1e-6)
    # White noise: energy of the through-plane differences drops strongly, in-plane differences much less.
    noise = rng.normal(size=(32, 16, 16)).astype(np.float32)
    out = G.thick_slice_degrade(noise, 4)
    through_ratio = np.square(np.diff(out, axis=0)).sum() / np.square(np.diff(noise, axis=0)).sum()
    in_plane_ratio = np.square(np.diff(out, axis=1)).sum() / np.square(np.diff(noise, axis=1)).sum()
    assert through_ratio < 0.05
    assert in_plane_ratio > 4 * through_ratio


def test_thick_slice_leaves_a_volume_constant_along_d_unchanged():
    in_plane = np.random.default_rng(2).normal(size=(1, 7, 9, 2)).astype(np.float32)
    volume = np.repeat(in_plane, 12, axis=0)
    for factor in (2, 3, 4, 6, 12):
        np.testing.assert_allclose(G.thick_slice_degrade(volume, factor), volume, rtol=1e-6, atol=1e-6)


def test_thick_slice_is_deterministic_and_does_not_modify_its_input():
    volume = np.random.default_rng(3).normal(size=(8, 4, 4)).astype(np.float32)
    copy = volume.copy()
    np.testing.assert_array_equal(G.thick_slice_degrade(volume, 2), G.thick_slice_degrade(volume, 2))
    np.testing.assert_array_equal(volume, copy)


@pytest.mark.parametrize("factor", [1, 0, 5, 2.0, True])
def test_thick_slice_rejects_bad_factors_naming_the_config_field(factor):
    with pytest.raises(ValueError, match=r"task\.sr_factor"):
        G.thick_slice_degrade(np.zeros((12, 3, 3)), factor)


def test_thick_slice_rejects_bad_volumes():
    with pytest.raises(ValueError, match="volume"):
        G.thick_slice_degrade(np.zeros((12, 3)), 2)


# ------------------------------------------------------------------------------------------------------------------
# Distortion
# ------------------------------------------------------------------------------------------------------------------


def test_random_displacement_is_deterministic_bounded_and_smooth():
    shape = (6, 40, 32)
    field = G.random_displacement(shape, np.random.default_rng(7), max_shift_voxels=3.0, smoothness=20.0)
    again = G.random_displacement(shape, np.random.default_rng(7), max_shift_voxels=3.0, smoothness=20.0)
    other = G.random_displacement(shape, np.random.default_rng(8), max_shift_voxels=3.0, smoothness=20.0)
    assert field.shape == shape and field.dtype == np.float32
    np.testing.assert_array_equal(field, again)
    assert not np.allclose(field, other)
    assert np.abs(field).max() <= 3.0 + 1e-5
    assert np.abs(G.displacement_slope(field, 1)).max() <= 0.5 + 1e-5
    # Smooth: neighbouring voxels differ by much less than the field's range along every axis.
    for axis in range(3):
        assert np.abs(np.diff(field, axis=axis)).max() < 0.2 * np.ptp(field)


def test_random_displacement_slope_cap_scales_the_field_down():
    shape = (4, 64, 16)
    steep = G.random_displacement(shape, np.random.default_rng(0), 20.0, smoothness=4.0, max_slope=0.3)
    slope = max(np.abs(G.displacement_slope(steep, 1)).max(), np.abs(np.diff(steep, axis=1)).max())
    assert slope == pytest.approx(0.3, rel=1e-4)
    assert np.abs(steep).max() < 20.0
    # The cap is along the requested axis only.
    along_d = G.random_displacement(shape, np.random.default_rng(0), 20.0, smoothness=4.0, axis=0, max_slope=0.3)
    assert np.abs(np.diff(along_d, axis=0)).max() <= 0.3 + 1e-5
    assert not np.allclose(along_d, steep)
    gentle = G.random_displacement(shape, np.random.default_rng(0), 1.0, smoothness=50.0)
    assert np.abs(gentle).max() == pytest.approx(1.0, rel=1e-5)  # no cap needed: the peak equals the request
    np.testing.assert_array_equal(G.random_displacement(shape, np.random.default_rng(0), 0.0, 10.0), 0.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_shift_voxels=-1.0, smoothness=5.0), "max_shift_voxels"),
    (dict(max_shift_voxels=1.0, smoothness=0.0), "smoothness"),
    (dict(max_shift_voxels=1.0, smoothness=5.0, max_slope=1.0), "max_slope"),
    (dict(max_shift_voxels=1.0, smoothness=5.0, axis=3), "axis"),
])
def test_random_displacement_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.random_displacement((4, 8, 8), np.random.default_rng(0), **kwargs)
    with pytest.raises(ValueError, match="rng"):
        G.random_displacement((4, 8, 8), 0, 1.0, 5.0)


def test_zero_displacement_is_exactly_the_identity():
    volume = np.random.default_rng(0).normal(size=(5, 9, 7, 2)).astype(np.float32)
    zero = np.zeros(volume.shape[:3])
    for axis in range(3):
        np.testing.assert_array_equal(G.distort(volume, zero, axis=axis), volume)
        np.testing.assert_array_equal(G.undistort(volume, zero, axis=axis), volume)


def test_uniform_shift_moves_content_without_changing_it():
    volume = _smooth_volume((4, 30, 12))
    shift = np.full(volume.shape, 2.0)
    out = G.distort(volume, shift, axis=1)
    # Pulling from y + 2 moves the content towards lower rows; the Jacobian of a uniform shift is 1.
    np.testing.assert_allclose(out[:, :-2], volume[:, 2:], rtol=1e-6)
    np.testing.assert_allclose(out[:, -2:], volume[:, -1:].repeat(2, axis=1), rtol=1e-6)  # edge extension


def test_distort_then_undistort_recovers_a_smooth_volume():
    volume = _smooth_volume((32, 40, 36))
    for axis, seed in [(0, 0), (1, 1), (1, 3), (2, 2)]:
        field = G.random_displacement(volume.shape, np.random.default_rng(seed), 3.0, smoothness=24.0, axis=axis)
        distorted = G.distort(volume, field, axis=axis)
        assert np.linalg.norm(distorted - volume) > 0.05 * np.linalg.norm(volume)  # the warp really did something
        restored = G.undistort(distorted, field, axis=axis)
        error = np.linalg.norm(restored - volume) / np.linalg.norm(volume)
        assert error < 0.02, (axis, error)


def test_distort_conserves_mass_per_line_and_modulates_intensity():
    volume = _smooth_volume((6, 60, 20))
    field = G.random_displacement(volume.shape, np.random.default_rng(4), 4.0, smoothness=30.0)
    out = G.distort(volume, field)
    line_mass_before, line_mass_after = volume.sum(axis=1), out.sum(axis=1)
    significant = line_mass_before > 0.05 * line_mass_before.max()
    relative = np.abs(line_mass_after - line_mass_before)[significant] / line_mass_before[significant]
    assert relative.max() < 0.01
    # Without the Jacobian factor the mass would not be conserved: the modulation is really applied.
    slope = G.displacement_slope(field, 1)
    assert np.abs(slope).max() > 0.1
    unmodulated = out / (1 + slope)
    assert (np.abs(unmodulated.sum(axis=1) - line_mass_before)[significant]
            / line_mass_before[significant]).max() > 0.02


def test_distort_handles_channels_like_separate_volumes_and_is_deterministic():
    rng = np.random.default_rng(5)
    volume = np.stack([_smooth_volume((4, 20, 10)), rng.uniform(size=(4, 20, 10)).astype(np.float32)], axis=-1)
    field = G.random_displacement(volume.shape[:3], np.random.default_rng(1), 2.0, smoothness=10.0)
    out = G.distort(volume, field)
    assert out.shape == volume.shape and out.dtype == np.float32
    for c in range(2):
        np.testing.assert_allclose(out[..., c], G.distort(volume[..., c], field), rtol=1e-6)
    np.testing.assert_array_equal(out, G.distort(volume, field))
    assert (G.distort(np.abs(volume), 5.0 * field) >= 0).all()  # Jacobian clipped at 0 even for folding fields
    restored = G.undistort(out, field)
    for c in range(2):
        np.testing.assert_allclose(restored[..., c], G.undistort(out[..., c], field), rtol=1e-6)


def test_distortion_argument_errors():
    volume = np.zeros((4, 10, 6))
    with pytest.raises(ValueError, match="displacement must have"):
        G.distort(volume, np.zeros((4, 10, 5)))
    with pytest.raises(ValueError, match="axis"):
        G.distort(volume, np.zeros((4, 10, 6)), axis=-1)
    folding = np.zeros((4, 10, 6))
    folding[:, 5:] = -1.5  # a step of -1.5 along axis 1
    with pytest.raises(ValueError, match="folds over"):
        G.undistort(volume, folding)
    with pytest.raises(ValueError, match="finite"):
        G.distort(volume, np.full((4, 10, 6), np.nan))


# ------------------------------------------------------------------------------------------------------------------
# Synthesis split
# ------------------------------------------------------------------------------------------------------------------


def test_synthesis_split_picks_channels_in_order():
    image = np.arange(2 * 3 * 4 * 3, dtype=np.float32).reshape(2, 3, 4, 3)
    inputs, target = G.synthesis_split(image)
    np.testing.assert_array_equal(inputs, image[..., :2])
    np.testing.assert_array_equal(target, image[..., 2:3])
    assert inputs.shape == (2, 3, 4, 2) and target.shape == (2, 3, 4, 1)
    swapped, t2 = G.synthesis_split(image, inputs=("adc", "dwi"), target="t2")
    np.testing.assert_array_equal(swapped, image[..., [2, 1]])
    np.testing.assert_array_equal(t2, image[..., :1])
    target[...] = -1  # a copy, not a view
    assert (image[..., 2] >= 0).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(inputs=("t2", "flair")), r"inputs \['flair'\]"),
    (dict(target="dce"), "target 'dce'"),
    (dict(inputs=("t2", "adc")), "also listed in inputs"),
    (dict(channels=("t2", "dwi")), "3 channels"),
    (dict(channels=("t2", "t2", "adc")), "distinct"),
    (dict(inputs=()), "at least one"),
])
def test_synthesis_split_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        G.synthesis_split(np.zeros((2, 3, 4, 3)), **kwargs)
    with pytest.raises(ValueError, match="channels-last"):
        G.synthesis_split(np.zeros((2, 3, 4)))
