"""Every image format reads to the same (D, H, W) array and the same RAS world geometry, and bad files say why."""
import os
import sys

import nibabel as nib
import numpy as np
import pytest

from helpers import write_manifest_for, write_nifti
from transfer_jax.data.errors import DataError
from transfer_jax.data.manifest import Case, read_manifest
from transfer_jax.data.nifti import Grid, Volume, read_volume, resample, write_like
from transfer_jax.data.preprocess import PreparedCase, PreprocessConfig, cache_key, preprocess_cases
from transfer_jax.data.readers import read_image
from transfer_jax.data.slices import write_prediction_nifti

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
SHAPE_DHW = (6, 10, 12)
SPACING_IJK = (0.7, 0.9, 3.0)  # mm along the file axes (W, H, D)
ORIGIN_RAS = (-31.5, 12.25, 47.0)


def _rotation(angles):
    (a, b, c) = angles
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


# Oblique and proper (det +1): every format, DICOM included. DICOM orders slices along the normal of its rows and
# columns, so a left-handed grid comes back with its slices reversed; the flipped case leaves DICOM out.
OBLIQUE = _rotation((0.2, -0.15, 0.35)) @ np.diag([-1.0, -1.0, 1.0])
FLIPPED = _rotation((0.0, 0.1, -0.25)) @ np.diag([-1.0, 1.0, 1.0])


def _affine(direction_ras, spacing=SPACING_IJK, origin=ORIGIN_RAS):
    affine = np.eye(4)
    affine[:3, :3] = direction_ras * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


def _volume():
    values = np.arange(np.prod(SHAPE_DHW)).reshape(SHAPE_DHW)
    return ((values * 37) % 1000 - 200).astype(np.int16)  # not symmetric along any axis, negative values too


@pytest.fixture
def sitk():
    return pytest.importorskip("SimpleITK")


def _itk_image(sitk, array_dhw, affine):
    """The SimpleITK image of the same volume: ITK keeps spacing apart from direction and works in LPS."""
    image = sitk.GetImageFromArray(array_dhw)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((LPS_FROM_RAS @ affine[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin((LPS_FROM_RAS @ affine[:3, 3]).tolist())
    return image


def _write_dicom_series(sitk, image, folder, series_uid="1.2.826.0.1.3680043.2.1125.42.1", suffix=".dcm"):
    """One file per slice, with the position and orientation tags a scanner writes."""
    os.makedirs(folder, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.KeepOriginalImageUIDOn()
    d = image.GetDirection()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        slice_.SetMetaData("0008|0060", "MR")
        slice_.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.42")
        slice_.SetMetaData("0020|000e", series_uid)
        slice_.SetMetaData("0020|0013", str(k + 1))
        slice_.SetMetaData("0020|0037", "\\".join(f"{v:.10f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])))
        slice_.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))))
        writer.SetFileName(os.path.join(folder, f"{series_uid[-1]}_{k:03d}{suffix}"))
        writer.Execute(slice_)
    return folder


def _world(grid):
    index = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1).reshape(-1, 3)
    return (grid.affine_dhw @ np.concatenate([index, np.ones((len(index), 1))], 1).T)[:3].T


@pytest.mark.parametrize("direction,formats", [
    (OBLIQUE, ("mha", "mhd", "nrrd", "dicom")),
    (FLIPPED, ("mha", "nrrd", "nhdr")),
], ids=["oblique", "flipped"])
def test_every_format_reads_to_the_same_array_and_world_geometry(sitk, tmp_path, direction, formats):
    array, affine = _volume(), _affine(direction)
    reference = read_volume(write_nifti(str(tmp_path / "nib.nii.gz"), array.transpose(2, 1, 0), affine, np.int16))
    image = _itk_image(sitk, array, affine)
    # ITK's own NIfTI writer, read by nibabel: the LPS image above is the same volume in ITK's convention.
    sitk.WriteImage(image, str(tmp_path / "itk.nii.gz"))
    paths = {"itk NIfTI": str(tmp_path / "itk.nii.gz")}
    for fmt in formats:
        if fmt == "dicom":
            paths[fmt] = _write_dicom_series(sitk, image, str(tmp_path / "series"), suffix="")
        else:
            paths[fmt] = str(tmp_path / f"volume.{fmt}")
            sitk.WriteImage(image, paths[fmt])

    assert reference.array.shape == SHAPE_DHW
    np.testing.assert_array_equal(reference.array, array)
    for fmt, path in paths.items():
        volume = read_volume(path, case_id="c", role=fmt)
        assert volume.grid.shape == SHAPE_DHW, fmt
        np.testing.assert_array_equal(volume.array, reference.array, err_msg=fmt)
        np.testing.assert_allclose(volume.grid.affine_dhw, reference.grid.affine_dhw, atol=1e-5, err_msg=fmt)
        np.testing.assert_allclose(_world(volume.grid), _world(reference.grid), atol=1e-4, err_msg=fmt)
    np.testing.assert_allclose(reference.grid.spacing, SPACING_IJK[::-1], atol=1e-6)


def test_a_dicom_folder_of_dcm_files_keeps_the_stored_integer_type(sitk, tmp_path):
    array = _volume()
    folder = _write_dicom_series(sitk, _itk_image(sitk, array, _affine(OBLIQUE)), str(tmp_path / "series"))
    read, _ = read_image(folder)
    assert read.dtype == np.int16
    np.testing.assert_array_equal(read, array)


def _case_files(folder, rng):
    """A small case whose ADC and DWI sit on other (coarser, shifted) grids than the oblique T2."""
    t2_affine, other = _affine(OBLIQUE), _affine(OBLIQUE, spacing=(1.1, 1.3, 3.0), origin=(-30.0, 13.0, 45.5))
    gland = np.zeros(SHAPE_DHW, np.uint8)
    gland[1:5, 2:8, 3:10] = 1
    lesion = np.zeros(SHAPE_DHW, np.uint8)
    lesion[2:4, 4:6, 5:8] = 2
    files = {
        "t2": (rng.integers(1, 900, SHAPE_DHW).astype(np.int16), t2_affine),
        "adc": (rng.integers(1, 900, (5, 8, 9)).astype(np.int16), other),
        "dwi": (rng.integers(1, 900, (5, 8, 9)).astype(np.int16), other),
        "gland_mask": (gland, t2_affine),
        "lesion_mask": (lesion, t2_affine),
    }
    return {role: write_nifti(os.path.join(folder, f"{role}.nii.gz"), array.transpose(2, 1, 0), affine,
                              array.dtype) for role, (array, affine) in files.items()}


def test_a_manifest_of_mha_files_prepares_like_the_nifti_one(sitk, tmp_path):
    rng = np.random.default_rng(3)
    cases = {"nifti": [], "mha": []}
    for case_id in ("a", "b"):
        (tmp_path / case_id).mkdir()
        nifti = _case_files(str(tmp_path / case_id), rng)
        mha = {role: str(tmp_path / case_id / f"{role}.mha") for role in nifti}
        for role in nifti:  # converted by ITK's own NIfTI reader, not by the code under test
            image = sitk.ReadImage(nifti[role])
            for key in image.GetMetaDataKeys():  # NIfTI header fields MetaImage has no place for
                image.EraseMetaData(key)
            sitk.WriteImage(image, mha[role])
        cases["nifti"].append(Case(case_id=case_id, split="train", **nifti))
        cases["mha"].append(Case(case_id=case_id, split="train", **mha))
    config = PreprocessConfig(spacing=(2.5, 1.0, 0.8), crop_size=(4, 8, 8))
    prepared = {}
    for kind, listed in cases.items():
        (tmp_path / kind).mkdir()
        manifest = read_manifest(write_manifest_for(str(tmp_path / kind), listed))
        report = preprocess_cases(manifest, config, str(tmp_path / kind / "cache"))
        prepared[kind] = {case_id: PreparedCase.load(path) for case_id, path in report.paths.items()}

    assert sorted(prepared["mha"]) == sorted(prepared["nifti"]) == ["a", "b"]
    for case_id, want in prepared["nifti"].items():
        got = prepared["mha"][case_id]
        assert want.gland.any() and want.lesion.any()
        np.testing.assert_allclose(got.image, want.image, atol=1e-4)
        np.testing.assert_array_equal(got.gland, want.gland)
        np.testing.assert_array_equal(got.lesion, want.lesion)
        np.testing.assert_allclose(got.region_grid.affine, want.region_grid.affine, atol=1e-5)
        np.testing.assert_allclose(got.source_grid.affine, want.source_grid.affine, atol=1e-5)


def _expect_error(path, *fragments, absent=()):
    with pytest.raises(DataError) as info:
        read_volume(path, case_id="case7", role="t2")
    message = str(info.value)
    assert "case7" in message and path in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    for fragment in absent:
        assert fragment not in message, message
    return message


SUPPORTED = ("NIfTI (.nii, .nii.gz)", "MetaImage (.mha, .mhd)", "NRRD (.nrrd, .nhdr)", "DICOM series")


def test_a_file_of_another_format_named_like_nifti_says_what_it_looks_like(sitk, tmp_path):
    disguised = str(tmp_path / "t2.nii.gz")
    sitk.WriteImage(_itk_image(sitk, _volume(), _affine(OBLIQUE)), str(tmp_path / "t2.mha"))
    os.rename(tmp_path / "t2.mha", disguised)
    _expect_error(disguised, "as NIfTI", "looks like MetaImage", ".mha", *SUPPORTED, absent=("truncated",))

    nrrd_named_mha = str(tmp_path / "t2_.mha")
    sitk.WriteImage(_itk_image(sitk, _volume(), _affine(OBLIQUE)), str(tmp_path / "x.nrrd"))
    os.rename(tmp_path / "x.nrrd", nrrd_named_mha)
    _expect_error(nrrd_named_mha, "as MetaImage", "looks like NRRD", absent=("truncated",))


def test_a_nifti_named_mha_is_reported_without_simpleitk(tmp_path):
    path = str(tmp_path / "t2.mha")
    write_nifti(path + ".nii", np.ones((4, 4, 3)))
    os.rename(path + ".nii", path)
    _expect_error(path, "as MetaImage", "looks like NIfTI", absent=("truncated",))


def test_a_dicom_folder_with_a_missing_slice_names_the_gap(sitk, tmp_path):
    folder = _write_dicom_series(sitk, _itk_image(sitk, _volume(), _affine(OBLIQUE)), str(tmp_path / "series"))
    os.remove(os.path.join(folder, "1_003.dcm"))
    message = _expect_error(folder, "not evenly spaced", "6 mm between 1_002.dcm and 1_004.dcm", "3 mm")
    assert "missing" in message


def test_a_dicom_folder_with_two_series_names_both(sitk, tmp_path):
    image = _itk_image(sitk, _volume(), _affine(OBLIQUE))
    folder = _write_dicom_series(sitk, image, str(tmp_path / "mixed"), series_uid="1.2.826.0.1.3680043.2.1125.42.1")
    _write_dicom_series(sitk, image, folder, series_uid="1.2.826.0.1.3680043.2.1125.42.2")
    _expect_error(folder, "2 DICOM series", "1.2.826.0.1.3680043.2.1125.42.1 (6 files)",
                  "1.2.826.0.1.3680043.2.1125.42.2 (6 files)")


def test_a_folder_without_dicom_files_is_an_error(sitk, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    _expect_error(str(tmp_path / "empty"), "no DICOM series", *SUPPORTED)


def test_a_truncated_mha_names_the_file_and_format(sitk, tmp_path):
    whole = str(tmp_path / "whole.mha")
    sitk.WriteImage(_itk_image(sitk, _volume(), _affine(OBLIQUE)), whole)
    cut = str(tmp_path / "cut.mha")
    with open(whole, "rb") as f:
        data = f.read()
    with open(cut, "wb") as f:
        f.write(data[: len(data) - 200])
    _expect_error(cut, "truncated or not a valid MetaImage", *SUPPORTED)


@pytest.mark.parametrize("name,hint", [("t2.png", None), ("t2.img", None), ("slice.dcm", "folder")])
def test_an_unsupported_suffix_lists_the_supported_formats(tmp_path, name, hint):
    path = tmp_path / name
    path.write_bytes(b"\0" * 400)
    _expect_error(str(path), "unsupported file name suffix", *SUPPORTED, *([hint] if hint else []))


def test_without_simpleitk_a_metaimage_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "t2.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_UCHAR\n"
                    "ElementDataFile = LOCAL\n" + "\0" * 8)
    monkeypatch.setitem(sys.modules, "SimpleITK", None)  # makes `import SimpleITK` fail
    _expect_error(str(path), 'pip install "transfer_jax[itk]"', "SimpleITK", "MetaImage")


def test_four_d_and_non_finite_metaimages_keep_the_volume_checks(sitk, tmp_path):
    four_d = sitk.JoinSeries([sitk.GetImageFromArray(_volume())] * 3)
    sitk.WriteImage(four_d, str(tmp_path / "4d.mha"))
    _expect_error(str(tmp_path / "4d.mha"), "must be a 3-D volume", "(12, 10, 6, 3)")

    single = sitk.JoinSeries([sitk.GetImageFromArray(_volume())])
    sitk.WriteImage(single, str(tmp_path / "4d1.mha"))
    np.testing.assert_array_equal(read_volume(str(tmp_path / "4d1.mha")).array, _volume())

    values = _volume().astype(np.float32)
    values[2, 3, 4] = np.nan
    values[0, 0, 0] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(values), str(tmp_path / "nan.nrrd"))
    _expect_error(str(tmp_path / "nan.nrrd"), "2 NaN/Inf voxel(s)")


def test_predictions_on_a_metaimage_reference_overlay_it(sitk, tmp_path):
    array, affine = _volume(), _affine(FLIPPED)
    reference = str(tmp_path / "t2.mha")
    sitk.WriteImage(_itk_image(sitk, array, affine), reference)
    labels = (array > 100).astype(np.uint8)

    written = nib.load(write_prediction_nifti(labels, reference, tmp_path / "labels.nii.gz"))
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj).transpose(2, 1, 0), labels)
    with pytest.raises(ValueError, match="does not match"):
        write_prediction_nifti(labels[:3], reference, tmp_path / "bad.nii.gz")

    grid = read_volume(reference).grid
    write_like(labels, grid, str(tmp_path / "like.nii.gz"), reference=reference)
    again = read_volume(str(tmp_path / "like.nii.gz"))
    np.testing.assert_allclose(again.grid.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(again.array, labels)


def test_the_cache_key_follows_the_data_file_of_a_detached_header(sitk, tmp_path):
    header = str(tmp_path / "t2.mhd")
    sitk.WriteImage(_itk_image(sitk, _volume(), _affine(OBLIQUE)), header)
    data = [str(tmp_path / n) for n in os.listdir(tmp_path) if n.startswith("t2.") and n != "t2.mhd"]
    assert len(data) == 1
    case = Case(case_id="k", t2=header, adc=header, dwi=header, split="train")
    config = PreprocessConfig(spacing=None, crop_size=(4, 8, 8))
    before = cache_key(case, config)
    stat = os.stat(data[0])
    os.utime(data[0], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cache_key(case, config) != before


@pytest.mark.parametrize("order", [0, 1])
def test_resampling_keeps_border_planes_whatever_the_rounding_of_the_affine(order):
    """A float32 NIfTI affine and the double one of an .mha differ by rounding; a target plane lying on the
    source's first plane (as after `with_spacing`) must not turn to zeros on one side of that rounding."""
    values = np.random.default_rng(5).uniform(1.0, 2.0, SHAPE_DHW).astype(np.float32)
    affine = _affine(OBLIQUE)
    # A third of the source's spacing: no nearest-neighbour ties, and target voxels 0 and (15, 27, 33) lie exactly
    # on the source's first and last planes.
    target = Grid(SHAPE_DHW, affine).with_spacing((1.0, 0.3, 0.7 / 3))
    results = []
    for shift in (0.0, 1e-6, -1e-6):  # voxels, along every axis
        moved = affine.copy()
        moved[:3, 3] += shift * affine[:3, :3].sum(axis=1)
        results.append(resample(Volume(values, Grid(SHAPE_DHW, moved), ""), target, order=order))
    assert results[0][:16, :28, :34].min() >= 1.0 and not results[0][16:].any()
    for result in results[1:]:
        np.testing.assert_allclose(result, results[0], atol=1e-4)
