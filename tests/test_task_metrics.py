"""Task metrics against scikit-learn, brute-force references written here, and analytic cases."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from transfer_jax.tasks import metrics as M

# ------------------------------------------------------------------------------------------------------------------
# Surface distances
# ------------------------------------------------------------------------------------------------------------------


def _reference_edges(mask):
    """Edge voxels by direct neighbour checks (zero outside the array), independent of scipy's erosion."""
    padded = np.pad(mask, 1)
    interior = np.ones_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            neighbour = np.roll(padded, step, axis=axis)[tuple(slice(1, -1) for _ in range(mask.ndim))]
            interior &= neighbour
    return mask & ~interior


def _reference_hausdorff(pred, target, spacing, percentile):
    """All-pairs distances between edge voxels (small volumes only)."""
    scale = np.asarray(spacing)
    pred_points = np.argwhere(_reference_edges(pred)) * scale
    target_points = np.argwhere(_reference_edges(target)) * scale
    pairwise = np.sqrt(((pred_points[:, None, :] - target_points[None, :, :]) ** 2).sum(-1))
    forward, backward = pairwise.min(axis=1), pairwise.min(axis=0)
    return max(np.percentile(forward, percentile), np.percentile(backward, percentile))


def _cube(shape, start, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + n) for s, n in zip(start, size))] = True
    return mask


def _sphere(shape, centre, radius, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape).astype(float)
    distance2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
    return distance2 <= radius ** 2


def test_surface_voxels_of_a_cube_are_its_faces():
    cube = _cube((7, 7, 7), (1, 1, 1), (5, 5, 5))
    edges = M.surface_voxels(cube)
    expected = cube.copy()
    expected[2:5, 2:5, 2:5] = False  # the 3x3x3 core has all face neighbours inside
    np.testing.assert_array_equal(edges, expected)
    # A mask touching the array border keeps an edge there (outside counts as background).
    full = np.ones((3, 4, 5), bool)
    assert M.surface_voxels(full).sum() == full.sum() - 1 * 2 * 3


@pytest.mark.parametrize("axis, k", [(0, 3), (2, 3), (1, 4)])
def test_hd95_of_offset_small_cubes_is_the_offset_in_mm(axis, k):
    # 2x2x2 cubes: every voxel is an edge voxel; half the directed distances are (k-1)*s, half k*s, so every
    # percentile above 4/7 and the maximum equal k * spacing[axis].
    spacing = (2.0, 0.5, 0.7)
    start = [3, 3, 3]
    pred = _cube((12, 12, 12), start, (2, 2, 2))
    start[axis] += k
    target = _cube((12, 12, 12), start, (2, 2, 2))
    assert M.hausdorff95(pred, target, spacing) == pytest.approx(k * spacing[axis], rel=1e-12)
    assert M.hausdorff95(target, pred, spacing) == pytest.approx(k * spacing[axis], rel=1e-12)
    assert M.hausdorff_distance(pred, target, spacing, percentile=None) == pytest.approx(k * spacing[axis])


def test_hd95_of_parallel_plates_uses_the_spacing_of_the_offset_axis():
    # One-voxel-thick plates in H-W offset along D: every surface distance is exactly k * spacing[0].
    spacing = (3.0, 0.5, 0.5)
    pred = _cube((10, 12, 12), (2, 2, 2), (1, 8, 8))
    target = _cube((10, 12, 12), (6, 2, 2), (1, 8, 8))
    assert M.hausdorff95(pred, target, spacing) == pytest.approx(12.0)
    assert M.average_surface_distance(pred, target, spacing) == pytest.approx(12.0)
    assert M.hausdorff95(pred, target) == pytest.approx(4.0)  # default spacing is 1 mm


def test_hd95_matches_brute_force_on_offset_cubes_and_spheres():
    spacing = (1.5, 0.5, 0.8)
    pred = _cube((14, 16, 15), (3, 4, 2), (6, 7, 5))
    target = _cube((14, 16, 15), (5, 5, 4), (6, 7, 5))
    expected = _reference_hausdorff(pred, target, spacing, 95)
    assert M.hausdorff95(pred, target, spacing) == pytest.approx(expected, rel=1e-12)
    # Maximum: the far corners are offset by (2, 1, 2) voxels.
    assert M.hausdorff_distance(pred, target, spacing, None) == pytest.approx(
        np.sqrt((2 * 1.5) ** 2 + 0.5 ** 2 + (2 * 0.8) ** 2))

    sphere_a = _sphere((16, 18, 18), (7.5, 8, 8.5), 5.0, spacing)
    sphere_b = _sphere((16, 18, 18), (8.2, 9.0, 8.0), 4.0, spacing)
    for percentile in (95, 50, 100):
        assert M.hausdorff_distance(sphere_a, sphere_b, spacing, percentile) == pytest.approx(
            _reference_hausdorff(sphere_a, sphere_b, spacing, percentile), rel=1e-12)


def test_hd95_of_a_mask_with_itself_is_zero():
    sphere = _sphere((20, 24, 24), (10, 12, 11), 7.0)
    assert M.hausdorff95(sphere, sphere, (1.0, 0.5, 0.5)) == 0.0
    assert M.average_surface_distance(sphere, sphere, (1.0, 0.5, 0.5), symmetric=True) == 0.0


def test_cropping_for_speed_does_not_change_distances_at_the_border():
    # Masks touching the array border: their border voxels are surface voxels in both the cropped and full volume.
    pred = _cube((8, 9, 10), (0, 0, 0), (4, 9, 6))
    target = _cube((8, 9, 10), (2, 0, 3), (6, 9, 7))
    assert M.hausdorff95(pred, target, (1.0, 0.5, 0.5)) == pytest.approx(
        _reference_hausdorff(pred, target, (1.0, 0.5, 0.5), 95), rel=1e-12)


def test_average_surface_distance_matches_brute_force():
    spacing = (1.0, 0.5, 0.5)
    pred = _sphere((14, 20, 20), (7, 10, 10), 4.0, spacing)
    target = _cube((14, 20, 20), (4, 5, 6), (6, 9, 8))
    scale = np.asarray(spacing)
    p_pts = np.argwhere(_reference_edges(pred)) * scale
    t_pts = np.argwhere(_reference_edges(target)) * scale
    pairwise = np.sqrt(((p_pts[:, None] - t_pts[None]) ** 2).sum(-1))
    forward, backward = pairwise.min(1), pairwise.min(0)
    assert M.average_surface_distance(pred, target, spacing) == pytest.approx(forward.mean())
    assert M.average_surface_distance(pred, target, spacing, symmetric=True) == pytest.approx(
        np.concatenate([forward, backward]).mean())


def test_empty_masks_follow_monai_conventions():
    empty = np.zeros((6, 6, 6), bool)
    cube = _cube((6, 6, 6), (1, 1, 1), (3, 3, 3))
    assert np.isnan(M.hausdorff95(empty, empty))
    assert M.hausdorff95(cube, empty) == np.inf
    assert M.hausdorff95(empty, cube) == np.inf
    assert np.isnan(M.average_surface_distance(empty, empty))
    assert M.average_surface_distance(empty, cube) == np.inf


def test_hd95_per_class_matches_single_class_calls():
    shape, spacing = (12, 14, 14), (1.0, 0.5, 0.5)
    target = np.zeros(shape, np.int32)
    target[_cube(shape, (2, 2, 2), (5, 5, 5))] = 1
    target[_cube(shape, (6, 7, 7), (4, 5, 5))] = 2
    pred = np.zeros(shape, np.int32)
    pred[_cube(shape, (3, 2, 3), (5, 5, 5))] = 1
    pred[_cube(shape, (6, 8, 6), (4, 4, 5))] = 2
    pred[0, 0, 0] = 4  # class 4 only in the prediction -> inf; class 3 absent from both -> nan
    per_class = M.hausdorff95_per_class(pred, target, 5, spacing)
    assert per_class.shape == (4,)
    for k in (1, 2):
        assert per_class[k - 1] == pytest.approx(M.hausdorff95(pred == k, target == k, spacing))
    assert np.isnan(per_class[2]) and per_class[3] == np.inf
    with_background = M.hausdorff95_per_class(pred, target, 5, spacing, include_background=True)
    assert with_background.shape == (5,)
    assert with_background[0] == pytest.approx(M.hausdorff95(pred == 0, target == 0, spacing))
    np.testing.assert_array_equal(with_background[1:], per_class)
    asd = M.average_surface_distance_per_class(pred, target, 5, spacing)
    assert asd[0] == pytest.approx(M.average_surface_distance(pred == 1, target == 1, spacing))


def test_surface_distance_argument_errors():
    cube = _cube((6, 6, 6), (1, 1, 1), (3, 3, 3))
    with pytest.raises(ValueError, match="same shape"):
        M.hausdorff95(cube, cube[:5])
    with pytest.raises(ValueError, match="spacing"):
        M.hausdorff95(cube, cube, (1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        M.hausdorff95(cube, cube, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="percentile"):
        M.hausdorff_distance(cube, cube, percentile=120)
    with pytest.raises(ValueError, match="pred_labels"):
        M.hausdorff95_per_class(cube.astype(int) * 3, cube.astype(int), 3)
    with pytest.raises(ValueError, match="integer label map"):
        M.hausdorff95_per_class(cube.astype(float), cube.astype(int), 3)


# ------------------------------------------------------------------------------------------------------------------
# Classification
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def classification_data():
    rng = np.random.default_rng(0)
    n, k = 240, 4
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.2 * np.eye(k)[labels]  # informative but imperfect
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def test_accuracy_and_confusion_matrix_match_sklearn(classification_data):
    probs, labels = classification_data
    pred = probs.argmax(1)
    assert M.accuracy(pred, labels) == pytest.approx(skm.accuracy_score(labels, pred))
    np.testing.assert_array_equal(M.confusion_matrix(pred, labels, 4), skm.confusion_matrix(labels, pred))
    assert np.isnan(M.accuracy([], []))


def test_auroc_binary_matches_sklearn_with_and_without_ties(classification_data):
    probs, labels = classification_data
    binary = (labels >= 2).astype(int)
    scores = probs[:, 2:].sum(1)
    assert M.auroc_binary(scores, binary) == pytest.approx(skm.roc_auc_score(binary, scores), abs=1e-12)
    tied = np.round(scores, 1)  # many ties
    assert len(np.unique(tied)) < 12
    assert M.auroc_binary(tied, binary) == pytest.approx(skm.roc_auc_score(binary, tied), abs=1e-12)
    assert M.auroc_binary([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1]) == 1.0
    assert M.auroc_binary([0.4, 0.3, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert M.auroc_binary([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5


def test_auroc_degenerate_inputs_are_nan():
    assert np.isnan(M.auroc_binary([0.1, 0.9], [1, 1]))
    assert np.isnan(M.auroc_binary([], []))
    assert np.isnan(M.auroc_binary([0.1, np.nan], [0, 1]))
    with pytest.raises(ValueError, match="binary"):
        M.auroc_binary([0.1, 0.2], [0, 2])


def test_auroc_ovr_macro_matches_sklearn(classification_data):
    probs, labels = classification_data
    assert M.auroc_ovr_macro(probs, labels) == pytest.approx(
        skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"), abs=1e-12)


def test_auroc_ovr_macro_skips_classes_absent_from_labels(classification_data):
    probs, labels = classification_data
    keep = labels != 3
    probs, labels = probs[keep], labels[keep]
    expected = np.mean([skm.roc_auc_score(labels == k, probs[:, k]) for k in range(3)])
    assert M.auroc_ovr_macro(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(M.auroc_ovr_macro(probs[:5], np.zeros(5, int)))


@pytest.mark.parametrize("weights", [None, "linear", "quadratic"])
def test_cohen_kappa_matches_sklearn(classification_data, weights):
    probs, labels = classification_data
    pred = probs.argmax(1)
    expected = skm.cohen_kappa_score(labels, pred, labels=list(range(4)), weights=weights)
    assert M.cohen_kappa(pred, labels, 4, weights) == pytest.approx(expected, abs=1e-12)
    assert M.cohen_kappa(labels, pred, 4, weights) == pytest.approx(expected, abs=1e-12)
    # A second, less structured pair of raters.
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 5, 100), rng.integers(0, 5, 100)
    assert M.cohen_kappa(a, b, 5, weights) == pytest.approx(
        skm.cohen_kappa_score(a, b, labels=list(range(5)), weights=weights), abs=1e-12)


def test_cohen_kappa_edge_cases():
    assert M.cohen_kappa([0, 1, 2, 3], [0, 1, 2, 3], 4) == 1.0
    assert np.isnan(M.cohen_kappa([2, 2, 2], [2, 2, 2], 4))  # no chance disagreement possible
    assert np.isnan(M.cohen_kappa([], [], 4))
    with pytest.raises(ValueError, match="weights"):
        M.cohen_kappa([0], [0], 2, weights="cubic")
    with pytest.raises(ValueError, match=r"b must hold class indices in \[0, 2\)"):
        M.cohen_kappa([0, 1], [0, 2], 2)


def test_f1_macro_matches_sklearn(classification_data):
    probs, labels = classification_data
    pred = probs.argmax(1)
    assert M.f1_macro(pred, labels, 4) == pytest.approx(
        skm.f1_score(labels, pred, average="macro", zero_division=0), abs=1e-12)
    # Class 3 never predicted (F1 0 but counted), class 4 absent from both vectors (not counted, as sklearn).
    pred_without_3 = np.where(pred == 3, 0, pred)
    assert M.f1_macro(pred_without_3, labels, 5) == pytest.approx(
        skm.f1_score(labels, pred_without_3, average="macro", zero_division=0), abs=1e-12)
    assert np.isnan(M.f1_macro([], [], 3))


def _brute_force_operating_points(scores, labels):
    points = []
    for threshold in np.r_[np.unique(scores), np.inf]:
        positive = scores >= threshold
        sensitivity = (positive & (labels == 1)).sum() / (labels == 1).sum()
        specificity = (~positive & (labels == 0)).sum() / (labels == 0).sum()
        points.append((sensitivity, specificity))
    return np.array(points)


def test_operating_points_match_brute_force(classification_data):
    probs, labels = classification_data
    binary = (labels >= 1).astype(int)
    for scores in (probs[:, 1:].sum(1), np.round(probs[:, 1:].sum(1), 1)):
        points = _brute_force_operating_points(scores, binary)
        for level in (0.8, 0.9):
            assert M.specificity_at_sensitivity(scores, binary, level) == pytest.approx(
                points[points[:, 0] >= level, 1].max())
            assert M.sensitivity_at_specificity(scores, binary, level) == pytest.approx(
                points[points[:, 1] >= level, 0].max())
    assert M.specificity_at_sensitivity([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], 1.0) == 1.0
    assert np.isnan(M.sensitivity_at_specificity([0.1, 0.2], [1, 1], 0.8))


def test_binary_metrics_match_sklearn(classification_data):
    probs, labels = classification_data
    binary = (labels >= 2).astype(int)
    scores = probs[:, 2:].sum(1)
    pred = (scores > 0.5).astype(int)
    result = M.binary_metrics(scores, binary)
    assert set(result) == set(M.BINARY_METRIC_KEYS)
    assert result["auroc"] == pytest.approx(skm.roc_auc_score(binary, scores))
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(binary, pred))
    assert result["f1"] == pytest.approx(skm.f1_score(binary, pred, zero_division=0))
    assert result["kappa"] == pytest.approx(skm.cohen_kappa_score(binary, pred))
    # Threshold is strict: a probability of exactly 0.5 is a negative call.
    assert M.binary_metrics([0.5, 0.5, 0.9, 0.1], [0, 1, 1, 0])["accuracy"] == 0.75


def test_binary_metrics_degenerate_inputs():
    one_class = M.binary_metrics([0.2, 0.7, 0.9], [1, 1, 1])
    assert np.isnan(one_class["auroc"]) and np.isnan(one_class["spec_at_sens80"])
    assert one_class["accuracy"] == pytest.approx(2 / 3)
    assert one_class["f1"] == pytest.approx(0.8)
    nonfinite = M.binary_metrics([0.2, np.nan], [0, 1])
    assert all(np.isnan(v) for v in nonfinite.values())


def test_pirads_metrics(classification_data):
    probs, labels = classification_data
    result = M.pirads_metrics(probs, labels)
    pred = probs.argmax(1)
    assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, pred))
    assert result["auroc_macro"] == pytest.approx(skm.roc_auc_score(labels, probs, multi_class="ovr"))
    assert result["kappa"] == pytest.approx(skm.cohen_kappa_score(labels, pred))
    assert result["kappa_quadratic"] == pytest.approx(skm.cohen_kappa_score(labels, pred, weights="quadratic"))
    assert result["f1_macro"] == pytest.approx(skm.f1_score(labels, pred, average="macro", zero_division=0))
    for suffix, first in (("ge3", 1), ("ge4", 2)):
        score, binary = probs[:, first:].sum(1), (labels >= first).astype(int)
        assert result[f"auroc_{suffix}"] == pytest.approx(skm.roc_auc_score(binary, score))
        assert result[f"f1_{suffix}"] == pytest.approx(skm.f1_score(binary, (score > 0.5).astype(int)))
        assert f"sens_at_spec90_{suffix}" in result
    # The two splits really differ (p>=3 uses columns 1:, p>=4 columns 2:).
    assert result["auroc_ge3"] != result["auroc_ge4"]


def test_pirads_metrics_degenerate_and_bad_inputs(classification_data):
    probs, labels = classification_data
    one_class = M.pirads_metrics(probs[:10], np.full(10, 2))
    assert np.isnan(one_class["auroc_macro"]) and np.isnan(one_class["auroc_ge3"])
    assert np.isfinite(one_class["accuracy"])
    nonfinite = probs.copy()
    nonfinite[0, 0] = np.nan
    result = M.pirads_metrics(nonfinite, labels)
    assert set(result) == set(M.pirads_metrics(probs, labels)) and all(np.isnan(v) for v in result.values())
    with pytest.raises(ValueError, match="4 columns"):
        M.pirads_metrics(probs[:, :3], labels)
    with pytest.raises(ValueError, match="same length"):
        M.pirads_metrics(probs, labels[:-1])


# ------------------------------------------------------------------------------------------------------------------
# Restoration / synthesis
# ------------------------------------------------------------------------------------------------------------------


def test_psnr_of_a_constant_offset_is_analytic():
    rng = np.random.default_rng(0)
    target = rng.uniform(0, 1, (2, 4, 6, 5, 1)).astype(np.float32)
    offsets = np.array([0.1, 0.01], np.float32)
    pred = target + offsets[:, None, None, None, None]
    np.testing.assert_allclose(M.psnr(pred, target, 1.0), 20 * np.log10(1.0 / offsets), rtol=1e-5)
    np.testing.assert_allclose(M.psnr(pred, target, jnp.array([2.0, 1.0])),
                               20 * np.log10(np.array([2.0, 1.0]) / offsets), rtol=1e-5)
    assert np.isinf(M.psnr(target, target, 1.0)).all()


def test_masked_psnr_and_mae_ignore_voxels_outside_the_mask():
    rng = np.random.default_rng(1)
    target = rng.normal(size=(2, 4, 6, 6, 1)).astype(np.float32)
    mask = np.zeros((2, 4, 6, 6), bool)
    mask[:, 1:3, 2:5, 1:4] = True
    pred = target + 0.25 * mask[..., None]  # error 0.25 inside the mask
    pred = np.where(mask[..., None], pred, pred + 10.0)  # and a large error outside
    np.testing.assert_allclose(M.mae(pred, target, mask), [0.25, 0.25], rtol=1e-5)
    np.testing.assert_allclose(M.psnr(pred, target, 1.0, mask), 20 * np.log10(1 / 0.25) * np.ones(2), rtol=1e-5)
    unmasked_mae = np.abs(pred - target).reshape(2, -1).mean(1)
    np.testing.assert_allclose(M.mae(pred, target), unmasked_mae, rtol=1e-5)
    assert np.isnan(M.mae(pred, target, np.zeros_like(mask))).all()
    with pytest.raises(ValueError, match="mask"):
        M.mae(pred, target, mask[:, :2])


def _reference_ssim(x, y, data_range, window, sigma, axes, mask=None):
    """Direct loop over every valid window position with explicit Gaussian weights (one batch element)."""
    offsets = np.arange(window) - (window - 1) / 2
    g = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    g /= g.sum()
    spatial = x.shape
    weights = np.ones([window if a in axes else 1 for a in range(x.ndim)])
    for a in axes:
        shape = [1] * x.ndim
        shape[a] = window
        weights = weights * g.reshape(shape)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ranges = [range(spatial[a] - window + 1) if a in axes else range(spatial[a]) for a in range(x.ndim)]
    values, keep = [], []
    half = (window - 1) // 2
    for position in itertools.product(*ranges):
        region = tuple(slice(p, p + window) if a in axes else slice(p, p + 1) for a, p in enumerate(position))
        px, py = x[region], y[region]
        mx, my = (weights * px).sum(), (weights * py).sum()
        vx = (weights * (px - mx) ** 2).sum()
        vy = (weights * (py - my) ** 2).sum()
        cxy = (weights * (px - mx) * (py - my)).sum()
        values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        centre = tuple(p + half if a in axes else p for a, p in enumerate(position))
        keep.append(True if mask is None else bool(mask[centre]))
    values, keep = np.array(values), np.array(keep)
    return values[keep].mean()


@pytest.fixture
def ssim_pair():
    rng = np.random.default_rng(2)
    z, yy, xx = np.meshgrid(np.linspace(0, 1, 9), np.linspace(0, 1, 10), np.linspace(0, 1, 11), indexing="ij")
    clean = np.sin(3 * z + 2 * yy) * np.cos(4 * xx) + 0.3 * rng.normal(size=z.shape)
    noisy = clean + 0.4 * rng.normal(size=z.shape)
    return clean.astype(np.float32), noisy.astype(np.float32)


def test_ssim3d_matches_a_direct_loop_reference(ssim_pair):
    clean, noisy = ssim_pair
    expected = _reference_ssim(noisy, clean, 4.0, 7, 1.5, (0, 1, 2))
    got = M.ssim3d(noisy[None], clean[None], 4.0)
    np.testing.assert_allclose(got, [expected], rtol=1e-4)
    # Raw-signal magnitudes (a large offset on both images) keep float32 accuracy.
    offset_expected = _reference_ssim(noisy + 1000.0, clean + 1000.0, 4.0, 7, 1.5, (0, 1, 2))
    np.testing.assert_allclose(M.ssim3d(noisy[None] + 1000.0, clean[None] + 1000.0, 4.0), [offset_expected],
                               rtol=1e-3)
    # Channels-last input with one channel gives the same value.
    np.testing.assert_allclose(M.ssim3d(noisy[None, ..., None], clean[None, ..., None], 4.0), got, rtol=1e-6)


def test_ssim_per_slice_and_masked_match_the_reference(ssim_pair):
    clean, noisy = ssim_pair
    expected_2d = _reference_ssim(noisy, clean, 4.0, 5, 1.0, (1, 2))
    np.testing.assert_allclose(M.ssim3d(noisy[None], clean[None], 4.0, window=5, sigma=1.0, axes=(2, 3)),
                               [expected_2d], rtol=1e-4)
    mask = np.zeros(clean.shape, bool)
    mask[2:8, 3:9, 4:10] = True
    expected_masked = _reference_ssim(noisy, clean, 4.0, 7, 1.5, (0, 1, 2), mask)
    np.testing.assert_allclose(M.ssim3d(noisy[None], clean[None], 4.0, mask=mask[None]), [expected_masked],
                               rtol=1e-4)
    assert expected_masked != pytest.approx(_reference_ssim(noisy, clean, 4.0, 7, 1.5, (0, 1, 2)), rel=1e-3)


def test_ssim_identity_noise_monotonicity_and_batch_independence(ssim_pair):
    clean, _ = ssim_pair
    rng = np.random.default_rng(5)
    noise = rng.normal(size=clean.shape).astype(np.float32)
    np.testing.assert_allclose(M.ssim3d(clean[None], clean[None], 4.0), [1.0], atol=1e-5)
    levels = [0.05, 0.2, 0.5, 1.0]
    batch_pred = np.stack([clean + level * noise for level in levels])
    batch_target = np.stack([clean] * len(levels))
    values = np.asarray(M.ssim3d(batch_pred, batch_target, 4.0))
    assert np.all(np.diff(values) < 0) and values[0] > 0.9 and values[-1] < 0.6
    one = M.ssim3d(batch_pred[2:3], batch_target[2:3], 4.0)
    np.testing.assert_allclose(values[2:3], one, rtol=1e-6)


def test_restoration_metrics_are_jittable(ssim_pair):
    clean, noisy = ssim_pair
    batch_pred, batch_target = jnp.stack([noisy, clean]), jnp.stack([clean, clean])
    mask = jnp.ones(batch_pred.shape, bool)

    @jax.jit
    def evaluate(pred, target, mask):
        return (M.psnr(pred, target, 4.0, mask), M.mae(pred, target, mask),
                M.ssim3d(pred, target, 4.0, mask, window=5, sigma=1.0))

    psnr_value, mae_value, ssim_value = evaluate(batch_pred, batch_target, mask)
    np.testing.assert_allclose(ssim_value, M.ssim3d(batch_pred, batch_target, 4.0, window=5, sigma=1.0), rtol=1e-6)
    np.testing.assert_allclose(mae_value, M.mae(batch_pred, batch_target), rtol=1e-6)
    assert ssim_value.shape == psnr_value.shape == (2,) and np.isinf(psnr_value[1])


def test_ssim_argument_errors(ssim_pair):
    clean, _ = ssim_pair
    batch = clean[None]
    with pytest.raises(ValueError, match="odd"):
        M.ssim3d(batch, batch, 1.0, window=6)
    with pytest.raises(ValueError, match="window=13"):
        M.ssim3d(batch, batch, 1.0, window=13)
    with pytest.raises(ValueError, match="axes"):
        M.ssim3d(batch, batch, 1.0, axes=(0, 1))
    with pytest.raises(ValueError, match="data_range"):
        M.ssim3d(batch, batch, jnp.ones(3))
    with pytest.raises(ValueError, match="same shape"):
        M.psnr(batch, batch[:, :3], 1.0)
