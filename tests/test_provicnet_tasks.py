"""ProViCNet on the non-segmentation tasks (`configs/{cls,sr,distortion,synthesis}.py:provicnet`): the slice
variants in tasks/slice_classification.py and tasks/slice_restoration.py."""
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import config_for, fixed_training_batch
from transfer_jax.data import slices as slice_data
from transfer_jax.tasks.degradations import thick_slice_degrade
from transfer_jax.tasks.registry import get_task
from transfer_jax.tasks.slice_segmentation import normalise_in_gland
from transfer_jax.train.pretrained import RUNTIME_OPTIONS

TASKS = {"cls": "provicnet_classification", "sr": "provicnet_super_resolution",
         "distortion": "provicnet_distortion", "synthesis": "provicnet_synthesis"}
DEPTH, SIZE, IMAGE = 4, 64, 112  # the smoke preset's crop and slice input size


def _sample(seed=0):
    """A prepared-case-like smoke crop: a gland disc in every slice, channels (t2, dwi, adc)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    disc = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2) < (SIZE * 0.3) ** 2
    gland = np.broadcast_to(disc, (DEPTH, SIZE, SIZE)).astype(np.uint8).copy()
    image = rng.normal(size=(DEPTH, SIZE, SIZE, 3)).astype(np.float32) + 3.0 * gland[..., None] + 1.0
    return {"image": image, "gland": gland, "lesion": None, "label": "3", "case_index": np.int32(2)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TASKS))
def test_task_trains(name, tmp_path):
    """A few steps on the 3 smoke training cases (fixed batch): the loss goes down; residual tasks start at the
    identity (step-0 PSNR = the degraded input's)."""
    from transfer_jax.train.loop import train_and_evaluate

    # lr 1e-4 without warm-up: Adam's first, sign-like step at 1e-3 overshoots the zero-initialised last conv.
    overrides = {"optimizer.warmup_steps": 0, "optimizer.lr": 1e-4}
    if name == "sr":  # a 2x blur of the 4 smoke slices leaves mostly unpredictable noise to restore
        overrides["task.sr_factor"] = 4
    config = fixed_training_batch(config_for(name, "provicnet,smoke", **overrides), total_steps=5)
    config.alignment.enabled = name == "sr"  # the probe path once: its sites are the same for every slice task
    summary = train_and_evaluate(config, str(tmp_path))
    assert summary["task"] == TASKS[name]
    with open(tmp_path / "metrics.jsonl") as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if r.get("train/loss") is not None]
    assert len(losses) == config.total_steps and losses[-1] < losses[0], losses
    final = summary["final"]
    assert np.isfinite(final[summary["primary_metric"]]), final
    if name == "cls":
        assert summary["primary_metric"] == "auroc_macro" and np.isfinite(final["accuracy"])
    else:
        assert summary["primary_metric"] == "psnr"
        assert all(np.isfinite(final[k]) for k in ("ssim", "mae", "psnr_volume")), final
    if name in ("sr", "distortion"):
        start = summary["history"][0]
        assert start["step"] == 0
        assert start["metrics"]["psnr"] == pytest.approx(start["metrics"]["psnr_input"], rel=1e-6)
    if config.alignment.enabled:
        assert set(summary["alignment"]) == {"cls", "mean_patch"}
        assert np.isfinite(summary["alignment"]["cls"]["mmd2_unbiased"])


def test_sample_shapes_and_inputs():
    sample = _sample()
    gland_z = [normalise_in_gland(sample["image"][..., c], sample["gland"]) for c in range(3)]
    resize = lambda v: slice_data.resize_bilinear(v, (IMAGE, IMAGE))  # noqa: E731
    positions = [[j, DEPTH] for j in range(DEPTH)]

    cls = get_task(config_for("cls", "provicnet,smoke"))
    out = cls.make_sample(sample)
    assert out["image"].shape == (DEPTH, IMAGE, IMAGE, 3) and int(out["label"]) == 3
    np.testing.assert_array_equal(out["slice_position"], positions)
    np.testing.assert_allclose(out["image"][..., 1], resize(gland_z[0]), atol=1e-6)  # centre = the T2 slice

    sr = get_task(config_for("sr", "provicnet,smoke"))
    out = sr.make_sample(sample)
    assert out["image"].shape == (DEPTH, IMAGE, IMAGE, 3)
    assert out["target"].shape == out["degraded"].shape == (DEPTH, SIZE, SIZE, 1) and out["mask"].shape[0] == DEPTH
    np.testing.assert_allclose(out["target"][..., 0], gland_z[0], atol=1e-6)  # clean T2 on the gland scale
    thick = out["degraded"][..., 0]
    np.testing.assert_allclose(thick, thick_slice_degrade(gland_z[0], 2), atol=1e-6)  # smoke: sr_factor 2
    np.testing.assert_allclose(out["image"][1, ..., 2], resize(thick[2]), atol=1e-5)  # neighbour j+1
    np.testing.assert_array_equal(out["slice_position"], positions)

    distortion = get_task(config_for("distortion", "provicnet,smoke"))
    out = distortion.make_sample(sample)
    assert out["image"].shape == (DEPTH, IMAGE, IMAGE, 3)
    assert out["target"].shape == out["degraded"].shape == (DEPTH, SIZE, SIZE, 2)
    np.testing.assert_allclose(out["image"][..., 0], resize(gland_z[0]), atol=1e-5)  # T2 stays clean
    np.testing.assert_allclose(out["target"], np.stack(gland_z[1:], -1), atol=1e-6)
    assert not np.allclose(out["degraded"], out["target"])

    synthesis = get_task(config_for("synthesis", "provicnet,smoke"))
    out = synthesis.make_sample(sample)
    assert out["image"].shape == (DEPTH, IMAGE, IMAGE, 3) and "degraded" not in out
    assert not out["image"][..., 2].any()  # the ADC slot is zero
    np.testing.assert_allclose(out["image"][..., 1], resize(gland_z[1]), atol=1e-5)
    np.testing.assert_allclose(out["target"][..., 0], gland_z[2], atol=1e-6)
    assert not synthesis.probe_inputs(sample["image"][None])[..., 2].any()


@pytest.mark.parametrize("name", list(TASKS))
def test_model_outputs(name):
    config = config_for(name, "provicnet,smoke")
    task = get_task(config)
    model = task.build_model(nnx.Rngs(0))
    model.eval()
    rows = [task.make_sample(_sample(seed)) for seed in (0, 1)]
    batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
    outputs = task.forward(model, batch, jnp.float32)
    if name == "cls":
        assert outputs.shape == (2, 4)
    else:
        assert outputs.logits.shape == batch["target"].shape
        if task.residual:  # zero-initialised last conv: the untrained model returns the degraded input
            np.testing.assert_array_equal(np.asarray(outputs.logits), np.asarray(batch["degraded"]))
    stats = task.eval_stats(outputs, batch)
    assert all(v.shape[0] == 2 for v in stats.values())
    probe = task.probe_inputs(np.stack([r["image"] for r in (_sample(0), _sample(1))]))
    assert probe.shape == (2, DEPTH, IMAGE, IMAGE, 3)
    sites = task.probe_features(model, jnp.asarray(probe))
    assert sites["cls"].shape == sites["mean_patch"].shape == (2 * DEPTH, 32)


def test_configs_fit_the_contrastive_pretraining_artifact():
    for preset in ("smoke", "default", "full"):
        pre = config_for("pretrain_contrastive", preset)
        mine = {k: v for k, v in pre.model.backbone_options.to_dict().items() if k not in RUNTIME_OPTIONS}
        for name in TASKS:
            other = config_for(name, f"provicnet,{preset}")
            assert other.task.name == TASKS[name]
            theirs = {k: v for k, v in other.model.backbone_options.to_dict().items() if k not in RUNTIME_OPTIONS}
            assert mine == theirs, (name, preset)
            assert tuple(pre.data.crop_size) == tuple(other.data.crop_size) and pre.task.image_size == \
                other.task.image_size
            assert other.optimizer.lr_scale_patterns == ((r"^backbone\.", 0.05),)
            assert other.optimizer.weight_decay == 0.0
            get_task(other)  # sr_factor divides the crop depth, the crop fits the output size


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A randomly initialised ProViCNet written the way `configs/pretrain_contrastive.py` exports it."""
    from transfer_jax.convert.artifact import save_converted
    from transfer_jax.convert.table import flatten

    task = get_task(config_for("pretrain_contrastive", "smoke"))
    export = task.pretrained_export()
    state = flatten(nnx.to_pure_dict(nnx.state(task.build_model(nnx.Rngs(1)))))
    directory = str(tmp_path_factory.mktemp("provicnet") / "artifact")
    save_converted(directory, export.model_name, export.config, export.select(state), {"source": "test"})
    return directory, state


@pytest.mark.parametrize("name", list(TASKS))
def test_pretrained_artifact_loads(name, artifact):
    from transfer_jax.train.pretrained import PretrainedMismatch, adopt_architecture, load_into

    directory, source = artifact
    config = config_for(name, "provicnet,smoke", **{"init.mode": "pretrained", "init.checkpoint": directory})
    adopt_architecture(config)  # as the loop does
    task = get_task(config)
    _, params, rest = nnx.split(task.build_model(nnx.Rngs(0)), nnx.Param, ...)
    load = lambda dont_load: load_into(params, rest, directory, dont_load=dont_load,  # noqa: E731
                                       shardings=lambda _: None)
    params, rest, report = load(tuple(config.init.dont_load))
    from transfer_jax.convert.table import flatten

    loaded = flatten(nnx.to_pure_dict(params))
    backbone = [p for p in loaded if p.startswith(task.backbone_prefix)]
    assert backbone and set(backbone) <= set(report.loaded)
    assert {"axis_pos.kernel", "axis_max.kernel"} <= set(report.loaded)
    for path in backbone:
        np.testing.assert_array_equal(np.asarray(loaded[path]), source[path], err_msg=path)
    if name == "cls":
        assert not report.skipped_by_dont_load and "head.0.kernel" in report.kept_initialised
    else:
        assert report.skipped_by_dont_load == ["head.segmentation_conv.9.bias", "head.segmentation_conv.9.kernel"]
        assert "head.segmentation_conv.1.kernel" in report.loaded
        if task.residual:  # the skipped last conv keeps its zero start
            assert not np.asarray(loaded["head.segmentation_conv.9.kernel"]).any()
        with pytest.raises(PretrainedMismatch, match="segmentation_conv.9"):
            load(())


@pytest.mark.slow
def test_run_starts_from_the_artifact(artifact, tmp_path, capsys):
    """Through the loop (`init.mode=pretrained`): the artifact's architecture is adopted, its weights loaded, and the
    residual head still starts at the identity."""
    from transfer_jax.train.loop import train_and_evaluate

    directory, _ = artifact
    config = fixed_training_batch(config_for("sr", "provicnet,smoke", **{
        "init.mode": "pretrained", "init.checkpoint": directory, "alignment.enabled": False}), total_steps=1)
    summary = train_and_evaluate(config, str(tmp_path))
    start = summary["history"][0]["metrics"]
    assert start["psnr"] == pytest.approx(start["psnr_input"], rel=1e-6)
    assert "2 skipped by init.dont_load" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["seg", "cls", "synthesis"])
def test_predict_writes_slice_model_outputs(name, tmp_path):
    """`python -m transfer_jax.predict` on a finished ProViCNet run: label maps / volumes on the T2 grid, or CSV."""
    import nibabel as nib

    from transfer_jax.data.manifest import read_manifest
    from transfer_jax.predict import main
    from transfer_jax.train.loop import train_and_evaluate

    config = config_for(name, "provicnet,smoke", **{"total_steps": 1, "alignment.enabled": False})
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    output = tmp_path / "predictions"
    main(["--workdir", str(tmp_path / "run"), "--manifest", summary["manifest"], "--output", str(output)])
    cases = read_manifest(summary["manifest"])
    if name == "cls":
        rows = (output / "probabilities.csv").read_text().strip().splitlines()
        assert len(rows) == len(cases) + 1 and rows[0].startswith("case_id,prob_0")
        probs = np.array([[float(v) for v in r.split(",")[1:5]] for r in rows[1:]])
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
        return
    suffix = "seg" if name == "seg" else "adc"
    written = nib.load(str(output / f"{cases[0].case_id}_{suffix}.nii.gz"))
    source = nib.load(cases[0].t2)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    values = np.asarray(written.dataobj)
    assert np.isfinite(values).all()
    if name == "seg":
        assert set(np.unique(values)) <= {0, 1, 2, 3}  # ProViCNet's four classes
    else:
        assert np.abs(values).max() > 0  # the window's ADC, zero elsewhere
