"""Sliding-window inference: MONAI window grid, importance map, blending, padding, batching and sharding."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transfer_jax.tasks import sliding_window as S
from transfer_jax.train.mesh import create_mesh


def _volume(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _pointwise(kernel, bias):
    """A 1x1x1 "conv": the same linear map C -> K at every voxel (translation-equivariant, no spatial context)."""
    def apply(windows):
        return jnp.einsum("bdhwc,ck->bdhwk", windows, kernel, precision="highest") + bias
    return apply


def _box_sum_3(x):
    """Per-window 3x3x3 box sum with zero padding at the window border (numpy or jax, batch-first, channels-last)."""
    xp = jnp if isinstance(x, jax.Array) else np
    padded = xp.pad(x, ((0, 0), (1, 1), (1, 1), (1, 1), (0, 0)))
    d, h, w = x.shape[1:4]
    return sum(padded[:, i:i + d, j:j + h, k:k + w] for i, j, k in itertools.product(range(3), repeat=3))


def _numpy_reference(apply_np, volume, roi, overlap, mode, pad_value=0.0):
    """MONAI's algorithm written out with loops in numpy: pad, visit each window, blend, crop."""
    padding = S.roi_padding(volume.shape[:3], roi)
    padded = np.pad(volume, list(padding) + [(0, 0)], constant_values=pad_value)
    starts = S.window_starts(padded.shape[:3], roi, overlap)
    weights = np.asarray(S.importance_map(roi, mode))
    total, norm = None, np.zeros(padded.shape[:3])
    for start in starts:
        region = tuple(slice(s, s + r) for s, r in zip(start, roi))
        out = apply_np(padded[region][None])[0]
        if total is None:
            total = np.zeros(padded.shape[:3] + out.shape[-1:])
        total[region] += out * weights[..., None]
        norm[region] += weights
    blended = total / norm[..., None]
    crop = tuple(slice(b, b + n) for (b, _), n in zip(padding, volume.shape[:3]))
    return blended[crop]


# ------------------------------------------------------------------------------------------------------------------
# Window grid and importance map
# ------------------------------------------------------------------------------------------------------------------


def test_window_starts_exact_tiling_without_overlap():
    starts = S.window_starts((8, 8, 8), (4, 4, 4), 0.0)
    assert starts == [(d, h, w) for d in (0, 4) for h in (0, 4) for w in (0, 4)]


@pytest.mark.parametrize("shape, roi, overlap, per_axis", [
    # interval 2 along D (10 = 6 + 4), 2 then a flush start 3 along H, the ROI spans W.
    ((10, 7, 5), (4, 4, 5), 0.5, ([0, 2, 4, 6], [0, 2, 3], [0])),
    # interval int(5 * 0.75) = 3: 0, 3, 6, then 9 moved back to 12 - 5 = 7.
    ((12, 5, 6), (5, 5, 3), 0.25, ([0, 3, 6, 7], [0], [0, 2, 3])),
    # The upstream anatomy setting: a (64, 300, 300) volume, ROI (64, 224, 224), overlap 0.5 -> starts 0 and 76.
    ((64, 300, 300), (64, 224, 224), 0.5, ([0], [0, 76], [0, 76])),
    # Overlap so large the interval rounds to 0 -> clamped to 1.
    ((6, 4, 4), (4, 4, 4), 0.9, ([0, 1, 2], [0], [0])),
    # Axes shorter than the ROI are padded up to it: one window there.
    ((3, 9, 2), (4, 4, 4), 0.5, ([0], [0, 2, 4, 5], [0])),
])
def test_window_starts_follow_monai(shape, roi, overlap, per_axis):
    assert S.window_starts(shape, roi, overlap) == list(itertools.product(*per_axis))


def test_window_starts_per_axis_overlap_and_errors():
    assert S.window_starts((8, 8, 8), (4, 4, 4), (0.0, 0.5, 0.75)) == list(
        itertools.product([0, 4], [0, 2, 4], [0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="overlap"):
        S.window_starts((8, 8, 8), (4, 4, 4), 1.0)
    with pytest.raises(ValueError, match="roi"):
        S.window_starts((8, 8, 8), (4, 4), 0.5)
    with pytest.raises(ValueError, match="roi"):
        S.window_starts((8, 8, 8), (4, 0, 4), 0.5)
    with pytest.raises(ValueError, match="volume_shape3d"):
        S.window_starts((8, 8), (4, 4, 4), 0.5)


def test_roi_padding_is_symmetric_like_monai():
    assert S.roi_padding((3, 5, 8), (4, 8, 4)) == ((0, 1), (1, 2), (0, 0))


def test_gaussian_importance_map_matches_the_formula():
    roi = (5, 8, 16)
    got = np.asarray(S.importance_map(roi, "gaussian"))
    expected = np.ones(roi)
    for axis, n in enumerate(roi):
        x = np.arange(n) - (n - 1) / 2
        shape = [1, 1, 1]
        shape[axis] = n
        expected = expected * np.exp(-x ** 2 / (2 * (0.125 * n) ** 2)).reshape(shape)
    expected = np.maximum(expected, 1e-3)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert got.min() == pytest.approx(1e-3)  # corners are floored
    assert got.dtype == np.float32
    np.testing.assert_array_equal(S.importance_map(roi, "constant"), np.ones(roi))
    with pytest.raises(ValueError, match="mode"):
        S.importance_map(roi, "triangle")


# ------------------------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [0.0, 0.5])
@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_pointwise_model_gives_the_direct_forward(overlap, mode):
    volume = _volume((8, 12, 8, 2))
    kernel = jnp.asarray(_volume((2, 3), seed=1))
    bias = jnp.asarray([0.5, -1.0, 2.0])
    apply = _pointwise(kernel, bias)
    result = S.sliding_window_inference(apply, volume, (4, 4, 4), overlap=overlap, batch_size=4, mode=mode)
    direct = apply(jnp.asarray(volume)[None])[0]
    assert result.shape == (8, 12, 8, 3) and result.dtype == jnp.float32
    np.testing.assert_allclose(result, direct, rtol=1e-5, atol=1e-5)


def test_conv_model_with_exact_tiling_equals_per_tile_application():
    volume = _volume((8, 8, 12, 1), seed=2)
    result = S.sliding_window_inference(_box_sum_3, volume, (4, 4, 4), overlap=0.0, batch_size=2)
    expected = np.zeros_like(volume)
    for d, h, w in itertools.product((0, 4), (0, 4), (0, 4, 8)):
        tile = (slice(d, d + 4), slice(h, h + 4), slice(w, w + 4))
        expected[tile] = _box_sum_3(volume[tile][None])[0]
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
    # The tiles really matter: a single pass over the whole volume differs at the tile borders.
    assert not np.allclose(expected, _box_sum_3(volume[None])[0], atol=1e-3)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_overlapping_windows_blend_like_the_numpy_reference(mode):
    volume = _volume((9, 10, 7, 2), seed=3)

    def window_mean(windows):  # each window contributes its own constant: the blending weights decide the output
        xp = jnp if isinstance(windows, jax.Array) else np
        return xp.broadcast_to(windows.mean(axis=(1, 2, 3), keepdims=True), windows.shape[:4] + (2,)) * 1.0

    result = S.sliding_window_inference(window_mean, volume, (4, 6, 4), overlap=0.5, batch_size=3, mode=mode)
    expected = _numpy_reference(window_mean, volume, (4, 6, 4), 0.5, mode)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)


def test_volume_smaller_than_the_roi_is_padded_and_cropped():
    volume = _volume((3, 5, 8, 1), seed=4)
    roi = (4, 8, 4)  # D short by 1 (pad 0 before, 1 after), H short by 3 (pad 1 before, 2 after)
    result = S.sliding_window_inference(_box_sum_3, volume, roi, overlap=0.5, batch_size=2, pad_value=0.25)
    assert result.shape == (3, 5, 8, 1)
    expected = _numpy_reference(_box_sum_3, volume, roi, 0.5, S.DEFAULT_BLEND_MODE, pad_value=0.25)
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)
    # The pad value reached the model: with zero padding the border outputs differ.
    zero_pad = S.sliding_window_inference(_box_sum_3, volume, roi, overlap=0.5, batch_size=2)
    assert not np.allclose(result, zero_pad)


def test_batch_padding_traces_one_shape_and_ignores_filler_windows():
    volume = _volume((8, 8, 8, 2), seed=5)
    kernel, bias = jnp.asarray(_volume((2, 4), seed=6)), jnp.zeros(4)
    pointwise = _pointwise(kernel, bias)
    seen_shapes = []

    def apply(windows):
        seen_shapes.append(windows.shape)
        return pointwise(windows)

    starts = S.window_starts(volume.shape[:3], (4, 4, 4), 0.5)
    assert len(starts) == 27 and 27 % 4
    result = S.sliding_window_inference(apply, volume, (4, 4, 4), overlap=0.5, batch_size=4)
    assert set(seen_shapes) == {(4, 4, 4, 4, 2)}
    one_at_a_time = S.sliding_window_inference(pointwise, volume, (4, 4, 4), overlap=0.5, batch_size=1)
    np.testing.assert_allclose(result, one_at_a_time, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result, pointwise(jnp.asarray(volume)[None])[0], rtol=1e-5, atol=1e-5)


def test_filler_windows_with_nonfinite_outputs_are_dropped():
    volume = _volume((4, 4, 12, 1), seed=7)
    def apply(windows):
        slot = jnp.arange(windows.shape[0])[:, None, None, None, None]
        return jnp.where(slot == 2, jnp.nan, windows * 2.0)

    # 3 windows along W with batch_size 4 -> one batch, slot 3 is filler; slot 2 is a real window -> nan there.
    result = np.asarray(S.sliding_window_inference(apply, volume, (4, 4, 4), overlap=0.0, batch_size=4))
    assert np.isnan(result[..., 8:12, :]).all() and np.isfinite(result[..., :8, :]).all()

    def apply_filler_nan(windows):
        slot = jnp.arange(windows.shape[0])[:, None, None, None, None]
        return jnp.where(slot == 3, jnp.nan, windows * 2.0)

    clean = S.sliding_window_inference(apply_filler_nan, volume, (4, 4, 4), overlap=0.0, batch_size=4)
    np.testing.assert_allclose(clean, volume * 2.0, rtol=1e-6)


def test_sharded_over_a_mesh_equals_unsharded():
    assert jax.device_count() == 8
    volume = _volume((8, 12, 12, 1), seed=8)
    unsharded = S.sliding_window_inference(_box_sum_3, volume, (4, 8, 8), overlap=0.5, batch_size=8)
    for mesh in (create_mesh(), create_mesh(data=4, fsdp=2)):
        predict = jax.jit(lambda v: S.sliding_window_inference(_box_sum_3, v, (4, 8, 8), overlap=0.5, batch_size=8,
                                                               mesh=mesh))
        # The window batch (8, 4, 8, 8, 1) is constrained to be split over both mesh axes.
        assert '[{"data", "fsdp"}, {}, {}, {}, {}]' in predict.lower(volume).as_text()
        np.testing.assert_allclose(predict(volume), unsharded, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size=4 must be a multiple of the 8 devices"):
        S.sliding_window_inference(_box_sum_3, volume, (4, 8, 8), batch_size=4, mesh=create_mesh())


def test_jit_matches_eager_and_nnx_modules_work_inside():
    from flax import nnx
    volume = _volume((8, 8, 8, 3), seed=9)
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))

    @nnx.jit
    def predict(model, volume):
        return S.sliding_window_inference(model, volume, (4, 4, 4), overlap=0.5, batch_size=4)

    jitted = predict(model, volume)
    eager = S.sliding_window_inference(model, volume, (4, 4, 4), overlap=0.5, batch_size=4)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jitted, model(jnp.asarray(volume)), rtol=1e-4, atol=1e-4)


def test_inference_argument_errors():
    volume = _volume((8, 8, 8, 1))
    identity = lambda x: x  # noqa: E731
    with pytest.raises(ValueError, match="channels-last"):
        S.sliding_window_inference(identity, volume[..., 0], (4, 4, 4))
    with pytest.raises(ValueError, match="batch_size"):
        S.sliding_window_inference(identity, volume, (4, 4, 4), batch_size=0)
    with pytest.raises(ValueError, match="apply_fn must map"):
        S.sliding_window_inference(lambda x: x[:, ::2], volume, (4, 4, 4))
    with pytest.raises(ValueError, match="apply_fn must map"):
        S.sliding_window_inference(lambda x: (x, x), volume, (4, 4, 4))
    with pytest.raises(ValueError, match="mode"):
        S.sliding_window_inference(identity, volume, (4, 4, 4), mode="average")
