"""Task heads and label sets of the released checkpoints: ProFound's binary lesion (sigmoid) UPerNet and
ProViCNet's four classes with indolent vs csPCa kept from graded lesion masks, ProFound's 9-class anatomy UPerNet
on [T2, 0, 0]."""
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config_for, write_nifti
from transfer_jax.data.dataset import preprocess_config
from transfer_jax.data.errors import DataError
from transfer_jax.data.manifest import Case
from transfer_jax.data.preprocess import PreprocessConfig, prepare_case
from transfer_jax.models.upernet import SegmentationOutput
from transfer_jax.tasks.registry import get_task
from transfer_jax.tasks.segmentation import sigmoid_dice_ce_loss


def _monai_dice_ce_sigmoid(logits, target, lambda_dice, lambda_ce):
    """numpy transcription of MONAI DiceCELoss(sigmoid=True) on NCDHW arrays with one channel (DiceLoss defaults:
    include_background, squared_pred False, smooth_nr = smooth_dr = 1e-5, mean over (N, C); BCEWithLogits mean)."""
    p = 1.0 / (1.0 + np.exp(-logits))
    axes = tuple(range(2, logits.ndim))
    intersection = np.sum(p * target, axis=axes)
    denominator = np.sum(p, axis=axes) + np.sum(target, axis=axes)
    dice = np.mean(1.0 - (2.0 * intersection + 1e-5) / (denominator + 1e-5))
    bce = np.mean(-(target * np.log(p) + (1.0 - target) * np.log(1.0 - p)))
    return lambda_dice * dice + lambda_ce * bce


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 1.7)])
def test_sigmoid_dice_ce_matches_monai_formula(weights):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(2, 1, 3, 4, 5))  # NCDHW as MONAI sees it
    target = (rng.random((2, 1, 3, 4, 5)) > 0.6).astype(np.float64)
    target[1] = 0.0  # an empty ground truth: Dice 1 - 1e-5 / (sum p + 1e-5), as MONAI
    expected = _monai_dice_ce_sigmoid(logits, target, *weights)
    # ours: channels-last logits (N, D, H, W, 1) and an integer label map (N, D, H, W); labels > 0 are foreground
    labels = (target[:, 0] * rng.integers(1, 4, size=target[:, 0].shape)).astype(np.int32)
    got = sigmoid_dice_ce_loss(jnp.asarray(np.moveaxis(logits, 1, -1), jnp.float32), jnp.asarray(labels),
                               lambda_dice=weights[0], lambda_ce=weights[1])
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_lesion_variant_builds_a_one_channel_sigmoid_head():
    config = config_for("seg", "lesion,smoke")
    assert (config.task.activation, tuple(config.task.classes), config.task.threshold) == ("sigmoid", ("lesion",), 0.5)
    task = get_task(config)
    assert task.out_channels == 1 and task.class_names == ("background", "lesion")
    assert config_for("seg", "smoke,lesion").task.activation == "sigmoid"  # the variant may come anywhere
    assert config_for("seg", "smoke").task.activation == "softmax"


def test_sigmoid_head_thresholds_predictions_and_scores_dice():
    task = get_task(config_for("seg", "lesion,smoke"))
    logits = np.array([-3.0, -0.1, 0.1, 2.0, 0.0], np.float32).reshape(1, 5, 1, 1, 1)
    np.testing.assert_array_equal(task.predicted_labels(logits).ravel(), [0, 0, 1, 1, 0])  # sigmoid(0) = 0.5
    probs = task.probabilities(logits)
    assert probs.shape == (1, 5, 1, 1, 2)
    np.testing.assert_allclose(probs[..., 1].ravel(), 1 / (1 + np.exp(-logits.ravel())), rtol=1e-6)
    labels = np.array([0, 1, 1, 0, 0], np.int32).reshape(1, 5, 1, 1)
    stats = task.eval_stats(SegmentationOutput(jnp.asarray(logits), None), {"label": jnp.asarray(labels)})
    metrics = task.summarize({k: np.asarray(v) for k, v in stats.items()})
    assert metrics["dice/lesion"] == pytest.approx(2 * 1 / (2 + 2))  # P = {2, 3}, G = {1, 2}
    strict = get_task(config_for("seg", "lesion,smoke", **{"task.threshold": 0.9}))
    np.testing.assert_array_equal(strict.predicted_labels(logits).ravel(), [0, 0, 0, 0, 0])  # sigmoid(2) < 0.9


def test_sigmoid_head_loss_adds_the_auxiliary_term():
    task = get_task(config_for("seg", "lesion,smoke"))
    rng = np.random.default_rng(1)
    main = jnp.asarray(rng.normal(size=(1, 2, 3, 3, 1)), jnp.float32)
    aux = jnp.asarray(rng.normal(size=(1, 2, 3, 3, 1)), jnp.float32)
    label = jnp.asarray(rng.integers(0, 2, size=(1, 2, 3, 3)), jnp.int32)
    total, metrics = task.loss(SegmentationOutput(main, aux), {"label": label})
    expected = sigmoid_dice_ce_loss(main, label) + 0.4 * sigmoid_dice_ce_loss(aux, label)
    np.testing.assert_allclose(float(total), float(expected), rtol=1e-6)


@pytest.mark.parametrize("overrides,fragment", [
    ({"task.activation": "sigmoid"}, "must name one class"),  # gland + lesion on a binary head
    ({"task.activation": "tanh"}, "task.activation must be one of"),
    ({"task.threshold": 1.0}, "task.threshold must be in (0, 1)"),
])
def test_bad_head_options(overrides, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        get_task(config_for("seg", "smoke", **overrides))



# -- graded lesion masks: ProViCNet's indolent vs csPCa ----------------------------------------------------------

def test_graded_lesion_mask_keeps_its_values(tmp_path):
    image = write_nifti(str(tmp_path / "t2.nii.gz"), np.ones((8, 8, 4), np.float32))
    grades = np.zeros((8, 8, 4), np.uint8)
    grades[1:3, 1:3, 1:3], grades[5:7, 5:7, 1:3], grades[1:3, 5:7, 0] = 1, 4, 6
    lesion = write_nifti(str(tmp_path / "lesion.nii.gz"), grades, dtype=np.uint8)
    case = Case(case_id="graded", t2=image, adc=image, dwi=image, split="train", lesion_mask=lesion)
    base = dict(spacing=None, crop_size=(4, 8, 8), region_margin=1.0, lesion_labels=(1, 2, 3, 4, 5),
                lesion_background_labels=(6,))
    graded = prepare_case(case, PreprocessConfig(**base, graded_masks=("lesion",))).lesion
    # arrays are (D, H, W) = NIfTI (k, j, i)
    assert graded[1:3, 1:3, 1:3].min() == 1 and graded[1:3, 5:7, 5:7].min() == 4
    assert sorted(np.unique(graded).tolist()) == [0, 1, 4]  # the background grade 6 is 0
    binary = prepare_case(case, PreprocessConfig(**base)).lesion
    np.testing.assert_array_equal(binary, graded > 0)
    assert binary.max() == 1


def test_graded_masks_config_is_checked():
    config = config_for("seg", "provicnet,smoke,graded")
    assert preprocess_config(config.data).graded_masks == ("lesion",)
    config.data.graded_masks = ("prostate",)
    with pytest.raises(DataError, match=r"data.graded_masks \('prostate',\): expected names among"):
        preprocess_config(config.data)
    with pytest.raises(ValueError, match="expected at most one of"):
        config_for("seg", "smoke,graded")


def _provicnet_sample(lesion):
    depth, size = lesion.shape[0], lesion.shape[1]
    gland = np.zeros(lesion.shape, np.uint8)
    gland[:, 16:48, 16:48] = 1
    image = np.random.default_rng(0).normal(size=lesion.shape + (3,)).astype(np.float32) + 2.0 * gland[..., None]
    return {"image": image, "gland": gland, "lesion": lesion, "label": "0", "case_index": np.int32(0)}


@pytest.mark.parametrize("arg,indolent_as_cspca,expected", [
    ("provicnet,smoke,graded", False, (1, 2, 3, 3)),  # upstream: 1 indolent, >= 2 (ISUP 2..5) csPCa
    ("provicnet,smoke,graded", True, (1, 3, 3, 3)),  # upstream's PI-CAI rule: 1 counts as csPCa
    ("provicnet,smoke", False, (1, 3, 3, 3)),  # binary masks: every lesion is csPCa, as before
])
def test_provicnet_labels_from_graded_lesions(arg, indolent_as_cspca, expected):
    task = get_task(config_for("seg", arg, **{"task.indolent_as_cspca": indolent_as_cspca}))
    size = task.label_size
    lesion = np.zeros((4, size, size), np.uint8)
    lesion[:, 20:24, 20:24], lesion[:, 30:34, 30:34], lesion[:, 40:44, 40:44] = 1, 2, 5
    if "graded" not in arg:
        lesion = (lesion > 0).astype(np.uint8)  # what preprocessing hands over without data.graded_masks
    label = task.make_sample(_provicnet_sample(lesion))["label"]
    assert label.shape == (4, size, size)
    got = (label[1, 18, 18], label[1, 21, 21], label[1, 31, 31], label[1, 41, 41])  # gland, grade 1, 2, 5
    assert tuple(int(v) for v in got) == expected
    assert label[1, 2, 2] == 0



# -- anatomy: 9 classes from T2 only ------------------------------------------------------------------------------

def test_anatomy_variant_sees_t2_only_and_predicts_the_argmax():
    task = get_task(config_for("seg", "anatomy,smoke"))
    assert task.name == "anatomy_segmentation" and task.out_channels == task.num_classes == 9
    image = np.random.default_rng(0).normal(size=(1, 2, 3, 3, 3)).astype(np.float32) + 1.0
    seen = task.forward(lambda x: x, {"image": jnp.asarray(image)}, jnp.float32)  # the model's input
    np.testing.assert_array_equal(np.asarray(seen[..., 0]), image[..., 0])
    assert not np.asarray(seen[..., 1:]).any()  # [T2, 0, 0], as upstream
    assert not task.probe_inputs(image)[..., 1:].any()
    logits = np.random.default_rng(1).normal(size=(2, 3, 4, 5, 9)).astype(np.float32)
    np.testing.assert_array_equal(task.predicted_labels(logits), logits.argmax(-1))
    gland = np.arange(8, dtype=np.uint8).reshape(2, 2, 2) + 1
    label = task.make_sample({"image": image[0, :2, :2, :2], "gland": gland})["label"]
    np.testing.assert_array_equal(label, gland)  # the graded gland mask's value is the class


@pytest.mark.parametrize("overrides,fragment", [
    ({"data.graded_masks": ()}, "set data.graded_masks"),
    ({"data.gland_labels": (1, 2)}, "must list the label values"),
    ({"task.input_channels": ("t1",)}, "task.input_channels"),
    ({"task.activation": "sigmoid"}, "one-channel"),
])
def test_bad_anatomy_options(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        get_task(config_for("seg", "anatomy,smoke", **overrides))



# -- TRUS: 9-slice stacks through the ChannelReducer ----------------------------------------------------------------

def test_trus_variant_stacks_nine_slices_through_the_reducer():
    from flax import nnx

    config = config_for("seg", "provicnet,smoke,trus,graded")
    assert config.data.graded_masks == ("lesion",) and config.task.edge == "clamp"  # 4-slice smoke crops
    task = get_task(config)
    size = task.label_size
    sample = _provicnet_sample(np.zeros((4, size, size), np.uint8))
    sample["image"][..., 0] = np.arange(4, dtype=np.float32)[:, None, None] * sample["gland"]  # slice index in gland
    row = task.make_sample(sample)
    assert row["image"].shape == (4, task.image_size, task.image_size, 9)
    centre = task.image_size // 2
    # gland z-score is monotone in the slice index: stack 1 (clamped at the edges) holds slices 0,0,0,0,1,2,3,3,3
    stack = row["image"][1, centre, centre]
    assert np.all(np.diff(stack) >= 0) and len(np.unique(np.round(stack, 4))) == 4
    np.testing.assert_allclose(stack[:4], stack[0])
    np.testing.assert_allclose(stack[6:], stack[8])
    model = task.build_model(nnx.Rngs(0))
    batch = {k: jnp.asarray(v)[None] for k, v in row.items()}
    outputs = task.forward(model, batch, jnp.float32)
    assert outputs.logits.shape == (4, size, size, 4)
    grads = nnx.grad(lambda m: task.loss(task.forward(m, batch, jnp.float32), batch)[0])(model)
    reducer = grads["ChannelReducer"]["reduce_channels"]["kernel"][...]
    assert reducer.shape == (1, 1, 9, 3) and np.abs(np.asarray(reducer)).sum() > 0  # the reducer is trained


def test_trus_edge_rule_needs_eighteen_slices():
    with pytest.raises(ValueError, match=r"at least 18 slices per crop \(9-slice stacks\)"):
        get_task(config_for("seg", "provicnet,smoke,trus", **{"task.edge": "shift", "data.crop_size": (16, 64, 64)}))


def _train_three_steps(variant: str, workdir) -> dict:
    """The summary of a 3-step smoke run of a seg.py variant on one fixed batch."""
    from helpers import fixed_training_batch
    from transfer_jax.train.loop import train_and_evaluate

    config = fixed_training_batch(config_for("seg", variant), total_steps=3)
    config.model.head_options.pool_scales = (1, 2)
    config.alignment.enabled = False
    return train_and_evaluate(config, str(workdir))


@pytest.mark.slow
def test_lesion_head_trains_and_predicts_a_binary_map(tmp_path):
    import nibabel as nib

    from transfer_jax.data.manifest import read_manifest
    from transfer_jax.predict import main

    summary = _train_three_steps("lesion,smoke", tmp_path)
    assert np.isfinite(summary["final"]["dice_mean"]) and "dice/gland" not in summary["final"]
    output = tmp_path / "predictions"
    main(["--workdir", str(tmp_path), "--manifest", summary["manifest"], "--output", str(output),
          "--save_probabilities"])
    case = read_manifest(summary["manifest"])[0]
    labels = nib.load(str(output / f"{case.case_id}_seg.nii.gz")).get_fdata()
    assert set(np.unique(labels)) <= {0.0, 1.0}
    probs = nib.load(str(output / f"{case.case_id}_probabilities.nii.gz")).get_fdata()
    assert probs.shape == labels.shape + (2,)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, atol=1e-4)


@pytest.mark.slow
def test_anatomy_head_trains_on_graded_gland_labels(tmp_path):
    summary = _train_three_steps("anatomy,smoke", tmp_path)
    final = summary["final"]
    assert summary["task"] == "anatomy_segmentation"
    assert np.isfinite(final["dice/structure_1"]) and np.isnan(final["dice/structure_8"])  # the phantom: label 1
