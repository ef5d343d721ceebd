"""Label maps: mask values through data.*_labels, the manifest's extra columns, classification targets by mapping."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import load_config, write_nifti
from transfer_jax.data.dataset import preprocess_config
from transfer_jax.data.errors import DataError
from transfer_jax.data.manifest import Case, read_manifest, write_manifest
from transfer_jax.data.preprocess import PreprocessConfig, prepare_case
from transfer_jax.tasks.classification import ClassificationTask


def test_extra_columns_round_trip_and_label_column(tmp_path):
    path = str(tmp_path / "m.csv")
    files = {role: str(tmp_path / f"{role}.nii.gz") for role in ("t2", "adc", "dwi")}
    write_manifest(path, [Case(case_id=f"c{i}", split="train", label=str(i), **files,
                               extra={"isup": str(i + 2), "center": "RUMC"}) for i in range(2)])
    read = read_manifest(path)
    assert [c.extra for c in read] == [{"isup": "2", "center": "RUMC"}, {"isup": "3", "center": "RUMC"}]
    assert [c.label for c in read] == ["0", "1"]
    assert [c.label for c in read_manifest(path, label_column="isup")] == ["2", "3"]
    with pytest.raises(DataError, match="no column 'case_ISUP' to read labels from"):
        read_manifest(path, label_column="case_ISUP")


def test_label_map_config_keys(tmp_path):
    config = load_config("seg", "smoke")
    prepared = preprocess_config(config.data)
    assert (prepared.gland_labels, prepared.lesion_labels) == ((1,), (1, 2, 3, 4, 5))
    config.data.gland_labels = (1, 2)
    config.data.lesion_labels = (3, 4, 5)
    config.data.lesion_background_labels = (2,)
    prepared = preprocess_config(config.data)
    assert (prepared.gland_labels, prepared.lesion_background_labels) == ((1, 2), (2,))
    config.data.lesion_background_labels = (3,)
    with pytest.raises(DataError, match=r"\[3\] are in both data.lesion_labels and data.lesion_background_labels"):
        preprocess_config(config.data)
    config.data.lesion_background_labels = ()
    config.data.gland_labels = (0, 1)
    with pytest.raises(DataError, match=r"must be positive integers \(0 is always background\)"):
        preprocess_config(config.data)
    config.data.gland_labels = ()
    with pytest.raises(DataError, match="data.gland_labels is empty"):
        preprocess_config(config.data)


def test_graded_lesion_map(tmp_path):
    """ISUP-graded lesion voxels: which grades are lesion is configuration, an unnamed grade is an error."""
    image = write_nifti(str(tmp_path / "t2.nii.gz"), np.ones((8, 8, 4), np.float32))
    grades = np.zeros((8, 8, 4), np.uint8)
    grades[1:3, 1:3, 1:3], grades[5:7, 5:7, 1:3] = 2, 4
    lesion = write_nifti(str(tmp_path / "lesion.nii.gz"), grades, dtype=np.uint8)
    case = Case(case_id="graded", t2=image, adc=image, dwi=image, split="train", lesion_mask=lesion)
    base = dict(spacing=None, crop_size=(4, 8, 8), region_margin=1.0)
    assert prepare_case(case, PreprocessConfig(**base)).lesion.sum() == 16
    grade_4 = prepare_case(case, PreprocessConfig(**base, lesion_labels=(3, 4, 5), lesion_background_labels=(1, 2)))
    assert grade_4.lesion.sum() == 8 and grade_4.lesion[1:3, 5:7, 5:7].all()
    with pytest.raises(DataError, match=r"lesion_mask has unexpected label value\(s\) \[2\]"):
        prepare_case(case, PreprocessConfig(**base, lesion_labels=(3, 4, 5)))


def _task(arg="smoke,binary", **data):
    config = load_config("cls", arg)
    for key, value in data.items():
        config.data[key] = value
    return ClassificationTask(config)


def test_classification_label_from_mapped_column():
    task = _task("smoke", label_column="isup", label_map="isup_cspca")  # two mapped classes: binary
    assert (task.num_classes, task.primary_metric) == (2, "auroc")
    assert [task.target(v) for v in ("0", "1", "2", "3.0", "5")] == [0, 0, 1, 1, 1]
    with pytest.raises(DataError, match="case 'c7'.*'isup' column holds '6', which data.label_map does not map"):
        task.validate_case(Case("c7", "a", "b", "c", "train", label="6"), None)
    explicit = _task(label_column="case_csPCa", label_map="NO:0,YES:1")
    assert [explicit.target("YES"), explicit.target("NO")] == [1, 0]
    default = _task()  # PI-RADS - 2 in `label`, csPCa = PI-RADS >= 4
    assert [default.target(v) for v in ("0", "1", "2", "3")] == [0, 0, 1, 1]
    pirads = _task("smoke", label_map="1:0,2:0,3:1,4:2,5:3")  # PI-RADS 1..5 as written, 1 and 2 together
    assert pirads.num_classes == 4 and pirads.target("4") == 2
    with pytest.raises(ValueError, match="data.label_column='isup' needs a data.label_map"):
        _task(label_column="isup")
    with pytest.raises(ValueError, match=r"maps to classes \[0, 2\]"):
        _task(label_column="isup", label_map="0:0,5:2")
    with pytest.raises(ValueError, match="task.binary needs a two-class data.label_map"):
        _task(label_map="1:0,2:0,3:1,4:2,5:3")
    with pytest.raises(ValueError, match="entry 'high' is not 'value:class'"):
        _task(label_map="high")
