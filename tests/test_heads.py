"""Task heads for the released checkpoints: the binary lesion (sigmoid) head of ProFound's lesion UPerNet."""
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import config_for
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
