"""Conversion machinery: the key-table engine, the artifact format, the ProFound converter and its commands."""
import functools
import json
import os

import numpy as np
import pytest
from flax import nnx

from helpers import fixture_path, run_python
from transfer_jax.convert import artifact
from transfer_jax.convert.table import (
    CONV3D,
    LINEAR,
    RESHAPE,
    SPARSE_CONV3D,
    SPARSE_DEPTHWISE3D,
    ConversionError,
    Default,
    Ignore,
    Rule,
    convert_state,
    flatten,
    target_spec,
    unflatten,
)

fixture = functools.partial(fixture_path, "profound")


# ----------------------------------------------------------------------------------------------------------------
# Table engine


class _Tiny(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([nnx.Linear(3, 4, rngs=rngs), nnx.Linear(4, 2, rngs=rngs)])
        self.norm = nnx.LayerNorm(2, rngs=rngs)
        self.stats = nnx.BatchStat(np.zeros((2,), np.float32))


TINY_RULES = [
    Rule(r"layers\.(\d+)\.weight", r"layers.\1.kernel", LINEAR),
    Rule(r"layers\.(\d+)\.bias", r"layers.\1.bias"),
    Rule(r"norm\.weight", "norm.scale"),
    Rule(r"norm\.bias", "norm.bias"),
    Rule(r"running_stats", "stats"),
]


def _tiny_source():
    rng = np.random.default_rng(0)
    return {
        "layers.0.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "layers.0.bias": rng.normal(size=(4,)).astype(np.float32),
        "layers.1.weight": rng.normal(size=(2, 4)).astype(np.float32),
        "layers.1.bias": rng.normal(size=(2,)).astype(np.float32),
        "norm.weight": np.ones(2, np.float32),
        "norm.bias": np.zeros(2, np.float32),
        "running_stats": np.arange(2, dtype=np.float64),
        "aux.num_batches_tracked": np.array(3),
    }


def test_target_spec_lists_params_and_batch_stats_without_rng_state():
    spec = target_spec(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))))
    assert spec["layers.0.kernel"].shape == (3, 4)
    assert spec["stats"].shape == (2,)
    assert not any("rngs" in k or "count" in k for k in spec)


def test_table_fills_every_target_and_reports():
    spec = target_spec(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))))
    source = _tiny_source()
    flat, report = convert_state(source, TINY_RULES, spec, ignore=[Ignore(r".*num_batches_tracked", "counter")],
                                 source_name="tiny.pth", target_name="Tiny")
    assert set(flat) == set(spec)
    np.testing.assert_array_equal(flat["layers.1.kernel"], source["layers.1.weight"].T)
    assert flat["stats"].dtype == np.float32  # cast to the target dtype
    assert report.ignored == {"aux.num_batches_tracked": "counter"}
    assert report.consumed["layers.0.weight"] == "layers.0.kernel"
    assert report.num_parameters == sum(v.size for v in flat.values())
    model = _Tiny(nnx.Rngs(1))
    nnx.update(model, nnx.State(unflatten(flat)))
    np.testing.assert_array_equal(model.layers[0].kernel[...], source["layers.0.weight"].T)


def test_table_collects_every_problem_in_one_error():
    spec = target_spec(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))))
    source = _tiny_source()
    source["layers.0.wieght"] = source.pop("layers.0.weight")  # renamed key: unmatched + missing target
    source["layers.1.bias"] = np.zeros(5, np.float32)  # wrong shape
    source["extra.thing"] = np.zeros(1, np.float32)  # no rule
    rules = TINY_RULES + [Rule(r"norm\.(weight)", r"norm.scale")]  # a second rule claiming norm.weight
    with pytest.raises(ConversionError) as info:
        convert_state(source, rules, spec, source_name="tiny.pth", target_name="Tiny")
    message = str(info.value)
    problems = info.value.problems
    assert message.startswith("cannot convert tiny.pth into Tiny: 6 problem(s):")
    assert len(problems) == 6
    assert any("'layers.0.wieght'" in p and "no rule" in p for p in problems)
    assert any("'extra.thing'" in p for p in problems)
    assert any("'aux.num_batches_tracked'" in p for p in problems)
    assert any("'layers.1.bias'" in p and "(5,)" in p and "expected (2,)" in p for p in problems)
    assert any("'norm.weight'" in p and "several" in p for p in problems)
    assert any("missing target 'layers.0.kernel' (3, 4)" in p for p in problems)


def test_unknown_target_path_gets_a_hint_and_defaults_are_reported():
    spec = target_spec(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))))
    source = _tiny_source()
    del source["norm.weight"], source["norm.bias"]
    rules = TINY_RULES + [Rule(r"aux\.num_batches_tracked", "layer.0.kernel")]
    with pytest.raises(ConversionError, match="closest target: 'layers.0.kernel'"):
        convert_state(source, rules, spec, defaults=[Default(r"norm\.(scale|bias)", "ones", "absent")])
    del source["aux.num_batches_tracked"]
    flat, report = convert_state(source, TINY_RULES, spec,
                                 defaults=[Default(r"norm\.scale", "ones", "no final norm"),
                                           Default(r"norm\.bias", "zeros", "no final norm")])
    np.testing.assert_array_equal(flat["norm.scale"], np.ones(2))
    np.testing.assert_array_equal(flat["norm.bias"], np.zeros(2))
    assert report.initialised == {"norm.scale": "ones: no final norm", "norm.bias": "zeros: no final norm"}


def test_layout_transforms():
    w = np.arange(2 * 3 * 4 * 5 * 6).reshape(2, 3, 4, 5, 6)
    k = CONV3D(w, None)
    assert k.shape == (4, 5, 6, 3, 2) and k[1, 2, 3, 2, 1] == w[1, 2, 1, 2, 3]
    assert RESHAPE(np.arange(8).reshape(1, 1, 1, 1, 8), (8,)).shape == (8,)
    with pytest.raises(ValueError, match="cannot reshape"):
        RESHAPE(np.zeros(8), (9,))


def test_sparse_kernel_rule_puts_depth_fastest():
    # Offset index o of a Minkowski kernel is w*k*k + h*k + d (upstream remap_checkpoint_keys).
    k, cin, cout = 3, 2, 4
    sparse = np.random.default_rng(0).normal(size=(k ** 3, cin, cout))
    dense = SPARSE_CONV3D(sparse, None)
    assert dense.shape == (k, k, k, cin, cout)
    for d, h, w in [(0, 0, 1), (1, 0, 0), (2, 1, 0), (0, 2, 1)]:
        np.testing.assert_array_equal(dense[d, h, w], sparse[w * k * k + h * k + d])
    # A 1x1x1 stride-1 conv is stored squeezed as (Cin, Cout).
    np.testing.assert_array_equal(SPARSE_CONV3D(sparse[0], None), sparse[0][None, None, None])
    depthwise = np.random.default_rng(1).normal(size=(7 ** 3, 5))
    dw = SPARSE_DEPTHWISE3D(depthwise, None)
    assert dw.shape == (7, 7, 7, 1, 5)
    np.testing.assert_array_equal(dw[6, 1, 2, 0], depthwise[2 * 49 + 1 * 7 + 6])
    with pytest.raises(ValueError, match="not a cube"):
        SPARSE_DEPTHWISE3D(np.zeros((10, 2)), None)


def test_flatten_unflatten_round_trip():
    tree = {"a": {0: {"k": 1}, 1: {"k": 2}}, "b": 3}
    flat = flatten(tree)
    assert flat == {"a.0.k": 1, "a.1.k": 2, "b": 3}
    assert unflatten(flat) == tree


# ----------------------------------------------------------------------------------------------------------------
# Artifact


def test_artifact_round_trip(tmp_path):
    state = {"encoder.stages.0.0.kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
             "encoder.norm.scale": np.ones(3, np.float32), "head.1.mean": np.zeros(3, np.float32)}
    out = artifact.save_converted(tmp_path / "art", "toy", {"dims": (1, 2), "k": 3}, state, {"consumed": {}})
    assert os.path.isfile(os.path.join(out, "model.json"))
    name, config, nested = artifact.load_converted(out)
    assert name == "toy" and config == {"dims": [1, 2], "k": 3}
    np.testing.assert_array_equal(nested["encoder"]["stages"][0][0]["kernel"], state["encoder.stages.0.0.kernel"])
    assert nested["head"][1]["mean"].dtype == np.float32
    meta = json.load(open(os.path.join(out, "model.json")))
    assert meta["format_version"] == artifact.FORMAT_VERSION and meta["conversion"] == {"consumed": {}}


def test_artifact_refuses_to_clobber_and_reports_non_artifacts(tmp_path):
    state = {"w": np.zeros(2, np.float32)}
    artifact.save_converted(tmp_path / "a", "toy", {}, state, {})
    with pytest.raises(artifact.ArtifactError, match="overwrite"):
        artifact.save_converted(tmp_path / "a", "toy", {}, state, {})
    artifact.save_converted(tmp_path / "a", "toy2", {}, {"w": np.ones(2, np.float32)}, {}, overwrite=True)
    name, _, nested = artifact.load_converted(tmp_path / "a")
    assert name == "toy2" and nested["w"][0] == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(artifact.ArtifactError, match="not a converted-weights artifact"):
        artifact.save_converted(tmp_path / "other", "toy", {}, state, {}, overwrite=True)
    with pytest.raises(artifact.ArtifactError, match="model.json is missing"):
        artifact.load_converted(tmp_path / "other")
    with pytest.raises(artifact.ArtifactError, match="no such directory"):
        artifact.load_converted(tmp_path / "absent")


# ----------------------------------------------------------------------------------------------------------------
# ProFound converter

from transfer_jax.convert.profound import (  # noqa: E402
    CONV_MODEL,
    VIT_MODEL,
    convert_profound,
    convert_to_artifact,
    load_profound,
)
from transfer_jax.convert.torch_pickle import CheckpointReadError, load_state_dict  # noqa: E402

TINY_CONV = {"in_channels": 3, "depths": (1, 1, 2, 1), "dims": (8, 16, 24, 32), "stem_kernel": (4, 4, 4),
             "downsample_kernel": (2, 2, 2), "last_downsample": (1, 1, 1)}


def _subset(config, expected):
    return {k: config[k] for k in expected} == expected


def _save_safetensors(path, state_dict):
    import safetensors.numpy

    safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(path))
    return path


def test_fcmae_checkpoint_sizes_dropped_decoder_and_initialised_norm():
    converted = convert_profound(fixture("conv_fcmae.pth"))
    assert converted.model_name == CONV_MODEL and converted.source_kind == "fcmae" and converted.epoch == 799
    assert _subset(converted.config["encoder"], TINY_CONV) and converted.config["head"] is None
    report = converted.report
    dropped = set(report.ignored)
    assert {"mask_token", "proj.weight", "proj.bias", "pred.weight", "pred.bias"} <= dropped
    assert all(k in ("mask_token",) or k.split(".")[0] in ("proj", "decoder", "pred") for k in dropped)
    assert set(report.initialised) == {"encoder.norm.scale", "encoder.norm.bias"}
    assert "ones" in report.initialised["encoder.norm.scale"]
    np.testing.assert_array_equal(converted.state["encoder.norm.scale"], 1.0)
    np.testing.assert_array_equal(converted.state["encoder.norm.bias"], 0.0)
    # Every encoder tensor of the checkpoint is consumed; the sparse kernels became dense Flax kernels.
    sd = load_state_dict(fixture("conv_fcmae.pth"))
    assert set(report.consumed) == {k for k in sd if k.startswith("encoder.")}
    assert sd["encoder.downsample_layers.3.1.kernel"].shape == (24, 32)
    np.testing.assert_array_equal(converted.state["encoder.downsample_layers.3.1.kernel"][0, 0, 0],
                                  sd["encoder.downsample_layers.3.1.kernel"])
    assert converted.state["encoder.stages.0.0.dwconv.kernel"].shape == (7, 7, 7, 1, 8)
    assert converted.state["encoder.downsample_layers.1.1.kernel"].shape == (2, 2, 2, 8, 16)


def test_sizes_are_inferred_for_every_checkpoint_kind():
    classifier = convert_profound(fixture("conv_classifier.pth.tar"))
    assert _subset(classifier.config["encoder"], TINY_CONV)
    assert classifier.config["head"] == {"type": "classification", "num_classes": 4, "bottleneck_dim": 12}
    upernet = convert_profound(fixture("conv_upernet.pth.tar"))
    assert _subset(upernet.config["head"], {"type": "upernet", "num_classes": 1, "hidden_size": 8,
                                            "auxiliary_channels": 4, "pool_scales": (1, 2, 3, 6)})
    mae = convert_profound(fixture("vit_mae.pth"), num_heads=3, with_decoder=True, decoder_num_heads=2)
    assert mae.model_name == VIT_MODEL
    assert _subset(mae.config["encoder"], {"img_size": (16, 32, 32), "patch_size": (4, 8, 8), "width": 24,
                                           "depth": 4, "num_heads": 3, "mlp_ratio": 4.0, "in_channels": 3})
    assert _subset(mae.config["decoder"], {"width": 12, "depth": 1, "num_heads": 2, "mask_ratio": 0.75,
                                           "norm_pix_loss": False})
    assert any("inferred from the stored sin-cos position table" in n for n in mae.report.notes)
    vit_cls = convert_profound(fixture("vit_classifier.pth.tar"), num_heads=3)
    assert vit_cls.config["head"] == {"type": "classification", "num_classes": 3, "bottleneck_dim": 10}


def test_mae_decoder_is_dropped_unless_kept():
    encoder_only = convert_profound(fixture("vit_mae.pth"), num_heads=3)
    assert "decoder_pred.weight" in encoder_only.report.ignored
    assert not any(k.startswith("decoder") for k in encoder_only.state)
    kept = convert_profound(fixture("vit_mae.pth"), num_heads=3, with_decoder=True, decoder_num_heads=2)
    assert kept.report.ignored == {}
    assert kept.state["decoder.decoder_pred.kernel"].shape == (12, 4 * 8 * 8 * 3)


def test_vit_head_count_without_default_is_asked_for():
    with pytest.raises(ConversionError, match=r"--num-heads"):
        convert_profound(fixture("vit_mae.pth"))


def test_truncated_checkpoint(tmp_path):
    data = open(fixture("conv_fcmae.pth"), "rb").read()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointReadError, match="cut.pth"):
        convert_profound(path)


def test_checkpoint_of_the_other_model_is_named():
    with pytest.raises(ConversionError) as info:
        convert_profound(fixture("vit_mae.pth"), variant="conv")
    message = str(info.value)
    assert "vit_mae.pth" in message and "ProFound-Conv" in message and "ProFound-ViT" in message
    with pytest.raises(ConversionError, match="ProFound-Conv"):
        convert_profound(fixture("conv_classifier.pth.tar"), variant="vit")


def test_not_a_profound_checkpoint(tmp_path):
    path = _save_safetensors(tmp_path / "other.safetensors", {"backbone.weight": np.zeros(3, np.float32)})
    with pytest.raises(ConversionError, match="not a ProFound checkpoint.*backbone.weight"):
        convert_profound(path)


def test_renamed_key_and_wrong_shape_are_reported_together(tmp_path):
    sd = load_state_dict(fixture("conv_classifier.pth.tar"))
    sd["encoder.stages.1.0.pwconv1.wieght"] = sd.pop("encoder.stages.1.0.pwconv1.weight")
    sd["head.3.bias"] = np.zeros(7, np.float32)  # head.3.weight says 4 classes
    sd["encoder.stages.0.0.grn.gamma"] = np.zeros((1, 1, 1, 1, 33), np.float32)
    path = _save_safetensors(tmp_path / "edited.safetensors", sd)
    with pytest.raises(ConversionError) as info:
        convert_profound(path)
    problems = info.value.problems
    message = str(info.value)
    assert message.startswith(f"cannot convert {path} into ProFound-Conv + classification head (4 classes): "
                              f"{len(problems)} problem(s):")
    assert any("'encoder.stages.1.0.pwconv1.wieght'" in p and "no rule" in p for p in problems)
    assert any("missing target 'encoder.stages.1.0.pwconv1.kernel' (16, 64)" in p for p in problems)
    assert any("'head.3.bias'" in p and "expected (4,)" in p for p in problems)
    assert any("'encoder.stages.0.0.grn.gamma'" in p and "(32,)" in p for p in problems)
    assert len(problems) == 4


def test_artifact_round_trip_rebuilds_the_model(tmp_path):
    converted = convert_to_artifact(fixture("conv_classifier.pth.tar"), tmp_path / "cls")
    model, config = load_profound(tmp_path / "cls", expect=CONV_MODEL)
    assert config["head"]["num_classes"] == 4
    np.testing.assert_array_equal(model.head[1].var[...], converted.state["head.1.var"])
    meta = json.load(open(tmp_path / "cls" / "model.json"))
    assert meta["conversion"]["source_kind"] == "conv" and meta["conversion"]["checkpoint_epoch"] == 3
    assert meta["conversion"]["ignored"] == {"head.1.num_batches_tracked": meta["conversion"]["ignored"][
        "head.1.num_batches_tracked"]}
    with pytest.raises(artifact.ArtifactError, match="expected 'profound_vit'"):
        load_profound(tmp_path / "cls", expect=VIT_MODEL)


# ----------------------------------------------------------------------------------------------------------------
# Commands end to end (subprocess, as a user runs them)


def test_convert_script_and_extract_command_conv(tmp_path):
    out = tmp_path / "conv_cls"
    result = run_python("-m", "transfer_jax.convert", "profound", "--checkpoint", fixture("conv_classifier.pth.tar"),
                  "--output", str(out), "--variant", "conv")
    assert result.returncode == 0, result.stderr
    assert "64,432 trainable parameters" in result.stdout
    assert "head.1.num_batches_tracked" in result.stdout
    again = run_python("-m", "transfer_jax.convert", "profound", "--checkpoint", fixture("conv_classifier.pth.tar"),
                 "--output", str(out))
    assert again.returncode == 1 and "overwrite" in again.stderr

    features = tmp_path / "features.npz"
    result = run_python("-m", "transfer_jax.extract", "--model", "profound_conv", "--params", str(out),
                  "--input", fixture("inputs.npz"), "--output", str(features), "--batch-size", "3")
    assert result.returncode == 0, result.stderr
    got = np.load(features)
    ref = np.load(fixture("conv_classifier_ref.npz"))
    assert sorted(got.files) == ["logits", "pooled", "stage1", "stage2", "stage3", "stage4"]
    for name, ref_name in [("stage1", "stage1"), ("stage4", "stage4"), ("pooled", "pooled"),
                           ("logits", "logits_eval")]:
        assert got[name].dtype == np.float32
        np.testing.assert_allclose(got[name], ref[ref_name], atol=1e-3, err_msg=name)


def test_convert_script_reports_every_problem(tmp_path):
    sd = load_state_dict(fixture("conv_upernet.pth.tar"))
    sd["decode_head.fpn_convs.0.conv.weight"] = sd["decode_head.fpn_convs.0.conv.weight"][:, :4]
    sd["decode_head.extra.weight"] = np.zeros(2, np.float32)
    path = _save_safetensors(tmp_path / "broken.safetensors", sd)
    result = run_python("-m", "transfer_jax.convert", "profound", "--checkpoint", str(path), "--output", str(tmp_path / "x"))
    assert result.returncode == 1
    assert "2 problem(s)" in result.stderr
    assert "decode_head.fpn_convs.0.conv.weight" in result.stderr and "decode_head.extra.weight" in result.stderr
    assert not (tmp_path / "x").exists()


def test_extract_command_vit_tokens(tmp_path):
    out = tmp_path / "vit"
    result = run_python("-m", "transfer_jax.convert", "profound", "--checkpoint", fixture("vit_mae.pth"), "--output", str(out),
                  "--variant", "vit", "--num-heads", "3")
    assert result.returncode == 0, result.stderr
    features = tmp_path / "vit.npz"
    result = run_python("-m", "transfer_jax.extract", "--model", "profound_vit", "--params", str(out),
                  "--input", fixture("inputs.npz"), "--output", str(features))
    assert result.returncode == 0, result.stderr
    got = np.load(features)
    ref = np.load(fixture("vit_mae_ref.npz"))
    assert sorted(got.files) == ["cls", "tokens"]
    assert got["tokens"].shape == (2, 1 + 64, 24)
    np.testing.assert_allclose(got["cls"], ref["cls"], atol=1e-3)
    np.testing.assert_allclose(got["tokens"][:, 0], ref["cls"], atol=1e-3)
    np.testing.assert_allclose(got["tokens"][:, 1:], ref["tokens"], atol=1e-3)
    wrong = run_python("-m", "transfer_jax.extract", "--model", "profound_conv", "--params", str(out),
                 "--input", fixture("inputs.npz"), "--output", str(tmp_path / "no.npz"))
    assert wrong.returncode != 0 and "expected 'profound_conv'" in wrong.stderr


def test_extract_from_manifest(tmp_path):
    from transfer_jax.features.profound import extract_profound_conv
    from transfer_jax.data.phantom import PhantomConfig, generate_phantom_dataset

    manifest = generate_phantom_dataset(str(tmp_path / "phantom"), PhantomConfig(num_cases=3, num_val=1,
                                                                                 num_test=1))
    convert_to_artifact(fixture("conv_upernet.pth.tar"), tmp_path / "seg")
    shapes = extract_profound_conv(tmp_path / "seg", manifest, tmp_path / "m.npz", split="test",
                                   crop_size=(16, 32, 32))
    assert shapes["seg_logits"] == (1, 16, 32, 32, 1) and shapes["case_id"] == (1,)
    got = np.load(tmp_path / "m.npz")
    assert list(got["case_id"]) == ["phantom0002"]
    assert np.isfinite(got["pooled"]).all()
