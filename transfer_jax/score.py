"""Scores prediction files against the labels of a manifest: the numbers to quote for a set of predictions.

    python -m transfer_jax.score --predictions=preds/ --manifest=cases.csv --split=test
    python -m transfer_jax.score --predictions=preds/ --manifest=cases.csv --split=test --classes=gland,lesion

Reads what `predict` writes (or the same files from any other model) for every manifest row of `--split`, on
each case's T2 grid, and writes `<output>/scores.csv` (one row per case) and `<output>/scores_summary.json` (the
means, as the run's `summary.json` reports them). What is scored follows the files found:

* segmentation, `<case_id>_seg.nii.gz` (or `.nii`, `.mha`): integer label maps, label `k` = the `k`-th of
  `--classes` (the run's `task.classes`, default gland,lesion). The reference is the manifest's `<class>_mask` files
  on the T2 grid (nearest-neighbour), later classes winning where they overlap. Dice and HD95 (mm, T2 spacing) per
  class per case with the in-run conventions (`tasks/segmentation.py`): a class absent from the reference has no
  Dice; HD95 is NaN when absent from both maps and the volume's diagonal when present in only one.
* classification, `probabilities.csv` (`case_id, prob_0..prob_{K-1}`): against the manifest's `label` (PI-RADS - 2).
  Two columns: the csPCa-positive probability (PI-RADS >= 4), `binary_metrics` plus `ap` (average precision); four
  columns: `pirads_metrics` plus `ap_ge3` / `ap_ge4`.
* restoration (super-resolution, distortion, synthesis), `<case_id>_<channel>.nii.gz` for channels of
  `--channels`: z-scored intensities as the network sees them. The reference is the manifest's image of the channel
  on the T2 grid (trilinear), z-scored over its non-zero voxels as preparation does; PSNR, SSIM and MAE over the
  case's gland mask (the whole volume without one), data range = the reference's max - min. The run measures on
  its prepared grid, so these agree with it up to resampling.

Where the T2 grid is the run's prepared grid (the run's `data.spacing` and a prepared region covering the volume),
segmentation and classification scores equal the run's `test` numbers for the same predictions.
"""
from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence

import numpy as np

from transfer_jax.cli import ArgumentParser, reports_data_errors
from transfer_jax.data.errors import DataError
from transfer_jax.data.manifest import Case, cases_in_split, read_manifest
from transfer_jax.data.nifti import Grid, Volume, read_volume, resample
from transfer_jax.data.preprocess import zscore_nonzero
from transfer_jax.tasks.classification import binary_target, parse_label
from transfer_jax.tasks.metrics import average_precision, binary_metrics, mae, pirads_metrics, psnr, ssim3d
from transfer_jax.tasks.segmentation import case_hd95, dice_counts, dice_from_counts, label_map, summarize_cases

EXTENSIONS = (".nii.gz", ".nii", ".mha")
CHANNELS = ("t2", "dwi", "adc")
SEGMENTATION_CLASSES = ("gland", "lesion")


def _prediction_file(directory: str, stem: str) -> Optional[str]:
    for extension in EXTENSIONS:
        path = os.path.join(directory, stem + extension)
        if os.path.isfile(path):
            return path
    return None


def _on_grid(prediction: Volume, grid: Grid, case: Case) -> np.ndarray:
    if prediction.grid.shape != grid.shape or not np.allclose(prediction.grid.affine, grid.affine, atol=1e-3):
        raise DataError(f"prediction grid {prediction.grid.shape} differs from the T2 grid {grid.shape} (or its "
                        "affine); expected a file on the case's T2 grid, as predict writes it",
                        case_id=case.case_id, path=prediction.path)
    return prediction.array


def _reference_mask(case: Case, role: str, grid: Grid) -> np.ndarray:
    path = case.path(role)
    if path is None:
        raise DataError(f"scoring needs the manifest's {role!r}, but the cell is empty", case_id=case.case_id)
    return resample(read_volume(path, case_id=case.case_id, role=role), grid, order=0) > 0


# -- segmentation --------------------------------------------------------------------------------------------------

def score_segmentation(cases: Sequence[Case], directory: str, classes: Sequence[str]) -> tuple[list[dict], dict]:
    """Per-case rows and the summary (`dice/<class>`, `dice_mean`, `hd95/<class>`) of `<case_id>_seg` files."""
    unknown = [c for c in classes if c not in SEGMENTATION_CLASSES]
    if unknown or not classes:
        raise ValueError(f"--classes: expected names among {SEGMENTATION_CLASSES}, got {tuple(classes)}")
    class_names = ("background", *classes)
    num_classes = len(class_names)
    rows, dice, hd95 = [], [], []
    for case in cases:
        path = _prediction_file(directory, f"{case.case_id}_seg")
        if path is None:
            raise DataError(f"no segmentation {case.case_id}_seg{{{','.join(EXTENSIONS)}}} in {directory}",
                            case_id=case.case_id)
        t2 = read_volume(case.t2, case_id=case.case_id, role="t2")
        predicted = _on_grid(read_volume(path, case_id=case.case_id, role="prediction"), t2.grid, case)
        labels = np.rint(predicted).astype(np.int64)
        if labels.min() < 0 or labels.max() >= num_classes or not np.allclose(predicted, labels):
            raise DataError(f"segmentation labels must be integers in [0, {num_classes}) for classes "
                            f"{class_names}, got values in [{predicted.min()}, {predicted.max()}]",
                            case_id=case.case_id, path=path)
        masks = {cls: _reference_mask(case, f"{cls}_mask", t2.grid) for cls in classes}
        target = label_map(masks, classes, t2.grid.shape)
        counts = {k: np.asarray(v) for k, v in dice_counts(labels[None], target[None], num_classes).items()}
        case_dice = dice_from_counts(counts)[0]
        case_hd = case_hd95(labels, target, num_classes, t2.grid.spacing)
        dice.append(case_dice)
        hd95.append(case_hd)
        rows.append({"case_id": case.case_id, **{f"dice/{n}": case_dice[k] for k, n in enumerate(class_names) if k},
                     **{f"hd95/{n}": case_hd[k - 1] for k, n in enumerate(class_names) if k}})
    summary = summarize_cases(np.stack(dice), np.stack(hd95), class_names)
    return rows, summary


# -- classification ------------------------------------------------------------------------------------------------

def score_classification(cases: Sequence[Case], path: str) -> tuple[list[dict], dict]:
    """Per-case rows and the summary of a `probabilities.csv` (`case_id, prob_0..prob_{K-1}`, K = 2 or 4)."""
    with open(path, newline="", encoding="utf-8") as f:
        table = {row["case_id"]: row for row in csv.DictReader(f)}
    columns = sorted((c for c in next(iter(table.values()), {}) if c.startswith("prob_")),
                     key=lambda c: int(c[len("prob_"):]))
    if len(columns) not in (2, 4):
        raise DataError(f"expected columns prob_0..prob_1 (binary) or prob_0..prob_3 (PI-RADS) in {path}, got "
                        f"{columns}", path=path)
    missing = [c.case_id for c in cases if c.case_id not in table]
    if missing:
        raise DataError(f"no probabilities for case(s) {missing[:5]} in {path}", path=path)
    probs = np.array([[float(table[c.case_id][k]) for k in columns] for c in cases])
    labels = np.array([parse_label(c.label, c.case_id) for c in cases])
    rows = [{"case_id": c.case_id, "label": int(y), **dict(zip(columns, p))} for c, y, p in zip(cases, labels, probs)]
    if len(columns) == 2:
        positive = binary_target(labels)
        summary = {**binary_metrics(probs[:, 1], positive), "ap": average_precision(probs[:, 1], positive)}
    else:
        summary = pirads_metrics(probs, labels)
        for name, first in (("ge3", 1), ("ge4", 2)):
            summary[f"ap_{name}"] = average_precision(probs[:, first:].sum(axis=1), (labels >= first).astype(int))
    return rows, {k: float(v) for k, v in summary.items()}


# -- restoration ---------------------------------------------------------------------------------------------------

def score_restoration(cases: Sequence[Case], directory: str, channels: Sequence[str],
                      ssim_window: int = 7) -> tuple[list[dict], dict]:
    """Per-case rows and the means of PSNR / SSIM / MAE in the gland of `<case_id>_<channel>` files."""
    import jax.numpy as jnp

    rows = []
    for case in cases:
        t2 = read_volume(case.t2, case_id=case.case_id, role="t2")
        predicted, reference = [], []
        for channel in channels:
            path = _prediction_file(directory, f"{case.case_id}_{channel}")
            if path is None:
                raise DataError(f"no prediction {case.case_id}_{channel}{{{','.join(EXTENSIONS)}}} in {directory}",
                                case_id=case.case_id)
            predicted.append(_on_grid(read_volume(path, case_id=case.case_id, role="prediction"), t2.grid, case))
            source = read_volume(case.path(channel), case_id=case.case_id, role=channel)
            reference.append(zscore_nonzero(resample(source, t2.grid, order=1)))
        pred, target = np.stack(predicted, axis=-1)[None], np.stack(reference, axis=-1)[None]
        mask = (_reference_mask(case, "gland_mask", t2.grid) if case.gland_mask else np.ones(t2.grid.shape, bool))
        data_range = jnp.asarray([max(float(target.max() - target.min()), 1e-6)])
        mask = jnp.asarray(mask[None].astype(np.uint8))
        rows.append({"case_id": case.case_id,
                     "psnr": float(psnr(jnp.asarray(pred), jnp.asarray(target), data_range, mask)[0]),
                     "ssim": float(ssim3d(jnp.asarray(pred), jnp.asarray(target), data_range, mask,
                                          window=ssim_window)[0]),
                     "mae": float(mae(jnp.asarray(pred), jnp.asarray(target), mask)[0])})
    summary = {}
    for key in ("psnr", "ssim", "mae"):
        values = np.array([r[key] for r in rows])
        finite = values[np.isfinite(values)]
        summary[key] = float(finite.mean()) if finite.size else float("nan")
    return rows, summary


# -- command -------------------------------------------------------------------------------------------------------

def _restoration_channels(directory: str, case: Case, channels: Sequence[str]) -> list[str]:
    return [c for c in channels if _prediction_file(directory, f"{case.case_id}_{c}") is not None]


def score(predictions: str, manifest: str, split: str = "test", *, output: Optional[str] = None,
          classes: Sequence[str] = SEGMENTATION_CLASSES, channels: Sequence[str] = CHANNELS,
          ssim_window: int = 7) -> dict:
    """Scores the predictions of the `split` cases; writes scores.csv and scores_summary.json; returns the summary
    record (`kind`, `split`, `cases`, `metrics`, `files`)."""
    if not os.path.isdir(predictions):
        raise DataError("predictions folder not found", path=predictions)
    cases = cases_in_split(read_manifest(manifest), split)
    if not cases:
        raise DataError(f"no case of split {split!r} in the manifest", path=manifest)
    probabilities = os.path.join(predictions, "probabilities.csv")
    if os.path.isfile(probabilities):
        kind, (rows, metrics) = "classification", score_classification(cases, probabilities)
    elif _prediction_file(predictions, f"{cases[0].case_id}_seg") is not None:
        kind, (rows, metrics) = "segmentation", score_segmentation(cases, predictions, classes)
    elif _restoration_channels(predictions, cases[0], channels):
        found = _restoration_channels(predictions, cases[0], channels)
        kind, (rows, metrics) = "restoration", score_restoration(cases, predictions, found, ssim_window)
    else:
        raise DataError(f"found none of probabilities.csv, {cases[0].case_id}_seg.* or "
                        f"{cases[0].case_id}_<channel>.* (channels {tuple(channels)}): is this a predict output?",
                        path=predictions)
    output = output or predictions
    os.makedirs(output, exist_ok=True)
    table = os.path.join(output, "scores.csv")
    with open(table, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    record = {"kind": kind, "split": split, "cases": len(cases), "manifest": os.path.abspath(manifest),
              "predictions": os.path.abspath(predictions), "metrics": metrics}
    summary_path = os.path.join(output, "scores_summary.json")
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return {**record, "files": [table, summary_path]}


@reports_data_errors
def main(argv=None) -> None:
    """The `transfer-jax-score` console script and `python -m transfer_jax.score`."""
    parser = ArgumentParser("transfer_jax.score", __doc__)
    parser.add_argument("--predictions", required=True, help="folder of prediction files (predict's --output)")
    parser.add_argument("--manifest", required=True, help="CSV of the cases with their labels / masks / images")
    parser.add_argument("--split", default="test", help="the manifest split to score")
    parser.add_argument("--output", default=None, help="folder for scores.csv and scores_summary.json "
                        "(default: the predictions folder)")
    parser.add_argument("--classes", default=",".join(SEGMENTATION_CLASSES),
                        help="segmentation: the classes of labels 1, 2, ... (the run's task.classes)")
    parser.add_argument("--channels", default=",".join(CHANNELS),
                        help="restoration: the channels whose <case_id>_<channel> files are scored if present")
    parser.add_argument("--ssim_window", type=int, default=7, help="restoration: SSIM window (the run's "
                        "task.ssim_window)")
    args = parser.parse_args(argv)
    split_list = lambda text: tuple(t for t in text.split(",") if t)  # noqa: E731
    result = score(args.predictions, args.manifest, args.split, output=args.output,
                   classes=split_list(args.classes), channels=split_list(args.channels), ssim_window=args.ssim_window)
    shown = "  ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items())
    print(f"{result['kind']}, {result['cases']} {args.split} case(s): {shown}\nwritten: {', '.join(result['files'])}")


if __name__ == "__main__":
    main()
