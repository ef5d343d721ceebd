"""The downstream tasks (classification, super-resolution, distortion correction, synthesis; segmentation with
ProFound-ViT and HD95) on the one training loop, their target builders and their bad-input errors."""
import json

import numpy as np
import pytest

from helpers import config_for, fixed_training_batch, load_config, tiny_manifest
from transfer_jax.data.errors import BadCasesError, DataError
from transfer_jax.data.manifest import Case, read_manifest, write_manifest
from transfer_jax.tasks.registry import get_task


def _config(name, arg, **overrides):
    return config_for(name, arg, **overrides)


# -- every task x backbone trains on the default data -------------------------------------------------------------

RUNS = [
    ("cls", "profound_conv,smoke"),
    ("sr", "profound_conv,smoke"),
    ("distortion", "profound_conv,smoke"),
    ("synthesis", "profound_conv,smoke"),
    ("cls", "profound_vit,smoke,binary"),
    ("sr", "profound_vit,smoke"),
    ("distortion", "profound_vit,smoke"),
    ("synthesis", "profound_vit,smoke"),
    ("seg", "profound_vit,smoke"),
]


def _tiny(config):
    """Smaller than the smoke preset where it does not change the code path: fewer compiled ops, fewer steps.

    A fixed training batch: no augmentation and a batch of exactly the 3 training cases of the smoke phantom set
    (one epoch per step, so every step sees the same samples; the order does not change the loss), so the logged
    training loss must go down from the first step to the last.
    """
    fixed_training_batch(config, total_steps=5)
    if "head_options" in config.model and "pool_scales" in config.model.head_options:
        config.model.head_options.pool_scales = (1, 2)
    if config.model.backbone == "profound_vit":
        config.model.backbone_options.depth = 2
        config.model.backbone_options.out_indices = (0, 0, 1, 1)
    return config


@pytest.mark.slow
@pytest.mark.parametrize("name,arg", RUNS, ids=[f"{n}-{a.split(',')[0]}" for n, a in RUNS])
def test_task_trains(name, arg, tmp_path):
    from transfer_jax.train.loop import train_and_evaluate

    config = _tiny(_config(name, arg))
    vit = config.model.backbone == "profound_vit"
    # Alignment once per backbone family is enough to check the ViT sites; it costs a compile elsewhere.
    config.alignment.enabled = vit and name == "sr"
    summary = train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    losses = [r["train/loss"] for r in records if r.get("train/loss") is not None]
    assert len(losses) == config.total_steps
    assert losses[-1] < losses[0], losses
    primary = summary["primary_metric"]
    final = summary["final"]
    assert primary in final and np.isfinite(final[primary]), final
    assert summary["best"] is not None and np.isfinite(summary["best"])
    if name in ("sr", "distortion", "synthesis"):
        for key in ("psnr", "ssim", "mae", "psnr_volume"):
            assert np.isfinite(final[key]), (key, final)
    if name == "sr" or name == "distortion":  # zero-initialised residual: the untrained model is the identity
        start = summary["history"][0]["metrics"]
        assert start["psnr"] == pytest.approx(start["psnr_input"], rel=1e-5)
    if name == "cls":
        assert primary == ("auroc" if "binary" in arg else "auroc_macro")
        for key in ("accuracy", "kappa", "f1" if "binary" in arg else "f1_macro"):
            assert np.isfinite(final[key]), final
    if name == "seg":
        assert np.isfinite(final["dice_mean"]) and "hd95/gland" in final and "hd95/lesion" in final
    if config.alignment.enabled:
        assert set(summary["alignment"]) == {"cls", "mean_patch"}
    if config.model.backbone == "profound_conv" and name in ("cls", "sr"):
        _check_predict(name, config, summary, tmp_path)


def _check_predict(name, config, summary, tmp_path):
    """`python -m transfer_jax.predict` on the finished run: CSV probabilities / NIfTI on the T2 grid."""
    import nibabel as nib

    from transfer_jax.predict import main

    output = tmp_path / "predictions"
    main(["--workdir", str(tmp_path), "--manifest", summary["manifest"], "--output", str(output)])
    cases = read_manifest(summary["manifest"])
    if name == "cls":
        with open(output / "probabilities.csv") as f:
            rows = f.read().strip().splitlines()
        assert len(rows) == len(cases) + 1 and rows[0].startswith("case_id,prob_0")
        probs = np.array([[float(v) for v in r.split(",")[1:5]] for r in rows[1:]])
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    else:
        for channel in config.data.channels:
            written = nib.load(str(output / f"{cases[0].case_id}_{channel}.nii.gz"))
            source = nib.load(cases[0].t2)
            assert written.shape == source.shape and np.allclose(written.affine, source.affine)
            assert np.isfinite(written.get_fdata()).all() and np.abs(written.get_fdata()).max() > 0


def test_pirads_four_class_metrics_reported(tmp_path):
    """The four-class summary carries every PI-RADS metric of the issue (from a fake evaluation)."""
    task = get_task(_config("cls", "smoke"))
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=12)
    metrics = task.summarize({"probs": probs, "label": np.arange(12) % 4})
    for key in ("auroc_macro", "auroc_ge3", "auroc_ge4", "accuracy", "kappa", "kappa_quadratic", "f1_macro"):
        assert np.isfinite(metrics[key]), key
    assert task.primary_metric == "auroc_macro" and task.direction == "max"


# -- target builders -----------------------------------------------------------------------------------------------

def _sample(shape=(16, 32, 32), channels=3, seed=0, case_index=0, gland=True):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(*shape, channels)).astype(np.float32)
    mask = np.zeros(shape, np.uint8)
    mask[4:12, 8:24, 8:24] = 1
    return {"image": image, "gland": mask if gland else None, "lesion": None, "label": "2",
            "case_index": np.int32(case_index)}


def test_cls_binary_mapping():
    from transfer_jax.tasks.classification import binary_target

    assert binary_target([0, 1, 2, 3]).tolist() == [0, 0, 1, 1]  # PI-RADS >= 4 is csPCa-positive
    four = get_task(_config("cls", "smoke"))
    binary = get_task(_config("cls", "smoke,binary"))
    assert binary.num_classes == 2 and four.num_classes == 4
    for text, four_class, two_class in (("0", 0, 0), ("1", 1, 0), ("2", 2, 1), ("3", 3, 1), ("3.0", 3, 1)):
        sample = dict(_sample(), label=text)
        assert int(four.make_sample(sample)["label"]) == four_class
        assert int(binary.make_sample(sample)["label"]) == two_class
    # task.binary=True works as well as the config argument
    assert get_task(_config("cls", "smoke", **{"task.binary": True})).primary_metric == "auroc"


def test_sr_input_lost_through_plane_detail():
    task = get_task(_config("sr", "smoke"))
    depth = 16
    z = np.arange(depth, dtype=np.float32)
    # fast through-plane oscillation (period 2 slices) on top of an in-plane pattern constant along D
    in_plane = np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32)
    volume = (np.cos(np.pi * z)[:, None, None] + in_plane[None])[..., None].repeat(3, axis=-1)
    out = task.make_sample(dict(_sample(), image=volume))
    assert out["image"].shape == out["target"].shape == volume.shape
    np.testing.assert_array_equal(out["target"], volume)
    through_plane = lambda v: np.abs(np.diff(v, axis=0)).mean()  # noqa: E731
    assert through_plane(out["image"]) < 0.05 * through_plane(volume)
    # the in-plane content (the mean over slices) survives
    np.testing.assert_allclose(out["image"].mean(axis=0), volume.mean(axis=0), atol=1e-5)


def test_synthesis_channel_split():
    task = get_task(_config("synthesis", "smoke"))
    sample = _sample()
    out = task.make_sample(sample)
    image = sample["image"]  # channels (t2, dwi, adc)
    np.testing.assert_array_equal(out["image"][..., :2], image[..., :2])
    assert not out["image"][..., 2].any()  # the ADC slot is zero: the network never sees the answer
    np.testing.assert_array_equal(out["target"], image[..., 2:3])
    assert task.residual is False and task.target_channels == ("adc",)


def test_gland_weighted_l1():
    import jax.numpy as jnp

    from transfer_jax.models.upernet import SegmentationOutput

    rng = np.random.default_rng(0)
    target = rng.normal(size=(2, 4, 5, 6, 1)).astype(np.float32)
    pred = rng.normal(size=target.shape).astype(np.float32)
    mask = (rng.random(target.shape[:-1]) < 0.2).astype(np.uint8)
    batch = {"target": jnp.asarray(target), "mask": jnp.asarray(mask)}
    outputs = SegmentationOutput(logits=jnp.asarray(pred), aux_logits=None)
    error = np.abs(pred - target)[..., 0]
    plain = get_task(_config("synthesis", "smoke", **{"task.gland_loss_weight": 0.0}))
    np.testing.assert_allclose(plain.loss(outputs, batch)[0], error.mean(), rtol=1e-6)
    weighted = get_task(_config("synthesis", "smoke", **{"task.gland_loss_weight": 9.0}))
    weights = 1.0 + 9.0 * mask
    np.testing.assert_allclose(weighted.loss(outputs, batch)[0], (error * weights).sum() / weights.sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="gland_loss_weight"):
        get_task(_config("synthesis", "smoke", **{"task.gland_loss_weight": -1.0}))


def test_distortion_deterministic_per_case_and_keeps_t2():
    task = get_task(_config("distortion", "smoke"))
    sample = _sample(case_index=3)
    first, second = task.make_sample(sample), task.make_sample(dict(sample))
    np.testing.assert_array_equal(first["image"], second["image"])  # same case, same crop: same field
    other = task.make_sample(dict(sample, case_index=np.int32(4)))
    assert not np.array_equal(first["image"], other["image"])
    np.testing.assert_array_equal(first["image"][..., 0], sample["image"][..., 0])  # T2 stays clean
    np.testing.assert_array_equal(first["target"], sample["image"][..., 1:])  # undistorted DWI, ADC
    assert not np.allclose(first["image"][..., 1:], first["target"])


def test_restoration_mask_fallback_without_gland():
    task = get_task(_config("sr", "smoke"))
    out = task.make_sample(_sample(gland=False))
    assert out["mask"].all()  # whole crop when there is no gland mask
    assert task.make_sample(_sample())["mask"].sum() == 8 * 16 * 16


# -- bad task input ------------------------------------------------------------------------------------------------

def _fake_case(**fields):
    values = dict(case_id="caseX", t2="t2.nii.gz", adc="adc.nii.gz", dwi="dwi.nii.gz", split="train",
                  gland_mask="gland.nii.gz", label="1")
    values.update(fields)
    return Case(**values)


@pytest.mark.parametrize("label,fragment", [(None, "empty"), ("", "empty"), ("high", "not a number"),
                                            ("7", "0..3"), ("1.5", "0..3")])
def test_cls_bad_label(label, fragment):
    task = get_task(_config("cls", "smoke"))
    with pytest.raises(DataError) as info:
        task.validate_case(_fake_case(label=label), None)
    message = str(info.value)
    assert "caseX" in message and "'label'" in message and fragment in message, message


def test_cls_bad_label_in_preflight(tmp_path):
    """A manifest row without a usable label stops the run before training, naming the case and the column."""
    from transfer_jax.train.loop import train_and_evaluate

    manifest = tiny_manifest(str(tmp_path / "data"))
    cases = read_manifest(manifest)
    cases[0] = Case(**{**cases[0].__dict__, "label": None})
    cases[1] = Case(**{**cases[1].__dict__, "label": "PI-RADS 4"})
    write_manifest(manifest, cases)
    config = _config("cls", "smoke", **{"data.manifest": manifest})
    with pytest.raises(BadCasesError) as info:
        train_and_evaluate(config, str(tmp_path / "run"))
    message = str(info.value)
    assert cases[0].case_id in message and cases[1].case_id in message and "'label'" in message, message


def test_missing_gland_mask_when_required():
    task = get_task(_config("distortion", "smoke", **{"task.require_gland_mask": True}))

    class Prepared:
        gland = None
        image = np.zeros((2, 2, 2, 3), np.float32)

    with pytest.raises(DataError) as info:
        task.validate_case(_fake_case(gland_mask=None), Prepared())
    assert "caseX" in str(info.value) and "gland_mask" in str(info.value)
    # without the requirement the whole crop is measured instead
    get_task(_config("distortion", "smoke")).validate_case(_fake_case(gland_mask=None), Prepared())


@pytest.mark.parametrize("factor", [3, 5])
def test_sr_factor_must_divide_crop_depth(factor):
    with pytest.raises(ValueError, match=r"task\.sr_factor"):
        get_task(_config("sr", "smoke", **{"task.sr_factor": factor}))  # smoke crop depth 16


def test_sr_factor_must_be_int():
    with pytest.raises(ValueError, match=r"task\.sr_factor"):
        get_task(_config("sr", "smoke", **{"task.sr_factor": 1}))


def test_unknown_channel_names():
    with pytest.raises(ValueError, match=r"task\.distort_channels"):
        get_task(_config("distortion", "smoke", **{"task.distort_channels": ("b2000",)}))
    with pytest.raises(ValueError, match=r"task\.target"):
        get_task(_config("synthesis", "smoke", **{"task.target": "t1"}))


# -- segmentation: HD95 --------------------------------------------------------------------------------------------

def test_segmentation_hd95_from_label_maps():
    task = get_task(_config("seg", "smoke"))
    target = np.zeros((2, 8, 16, 16), np.int8)
    target[:, 2:6, 4:12, 4:12] = 1
    target[0, 3:5, 6:8, 6:8] = 2
    pred = target.copy()
    pred[1, 3:5, 6:8, 6:8] = 2  # case 1: lesion predicted, none in the ground truth -> crop diagonal
    counts = {k: np.zeros((2, 3)) + 1 for k in ("intersection", "pred_sum", "target_sum")}
    metrics = task.summarize({**counts, "pred_labels": pred, "target_labels": target})
    from transfer_jax.tasks.metrics import hausdorff95_per_class

    spacing = np.asarray(task.config.data.spacing)
    gland = [hausdorff95_per_class(p.astype(int), t.astype(int), 3, tuple(spacing))[0] for p, t in zip(pred, target)]
    assert metrics["hd95/gland"] == pytest.approx(np.mean(gland))
    diagonal = float(np.sqrt(((np.asarray(pred.shape[1:]) * spacing) ** 2).sum()))
    assert metrics["hd95/lesion"] == pytest.approx(diagonal / 2)  # mean of 0 (case 0) and the diagonal (case 1)
    assert "dice_mean" in metrics
    off = get_task(_config("seg", "smoke", **{"task.hd95": False}))
    assert off.hd95 is False


# -- every config x backbone x preset builds a model whose output fits the task ------------------------------------

@pytest.mark.parametrize("name", ["cls", "sr", "distortion", "synthesis", "seg"])
@pytest.mark.parametrize("backbone", ["profound_conv", "profound_vit"])
def test_config_presets_build(name, backbone):
    """Abstract (no FLOPs) forward of each preset's model on its crop: the ViT adapter / UPerNet pyramid, the
    classifier width and the output channels line up at smoke, default and full sizes."""
    import jax.numpy as jnp
    from flax import nnx

    for preset in ("default", "full"):  # smoke sizes train in test_task_trains
        config = load_config(name, f"{backbone},{preset}")
        task = get_task(config)
        crop = tuple(config.data.crop_size)

        def forward():
            model = task.build_model(nnx.Rngs(0))
            model.eval()
            return task.forward(model, {"image": jnp.zeros((1, *crop, len(config.data.channels)))}, jnp.float32)

        out = nnx.eval_shape(forward)
        if name == "cls":
            assert out.shape == (1, task.num_classes)
        else:
            channels = task.num_classes if name == "seg" else len(task.target_channels)
            assert out.logits.shape == (1, *crop, channels), (preset, out.logits.shape)
        if backbone == "profound_vit":
            assert tuple(config.model.backbone_options.img_size) == crop
            assert tuple(config.alignment.sites) == ("cls", "mean_patch")
