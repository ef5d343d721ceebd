"""ProViCNet checkpoint conversion: kinds and sizes of the released files, error reporting, script and extract CLI.

Full-size state dicts are synthesised from the key lists in ``tests/data/provicnet_keys/*.tsv`` as
zero-stride ``np.broadcast_to`` views, so the 45M-value released layouts convert without allocating them.
"""

import functools
import json
import os
import shutil

import numpy as np
import pytest

from helpers import REPO, fixture_path, run_python
from transfer_jax.convert.provicnet import (
    ConversionError,
    convert_checkpoint,
    convert_fusion,
    convert_slice_model,
    infer_kind,
    load_provicnet,
)
from transfer_jax.convert.torch_pickle import CheckpointReadError, load_state_dict
from transfer_jax.models.dinov2 import DinoV2Config
from transfer_jax.models.provicnet import ContrastiveHeadConfig, FusionConfig, ProViCNetConfig

KEY_LISTS = os.path.join(REPO, "tests", "data", "provicnet_keys")
fixture = functools.partial(fixture_path, "provicnet")


def released_layout(tsv: str, value: float = 0.0) -> dict[str, np.ndarray]:
    """A released file's key set with its exact shapes and dtypes; every tensor a constant zero-stride view."""
    path = os.path.join(KEY_LISTS, tsv)
    if not os.path.isfile(path):
        pytest.fail(f"key list {path} not found")
    state = {}
    for line in open(path).read().splitlines():
        key, shape, dtype = line.split("\t")
        dims = tuple(json.loads(shape))
        state[key] = np.broadcast_to(np.asarray(value if dtype == "float32" else 7, dtype=dtype), dims)
    return state


# ---------------------------------------------------------------------------------------------------------------
# Kinds and sizes of the five released files


def test_released_slice_models_convert_with_the_default_sizes():
    for kind, tsv, reducer in (("mri", "mri_T2_ADC_DWI.tsv", None), ("trus", "trus.tsv", 9)):
        state = released_layout(tsv)
        assert infer_kind(state) == kind
        converted = convert_slice_model(state)
        assert converted.kind == kind
        assert converted.config == ProViCNetConfig(reducer_in_channels=reducer)
        assert converted.config.backbone == DinoV2Config(width=384, depth=12, num_heads=6, patch=14, pos_grid=37,
                                                         num_registers=4, mlp_ratio=4.0, in_channels=3)
        assert converted.config.contrastive_head == ContrastiveHeadConfig(2048, 256, 65536, 3)
        report = converted.report
        assert len(report.consumed) + len(report.ignored) == len(state) == (206 if reducer else 204)
        assert sorted(report.ignored) == ["head.segmentation_conv.2.num_batches_tracked",
                                          "head.segmentation_conv.6.num_batches_tracked"]
        assert report.consumed["backbone.mask_token"] == "backbone.mask_token"
        assert report.consumed["CL_Head.last_layer.weight_v"] == "CL_Head.last_layer.v"
        assert converted.state["CL_Head.last_layer.v"].shape == (256, 65536)
        assert converted.state["backbone.blocks.11.attn.qkv.kernel"].shape == (384, 1152)
        assert report.num_parameters == (44_931_170 if reducer else 44_931_140)


def test_released_slice_model_without_contrastive_head():
    state = released_layout("mri_T2_ADC_DWI.tsv")
    dropped = convert_slice_model(state, drop_contrastive_head=True)
    assert dropped.config.contrastive_head is None
    assert not any(path.startswith("CL_Head") for path in dropped.state)
    assert sum(1 for reason in dropped.report.ignored.values() if "contrastive" in reason) == 8
    # A checkpoint that simply has no CL_Head converts too (upstream's plain ProViCNet class).
    without = {k: v for k, v in state.items() if not k.startswith("CL_Head.")}
    assert convert_checkpoint(without).config.contrastive_head is None


def test_released_fusion_converts_with_the_stream_overwrite():
    fusion = released_layout("mpMRI_fusion.tsv", value=9.0)
    assert infer_kind(fusion) == "fusion"
    sequences = {name: released_layout("mri_T2_ADC_DWI.tsv", value=value)
                 for name, value in (("T2W", 1.0), ("ADC", 2.0), ("DWI", 3.0))}
    converted = convert_fusion(fusion, sequences)
    assert converted.config == FusionConfig(384, 128, 4)
    assert len(converted.report.consumed) + len(converted.report.ignored) == 30
    for name, value in (("T2W", 1.0), ("ADC", 2.0), ("DWI", 3.0)):
        for entry in ("1.kernel", "1.bias", "2.scale", "2.bias", "2.mean", "2.var"):
            assert np.all(converted.state[f"Stream_{name}.UpsampleModule.{entry}"] == value), (name, entry)
    assert np.all(converted.state["FusionSegmentation.1.kernel"] == 9.0), "the fusion head itself is kept"
    assert sum("overwritten" in note for note in converted.report.notes) == 3
    kept = convert_fusion(fusion, keep_stored_streams=True)
    assert np.all(kept.state["Stream_T2W.UpsampleModule.1.kernel"] == 9.0)


# ---------------------------------------------------------------------------------------------------------------
# Errors: one message listing every problem


def test_truncated_file_names_the_file(tmp_path):
    data = open(fixture("mri_t2.pth"), "rb").read()
    truncated = tmp_path / "T2_best.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match="T2_best.pth"):
        convert_checkpoint(truncated)


def test_checkpoint_of_another_model_is_rejected_with_what_was_expected():
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(fixture("dinov2_backbone_only.pth"), num_heads=2)
    message = str(error.value)
    assert "dinov2_backbone_only.pth" in message
    assert "bare DINOv2 backbone" in message and "head.segmentation_conv.9.weight" in message
    with pytest.raises(ConversionError, match="not a slice model"):
        convert_slice_model(fixture("fusion.pth"))
    with pytest.raises(ConversionError, match="not the mpMRI fusion checkpoint"):
        convert_fusion(fixture("mri_t2.pth"), keep_stored_streams=True)


def test_renamed_key_wrong_shape_and_stray_key_are_reported_together():
    state = load_state_dict(fixture("mri_t2.pth"))
    state["backbone.blocks.1.ls2.scale"] = state.pop("backbone.blocks.1.ls2.gamma")
    state["head.segmentation_conv.5.weight"] = np.zeros((8, 15, 3, 3), np.float32)
    state["backbone.extra_tokens"] = np.zeros((1, 2, 32), np.float32)
    with pytest.raises(ConversionError) as error:
        convert_slice_model(state, num_heads=2, source_name="edited.pth")
    problems = error.value.problems
    assert len(problems) == 4, problems
    message = str(error.value)
    assert message.startswith("cannot convert edited.pth into ProViCNet (mri): 4 problem(s)")
    assert "unexpected source key 'backbone.blocks.1.ls2.scale'" in message
    assert "missing target 'backbone.blocks.1.ls2.gamma'" in message
    assert "'head.segmentation_conv.5.weight' (8, 15, 3, 3)" in message and "expected (3, 3, 16, 8)" in message
    assert "unexpected source key 'backbone.extra_tokens'" in message


def test_fusion_problems_are_reported_together():
    fusion = load_state_dict(fixture("fusion.pth"))
    with pytest.raises(ConversionError) as error:
        convert_fusion(fusion)
    assert sum("no sequence checkpoint for Stream_" in p for p in error.value.problems) == 3
    with pytest.raises(ConversionError) as error:
        convert_fusion(fusion, {"T2W": fixture("trus.pth"), "ADC": fixture("mri_adc.pth"),
                                "DWI": fixture("no_such_file.pth")}, num_heads=2)
    message = str(error.value)
    assert "Stream_T2W source" in message and "is a trus model" in message
    assert "Stream_DWI source cannot be used" in message and "no_such_file.pth" in message
    del fusion["FusionSegmentation.5.bias"]
    with pytest.raises(ConversionError) as error:
        convert_fusion(fusion, keep_stored_streams=True)
    assert any("missing target 'FusionSegmentation.5.bias'" in p for p in error.value.problems)


def test_sizes_are_inferred_from_shapes_but_heads_must_divide_the_width():
    converted = convert_checkpoint(fixture("trus.pth"), num_heads=2)
    assert converted.config.backbone == DinoV2Config(width=32, depth=2, num_heads=2, patch=14, pos_grid=10,
                                                     num_registers=4, mlp_ratio=4.0, in_channels=3)
    assert converted.config.head_channels == (16, 8) and converted.config.reducer_in_channels == 9
    with pytest.raises(ConversionError, match="not divisible by 3 heads"):
        convert_checkpoint(fixture("trus.pth"), num_heads=3)


# ---------------------------------------------------------------------------------------------------------------
# Command lines end to end


def test_convert_script_and_extract_command_end_to_end(tmp_path):
    t2_dir = tmp_path / "t2"
    done = run_python("-m", "transfer_jax.convert", "provicnet", "--checkpoint", fixture("mri_t2.pth"), "--output", str(t2_dir),
               "--num-heads", "2")
    assert done.returncode == 0, done.stderr
    assert "62 tensors converted" in done.stdout and "num_batches_tracked" in done.stdout
    metadata = json.load(open(t2_dir / "model.json"))
    assert metadata["model"] == "provicnet" and metadata["config"]["backbone"]["num_heads"] == 2

    # Fusion: T2 from the converted artifact, ADC / DWI straight from their checkpoints.
    fusion_dir = tmp_path / "fusion"
    done = run_python("-m", "transfer_jax.convert", "provicnet", "--checkpoint", fixture("fusion.pth"), "--output", str(fusion_dir),
               "--t2", str(t2_dir), "--adc", fixture("mri_adc.pth"), "--dwi", fixture("mri_dwi.pth"),
               "--num-heads", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("overwritten by head.segmentation_conv") == 3
    fusion = load_provicnet(fusion_dir, expect="provicnet_fusion")
    t2 = load_provicnet(t2_dir)
    np.testing.assert_array_equal(np.asarray(fusion.Stream_T2W.UpsampleModule[2].mean[...]),
                                  np.asarray(t2.head.segmentation_conv[2].mean[...]))

    io = np.load(fixture("mri_t2_io.npz"))
    request = tmp_path / "slices.npz"
    np.savez(request, image=io["images"], slice_index=io["slice_position"][:, 0],
             num_slices=io["slice_position"][:, 1])
    output = tmp_path / "features.npz"
    done = run_python("-m", "transfer_jax.extract", "--model", "provicnet", "--params", str(t2_dir), "--input",
               str(request), "--output", str(output))
    assert done.returncode == 0, done.stderr
    features = np.load(output)
    assert features["patch_tokens"].dtype == np.float32 and features["patch_tokens"].shape == (2, 64, 32)
    assert features["cls"].shape == (2, 32) and features["seg_logits"].shape == (2, 64, 64, 4)
    np.testing.assert_allclose(features["patch_tokens"], io["patch_tokens"], atol=1e-4)
    np.testing.assert_allclose(features["cls"], io["cls"], atol=1e-4)
    np.testing.assert_allclose(features["seg_logits"], io["logits"].transpose(0, 2, 3, 1), atol=1e-4)


def test_convert_script_failures_exit_with_one_clear_message(tmp_path):
    broken = tmp_path / "ADC_best.pth"
    shutil.copy(fixture("mri_adc.pth"), broken)
    broken.write_bytes(broken.read_bytes()[:1000])
    done = run_python("-m", "transfer_jax.convert", "provicnet", "--checkpoint", str(broken), "--output", str(tmp_path / "out"))
    assert done.returncode == 1 and "ADC_best.pth" in done.stderr and "Traceback" not in done.stderr
    done = run_python("-m", "transfer_jax.convert", "provicnet", "--checkpoint", fixture("fusion.pth"), "--output",
               str(tmp_path / "fusion"))
    assert done.returncode == 1 and done.stderr.count("no sequence checkpoint for Stream_") == 3
    assert not (tmp_path / "fusion").exists()
