"""Bad input is caught before training, with an error that names the case, the file and what was expected."""
import gzip
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, write_nifti
from transfer_jax.data.errors import BadCasesError, DataError
from transfer_jax.data.manifest import Case, read_manifest, write_manifest
from transfer_jax.data.preprocess import PreprocessConfig, prepare_case, preprocess_cases

CONFIG = PreprocessConfig(spacing=None, crop_size=(4, 8, 8))


def _case(tmp_path, name="c1", **replace) -> Case:
    """A valid tiny case; keyword arguments swap in broken files."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    files = {}
    for role in ("t2", "adc", "dwi"):
        files[role] = write_nifti(str(folder / f"{role}.nii.gz"), rng.random((12, 12, 6)) * 100 + 1)
    mask = np.zeros((12, 12, 6), np.uint8)
    mask[3:9, 3:9, 1:5] = 1
    files["gland_mask"] = write_nifti(str(folder / "gland.nii.gz"), mask, dtype=np.uint8)
    files["lesion_mask"] = write_nifti(str(folder / "lesion.nii.gz"), mask * 0, dtype=np.uint8)
    files.update(replace)
    return Case(case_id=name, split="train", **files)


def _expect(case, *fragments):
    with pytest.raises(DataError) as info:
        prepare_case(case, CONFIG)
    message = str(info.value)
    assert case.case_id in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_valid_case_prepares(tmp_path):
    prepared = prepare_case(_case(tmp_path), CONFIG)
    assert prepared.image.shape == (5, 10, 10, 3)


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.nii.gz")
    _expect(_case(tmp_path, adc=missing), "adc file does not exist", missing)


def test_truncated_gzip(tmp_path):
    good = _case(tmp_path).t2
    broken = str(tmp_path / "truncated.nii.gz")
    with open(good, "rb") as f:
        data = f.read()
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 2])
    _expect(_case(tmp_path, t2=broken), "truncated or not a valid NIfTI", broken)


def test_not_a_nifti(tmp_path):
    junk = str(tmp_path / "junk.nii.gz")
    with gzip.open(junk, "wb") as f:
        f.write(b"this is not an image" * 50)
    _expect(_case(tmp_path, dwi=junk), "dwi", junk)


def test_four_d_volume(tmp_path):
    four_d = write_nifti(str(tmp_path / "4d.nii.gz"), np.ones((12, 12, 6, 3)))
    _expect(_case(tmp_path, t2=four_d), "must be a 3-D volume", "(12, 12, 6, 3)")


def test_trailing_singleton_axis_is_accepted(tmp_path):
    volume = write_nifti(str(tmp_path / "4d1.nii.gz"), np.random.default_rng(1).random((12, 12, 6, 1)) + 1)
    assert prepare_case(_case(tmp_path, t2=volume), CONFIG).image.shape == (5, 10, 10, 3)


def test_grids_do_not_overlap(tmp_path):
    far = np.eye(4)
    far[:3, 3] = (500.0, 0.0, 0.0)
    moved = write_nifti(str(tmp_path / "far.nii.gz"), np.ones((12, 12, 6)), affine=far)
    _expect(_case(tmp_path, adc=moved), "do not overlap", "covers only 0%")


def test_nan_and_inf_voxels(tmp_path):
    data = np.ones((12, 12, 6), np.float32)
    data[0, 0, 0] = np.nan
    data[1, 1, 1] = np.inf
    bad = write_nifti(str(tmp_path / "nan.nii.gz"), data)
    _expect(_case(tmp_path, dwi=bad), "2 NaN/Inf voxel(s)", bad)


def test_mask_with_unexpected_labels(tmp_path):
    mask = np.zeros((12, 12, 6), np.uint8)
    mask[2:5, 2:5, 2:4] = 7
    bad = write_nifti(str(tmp_path / "mask7.nii.gz"), mask, dtype=np.uint8)
    _expect(_case(tmp_path, gland_mask=bad), "unexpected label value(s) [7]", "gland_mask")
    fractional = write_nifti(str(tmp_path / "maskf.nii.gz"), mask * 0.5)
    _expect(_case(tmp_path, lesion_mask=fractional), "integer labels")


def test_manifest_missing_column(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("case_id,t2,adc,split\nc1,a.nii.gz,b.nii.gz,train\n")
    with pytest.raises(DataError) as info:
        read_manifest(str(path))
    assert "missing required column(s) ['dwi']" in str(info.value) and str(path) in str(info.value)


def test_manifest_row_problems_are_reported_together(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("case_id,t2,adc,dwi,split\nc1,a,b,c,train\nc1,a,b,c,val\nc2,a,b,c,holdout\nc3,,b,c,test\n")
    with pytest.raises(DataError) as info:
        read_manifest(str(path))
    message = str(info.value)
    assert "duplicate case_id 'c1'" in message and "'holdout'" in message and "empty path" in message


def test_policy_error_lists_every_bad_case_before_training(tmp_path):
    good = _case(tmp_path, "good")
    bad1 = _case(tmp_path, "bad1", adc=str(tmp_path / "missing.nii.gz"))
    bad2 = _case(tmp_path, "bad2", t2=write_nifti(str(tmp_path / "x4d.nii.gz"), np.ones((4, 4, 4, 2))))
    with pytest.raises(BadCasesError) as info:
        preprocess_cases([good, bad1, bad2], CONFIG, str(tmp_path / "cache"), on_bad_case="error")
    assert len(info.value.problems) == 2
    assert "bad1" in str(info.value) and "bad2" in str(info.value) and "on_bad_case='skip'" in str(info.value)


def test_policy_skip_reports_and_keeps_the_rest(tmp_path):
    good = _case(tmp_path, "good")
    bad = _case(tmp_path, "bad", dwi=str(tmp_path / "missing.nii.gz"))
    report = preprocess_cases([good, bad], CONFIG, str(tmp_path / "cache"), on_bad_case="skip")
    assert list(report.paths) == ["good"]
    assert [p.case_id for p in report.problems] == ["bad"]


@pytest.mark.slow
def test_run_with_skipped_case_reports_it_in_the_summary(tmp_path):
    from helpers import smoke_config, tiny_manifest
    from transfer_jax.train.loop import train_and_evaluate

    manifest = tiny_manifest(str(tmp_path / "data"), num_cases=5)
    cases = read_manifest(manifest)
    broken = cases[0].__class__(**{**cases[0].__dict__, "adc": str(tmp_path / "gone.nii.gz")})
    edited = os.path.join(str(tmp_path / "data"), "edited.csv")
    write_manifest(edited, [broken] + cases[1:])
    config = smoke_config(**{"data.manifest": edited, "total_steps": 1, "eval_every": 1, "log_every": 1,
                             "checkpoint_every": 1, "data.on_bad_case": "skip", "logging.tensorboard": False})
    summary = train_and_evaluate(config, str(tmp_path / "run"))
    assert len(summary["skipped_cases"]) == 1 and cases[0].case_id in summary["skipped_cases"][0]
    config.data.on_bad_case = "error"
    with pytest.raises(BadCasesError):
        train_and_evaluate(config, str(tmp_path / "run2"))
    assert not os.path.exists(os.path.join(str(tmp_path / "run2"), "checkpoints", "1"))


def test_unknown_config_key_is_rejected_by_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "transfer_jax.main", "--config=configs/seg.py:smoke",
         f"--workdir={tmp_path / 'run'}", "--config.optimizer.learning_rate=1e-3"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "unknown config field 'learning_rate'" in result.stderr and "Traceback" not in result.stderr


def test_bad_cases_end_the_command_with_one_list_and_no_traceback(tmp_path):
    good = _case(tmp_path, "good")
    bad = _case(tmp_path, "bad", t2=str(tmp_path / "bad" / "absent.mha"))
    worse = _case(tmp_path, "worse", adc=write_nifti(str(tmp_path / "x4d.nii.gz"), np.ones((4, 4, 4, 2))))
    manifest = str(tmp_path / "manifest.csv")
    write_manifest(manifest, [good, bad, worse])
    result = subprocess.run(
        [sys.executable, "-m", "transfer_jax.main", "--config=configs/seg.py:smoke", f"--workdir={tmp_path / 'run'}",
         f"--config.data.manifest={manifest}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "error: 2 case(s) failed the pre-flight check" in result.stderr
    assert "case 'bad', file " in result.stderr and "absent.mha: t2 file does not exist" in result.stderr
    assert "case 'worse', file " in result.stderr and "'good'" not in result.stderr
