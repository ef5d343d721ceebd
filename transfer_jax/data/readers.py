"""Reading one 3-D image from any supported format into the project's array and world conventions.

Formats: NIfTI (`.nii`, `.nii.gz`; nibabel), MetaImage (`.mha`, `.mhd`), NRRD (`.nrrd`, `.nhdr`) and DICOM series
(a folder of `.dcm` or extension-less files); the last three through SimpleITK, an optional dependency imported
only when such a file is read. The reader is chosen by suffix (a folder is a DICOM series) and the file's first
bytes are checked against it, so a MetaImage named `.nii.gz` is reported as such instead of as a damaged NIfTI.

Whatever the reader, the result is the same: the array is (D, H, W) = the file's (i, j, k) axes reversed, without
reorientation (SimpleITK's `GetArrayFromImage`; nibabel's data transposed), and the affine maps (i, j, k) to world
RAS millimetres as nibabel's does. ITK's world is LPS, so its direction and origin have the first two world axes
negated; an .mha and the NIfTI of the same volume then give the same array and the same affine.
"""
from __future__ import annotations

import os
import re
import zlib

import nibabel as nib
import numpy as np

from transfer_jax.data.errors import DataError

NIFTI, METAIMAGE, NRRD, DICOM = "NIfTI", "MetaImage", "NRRD", "DICOM series"
SUFFIXES = {NIFTI: (".nii", ".nii.gz"), METAIMAGE: (".mha", ".mhd"), NRRD: (".nrrd", ".nhdr")}
SUPPORTED = "NIfTI (.nii, .nii.gz), MetaImage (.mha, .mhd), NRRD (.nrrd, .nhdr), DICOM series (a folder)"
INSTALL_HINT = 'pip install "transfer_jax[itk]" (SimpleITK)'

# ITK's world is LPS, NIfTI's (and this project's) RAS: the same point with x and y negated.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_ITK_IO = {METAIMAGE: "MetaImageIO", NRRD: "NrrdImageIO"}
_METAIMAGE_KEY = re.compile(rb"\s*(ObjectType|NDims|DimSize|ElementType|ElementSpacing|HeaderSize|Comment)\s*=")
# Consecutive DICOM slice positions may differ from their median step by this fraction before a slice counts as
# missing (scanners round positions; a missing slice doubles a step).
_SLICE_STEP_TOLERANCE = 0.01


def format_of(path: str) -> str | None:
    """The format the name promises: by suffix (case-insensitive), a folder being a DICOM series."""
    if os.path.isdir(path):
        return DICOM
    name = path.lower()
    for fmt, suffixes in SUFFIXES.items():
        if name.endswith(suffixes):
            return fmt
    return None


def sniff(path: str) -> str | None:
    """The format the file's first bytes look like (gzip is looked through), or None if none is recognised."""
    try:
        with open(path, "rb") as f:
            head = f.read(2048)
    except OSError:
        return None
    if head[:2] == b"\x1f\x8b":
        try:  # a decompressor object tolerates a cut-off stream and returns what it could decode
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head)
        except zlib.error:
            return None
    if head[344:348] in (b"n+1\0", b"ni1\0") or head[4:8] in (b"n+2\0", b"ni2\0"):
        return NIFTI
    if head.startswith(b"NRRD000"):
        return NRRD
    if head[128:132] == b"DICM":
        return "DICOM"
    if _METAIMAGE_KEY.match(head):
        return METAIMAGE
    return None


def source_files(path: str) -> list[str]:
    """Every file an image is read from, for cache keys: the file itself plus the data file a detached header
    (.mhd, .nhdr) names, or every file of a DICOM folder. Data-file lists and patterns count as the header only."""
    if os.path.isdir(path):
        return sorted(e.path for e in os.scandir(path) if e.is_file())
    files = [path]
    key = {METAIMAGE: r"ElementDataFile\s*=", NRRD: r"data ?file\s*:"}.get(format_of(path))
    if key is not None and path.lower().endswith((".mhd", ".nhdr")):
        try:
            with open(path, "rb") as f:
                header = f.read(65536).decode("latin-1")
        except OSError:
            return files
        match = re.search(rf"^\s*{key}\s*(\S+)\s*$", header, flags=re.MULTILINE | re.IGNORECASE)
        if match and match.group(1) not in ("LOCAL", "LIST") and "%" not in match.group(1):
            data = os.path.join(os.path.dirname(path), match.group(1))
            if os.path.isfile(data):
                files.append(data)
    return files


def read_image(path: str, *, case_id: str | None = None, role: str = "image",
               dtype=None) -> tuple[np.ndarray, np.ndarray]:
    """(array (D, H, W), affine (i, j, k) -> RAS mm) of one 3-D image; every failure is a one-line DataError.

    `dtype` None keeps the stored type (scaled NIfTI data comes back as float). A trailing 4th axis of length 1
    is dropped; any other 4-D or vector image is an error.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{role} file does not exist", case_id=case_id, path=path)
    fmt = format_of(path)
    if fmt is None:
        hint = "; a DICOM file: give the folder holding its series" if path.lower().endswith(".dcm") else ""
        raise DataError(f"cannot read {role}: unsupported file name suffix{hint}; supported: {SUPPORTED}",
                        case_id=case_id, path=path)
    if fmt == DICOM:
        return _read_dicom_series(path, case_id, role, dtype)
    found = sniff(path)
    if found is not None and found != fmt:
        fix = ("give the folder of its series instead" if found == "DICOM"
               else f"rename it ({', '.join(SUFFIXES[found])}) or convert it")
        raise DataError(f"cannot read {role} as {fmt}: the file looks like {found}, not {fmt}; {fix}; "
                        f"supported: {SUPPORTED}", case_id=case_id, path=path)
    if fmt == NIFTI:
        return _read_nifti(path, case_id, role, dtype)
    sitk = _simpleitk(fmt, case_id, role, path)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(_ITK_IO[fmt])
    reader.SetFileName(path)
    return _execute(reader, fmt, case_id, role, path, dtype)


def _execute(reader, fmt: str, case_id: str | None, role: str, path: str, dtype):
    """Runs a SimpleITK reader; its failure becomes the one-line error of an unreadable file."""
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise _unreadable(fmt, role, case_id, path, _itk_reason(exc)) from None
    return _from_itk(image, case_id, role, path, dtype)


def _unreadable(fmt: str, role: str, case_id: str | None, path: str, reason: str) -> DataError:
    return DataError(f"cannot read {role}: the file is truncated or not a valid {fmt} ({reason}); supported: "
                     f"{SUPPORTED}", case_id=case_id, path=path)


def _not_3d(role: str, shape: tuple[int, ...]) -> str:
    return f"{role} must be a 3-D volume, got shape {shape} ({len(shape)}-D)"


def _read_nifti(path: str, case_id: str | None, role: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    try:
        image = nib.load(path)
        shape = image.shape
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise DataError(_not_3d(role, image.shape), case_id=case_id, path=path)
        data = np.asarray(image.dataobj, dtype=dtype).reshape(shape)
    except DataError:
        raise
    except (EOFError, OSError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise _unreadable(NIFTI, role, case_id, path, f"{type(exc).__name__}: {exc}") from None
    return np.ascontiguousarray(data.transpose(2, 1, 0)), np.asarray(image.affine, dtype=np.float64)


def _simpleitk(fmt: str, case_id: str | None, role: str, path: str):
    try:
        import SimpleITK
    except ImportError:
        raise DataError(f"cannot read {role}: {fmt} files are read with SimpleITK, which is not installed; "
                        f"{INSTALL_HINT}", case_id=case_id, path=path) from None
    return SimpleITK


def _itk_reason(exc: RuntimeError) -> str:
    """ITK's multi-line exception text reduced to its message lines (no source locations or object ids)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [re.sub(r"^ITK ERROR: \w+\(0x[0-9a-f]+\): ", "", line) for line in lines
            if line and not line.startswith("Exception thrown in SimpleITK") and line != "Reason: Success"]
    return " ".join(kept) or "ITK could not read it"


def _from_itk(image, case_id: str | None, role: str, path: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    size = tuple(image.GetSize())
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(f"{role} has {image.GetNumberOfComponentsPerPixel()} values per voxel (a vector or colour "
                        "image); expected one", case_id=case_id, path=path)
    if len(size) == 4 and size[3] == 1:
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, 0])
    elif len(size) != 3:
        raise DataError(_not_3d(role, size), case_id=case_id, path=path)
    array = sitk.GetArrayFromImage(image)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return np.ascontiguousarray(array), affine


def _read_dicom_series(folder: str, case_id: str | None, role: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    sitk = _simpleitk(DICOM, case_id, role, folder)
    series = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series:
        raise DataError(f"cannot read {role}: the folder holds no DICOM series (a folder is read as one DICOM "
                        f"series); supported: {SUPPORTED}", case_id=case_id, path=folder)
    if len(series) > 1:
        listing = ", ".join(f"{uid} ({len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, uid))} files)"
                            for uid in series)
        raise DataError(f"{role} folder holds {len(series)} DICOM series: {listing}; give each series its own "
                        "folder", case_id=case_id, path=folder)
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series[0])
    _check_slice_positions(sitk, folder, files, case_id, role)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return _execute(reader, DICOM, case_id, role, folder, dtype)


def _check_slice_positions(sitk, folder: str, files, case_id: str | None, role: str) -> None:
    """Slices must share one orientation and be evenly spaced along its normal: a gap means a missing slice."""
    positions, orientations = [], []
    for name in files:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
            positions.append([float(v) for v in reader.GetMetaData("0020|0032").split("\\")])
            orientations.append([float(v) for v in reader.GetMetaData("0020|0037").split("\\")])
        except (RuntimeError, ValueError) as exc:
            raise DataError(f"{role} DICOM slice {os.path.basename(name)} has no readable image position/"
                            f"orientation ({type(exc).__name__}: {exc})", case_id=case_id, path=folder) from None
    orientations = np.asarray(orientations)
    if len(files) < 2:
        return
    if np.abs(orientations - orientations[0]).max() > 1e-4:
        raise DataError(f"{role} DICOM slices have different orientations (ImageOrientationPatient); expected "
                        "one stack of parallel slices", case_id=case_id, path=folder)
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    along = np.asarray(positions) @ normal
    steps = np.diff(along)
    step = float(np.median(steps))
    if step == 0:
        raise DataError(f"{role} DICOM slices share one position (ImagePositionPatient) "
                        "along their normal; expected one stack of distinct slices", case_id=case_id, path=folder)
    bad = np.flatnonzero(np.abs(steps - step) > _SLICE_STEP_TOLERANCE * abs(step))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{role} DICOM slices are not evenly spaced: {abs(steps[i]):.4g} mm between "
            f"{os.path.basename(files[i])} and {os.path.basename(files[i + 1])} (positions {along[i]:.4g} and "
            f"{along[i + 1]:.4g} mm along the slice normal) where the usual step is {abs(step):.4g} mm; a slice "
            f"is missing or duplicated ({bad.size} uneven step(s) in {len(files)} slices)",
            case_id=case_id, path=folder)
