"""Conversion machinery: the key-table engine, the artifact format, the ProFound converter and its commands."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

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

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "profound")


def fixture(name):
    return os.path.join(FIXTURES, name)


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
