"""Evaluation metrics of the downstream tasks, each with its exact definition.

Three families, with the conventions of the references the upstream code used:

* **Segmentation surface distances** (numpy/scipy, host side, one case at a time): MONAI
  ``compute_hausdorff_distance(percentile=95)`` and ``compute_average_surface_distance`` semantics - surfaces are
  the voxels of a mask that have a face neighbour outside it, distances come from Euclidean distance transforms
  with the voxel spacing in mm.
* **Classification** (numpy, host side, over a whole evaluation set): scikit-learn semantics (``roc_auc_score``,
  ``cohen_kappa_score``, ``f1_score(average="macro", zero_division=0)``, ``accuracy_score``), with degenerate inputs
  (one class only, constant raters, non-finite scores) giving ``nan`` instead of raising, so a diverged model or a
  tiny validation split never stops an evaluation.
* **Restoration / synthesis image quality** (jax.numpy, jittable, one value per batch element, optionally restricted
  to a mask such as the gland): PSNR, MAE and a Gaussian-window SSIM in 3-D (or 2-D per slice via ``axes``).

Every argument error is a ``ValueError`` that names the argument and says what was expected.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage, stats

# ---------------------------------------------------------------------------------------------------------------
# Segmentation: surface distances (numpy / scipy)
# ---------------------------------------------------------------------------------------------------------------


def _as_mask(mask, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype != bool:
        if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
            raise ValueError(f"{name} must be a boolean (or 0/1 numeric) mask, got dtype {array.dtype}")
        array = array != 0
    if array.ndim == 0:
        raise ValueError(f"{name} must be an N-D mask, got a scalar")
    return array


def _as_spacing(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=float)))
    if len(values) != ndim:
        raise ValueError(f"spacing must have one entry per axis ({ndim}), got {spacing!r}")
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be finite and positive (mm per voxel), got {spacing!r}")
    return values


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """The edge of a binary mask: voxels of ``mask`` with at least one face (6-connected in 3-D) neighbour outside it.

    ``mask & ~binary_erosion(mask)`` with scipy's default cross-shaped structuring element and voxels beyond the
    array counting as background - exactly MONAI's voxel-based ``get_mask_edges`` (whose crop to the foreground box
    with a margin of 1 changes nothing, as the erosion already treats the outside as background).
    """
    mask = _as_mask(mask, "mask")
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _foreground_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Bounding box of the foreground grown by one voxel (clipped to the array), for cheaper distance transforms."""
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        occupied = np.flatnonzero(mask.any(axis=other_axes))
        box.append(slice(max(int(occupied[0]) - 1, 0), min(int(occupied[-1]) + 2, mask.shape[axis])))
    return tuple(box)


def _directed_distances(from_surface: np.ndarray, to_surface: np.ndarray, spacing) -> np.ndarray:
    """For every voxel of ``from_surface``, the Euclidean distance in mm to the nearest voxel of ``to_surface``."""
    # distance_transform_edt measures, for each non-zero voxel, the distance to the nearest zero voxel.
    distance_to_target = ndimage.distance_transform_edt(~to_surface, sampling=spacing)
    return distance_to_target[from_surface]


def _surface_distances(pred, target, spacing) -> tuple[np.ndarray, np.ndarray] | None:
    """(pred edge -> target edge, target edge -> pred edge) distances in mm; None when either mask is empty."""
    pred = _as_mask(pred, "pred")
    target = _as_mask(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}")
    spacing = _as_spacing(spacing, pred.ndim)
    if not pred.any() or not target.any():
        return None
    # Both point sets lie inside the union's bounding box, so cropping to it (plus a background margin of one voxel
    # so that surfaces stay where they are) leaves every distance unchanged and makes the transforms much cheaper.
    box = _foreground_box(pred | target)
    pred_edge, target_edge = surface_voxels(pred[box]), surface_voxels(target[box])
    return (_directed_distances(pred_edge, target_edge, spacing),
            _directed_distances(target_edge, pred_edge, spacing))


def _empty_case_value(pred, target) -> float:
    """MONAI's convention: both masks empty -> nan (nothing to measure); exactly one empty -> inf."""
    return float("nan") if not np.any(pred) and not np.any(target) else float("inf")


def hausdorff_distance(pred, target, spacing: Sequence[float] | None = None,
                       percentile: float | None = 95.0) -> float:
    """Symmetric (percentile) Hausdorff distance between two binary masks, in mm.

    ``max(q(d(P -> T)), q(d(T -> P)))`` where ``d(A -> B)`` are the Euclidean distances (with ``spacing``, mm per
    voxel along each axis) from every surface voxel of A (:func:`surface_voxels`) to the nearest surface voxel of B,
    and ``q`` is the ``percentile``-th percentile with linear interpolation (``np.percentile``, like
    ``torch.quantile``), or the maximum when ``percentile`` is None (classic Hausdorff distance). This is MONAI's
    ``compute_hausdorff_distance(include_background=True, percentile=percentile, directed=False, spacing=spacing)``
    for one case and one class.

    ``percentile=0`` is the minimum here (MONAI's ``if not percentile`` turns 0 into the maximum).

    Empty masks: both empty -> ``nan``; exactly one empty -> ``inf`` (as MONAI). Callers averaging over cases should
    skip ``nan`` and decide how to treat ``inf`` (a missed or hallucinated structure).
    """
    if percentile is not None and not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100] or None, got {percentile!r}")
    distances = _surface_distances(pred, target, spacing)
    if distances is None:
        return _empty_case_value(pred, target)
    if percentile is None:
        return float(max(d.max() for d in distances))
    return float(max(np.percentile(d, percentile) for d in distances))


def hausdorff95(pred, target, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile Hausdorff distance (HD95) in mm; see :func:`hausdorff_distance` for the exact definition."""
    return hausdorff_distance(pred, target, spacing, percentile=95.0)


def average_surface_distance(pred, target, spacing: Sequence[float] | None = None, symmetric: bool = False) -> float:
    """Average surface distance in mm, MONAI ``compute_average_surface_distance`` semantics.

    ``mean(d(P -> T))`` (MONAI's default, ``symmetric=False``), or with ``symmetric=True`` the mean of the
    concatenated ``d(P -> T)`` and ``d(T -> P)``. Same empty-mask convention as :func:`hausdorff_distance`.
    """
    distances = _surface_distances(pred, target, spacing)
    if distances is None:
        return _empty_case_value(pred, target)
    used = np.concatenate(distances) if symmetric else distances[0]
    return float(used.mean())


def _as_label_map(labels, name: str, num_classes: int) -> np.ndarray:
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label map, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"{name} values must lie in [0, {num_classes}), got range [{array.min()}, {array.max()}]")
    return array


def _per_class(metric, pred_labels, target_labels, num_classes: int, include_background: bool) -> np.ndarray:
    num_classes = _check_num_classes(num_classes)
    pred_labels = _as_label_map(pred_labels, "pred_labels", num_classes)
    target_labels = _as_label_map(target_labels, "target_labels", num_classes)
    if pred_labels.shape != target_labels.shape:
        raise ValueError(f"pred_labels and target_labels must have the same shape, "
                         f"got {pred_labels.shape} and {target_labels.shape}")
    first = 0 if include_background else 1
    return np.array([metric(pred_labels == k, target_labels == k) for k in range(first, num_classes)],
                    dtype=np.float64)


def hausdorff95_per_class(pred_labels, target_labels, num_classes: int, spacing: Sequence[float] | None = None,
                          include_background: bool = False) -> np.ndarray:
    """HD95 (mm) of every class of two integer label maps of one case: shape ``(num_classes - 1,)`` or, with
    ``include_background``, ``(num_classes,)``; entry ``k`` compares ``pred_labels == c`` with ``target_labels == c``
    for the ``k``-th class ``c`` used. A class absent from both maps gives ``nan`` (MONAI; skip it when averaging),
    a class present in only one of them ``inf``.
    """
    return _per_class(lambda p, t: hausdorff95(p, t, spacing), pred_labels, target_labels, num_classes,
                      include_background)


def average_surface_distance_per_class(pred_labels, target_labels, num_classes: int,
                                       spacing: Sequence[float] | None = None, include_background: bool = False,
                                       symmetric: bool = False) -> np.ndarray:
    """:func:`average_surface_distance` per class, laid out like :func:`hausdorff95_per_class`."""
    return _per_class(lambda p, t: average_surface_distance(p, t, spacing, symmetric), pred_labels, target_labels,
                      num_classes, include_background)


# ---------------------------------------------------------------------------------------------------------------
# Classification (numpy)
# ---------------------------------------------------------------------------------------------------------------


def _as_class_vector(values, name: str, num_classes: int | None = None) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector of class indices, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.int64)
    if not np.issubdtype(array.dtype, np.integer):
        if not (np.issubdtype(array.dtype, np.floating) and np.all(array == np.round(array))):
            raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must hold non-negative class indices, got minimum {array.min()}")
    if num_classes is not None and array.size and array.max() >= num_classes:
        raise ValueError(f"{name} must hold class indices in [0, {num_classes}), got maximum {array.max()}")
    return array.astype(np.int64)


def _check_num_classes(num_classes) -> int:
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same length, got {a.shape[0]} and {b.shape[0]}")


def accuracy(pred, labels) -> float:
    """Fraction of ``pred == labels`` (class indices); ``nan`` for an empty set."""
    pred, labels = _as_class_vector(pred, "pred"), _as_class_vector(labels, "labels")
    _same_length(pred, labels, "pred", "labels")
    return float(np.mean(pred == labels)) if pred.size else float("nan")


def confusion_matrix(pred, labels, num_classes: int) -> np.ndarray:
    """``C[i, j]`` = number of samples with ``labels == i`` and ``pred == j`` (sklearn's orientation), int64."""
    num_classes = _check_num_classes(num_classes)
    pred = _as_class_vector(pred, "pred", num_classes)
    labels = _as_class_vector(labels, "labels", num_classes)
    _same_length(pred, labels, "pred", "labels")
    return np.bincount(labels * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _scorable_binary(scores, labels) -> tuple[np.ndarray, np.ndarray] | None:
    """Validated ``(scores float64, labels 0/1)``, or None when no ROC exists (one class only, an empty set, or a
    ``nan`` score)."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = _as_class_vector(labels, "labels")
    if scores.ndim != 1:
        raise ValueError(f"scores must be a 1-D vector, got shape {scores.shape}")
    _same_length(scores, labels, "scores", "labels")
    if labels.size and labels.max() > 1:
        raise ValueError(f"labels must be binary (0/1), got values {np.unique(labels).tolist()}")
    if labels.sum() in (0, labels.size) or np.isnan(scores).any():
        return None
    return scores, labels


def auroc_binary(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for ``labels`` in {0, 1}, by ranks (Mann-Whitney U).

    ``AUC = (sum of the ranks of the positives - P (P + 1) / 2) / (P N)`` with 1-based ranks of all scores, tied
    scores sharing their average rank, P positives and N negatives: the probability that a random positive scores
    higher than a random negative, ties counting one half - equal to ``sklearn.metrics.roc_auc_score``.

    Degenerate inputs give ``nan`` (sklearn raises): labels of one class only, an empty set, or any ``nan`` score.
    """
    checked = _scorable_binary(scores, labels)
    if checked is None:
        return float("nan")
    scores, labels = checked
    positive = labels == 1
    num_positive = int(positive.sum())
    num_negative = labels.size - num_positive
    ranks = stats.rankdata(scores, method="average")
    u_statistic = ranks[positive].sum() - num_positive * (num_positive + 1) / 2.0
    return float(u_statistic / (num_positive * num_negative))


def average_precision(scores, labels) -> float:
    """Average precision of ``scores`` for ``labels`` in {0, 1}: ``sum_n (R_n - R_(n-1)) P_n`` over the thresholds
    ``score >= t`` at every distinct score, from the highest down (recall ``R``, precision ``P``; tied scores enter
    together) - ``sklearn.metrics.average_precision_score``. ``nan`` without a positive label, for an empty set or
    a ``nan`` score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = _as_class_vector(labels, "labels", 2)
    if scores.ndim != 1:
        raise ValueError(f"scores must be a 1-D vector, got shape {scores.shape}")
    _same_length(scores, labels, "scores", "labels")
    if labels.sum() == 0 or np.isnan(scores).any():
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    run_ends = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), sorted_scores.size - 1]
    true_positive = np.cumsum(sorted_labels)[run_ends]
    precision = true_positive / (run_ends + 1.0)
    recall = true_positive / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _as_probabilities(probs, name: str = "probs") -> np.ndarray:
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] < 2:
        raise ValueError(f"{name} must have shape (N, K) with K >= 2 classes, got {array.shape}")
    return array


def auroc_ovr_macro(probs, labels) -> float:
    """One-vs-rest macro AUC: the mean over classes ``k`` of ``auroc_binary(probs[:, k], labels == k)``.

    Equal to ``roc_auc_score(labels, probs, multi_class="ovr", average="macro")`` whenever every class occurs in
    ``labels`` (sklearn then requires rows summing to 1; here any per-class scores are accepted). A class absent from
    ``labels`` has no one-vs-rest AUC and is skipped (sklearn raises); ``nan`` when no class can be scored (fewer
    than two classes present, or ``nan`` scores).
    """
    probs = _as_probabilities(probs)
    labels = _as_class_vector(labels, "labels", probs.shape[1])
    _same_length(probs, labels, "probs", "labels")
    per_class = [auroc_binary(probs[:, k], (labels == k).astype(np.int64)) for k in range(probs.shape[1])]
    scored = [value for value in per_class if np.isfinite(value)]
    return float(np.mean(scored)) if scored else float("nan")


_KAPPA_WEIGHTS = (None, "linear", "quadratic")


def cohen_kappa(a, b, num_classes: int, weights: str | None = None) -> float:
    """Cohen's kappa between two ratings (class indices in ``[0, num_classes)``), optionally weighted.

    With the confusion matrix ``O`` (counts), the chance matrix ``E = outer(O.sum(1), O.sum(0)) / O.sum()`` and the
    disagreement weights ``w_ij = [i != j]`` (``weights=None``), ``|i - j|`` ("linear") or ``(i - j)^2``
    ("quadratic"): ``kappa = 1 - sum(w * O) / sum(w * E)``. Symmetric in ``a`` and ``b``.

    Equal to ``sklearn.metrics.cohen_kappa_score(a, b, labels=range(num_classes), weights=weights)``; without
    ``labels`` sklearn weights by position among the classes that occur, which differs from this only for weighted
    kappa when a class in the middle of the scale is absent from both ratings. ``nan`` when ``sum(w * E) == 0``
    (e.g. both raters always give the same single class) or the set is empty.
    """
    if weights not in _KAPPA_WEIGHTS:
        raise ValueError(f"weights must be one of {_KAPPA_WEIGHTS}, got {weights!r}")
    num_classes = _check_num_classes(num_classes)
    a = _as_class_vector(a, "a", num_classes)
    b = _as_class_vector(b, "b", num_classes)
    _same_length(a, b, "a", "b")
    observed = confusion_matrix(b, a, num_classes).astype(np.float64)
    total = observed.sum()
    if total == 0:
        return float("nan")
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / total
    i, j = np.indices(observed.shape)
    if weights is None:
        disagreement = (i != j).astype(np.float64)
    elif weights == "linear":
        disagreement = np.abs(i - j).astype(np.float64)
    else:
        disagreement = ((i - j) ** 2).astype(np.float64)
    chance = float((disagreement * expected).sum())
    if chance == 0.0:
        return float("nan")
    return float(1.0 - (disagreement * observed).sum() / chance)


def f1_per_class(pred, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F1 ``2 TP / (2 TP + FP + FN)`` (0 when the denominator is 0) and a mask of the classes that occur in
    ``labels`` or ``pred``."""
    counts = confusion_matrix(pred, labels, num_classes)
    true_positive = np.diag(counts).astype(np.float64)
    support_true, support_pred = counts.sum(axis=1), counts.sum(axis=0)
    denominator = support_true + support_pred  # = 2 TP + FN + FP
    f1 = np.divide(2.0 * true_positive, denominator, out=np.zeros(num_classes), where=denominator > 0)
    return f1, denominator > 0


def f1_macro(pred, labels, num_classes: int) -> float:
    """Macro F1: the unweighted mean of the per-class F1 over the classes occurring in ``labels`` or ``pred``.

    Equal to ``sklearn.metrics.f1_score(labels, pred, average="macro", zero_division=0)`` (sklearn's default
    ``labels=None`` also averages over the classes present in either vector, so a class absent from the evaluation
    set is not counted as a zero). A present class with no true positives scores 0. ``nan`` for an empty set.
    """
    f1, present = f1_per_class(pred, labels, num_classes)
    return float(f1[present].mean()) if present.any() else float("nan")


def _roc_operating_points(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sensitivity, specificity) for every threshold ``t`` of the rule ``score >= t``: each distinct score and +inf."""
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # The last position of each run of tied scores: all tied samples switch to positive together.
    run_ends = np.r_[np.flatnonzero(np.diff(sorted_scores) != 0), sorted_scores.size - 1]
    true_positive = np.r_[0, np.cumsum(sorted_labels)[run_ends]]
    false_positive = np.r_[0, np.cumsum(1 - sorted_labels)[run_ends]]
    num_positive, num_negative = labels.sum(), labels.size - labels.sum()
    return true_positive / num_positive, 1.0 - false_positive / num_negative


def _best_operating_point(scores, labels, minimum: float, name: str, *, floor_on: str) -> float:
    """The highest specificity (``floor_on='sensitivity'``) or sensitivity (``floor_on='specificity'``) over the ROC
    operating points whose other rate is at least ``minimum``; ``nan`` when no ROC exists."""
    if not 0.0 <= minimum <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {minimum!r}")
    checked = _scorable_binary(scores, labels)
    if checked is None:
        return float("nan")
    sensitivity, specificity = _roc_operating_points(*checked)
    floored, maximised = (sensitivity, specificity) if floor_on == "sensitivity" else (specificity, sensitivity)
    # The lowest score's threshold has sensitivity 1 and the +inf one specificity 1: the feasible set is never empty.
    return float(maximised[floored >= minimum].max())


def specificity_at_sensitivity(scores, labels, min_sensitivity: float) -> float:
    """Highest specificity over the ROC operating points whose sensitivity is at least ``min_sensitivity``
    (torchmetrics ``BinarySpecificityAtSensitivity``); ``nan`` when ``labels`` hold one class or scores are nan."""
    return _best_operating_point(scores, labels, min_sensitivity, "min_sensitivity", floor_on="sensitivity")


def sensitivity_at_specificity(scores, labels, min_specificity: float) -> float:
    """Highest sensitivity over the ROC operating points whose specificity is at least ``min_specificity``
    (torchmetrics ``BinarySensitivityAtSpecificity``); ``nan`` when ``labels`` hold one class or scores are nan."""
    return _best_operating_point(scores, labels, min_specificity, "min_specificity", floor_on="specificity")


BINARY_METRIC_KEYS = ("auroc", "accuracy", "f1", "kappa", "spec_at_sens80", "spec_at_sens90", "sens_at_spec80",
                      "sens_at_spec90")


def binary_metrics(prob_positive, labels, threshold: float = 0.5) -> dict[str, float]:
    """Metrics of a binary classifier from its positive-class probability (or any score) and labels in {0, 1}.

    * ``auroc``: :func:`auroc_binary` of the scores;
    * ``accuracy``, ``f1``, ``kappa``: of the hard prediction ``prob_positive > threshold`` (strict, like
      torchmetrics and like argmax over two softmax outputs, which picks class 0 on a tie); ``f1`` is the F1 of the
      positive class (``sklearn.metrics.f1_score``, ``zero_division=0``), ``kappa`` the unweighted Cohen's kappa;
    * ``spec_at_sens80``, ``spec_at_sens90``, ``sens_at_spec80``, ``sens_at_spec90``: the operating points the
      upstream PI-RADS evaluation reports (:func:`specificity_at_sensitivity`, :func:`sensitivity_at_specificity`).

    Every value is ``nan`` when a score is not finite or the set is empty; the threshold-free metrics are ``nan``
    when the labels hold a single class.
    """
    scores = np.asarray(prob_positive, dtype=np.float64)
    labels = _as_class_vector(labels, "labels", 2)
    if scores.ndim != 1:
        raise ValueError(f"prob_positive must be a 1-D vector, got shape {scores.shape}")
    _same_length(scores, labels, "prob_positive", "labels")
    if scores.size == 0 or not np.isfinite(scores).all():
        return dict.fromkeys(BINARY_METRIC_KEYS, float("nan"))
    pred = (scores > threshold).astype(np.int64)
    f1, _ = f1_per_class(pred, labels, 2)
    return {
        "auroc": auroc_binary(scores, labels),
        "accuracy": accuracy(pred, labels),
        "f1": float(f1[1]),
        "kappa": cohen_kappa(pred, labels, 2),
        "spec_at_sens80": specificity_at_sensitivity(scores, labels, 0.8),
        "spec_at_sens90": specificity_at_sensitivity(scores, labels, 0.9),
        "sens_at_spec80": sensitivity_at_specificity(scores, labels, 0.8),
        "sens_at_spec90": sensitivity_at_specificity(scores, labels, 0.9),
    }


PIRADS_NUM_CLASSES = 4  # PI-RADS 2..5 stored as 0..3 (upstream target = pirads - 2)


def pirads_metrics(probs, labels) -> dict[str, float]:
    """PI-RADS risk classification metrics from softmax outputs ``probs`` (N, 4) and labels in 0..3 (PI-RADS - 2).

    Four-class, on ``argmax(probs)``: ``accuracy``, ``kappa`` (unweighted Cohen's kappa - what upstream logs as
    "qwk"), ``kappa_quadratic`` (the actual quadratic-weighted kappa), ``f1_macro``; and ``auroc_macro``
    (:func:`auroc_ovr_macro` on the probabilities).

    Binary splits as upstream: PI-RADS >= 3 with score ``p = sum(probs[:, 1:])`` and label ``labels >= 1``;
    PI-RADS >= 4 with ``p = sum(probs[:, 2:])`` and label ``labels >= 2``. For each, every key of
    :func:`binary_metrics` with the suffix ``_ge3`` / ``_ge4`` (``auroc_ge3``, ``f1_ge3``, ``spec_at_sens80_ge3``...).

    Degenerate sets give ``nan`` for the affected metrics (see the individual functions); non-finite probabilities
    make every metric ``nan``.
    """
    probs = _as_probabilities(probs)
    if probs.shape[1] != PIRADS_NUM_CLASSES:
        raise ValueError(f"probs must have {PIRADS_NUM_CLASSES} columns (PI-RADS 2..5), got shape {probs.shape}")
    labels = _as_class_vector(labels, "labels", PIRADS_NUM_CLASSES)
    _same_length(probs, labels, "probs", "labels")
    splits = {"ge3": 1, "ge4": 2}
    if labels.size == 0 or not np.isfinite(probs).all():
        keys = ["accuracy", "auroc_macro", "kappa", "kappa_quadratic", "f1_macro"]
        keys += [f"{key}_{name}" for name in splits for key in BINARY_METRIC_KEYS]
        return dict.fromkeys(keys, float("nan"))
    pred = probs.argmax(axis=1)
    metrics = {
        "accuracy": accuracy(pred, labels),
        "auroc_macro": auroc_ovr_macro(probs, labels),
        "kappa": cohen_kappa(pred, labels, PIRADS_NUM_CLASSES),
        "kappa_quadratic": cohen_kappa(pred, labels, PIRADS_NUM_CLASSES, weights="quadratic"),
        "f1_macro": f1_macro(pred, labels, PIRADS_NUM_CLASSES),
    }
    for name, first_class in splits.items():
        binary = binary_metrics(probs[:, first_class:].sum(axis=1), (labels >= first_class).astype(np.int64))
        metrics.update({f"{key}_{name}": value for key, value in binary.items()})
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Restoration / synthesis image quality (jax.numpy, jittable)
# ---------------------------------------------------------------------------------------------------------------


def _check_pair(pred: jax.Array, target: jax.Array) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {pred.shape} and {target.shape}")
    if pred.ndim < 2:
        raise ValueError(f"pred must have a leading batch axis and at least one more axis, got shape {pred.shape}")


def _mask_weights(mask, shape: tuple[int, ...]) -> jax.Array:
    """The mask as float weights of ``shape``; a mask without the trailing channel axis is broadcast over it."""
    if mask is None:
        return jnp.ones(shape, jnp.float32)
    mask = jnp.asarray(mask)
    if mask.ndim == len(shape) - 1 and mask.shape == shape[:-1]:
        mask = mask[..., None]
    try:
        return jnp.broadcast_to(mask, shape).astype(jnp.float32)
    except ValueError:
        raise ValueError(f"mask must broadcast to the image shape {shape} (it keeps the batch axis and may omit the "
                         f"channel axis), got {mask.shape}") from None


def _per_sample_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    """Weighted mean over every axis but the first; an all-zero weight row gives nan (0 / 0)."""
    axes = tuple(range(1, values.ndim))
    return jnp.sum(values * weights, axis=axes) / jnp.sum(weights, axis=axes)


def _per_sample(value, batch: int, name: str) -> jax.Array:
    """A scalar or a (B,) vector as a (B,) float32 vector."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        return jnp.full((batch,), value)
    if value.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or one value per batch element ({batch},), got {value.shape}")
    return value


def mae(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean absolute error per batch element, ``sum(m |pred - target|) / sum(m)`` over all non-batch axes: (B,).

    ``mask`` (boolean or 0/1; other values act as weights) has the batch axis and may omit a trailing channel axis;
    without it every voxel counts. An empty mask gives ``nan``.
    """
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    _check_pair(pred, target)
    weights = _mask_weights(mask, pred.shape)
    error = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return _per_sample_mean(error, weights)


def psnr(pred: jax.Array, target: jax.Array, data_range, mask: jax.Array | None = None) -> jax.Array:
    """Peak signal-to-noise ratio in dB per batch element: ``10 log10(L^2 / MSE)``, shape (B,).

    ``L = data_range`` (a scalar or one value per batch element, e.g. the target's max - min) and ``MSE`` the
    (masked) mean squared error over all non-batch axes, mask rules as in :func:`mae`. ``MSE == 0`` gives ``inf``;
    an empty mask ``nan``.
    """
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    _check_pair(pred, target)
    data_range = _per_sample(data_range, pred.shape[0], "data_range")
    weights = _mask_weights(mask, pred.shape)
    mse = _per_sample_mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)), weights)
    return 10.0 * jnp.log10(jnp.square(data_range) / mse)


def gaussian_window(size: int, sigma: float) -> np.ndarray:
    """1-D Gaussian weights ``exp(-(i - c)^2 / (2 sigma^2))``, ``i = 0..size-1``, ``c = (size - 1) / 2``, sum 1."""
    if not isinstance(size, (int, np.integer)) or size < 1 or size % 2 == 0:
        raise ValueError(f"window must be a positive odd int, got {size!r}")
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    weights = np.exp(-(offsets ** 2) / (2.0 * sigma ** 2))
    return (weights / weights.sum()).astype(np.float32)


def _filter_valid(x: jax.Array, taps: np.ndarray, axes: tuple[int, ...]) -> jax.Array:
    """Separable correlation with ``taps`` along each of ``axes``, keeping only positions where the window fits.

    Written as a sum of shifted slices (one per tap): exact, cheap for short windows, and shape-static.
    """
    size = taps.shape[0]
    for axis in axes:
        length = x.shape[axis] - size + 1
        x = sum(float(taps[t]) * jax.lax.slice_in_dim(x, t, t + length, axis=axis) for t in range(size))
    return x


def ssim3d(pred: jax.Array, target: jax.Array, data_range, mask: jax.Array | None = None, window: int = 7,
           sigma: float = 1.5, axes: Sequence[int] = (1, 2, 3), k1: float = 0.01, k2: float = 0.03) -> jax.Array:
    """Structural similarity per batch element with a Gaussian window (Wang et al. 2004), shape (B,).

    ``pred``/``target`` are (B, D, H, W) or channels-last (B, D, H, W, C). Local statistics use the separable,
    normalised Gaussian window (``window`` taps, std ``sigma`` voxels, :func:`gaussian_window`) along ``axes``:
    the default (1, 2, 3) is 3-D SSIM; ``axes=(2, 3)`` filters in-plane only, i.e. 2-D SSIM of every slice, averaged.
    With ``mu = G*x``, ``sigma_xy = G*(xy) - mu_x mu_y`` (population moments, no ``N/(N-1)`` factor) and
    ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, ``L = data_range`` (scalar or per batch element)::

        SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

    **Valid region**: the SSIM map exists only at voxels whose whole window lies inside the volume (no padding, as
    MONAI ``SSIMMetric`` and pytorch-msssim; skimage instead pads by reflection and then crops the same border), so it
    is ``window - 1`` voxels shorter along each filtered axis. The result is the mean of the map over those voxels,
    or over those also inside ``mask`` (mask rules as in :func:`mae`; an empty masked region gives ``nan``). Every
    filtered axis must be at least ``window`` long.
    """
    pred, target = jnp.asarray(pred), jnp.asarray(target)
    _check_pair(pred, target)
    if pred.ndim not in (4, 5):
        raise ValueError(f"pred must be (B, D, H, W) or (B, D, H, W, C), got shape {pred.shape}")
    axes = tuple(int(a) for a in axes)
    if not axes or len(set(axes)) != len(axes) or not all(1 <= a < pred.ndim for a in axes):
        raise ValueError(f"axes must be distinct non-batch axes in [1, {pred.ndim}), got {axes}")
    gaussian_window(window, sigma)  # validates window and sigma
    for axis in axes:
        if pred.shape[axis] < window:
            raise ValueError(f"axis {axis} has length {pred.shape[axis]} < window={window}; use a smaller window")
    weights = _mask_weights(mask, pred.shape)
    data_range = _per_sample(data_range, pred.shape[0], "data_range")
    return _masked_mean_ssim(pred, target, weights, data_range, window=int(window), sigma=float(sigma), axes=axes,
                             k1=float(k1), k2=float(k2))


@functools.partial(jax.jit, static_argnames=("window", "sigma", "axes", "k1", "k2"))
def _masked_mean_ssim(pred, target, weights, data_range, *, window, sigma, axes, k1, k2):
    """The arithmetic of :func:`ssim3d` on validated inputs; jitted so eager callers dispatch one program, not
    a hundred small ops (inside a caller's jit it is simply inlined)."""
    taps = gaussian_window(window, sigma)
    extra = (1,) * (pred.ndim - 1)
    c1 = jnp.square(k1 * data_range).reshape(-1, *extra)
    c2 = jnp.square(k2 * data_range).reshape(-1, *extra)

    # Moments of intensities shifted by the target's mean: (co)variances are shift-invariant, and E[x^2] - mu^2 in
    # float32 loses digits when intensities are large compared with their local spread (raw MR signal).
    shift = jnp.mean(target.astype(jnp.float32), axis=tuple(range(1, pred.ndim)), keepdims=True)
    x, y = pred.astype(jnp.float32) - shift, target.astype(jnp.float32) - shift
    mu_x, mu_y = _filter_valid(x, taps, axes), _filter_valid(y, taps, axes)
    var_x = _filter_valid(x * x, taps, axes) - mu_x * mu_x
    var_y = _filter_valid(y * y, taps, axes) - mu_y * mu_y
    cov_xy = _filter_valid(x * y, taps, axes) - mu_x * mu_y
    mu_x, mu_y = mu_x + shift, mu_y + shift
    ssim_map = ((2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2))

    half = (window - 1) // 2
    for axis in axes:  # the mask is cut to the valid region: map voxel i sits at volume voxel i + half
        weights = jax.lax.slice_in_dim(weights, half, weights.shape[axis] - half, axis=axis)
    return _per_sample_mean(ssim_map, weights)
