"""Layer-by-layer parity of the Flax ProViCNet port against PyTorch reference fixtures.

The fixtures (``tests/fixtures/provicnet``, built by ``scripts/make_provicnet_fixtures.py`` with torch) hold tiny
models with the upstream key layout as ``.pth`` files and every intermediate output as ``.npz``. Here they are read
with the torch-free reader, converted with the ProViCNet table and compared to <= 1e-4 at full matmul precision.
PyTorch layouts are NCHW; the port is NHWC, so maps are transposed before comparing.
"""

import functools

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import fixture_path
from transfer_jax.convert.provicnet import convert_checkpoint, convert_fusion, load_provicnet
from transfer_jax.models.provicnet import FUSION_SEQUENCES, overwrite_streams_with_sequence_heads

TOLERANCE = 1e-4
NUM_HEADS = 2  # the tiny fixtures use 2 heads of width 16 (not width // 64)
SEQUENCE_FILES = {"T2W": "mri_t2.pth", "ADC": "mri_adc.pth", "DWI": "mri_dwi.pth"}


fixture = functools.partial(fixture_path, "provicnet")


def nhwc(array):
    return np.transpose(array, (0, 2, 3, 1))


def assert_close(actual, expected, what):
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs reference {expected.shape}"
    error = float(np.max(np.abs(actual - expected)))
    assert error <= TOLERANCE, f"{what}: max |diff| {error:.3g} > {TOLERANCE} (reference max {np.abs(expected).max():.3g})"


@pytest.fixture(scope="module")
def mri():
    return convert_checkpoint(fixture("mri_t2.pth"), num_heads=NUM_HEADS).to_module()


@pytest.fixture(scope="module")
def mri_io():
    return dict(np.load(fixture("mri_t2_io.npz")))


def test_position_table_resize_matches_torch_antialiased_bicubic(mri, mri_io, highest_precision):
    # Native grid 10: 8 and 4 are down-samples (antialias matters), 10 is the identity short-cut, 12 an
    # up-sample, (6, 9) a non-square grid (rows follow the image height).
    for grid in ((8, 8), (4, 4), (10, 10), (12, 12), (6, 9)):
        reference = mri_io[f"pos_embed_{grid[0]}x{grid[1]}"]
        assert_close(mri.backbone.interpolated_pos_embed(*grid), reference, f"pos_embed resized to {grid}")


def test_mri_slice_model_every_layer(mri, mri_io, highest_precision):
    images = jnp.asarray(nhwc(mri_io["images"]))
    position = jnp.asarray(mri_io["slice_position"])

    assert_close(mri.backbone.patch_embed(images), mri_io["patch_embed"], "patch embedding")
    tokens = mri.prepare_tokens(mri.backbone_input(images), position)
    assert tokens.shape[1] == 1 + 4 + 2 + 64, "cls + 4 registers + 2 slice-position tokens + 8x8 patches"
    assert_close(tokens, mri_io["tokens"], "tokens after concat [cls, registers, axis_pos, axis_max, patches]")
    for index, block in enumerate(mri.backbone.blocks):
        tokens = block(tokens)
        assert_close(tokens, mri_io[f"block_{index}"], f"block {index}")
    assert_close(mri.backbone.norm(tokens), mri_io["final_norm"], "final norm")

    features = mri.forward_features(images, position)
    assert_close(features.cls_token, mri_io["cls"], "cls token")
    assert_close(features.patch_tokens, mri_io["patch_tokens"], "patch tokens")
    stages = mri.head(mri.feature_map(features, images), collect=True)
    assert len(stages) == 10
    for index, stage in enumerate(stages):
        assert_close(stage, nhwc(mri_io[f"head_{index}"]), f"head.segmentation_conv[{index}]")
    logits = mri(images, position)
    assert logits.shape == (2, 64, 64, 4)
    assert_close(logits, nhwc(mri_io["logits"]), "segmentation logits")


def test_fallback_without_slice_positions_is_plain_dinov2(mri, mri_io, highest_precision):
    images = jnp.asarray(nhwc(mri_io["images"]))
    features = mri.forward_features(images, None)
    assert features.extra_tokens.shape[1] == 0
    assert_close(features.patch_tokens, mri_io["nopos_patch_tokens"], "patch tokens without positions")
    assert_close(features.cls_token, mri_io["nopos_cls"], "cls without positions")
    assert_close(mri(images), nhwc(mri_io["nopos_logits"]), "logits without positions")
    # The position tokens do change the result, so the two paths are really different.
    assert np.abs(np.asarray(mri(images)) - mri_io["logits"].transpose(0, 2, 3, 1)).max() > 1e-2


def test_contrastive_head_weight_norm(mri, mri_io, highest_precision):
    vectors = jnp.asarray(mri_io["cl_input"])
    assert_close(mri.CL_Head.bottleneck(vectors), mri_io["cl_bottleneck"], "CL_Head mlp + L2 normalise")
    assert_close(mri.project(vectors), mri_io["cl_output"], "CL_Head output")
    # W = g * v / ||v|| per output unit: the kernel's columns have norm g.
    kernel = np.asarray(mri.CL_Head.last_layer.kernel())
    np.testing.assert_allclose(np.linalg.norm(kernel, axis=0), np.asarray(mri.CL_Head.last_layer.g[...]), rtol=1e-5)


def test_contrastive_head_parametrizations_key_style(highest_precision):
    model = convert_checkpoint(fixture("mri_parametrized_weight_norm.pth"), num_heads=NUM_HEADS).to_module()
    io = np.load(fixture("mri_parametrized_weight_norm_io.npz"))
    assert_close(model.project(jnp.asarray(io["cl_input"])), io["cl_output"], "CL_Head (parametrizations keys)")


def test_trus_slice_model_with_channel_reducer(highest_precision):
    converted = convert_checkpoint(fixture("trus.pth"), num_heads=NUM_HEADS)
    assert converted.kind == "trus" and converted.config.reducer_in_channels == 9
    model = converted.to_module()
    io = np.load(fixture("trus_io.npz"))
    images = jnp.asarray(nhwc(io["images"]))
    position = jnp.asarray(io["slice_position"])
    reduced = model.backbone_input(images)
    assert_close(reduced, nhwc(io["reduced"]), "ChannelReducer 9 -> 3")
    assert_close(model.backbone.patch_embed(reduced), io["patch_embed"], "patch embedding")
    assert_close(model.prepare_tokens(reduced, position), io["tokens"], "tokens after concat")
    features = model.forward_features(images, position)
    assert_close(model.backbone.norm(features.prenorm_tokens), io["final_norm"], "final norm")
    assert_close(features.patch_tokens, io["patch_tokens"], "patch tokens")
    assert_close(features.cls_token, io["cls"], "cls token")
    assert_close(model(images, position), nhwc(io["logits"]), "TRUS logits (grid 4 from native 10)")


def test_mpmri_fusion_with_stream_overwrite(highest_precision):
    io = dict(np.load(fixture("fusion_io.npz")))
    position = jnp.asarray(io["slice_position"])
    tokens = {}
    sequence_models = {}
    for name, file in SEQUENCE_FILES.items():
        model = convert_checkpoint(fixture(file), num_heads=NUM_HEADS).to_module()
        features = model.forward_features(jnp.asarray(nhwc(io[f"images_{name}"])), position)
        assert_close(features.patch_tokens, io[f"tokens_{name}"], f"{name} patch tokens")
        tokens[name] = features.patch_tokens
        sequence_models[name] = model

    sources = {name: fixture(file) for name, file in SEQUENCE_FILES.items()}
    fusion = convert_fusion(fixture("fusion.pth"), sources, num_heads=NUM_HEADS).to_module()
    fused = fusion.fused_map(*(tokens[name] for name in FUSION_SEQUENCES))
    assert_close(fused, nhwc(io["fusion_concat"]), "fusion streams concat (after overwrite)")
    for name in FUSION_SEQUENCES:
        stream = fusion.stream(name)(jnp.asarray(io[f"tokens_{name}"]).reshape(2, 4, 4, -1))
        assert_close(stream, nhwc(io[f"fusion_stream_{name}"]), f"Stream_{name} (after overwrite)")
    logits = fusion(*(tokens[name] for name in FUSION_SEQUENCES))
    assert logits.shape == (2, 32, 32, 4)
    assert_close(logits, nhwc(io["logits"]), "fusion logits with the upstream stream overwrite")

    stored = convert_fusion(fixture("fusion.pth"), keep_stored_streams=True).to_module()
    assert_close(stored(*(tokens[n] for n in FUSION_SEQUENCES)), nhwc(io["logits_stored_streams"]),
                 "fusion logits with the stored stream weights")
    assert np.abs(io["logits"] - io["logits_stored_streams"]).max() > 1e-2, "the overwrite must matter"

    # The module-level overwrite (for models already in memory) gives the same network.
    overwrite_streams_with_sequence_heads(stored, sequence_models)
    assert_close(stored(*(tokens[n] for n in FUSION_SEQUENCES)), nhwc(io["logits"]), "module-level overwrite")


def test_artifact_round_trip_keeps_the_forward(mri, mri_io, tmp_path, highest_precision):
    directory = convert_checkpoint(fixture("mri_t2.pth"), num_heads=NUM_HEADS).save(tmp_path / "t2")
    reloaded = load_provicnet(directory, expect="provicnet")
    images = jnp.asarray(nhwc(mri_io["images"]))
    position = jnp.asarray(mri_io["slice_position"])
    assert_close(reloaded(images, position), nhwc(mri_io["logits"]), "logits after save/load")
