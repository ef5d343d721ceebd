"""`python -m transfer_jax.score` on small hand-made prediction folders (no model)."""
import csv
import json
import os

import numpy as np
import pytest

from helpers import write_nifti
from transfer_jax.data.errors import DataError
from transfer_jax.data.manifest import Case, write_manifest
from transfer_jax.data.preprocess import zscore_nonzero
from transfer_jax.score import main, score

SHAPE_IJK, AFFINE = (12, 10, 8), np.diag([1.0, 1.5, 2.0, 1.0])


def _case(directory, case_id, rng, label=None, split="test"):
    gland = np.zeros(SHAPE_IJK, np.uint8)
    gland[3:9, 2:8, 2:6] = 1
    lesion = np.zeros(SHAPE_IJK, np.uint8)
    lesion[5:7, 4:6, 3:5] = 1
    paths = {name: write_nifti(os.path.join(directory, f"{case_id}_{name}.nii.gz"),
                               50 + 20 * gland + rng.normal(0, 3, SHAPE_IJK), AFFINE)
             for name in ("t2", "adc", "dwi")}
    paths["gland_mask"] = write_nifti(os.path.join(directory, f"{case_id}_gland.nii.gz"), gland, AFFINE, np.uint8)
    paths["lesion_mask"] = write_nifti(os.path.join(directory, f"{case_id}_lesion.nii.gz"), lesion, AFFINE, np.uint8)
    return Case(case_id=case_id, split=split, label=label, **paths), gland, lesion


def _cohort(tmp_path, labels=(None, None)):
    rng = np.random.default_rng(0)
    made = [_case(str(tmp_path), f"c{n}", rng, label) for n, label in enumerate(labels)]
    made.append(_case(str(tmp_path), "train0", rng, "0", split="train"))
    manifest = str(tmp_path / "manifest.csv")
    write_manifest(manifest, [case for case, _, _ in made])
    return manifest, made[:-1]


def test_segmentation_scores_per_case_and_summary(tmp_path):
    manifest, cases = _cohort(tmp_path)
    predictions = tmp_path / "predictions"
    os.makedirs(predictions)
    (case0, gland, lesion), (case1, _, _) = cases
    truth = np.where(lesion > 0, 2, gland).astype(np.uint8)
    write_nifti(str(predictions / "c0_seg.nii.gz"), truth, AFFINE, np.uint8)  # perfect
    wrong = truth.copy()
    wrong[lesion > 0] = 1  # lesion missed: gland Dice still high, lesion Dice 0, lesion HD95 = the diagonal
    write_nifti(str(predictions / "c1_seg.nii.gz"), wrong, AFFINE, np.uint8)

    main(["--predictions", str(predictions), "--manifest", manifest, "--split", "test"])
    with open(predictions / "scores.csv", encoding="utf-8") as f:
        rows = {row["case_id"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"c0", "c1"}  # the train case is not scored
    assert float(rows["c0"]["dice/gland"]) == 1.0 and float(rows["c0"]["hd95/lesion"]) == 0.0
    assert float(rows["c1"]["dice/lesion"]) == 0.0
    diagonal = np.sqrt(sum((n * s) ** 2 for n, s in zip(SHAPE_IJK, (1.0, 1.5, 2.0))))
    assert float(rows["c1"]["hd95/lesion"]) == pytest.approx(diagonal)
    with open(predictions / "scores_summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    gland_c1 = 2 * 136 / (136 + 144)  # the lesion's 8 voxels predicted as gland
    assert summary["kind"] == "segmentation" and summary["cases"] == 2
    assert summary["metrics"]["dice/gland"] == pytest.approx((1.0 + gland_c1) / 2)
    assert summary["metrics"]["dice/lesion"] == pytest.approx(0.5)
    assert summary["metrics"]["hd95/lesion"] == pytest.approx(diagonal / 2)


def test_classification_auroc_and_average_precision(tmp_path):
    manifest, _ = _cohort(tmp_path, labels=("0", "3"))
    predictions = tmp_path / "predictions"
    os.makedirs(predictions)
    with open(predictions / "probabilities.csv", "w", encoding="utf-8") as f:
        f.write("case_id,prob_0,prob_1,pred\nc0,0.8,0.2,0\nc1,0.3,0.7,1\n")
    result = score(str(predictions), manifest, "test")
    assert result["kind"] == "classification"
    assert result["metrics"]["auroc"] == 1.0 and result["metrics"]["ap"] == 1.0
    with open(predictions / "probabilities.csv", "w", encoding="utf-8") as f:
        f.write("case_id,prob_0,prob_1,pred\nc0,0.3,0.7,1\nc1,0.8,0.2,0\n")
    flipped = score(str(predictions), manifest, "test")["metrics"]
    assert flipped["auroc"] == 0.0 and flipped["ap"] == 0.5


def test_restoration_against_the_z_scored_reference(tmp_path):
    manifest, cases = _cohort(tmp_path)
    predictions = tmp_path / "predictions"
    os.makedirs(predictions)
    import nibabel as nib

    for case, _, _ in cases:
        reference = zscore_nonzero(nib.load(case.adc).get_fdata().astype(np.float32))
        if case.case_id == "c1":
            reference = reference + 0.5  # off by 0.5 everywhere
        write_nifti(str(predictions / f"{case.case_id}_adc.nii.gz"), reference, AFFINE)
    result = score(str(predictions), manifest, "test", output=str(tmp_path / "scores"))
    assert result["kind"] == "restoration"
    with open(tmp_path / "scores" / "scores.csv", encoding="utf-8") as f:
        rows = {row["case_id"]: row for row in csv.DictReader(f)}
    assert float(rows["c0"]["mae"]) == pytest.approx(0.0, abs=1e-5)
    assert float(rows["c0"]["ssim"]) == pytest.approx(1.0, abs=1e-4)
    assert float(rows["c1"]["mae"]) == pytest.approx(0.5, abs=1e-5)
    assert np.isfinite(float(rows["c1"]["psnr"])) and float(rows["c1"]["ssim"]) < 1.0


def test_prediction_off_the_t2_grid_is_refused(tmp_path):
    manifest, cases = _cohort(tmp_path)
    predictions = tmp_path / "predictions"
    os.makedirs(predictions)
    for case, gland, _ in cases:
        write_nifti(str(predictions / f"{case.case_id}_seg.nii.gz"), gland[:, :, :4], AFFINE, np.uint8)
    with pytest.raises(DataError, match=r"c0.*c0_seg\.nii\.gz.*differs from the T2 grid"):
        score(str(predictions), manifest, "test")
    with pytest.raises(DataError, match="no case of split 'val'"):
        score(str(predictions), manifest, "val")


def test_average_precision_steps_over_distinct_scores():
    from transfer_jax.tasks.metrics import average_precision

    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    assert average_precision([0.5, 0.5, 0.1], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)  # a tie enters whole
    assert np.isnan(average_precision([0.2, 0.4], [0, 0]))
