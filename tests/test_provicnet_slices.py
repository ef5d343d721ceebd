"""ProViCNet slice data path: the real sample case, edge rules, resize, labels, mesh batching and NIfTI write-back."""

import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from transfer_jax.features.common import make_data_mesh, run_in_batches
from transfer_jax.features.provicnet import predict_slices
from transfer_jax.data import slices
from transfer_jax.data.readers import read_image
from transfer_jax.models.dinov2 import DinoV2Config
from transfer_jax.models.provicnet import ProViCNet, ProViCNetConfig


def sample_paths(sample_dir):
    return {name: os.path.join(sample_dir, f"sample_{name}.nii.gz") for name in ("t2", "adc", "dwi", "mask", "lesions")}


@pytest.fixture(scope="module")
def t2_stack(sample_dir):
    paths = sample_paths(sample_dir)
    return slices.load_case_slices(paths["t2"], paths["mask"], paths["lesions"])


# ---------------------------------------------------------------------------------------------------------------
# The real case


def test_sample_case_stacks_positions_and_class_counts(t2_stack):
    assert t2_stack.images.shape == (20, 3, 448, 448) and t2_stack.images.dtype == np.float32
    assert t2_stack.labels.shape == (20, 256, 256) and t2_stack.labels.dtype == np.uint8
    np.testing.assert_array_equal(t2_stack.slice_position[:, 0], np.arange(20))
    np.testing.assert_array_equal(t2_stack.slice_position[:, 1], np.full(20, 20))
    np.testing.assert_array_equal(t2_stack.source_slice, np.arange(20))
    # Spec section 4: bg 1,263,341 / gland 40,790 / indolent 0 / csPCa 6,589 (labels stay at 256 x 256).
    np.testing.assert_array_equal(np.bincount(t2_stack.labels.ravel(), minlength=4), [1263341, 40790, 0, 6589])
    assert np.array_equal(slices.one_hot(t2_stack.labels).sum(axis=(0, 2, 3)), [1263341, 40790, 0, 6589])


def test_stacks_hold_the_neighbouring_slices(t2_stack, sample_dir):
    paths = sample_paths(sample_dir)
    t2, _ = read_image(paths["t2"])
    gland, _ = read_image(paths["mask"])
    resized = slices.resize_bilinear(slices.zscore_in_gland(t2, gland), (448, 448))
    # Upstream's rule (the default): the end stacks move inside the volume.
    for stack, first in ((0, 0), (1, 0), (7, 6), (18, 17), (19, 17)):
        np.testing.assert_array_equal(t2_stack.images[stack], resized[first:first + 3])
    clamped = slices.load_case_slices(paths["t2"], paths["mask"], edge="clamp")
    for stack, centre in ((0, 0), (7, 7), (19, 19)):
        expected = [resized[min(max(centre + d, 0), 19)] for d in (-1, 0, 1)]
        np.testing.assert_array_equal(clamped.images[stack], np.stack(expected))


def test_gland_zscore_matches_the_spec_statistics(sample_dir):
    paths = sample_paths(sample_dir)
    gland, _ = read_image(paths["mask"])
    # Spec section 4: T2 221.2 / 97.6 -> [-2.27, 8.09]; ADC 1236.0 / 329.8 -> [-3.75, 6.77]; DWI 13.66 / 6.58.
    for name, mean, std, low, high in (("t2", 221.2, 97.6, -2.27, 8.09), ("adc", 1236.0, 329.8, -3.75, 6.77),
                                       ("dwi", 13.66, 6.58, -2.07, 9.78)):
        raw, _ = read_image(paths[name])
        inside = raw[gland == 1].astype(np.float64)
        assert inside.mean() == pytest.approx(mean, abs=0.05) and inside.std() == pytest.approx(std, abs=0.05)
        z = slices.zscore_in_gland(raw, gland, name=name)
        assert z.dtype == np.float32
        assert z[gland == 1].mean() == pytest.approx(0.0, abs=1e-5)
        assert z[gland == 1].std() == pytest.approx(1.0, abs=1e-5)
        assert z.min() == pytest.approx(low, abs=0.01) and z.max() == pytest.approx(high, abs=0.01)


def test_empty_gland_mask_is_a_clear_error(sample_dir):
    t2, _ = read_image(sample_paths(sample_dir)["t2"])
    with pytest.raises(ValueError, match="gland mask has no voxel equal to 1"):
        slices.make_slice_stack(t2, np.zeros_like(t2), name="sample_t2")


# ---------------------------------------------------------------------------------------------------------------
# Resize


def test_bilinear_resize_is_cv2_inter_linear_on_an_analytic_case():
    # 1-D: src = (d + 0.5) * 2/4 - 0.5 = -0.25, 0.25, 0.75, 1.25 -> clamped -> 0, 0.25, 0.75, 1.
    np.testing.assert_allclose(slices.resize_bilinear(np.array([[0.0, 1.0]]), (1, 4)), [[0, 0.25, 0.75, 1.0]])
    # A plane is reproduced exactly at the clamped half-pixel source coordinates.
    y, x = np.mgrid[0:256, 0:256].astype(np.float64)
    image = (0.003 * y - 0.002 * x + 0.5).astype(np.float32)
    out = slices.resize_bilinear(image[None], (448, 448))[0]
    src = np.clip((np.arange(448) + 0.5) * 256 / 448 - 0.5, 0, 255)
    expected = 0.003 * src[:, None] - 0.002 * src[None, :] + 0.5
    np.testing.assert_allclose(out, expected, atol=2e-6)
    # JAX's half-pixel linear up-sample agrees up to its float32 sample positions (the spec measured 8.7e-5
    # between JAX and cv2; cv2, like this resize, places samples in float64).
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(2, 256, 256)).astype(np.float32)
    reference = jax.image.resize(jnp.asarray(noise), (2, 448, 448), method="linear")
    np.testing.assert_allclose(slices.resize_bilinear(noise, (448, 448)), np.asarray(reference), atol=3e-4)


# ---------------------------------------------------------------------------------------------------------------
# Edge rules, selection, labels


def test_shift_edge_rule_reproduces_upstream_examples():
    # Spec section 3.2, Z = 20.
    _, centres3 = slices.stack_layout(20, np.arange(20), 3, "shift")
    np.testing.assert_array_equal(centres3, [1, 1] + list(range(2, 19)) + [18])
    _, centres9 = slices.stack_layout(20, np.arange(20), 9, "shift")
    np.testing.assert_array_equal(centres9, [4, 5, 6, 7] + list(range(4, 16)) + [12, 13, 14, 15])
    # And through the full path: slice k has intensity k, so channels show which slices were stacked.
    volume = np.broadcast_to(np.arange(20, dtype=np.float32)[:, None, None], (20, 8, 8)).copy()
    gland = np.ones_like(volume)
    stack = slices.make_slice_stack(volume, gland, num_channels=9, edge="shift", image_size=8)
    z = (np.arange(20) - volume.mean()) / volume.std()
    np.testing.assert_allclose(stack.images[:, :, 0, 0], z[centres9[:, None] + np.arange(-4, 5)], atol=1e-5)
    np.testing.assert_array_equal(stack.label_slice, centres9)
    np.testing.assert_array_equal(stack.source_slice, np.arange(20))
    np.testing.assert_array_equal(stack.slice_position[:, 1], 20)


def test_shift_rule_zero_pads_short_volumes_like_upstream():
    # Z = 5 < 2 * 3: one zero slice at each end, 7 stacks (upstream keeps every padded slice), centres shifted.
    volume = np.broadcast_to(np.arange(1, 6, dtype=np.float32)[:, None, None], (5, 4, 4)).copy()
    stack = slices.make_slice_stack(volume, np.ones_like(volume), np.zeros_like(volume), edge="shift",
                                    image_size=4)
    assert stack.images.shape == (7, 3, 4, 4)
    np.testing.assert_array_equal(stack.label_slice, [0, 0, 1, 2, 3, 4, 4])
    np.testing.assert_array_equal(stack.source_slice, np.arange(-1, 6))
    np.testing.assert_array_equal(stack.slice_position[:, 1], 7)
    assert np.all(stack.images[0, 0] == 0), "the padded slice is zero (the gland mean after the z-score)"


def test_clamp_rule_repeats_edge_slices_and_keeps_one_stack_per_slice():
    channels, centres = slices.stack_layout(6, np.arange(6), 3, "clamp")
    np.testing.assert_array_equal(channels[0], [0, 0, 1])
    np.testing.assert_array_equal(channels[5], [4, 5, 5])
    np.testing.assert_array_equal(centres, np.arange(6))
    channels9, _ = slices.stack_layout(6, [0], 9, "clamp")
    np.testing.assert_array_equal(channels9[0], [0, 0, 0, 0, 0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="odd"):
        slices.stack_layout(6, [0], 4)
    with pytest.raises(ValueError, match="edge"):
        slices.stack_layout(6, [0], 3, "wrap")


def test_background_slice_selection_and_running_positions():
    gland = np.zeros((10, 4, 4), np.uint8)
    gland[3:6, 1, 1] = 1
    volume = np.random.default_rng(0).normal(size=(10, 4, 4)).astype(np.float32)
    stack = slices.make_slice_stack(volume, gland, keep_background_fraction=0.5, rng=np.random.default_rng(1),
                                    image_size=4)
    kept = stack.source_slice
    assert {3, 4, 5} <= set(kept.tolist()) and len(kept) == 3 + int(7 * 0.5)
    assert np.all(np.diff(kept) > 0)
    np.testing.assert_array_equal(stack.slice_position, np.stack([np.arange(6), np.full(6, 6)], 1))
    with pytest.raises(ValueError, match="rng"):
        slices.make_slice_stack(volume, gland, keep_background_fraction=0.5)


def test_cancer_value_mapping_and_four_classes():
    np.testing.assert_array_equal(slices.map_cancer_labels(np.array([0, 1, 2, 3, 5])), [0, 1, 2, 2, 2])
    np.testing.assert_array_equal(slices.map_cancer_labels(np.array([0, 1, 3]), indolent_as_cspca=True), [0, 2, 2])
    gland = np.array([1, 1, 1, 0, 0, 0])
    cancer = np.array([0, 1, 2, 0, 1, 2])
    # Gland zeroed where cancer; cancer outside the gland is still cancer.
    np.testing.assert_array_equal(slices.four_class_labels(gland, cancer), [1, 2, 3, 0, 2, 3])


# ---------------------------------------------------------------------------------------------------------------
# Back to the volume


def test_labels_written_back_overlay_the_source_exactly(t2_stack, sample_dir, tmp_path):
    paths = sample_paths(sample_dir)
    volume = slices.volume_from_slices(t2_stack.labels, t2_stack)
    path = slices.write_prediction_nifti(volume, paths["t2"], tmp_path / "pred" / "labels.nii.gz")
    written = nib.load(path)
    t2 = nib.load(paths["t2"])
    assert written.shape == (256, 256, 20)
    np.testing.assert_allclose(written.affine, t2.affine, atol=1e-6)
    assert int(written.header["qform_code"]) == int(t2.header["qform_code"]) == 1
    assert int(written.header["sform_code"]) == int(t2.header["sform_code"]) == 1
    assert nib.aff2axcodes(written.affine) == nib.aff2axcodes(t2.affine)
    data = np.asanyarray(written.dataobj)
    assert data.dtype == np.uint8
    lesions = np.asanyarray(nib.load(paths["lesions"]).dataobj)
    gland = np.asanyarray(nib.load(paths["mask"]).dataobj)
    # Same voxels as the source label files, in NIfTI (X, Y, Z) order: no flip, no transpose slipped in.
    np.testing.assert_array_equal(data == 3, lesions > 0)
    np.testing.assert_array_equal(data == 1, (gland == 1) & (lesions == 0))


def test_probabilities_written_back_as_float(t2_stack, sample_dir, tmp_path):
    probability = np.random.default_rng(0).random((20, 256, 256)).astype(np.float32)
    volume = slices.volume_from_slices(probability, t2_stack)
    path = slices.write_prediction_nifti(volume, sample_paths(sample_dir)["t2"], tmp_path / "prob.nii.gz")
    data = np.asanyarray(nib.load(path).dataobj)
    assert data.dtype == np.float32
    np.testing.assert_array_equal(data, probability.transpose(2, 1, 0))
    with pytest.raises(ValueError, match="does not match"):
        slices.write_prediction_nifti(volume[:5], sample_paths(sample_dir)["t2"], tmp_path / "bad.nii.gz")


def test_predictions_land_on_the_slice_each_stack_was_made_for():
    # Upstream writes output slot k on slice k: under "shift" the end slots hold the moved stacks' predictions.
    volume = np.zeros((20, 4, 4), np.float32)
    stack = slices.make_slice_stack(volume + np.arange(20)[:, None, None], np.ones_like(volume), image_size=4)
    values = np.arange(20, dtype=np.float32)[:, None, None] * np.ones((20, 4, 4), np.float32)
    np.testing.assert_array_equal(slices.volume_from_slices(values, stack), values)
    # The padding slots of a short volume are left out; dropped background slices get `fill`.
    short = slices.make_slice_stack(volume[:4] + np.arange(4)[:, None, None], np.ones_like(volume[:4]), image_size=4)
    back = slices.volume_from_slices(np.arange(6, dtype=np.float32)[:, None, None] * np.ones((6, 4, 4)), short)
    np.testing.assert_array_equal(back[:, 0, 0], [1, 2, 3, 4])
    gland = np.zeros((20, 4, 4), np.uint8)
    gland[5:8] = 1
    kept = slices.make_slice_stack(volume + np.arange(20)[:, None, None], gland, image_size=4,
                                   keep_background_fraction=0.0, rng=np.random.default_rng(0))
    back = slices.volume_from_slices(np.ones((3, 4, 4), np.float32), kept, fill=-1)
    np.testing.assert_array_equal(back[:, 0, 0], [-1] * 5 + [1] * 3 + [-1] * 12)
    # Predictions at another in-plane size are resized to the volume grid.
    small = slices.volume_from_slices(np.ones((20, 2, 2), np.float32), stack)
    assert small.shape == (20, 4, 4)


# ---------------------------------------------------------------------------------------------------------------
# Mesh batching


def tiny_model():
    config = ProViCNetConfig(
        backbone=DinoV2Config(width=32, depth=1, num_heads=2, pos_grid=10), head_channels=(8, 8),
        contrastive_head=None,
    )
    model = ProViCNet(config, rngs=nnx.Rngs(0))
    model.eval()
    return model


def test_run_in_batches_pads_the_last_batch_and_shards_on_data():
    mesh = make_data_mesh()
    assert mesh.shape["data"] == 8 and mesh.axis_types == (jax.sharding.AxisType.Auto,)
    seen = []

    @jax.jit
    def double(batch):
        return {"y": batch["x"] * 2}

    def fn(batch):
        seen.append((batch["x"].shape, batch["x"].sharding.spec))
        return double(batch)

    x = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)
    out = run_in_batches(fn, {"x": x}, batch_size=8, mesh=mesh)
    np.testing.assert_array_equal(out["y"], 2 * x)
    assert seen == [((8, 3), jax.P("data"))] * 3
    with pytest.raises(ValueError, match="multiple"):
        run_in_batches(fn, {"x": x}, batch_size=6, mesh=mesh)


def test_predict_slices_on_the_real_case_and_write_the_prediction(t2_stack, sample_dir, tmp_path):
    model = tiny_model()
    result = predict_slices(model, t2_stack.images, t2_stack.slice_position, outputs=("logits", "cls"),
                            batch_size=8)
    assert result["logits"].shape == (20, 256, 256, 4) and result["cls"].shape == (20, 32)
    # Batched + sharded + padded equals one direct call on a few slices.
    direct = model(jnp.asarray(t2_stack.images_nhwc()[17:20]), jnp.asarray(t2_stack.slice_position[17:20]))
    np.testing.assert_allclose(result["logits"][17:20], np.asarray(direct), atol=1e-4)
    labels = slices.volume_from_slices(result["logits"].argmax(-1).astype(np.uint8), t2_stack)
    path = slices.write_prediction_nifti(labels, sample_paths(sample_dir)["t2"], tmp_path / "prediction.nii.gz")
    written = nib.load(path)
    assert written.shape == (256, 256, 20)
    np.testing.assert_allclose(written.affine, nib.load(sample_paths(sample_dir)["t2"]).affine, atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), labels.transpose(2, 1, 0))
