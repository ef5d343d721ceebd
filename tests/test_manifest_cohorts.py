"""Cohort manifest builders on synthetic cohorts written in the public PI-CAI and Prostate158 layouts."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from helpers import run_python, write_nifti
from transfer_jax.data.cohorts import main, picai_cohort, prostate158_cohort
from transfer_jax.data.manifest import read_manifest
from transfer_jax.data.preprocess import PreprocessConfig, prepare_case

sitk = pytest.importorskip("SimpleITK")

MARKSHEET_HEADER = ["patient_id", "study_id", "mri_date", "patient_age", "psa", "psad", "prostate_volume",
                    "histopath_type", "lesion_PIRADS", "lesion_GS", "lesion_ISUP", "case_ISUP", "case_csPCa", "center"]
# (patient, study, case_ISUP, lesion source): 10002 has two studies, its second positive with a Pooch25 mask only.
PICAI_STUDIES = [("10000", "1000000", 0, "resampled"), ("10001", "1000001", 3, "resampled"),
                 ("10002", "1000002", 1, "resampled"), ("10002", "1000003", 2, "Pooch25"),
                 ("10003", "1000004", 0, "resampled"), ("10004", "1000005", 4, "resampled")]
SPLITS = {0: (["10000_1000000", "10002_1000002", "10002_1000003", "10004_1000005"],
              ["10001_1000001", "10003_1000004"]),
          1: (["10001_1000001", "10003_1000004", "10004_1000005"],
              ["10000_1000000", "10002_1000002", "10002_1000003"])}


def _write_sitk(path: str, array_dhw: np.ndarray) -> None:
    image = sitk.GetImageFromArray(array_dhw)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin((-3.0, -3.0, 0.0))
    sitk.WriteImage(image, path)


def write_picai(root: str) -> tuple[str, str]:
    """images/<patient>/<patient>_<study>_{t2w,adc,hbv,sag,cor}.mha and a picai_labels checkout, as published."""
    images, labels = os.path.join(root, "images"), os.path.join(root, "picai_labels")
    lesion_dirs = {name: os.path.join(labels, "csPCa_lesion_delineations", "human_expert", name)
                   for name in ("resampled", "Pooch25")}
    ai_dir = os.path.join(labels, "csPCa_lesion_delineations", "AI", "Bosma22a")
    gland_dir = os.path.join(labels, "anatomical_delineations", "whole_gland", "AI", "Guerbet23")
    for folder in [*lesion_dirs.values(), ai_dir, gland_dir, os.path.join(labels, "clinical_information")]:
        os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for patient, study, isup, source in PICAI_STUDIES:
        case = f"{patient}_{study}"
        os.makedirs(os.path.join(images, patient), exist_ok=True)
        for suffix in ("t2w", "adc", "hbv", "sag", "cor"):
            _write_sitk(os.path.join(images, patient, f"{case}_{suffix}.mha"),
                        rng.uniform(1, 2, (4, 8, 8)).astype(np.float32))
        gland = np.zeros((4, 8, 8), np.uint8)
        gland[1:3, 2:6, 2:6] = 1
        _write_sitk(os.path.join(gland_dir, f"{case}.nii.gz"), gland)
        lesion = np.zeros((4, 8, 8), np.uint8)
        if isup >= 2:  # expert masks carry the ISUP grade, AI and Pooch25 masks 1
            lesion[1:3, 3:5, 3:5] = isup if source == "resampled" else 1
        _write_sitk(os.path.join(lesion_dirs[source], f"{case}.nii.gz"), lesion)
        _write_sitk(os.path.join(ai_dir, f"{case}.nii.gz"), (lesion > 0).astype(np.uint8))
        rows.append([patient, study, "2020-01-01", "65", "8.5", "", "50", "", "", "", "", str(isup),
                     "YES" if isup >= 2 else "NO", "RUMC"])
    with open(os.path.join(labels, "clinical_information", "marksheet.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MARKSHEET_HEADER)
        writer.writerows(rows)
    return images, labels


def write_baseline_splits(folder: str) -> str:
    """picai_baseline's split files: ds-config-{train,valid}-fold-<k>.json and the nnU-Net splits.json."""
    os.makedirs(folder, exist_ok=True)
    for fold, (train, val) in SPLITS.items():
        for kind, subjects in (("train", train), ("valid", val)):
            with open(os.path.join(folder, f"ds-config-{kind}-fold-{fold}.json"), "w") as f:
                json.dump({"subject_list": subjects}, f)
    with open(os.path.join(folder, "splits.json"), "w") as f:
        json.dump([{"train": train, "val": val} for train, val in SPLITS.values()], f)
    return folder


@pytest.fixture
def picai(tmp_path):
    return write_picai(str(tmp_path))


def test_picai_manifest_files_labels_and_baseline_folds(tmp_path, picai, capsys):
    images, labels = picai
    splits = write_baseline_splits(str(tmp_path / "splits"))
    output = str(tmp_path / "out" / "picai.csv")
    main(["picai", "--images", images, "--labels", labels, "--splits", splits, "--fold", "1", "--output", output])
    assert "wrote" in capsys.readouterr().out
    cases = {c.case_id: c for c in read_manifest(output)}
    assert sorted(cases) == sorted(f"{p}_{s}" for p, s, _, _ in PICAI_STUDIES)
    for patient, study, isup, source in PICAI_STUDIES:
        case = cases[f"{patient}_{study}"]
        for column, suffix in (("t2", "t2w"), ("adc", "adc"), ("dwi", "hbv")):
            assert getattr(case, column) == os.path.join(images, patient, f"{patient}_{study}_{suffix}.mha")
        assert case.lesion_mask == os.path.join(labels, "csPCa_lesion_delineations", "human_expert", source,
                                                f"{patient}_{study}.nii.gz")
        assert case.gland_mask.endswith(os.path.join("whole_gland", "AI", "Guerbet23", f"{patient}_{study}.nii.gz"))
        assert case.extra["isup"] == str(isup) and case.extra["cspca"] == str(int(isup >= 2))
        assert case.label is None  # never PI-RADS: the target is declared through task.label_map
        assert case.split == ("val" if case.case_id in SPLITS[1][1] else "train")
    # the nnU-Net splits.json of the same folds gives the same manifest
    again = str(tmp_path / "again.csv")
    main(["picai", "--images", images, "--labels", labels, "--splits", os.path.join(splits, "splits.json"),
          "--fold", "0", "--output", again])
    assert {c.case_id for c in read_manifest(again) if c.split == "val"} == set(SPLITS[0][1])


def test_picai_case_prepares_with_graded_lesions(tmp_path, picai):
    images, labels = picai
    cohort = picai_cohort(images, labels)
    assert not cohort.problems
    case = next(c for c in cohort.cases if c.case_id == "10001_1000001")  # expert mask, ISUP 3 voxels
    prepared = prepare_case(case, PreprocessConfig(spacing=None, crop_size=(4, 8, 8), region_margin=1.0))
    assert prepared.lesion.sum() == 2 * 2 * 2 and prepared.gland.sum() == 2 * 4 * 4
    only_grade_4 = PreprocessConfig(spacing=None, crop_size=(4, 8, 8), region_margin=1.0, lesion_labels=(4, 5),
                                    lesion_background_labels=(2, 3))
    assert prepare_case(case, only_grade_4).lesion.sum() == 0


def test_picai_seeded_split_groups_patients(picai):
    images, labels = picai
    positive = {"10001", "10002", "10004"}
    val_folds = {}
    for fold in range(5):
        cohort = picai_cohort(images, labels, fold=fold, seed=3)
        val = {c.case_id for c in cohort.cases if c.split == "val"}
        for case_id in val:
            val_folds.setdefault(case_id, []).append(fold)
        assert len({case_id.split("_")[0] for case_id in val}) == 1  # 5 patients, 5 folds
    assert sorted(val_folds) == sorted(f"{p}_{s}" for p, s, _, _ in PICAI_STUDIES)
    assert all(len(folds) == 1 for folds in val_folds.values())  # each case in exactly one val fold
    assert val_folds["10002_1000002"] == val_folds["10002_1000003"]  # a patient's studies stay together
    assert len({val_folds[c][0] for c in val_folds if c.split("_")[0] in positive}) == 3  # positives spread
    assignments = {seed: [c.split for c in picai_cohort(images, labels, seed=seed).cases] for seed in range(6)}
    assert assignments[3] == [c.split for c in picai_cohort(images, labels, seed=3).cases]
    assert len({tuple(a) for a in assignments.values()}) > 1


def test_picai_problems_listed_by_name(tmp_path, picai):
    images, labels = picai
    os.remove(os.path.join(images, "10001", "10001_1000001_hbv.mha"))
    os.remove(os.path.join(labels, "csPCa_lesion_delineations", "human_expert", "Pooch25", "10002_1000003.nii.gz"))
    os.makedirs(os.path.join(images, "10999"))
    _write_sitk(os.path.join(images, "10999", "10999_1009999_t2w.mha"), np.ones((2, 2, 2), np.float32))
    output = str(tmp_path / "picai.csv")
    command = ["-m", "transfer_jax.data.manifest", "picai", "--images", images, "--labels", labels,
               "--output", output]
    result = run_python(*command)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(lines) == 3, result.stderr
    assert any("10001_1000001" in line and "missing hbv sequence" in line for line in lines)
    assert any("10002_1000003" in line and "no lesion delineation" in line for line in lines)
    assert any("10999_1009999" in line and "marksheet" in line for line in lines)
    assert not os.path.exists(output)
    result = run_python(*command, "--on_bad_case=skip")
    assert result.returncode == 0, result.stderr
    assert sorted(c.case_id for c in read_manifest(output)) == ["10000_1000000", "10002_1000002", "10003_1000004",
                                                                "10004_1000005"]


def test_picai_bad_split_and_fold(tmp_path, picai, capsys):
    images, labels = picai
    splits = write_baseline_splits(str(tmp_path / "splits"))
    with pytest.raises(SystemExit, match="has 2 folds, --fold 3"):
        main(["picai", "--images", images, "--labels", labels, "--splits", os.path.join(splits, "splits.json"),
              "--fold", "3", "--output", str(tmp_path / "x.csv")])
    with open(os.path.join(splits, "ds-config-valid-fold-0.json"), "w") as f:
        json.dump({"subject_list": ["10001_1000001", "12345_1234567"]}, f)
    cohort = picai_cohort(images, labels, splits=splits, fold=0)
    assert [p.case_id for p in cohort.problems] == ["12345_1234567"]


# -- Prostate158 ---------------------------------------------------------------------------------------------------

P158_COLUMNS = ["ID", "t2", "adc", "dwi", "t2_anatomy_reader1", "t2_tumor_reader1", "adc_tumor_reader1"]


def write_prostate158(root: str, split_folder: str, list_name: str, ids: list[str], tumour: set[str],
                      extra_columns: tuple[str, ...] = ()) -> None:
    """<root>/<list>.csv and <root>/<split_folder>/<ID>/<name>.nii.gz, as the Zenodo archives ship them."""
    rows = []
    for case in ids:
        folder = os.path.join(root, split_folder, case)
        os.makedirs(folder, exist_ok=True)
        rel = lambda name: f"{split_folder}/{case}/{name}.nii.gz"  # noqa: E731
        for name in ("t2", "adc", "dwi"):
            write_nifti(os.path.join(folder, f"{name}.nii.gz"), np.ones((8, 8, 4), np.float32))
        zones = np.zeros((8, 8, 4), np.uint8)
        zones[2:6, 2:6, 1:3] = 1  # transition zone
        zones[2:6, 6:7, 1:3] = 2  # peripheral zone
        write_nifti(os.path.join(folder, "t2_anatomy_reader1.nii.gz"), zones, dtype=np.uint8)
        if case in tumour:
            for name in ("t2_tumor_reader1", "adc_tumor_reader1"):
                write_nifti(os.path.join(folder, f"{name}.nii.gz"), (zones == 2).astype(np.uint8), dtype=np.uint8)
            tumours = [rel("t2_tumor_reader1"), rel("adc_tumor_reader1")]
        else:
            write_nifti(os.path.join(folder, "empty.nii.gz"), np.zeros((8, 8, 4), np.uint8), dtype=np.uint8)
            tumours = ["", rel("empty")]
        rows.append([str(int(case)), rel("t2"), rel("adc"), rel("dwi"), rel("t2_anatomy_reader1"), *tumours]
                    + [rel(c) for c in extra_columns])
    with open(os.path.join(root, list_name), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(P158_COLUMNS + list(extra_columns))
        writer.writerows(rows)


@pytest.fixture
def prostate158(tmp_path):
    train_root, test_root = str(tmp_path / "prostate158_train"), str(tmp_path / "prostate158_test")
    write_prostate158(train_root, "train", "train.csv", ["020", "021", "022"], tumour={"020"})
    write_prostate158(train_root, "train", "valid.csv", ["023"], tumour={"023"})
    write_prostate158(test_root, "test", "test.csv", ["150"], tumour=set(),
                      extra_columns=("t2_anatomy_reader2",))
    return train_root, test_root


def test_prostate158_manifest_and_zonal_gland(tmp_path, prostate158):
    train_root, test_root = prostate158
    output = str(tmp_path / "p158.csv")
    main(["prostate158", "--root", train_root, "--test_root", test_root, "--output", output])
    cases = {c.case_id: c for c in read_manifest(output)}
    assert {k: c.split for k, c in cases.items()} == {"20": "train", "21": "train", "22": "train", "23": "val",
                                                      "150": "test"}
    assert cases["20"].t2 == os.path.join(train_root, "train", "020", "t2.nii.gz")
    assert cases["20"].lesion_mask == os.path.join(train_root, "train", "020", "adc_tumor_reader1.nii.gz")
    assert cases["21"].lesion_mask == os.path.join(train_root, "train", "021", "empty.nii.gz")
    assert cases["150"].gland_mask == os.path.join(test_root, "test", "150", "t2_anatomy_reader1.nii.gz")
    assert cases["150"].label is None

    # zonal anatomy (1 = TZ, 2 = PZ): refused under the default gland map, the whole gland with gland_labels=(1, 2)
    from transfer_jax.data.errors import DataError
    base = dict(spacing=None, crop_size=(4, 8, 8), region_margin=1.0)
    with pytest.raises(DataError, match=r"unexpected label value\(s\) \[2\].*gland_labels"):
        prepare_case(cases["20"], PreprocessConfig(**base))
    prepared = prepare_case(cases["20"], PreprocessConfig(**base, gland_labels=(1, 2)))
    assert prepared.gland.sum() == 4 * 5 * 2 and prepared.lesion.sum() == 4 * 1 * 2
    peripheral = prepare_case(cases["20"], PreprocessConfig(**base, gland_labels=(2,), gland_background_labels=(1,)))
    assert peripheral.gland.sum() == 4 * 1 * 2


def test_prostate158_problems_listed_by_name(tmp_path, prostate158):
    train_root, _ = prostate158
    os.remove(os.path.join(train_root, "train", "021", "adc.nii.gz"))
    output = str(tmp_path / "p158.csv")
    result = run_python("-m", "transfer_jax.data.manifest", "prostate158", "--root", train_root,
                        "--lesion_mask", "t2_tumor_reader1", "--output", output)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert len(lines) == 3, result.stderr  # 021: no adc; 021 and 022: no t2 tumour mask (negatives)
    assert any("'21'" in line and "adc not found" in line for line in lines)
    assert sum("empty 't2_tumor_reader1' cell" in line for line in lines) == 2
    assert "no test list" in result.stdout
    assert not os.path.exists(output)
    cohort = prostate158_cohort(train_root, gland_column=None, lesion_column=None)
    assert [p.case_id for p in cohort.problems] == ["21"]
    assert all(c.gland_mask is None and c.lesion_mask is None for c in cohort.cases)


def test_picai_manifest_feeds_csPCa_classification(tmp_path, picai):
    """The run's pre-flight reads the declared label column: ISUP -> csPCa through task.label_map."""
    from helpers import load_config
    from transfer_jax.data.dataset import prepare_splits
    from transfer_jax.data.preprocess import PreparedCase
    from transfer_jax.tasks.classification import ClassificationTask

    images, labels = picai
    output = str(tmp_path / "picai.csv")
    main(["picai", "--images", images, "--labels", labels, "--output", output])
    config = load_config("cls", "smoke")
    config.data.manifest = output
    config.data.label_column, config.data.label_map = "isup", "isup_cspca"
    task = ClassificationTask(config)
    assert task.binary
    splits = prepare_splits(config.data, str(tmp_path / "cache"), task, log=lambda *_: None)
    targets = {case_id: task.target(PreparedCase.load(path).label)
               for split in ("train", "val") for case_id, path in zip(splits.case_ids[split], splits.paths[split])}
    assert targets == {f"{p}_{s}": int(isup >= 2) for p, s, isup, _ in PICAI_STUDIES}
