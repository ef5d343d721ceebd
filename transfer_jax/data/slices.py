"""ProViCNet slice data path (numpy only): an image case -> 2.5-D slice stacks -> model inputs, and back.

What upstream (``US_MRI_Generator.__getitem__`` + ``collate_prostate_position_CS``, pimed/ProViCNet 1b016ac) does,
in this order, and what this module reproduces:

1. Read the volume as ``[Z, Y, X]`` = the file's ``(i, j, k)`` axes reversed, no reorientation (SimpleITK's
   ``GetArrayFromImage``; nibabel ``dataobj.transpose(2, 1, 0)``), in any format of :mod:`readers`.
2. Z-score the *whole* volume with the mean and (population) standard deviation of the voxels where the gland
   mask equals 1 -- every sequence (T2, ADC, DWI, TRUS) alike, no clipping. (Upstream divides by 255 first; a
   z-score does not see that.) An empty gland mask is an error here (upstream silently produces NaN).
3. Resize every slice, image only, to 448 x 448 with bilinear interpolation on half-pixel centres and edge
   clamping (cv2 ``INTER_LINEAR`` as used by albumentations ``Resize``). Labels stay at the native grid (256 x 256
   for the released models: the model output size).
4. Stack each kept slice with its neighbours into ``C`` channels (3 for MRI, 9 for TRUS), channel ``c`` holding
   slice ``centre - C//2 + c``. Edge rule (``edge=``):

   * ``"shift"`` (default): upstream's behaviour. Volumes with fewer than ``2 C`` slices are first zero-padded by
     ``C//2`` slices at both ends (images *and* labels); then a centre too close to an end is *moved* by ``C//2``
     into the volume (``i - C//2 < 0 -> i + C//2``, ``i + C//2 >= Z -> i - C//2``), and the label follows the
     moved centre. For Z = 20 the stacks are centred on ``[1, 1, 2, ..., 18, 18]`` (C = 3) and
     ``[4, 5, 6, 7, 4, 5, ..., 15, 12, 13, 14, 15]`` (C = 9).
   * ``"clamp"``: neighbours outside the volume repeat the first / last slice, so every stack is centred on the
     slice it is made for (the image-to-image slice tasks need that).
5. Keep every slice (``keep_background_fraction=1.0``: MRI inference / validation), or all slices containing
   gland plus a random fraction of the others (upstream TRUS default 0.2, MRI training 0.8).
6. Slice-position input per stack: ``(j, n)`` with ``j = 0..n-1`` the running index over the *kept* stacks and
   ``n`` their number, raw floats (for a whole MRI volume: the slice index and the volume's slice count). A crop
   of the volume keeps the volume's numbers (:func:`crop_positions`).
7. Labels: cancer values ``> 2`` are clamped to 2 (the sample stores csPCa as 3); optionally 1 -> 2 (upstream does
   this when the path contains "PICAI": PI-CAI lesions are csPCa only). Four classes per pixel: 0 background,
   1 gland without cancer (gland zeroed where cancer > 0), 2 indolent (cancer == 1), 3 csPCa (cancer == 2); cancer
   outside the gland still counts as cancer.

Layouts: images ``[S, C, 448, 448]`` float32 (upstream NCHW; the Flax model wants NHWC, see
``np.transpose(images, (0, 2, 3, 1))``), labels ``[S, Y, X]`` uint8 class indices (``one_hot`` gives
``[S, 4, Y, X]``), positions ``[S, 2]`` float32.

Back to the volume: :func:`volume_from_slices` puts each stack's prediction on the slice it was made for, as
upstream's inference writes output slot k on slice k (with ``"shift"`` the first and last slots hold the
predictions of the moved stacks), and :func:`write_prediction_nifti` writes them as NIfTI with the reference
image's affine (and header, for a NIfTI reference), array ``[Z, Y, X, ...]`` <-> NIfTI ``(X, Y, Z, ...)``, so the
file overlays the input in 3D Slicer / ITK-SNAP.

:func:`case_slices` builds a manifest case's stacks from its files for ``predict`` and ``extract``; training and
evaluation build theirs from the prepared crops with the same steps (``tasks/slice_segmentation.py``), their
positions counted from the volume by :func:`crop_positions`.
"""

from __future__ import annotations

import dataclasses
import os

import nibabel as nib
import numpy as np

from transfer_jax.data.errors import DataError
from transfer_jax.data.nifti import Grid, read_volume, resample
from transfer_jax.data.readers import NIFTI, format_of, read_image

MODEL_IMAGE_SIZE = 448
MRI_CHANNELS = 3
TRUS_CHANNELS = 9
CLASS_NAMES = ("background", "gland", "indolent", "csPCa")
EDGE_RULES = ("shift", "clamp")


# --------------------------------------------------------------------------------------------------------------
# Reading and labels
# --------------------------------------------------------------------------------------------------------------


def map_cancer_labels(cancer: np.ndarray, *, indolent_as_cspca: bool = False) -> np.ndarray:
    """Upstream ``_cancerTo3``: values ``> 2`` become 2 (csPCa); ``indolent_as_cspca`` also maps 1 -> 2.

    Returns uint8 in {0, 1, 2}: 0 none, 1 indolent (GG1), 2 clinically significant (GG >= 2).
    """
    values = np.asarray(cancer)
    if np.any(values < 0):
        raise ValueError(f"cancer labels must be >= 0, got minimum {values.min()}")
    mapped = np.minimum(values, 2)
    if indolent_as_cspca:
        mapped = np.where(mapped == 1, 2, mapped)
    return mapped.astype(np.uint8)


def four_class_labels(gland: np.ndarray, cancer: np.ndarray) -> np.ndarray:
    """Class index per pixel (upstream ``collate_prostate_position_CS`` argmax), uint8.

    ``cancer`` already mapped to {0, 1, 2} (:func:`map_cancer_labels`). 0 background, 1 gland without cancer,
    2 indolent, 3 csPCa; cancer wins over gland and counts even outside the gland.
    """
    gland = np.asarray(gland)
    cancer = np.asarray(cancer)
    if gland.shape != cancer.shape:
        raise ValueError(f"gland {gland.shape} and cancer {cancer.shape} labels differ in shape")
    labels = np.where(gland > 0, 1, 0).astype(np.uint8)
    labels[cancer == 1] = 2
    labels[cancer >= 2] = 3
    return labels


def one_hot(labels: np.ndarray, num_classes: int = len(CLASS_NAMES), axis: int = 1) -> np.ndarray:
    """Class indices -> float32 one-hot with the class axis inserted at ``axis`` ([S, 4, Y, X] by default)."""
    encoded = np.eye(num_classes, dtype=np.float32)[np.asarray(labels, dtype=np.int64)]
    return np.moveaxis(encoded, -1, axis)


# --------------------------------------------------------------------------------------------------------------
# Intensities and resizing
# --------------------------------------------------------------------------------------------------------------


def zscore_in_gland(volume: np.ndarray, gland: np.ndarray, *, name: str = "image") -> np.ndarray:
    """Whole-volume z-score with the mean / population std of the voxels where ``gland == 1``; float32.

    Statistics in float64. Raises ``ValueError`` naming ``name`` when the mask is empty or the gland is constant.
    """
    volume = np.asarray(volume)
    gland = np.asarray(gland)
    if volume.shape != gland.shape:
        raise ValueError(f"{name}: volume {volume.shape} and gland mask {gland.shape} differ in shape")
    inside = volume[gland == 1].astype(np.float64)
    if inside.size == 0:
        raise ValueError(
            f"{name}: the gland mask has no voxel equal to 1, so the gland z-score is undefined (upstream would "
            "produce NaN); ProViCNet inputs need a gland mask"
        )
    mean, std = inside.mean(), inside.std()
    if not std > 0:
        raise ValueError(f"{name}: intensities inside the gland are constant ({mean}); cannot z-score")
    return ((volume.astype(np.float64) - mean) / std).astype(np.float32)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR source taps: ``src = (dst + 0.5) * in/out - 0.5``, clamped to the edge pixels."""
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    low = np.floor(src)
    frac = src - low
    low = low.astype(np.int64)
    before = low < 0
    low[before], frac[before] = 0, 0.0
    after = low >= in_size - 1
    low[after], frac[after] = in_size - 1, 0.0
    high = np.minimum(low + 1, in_size - 1)
    return low, high, frac


def resize_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize the last two axes ``[..., H, W] -> [..., h, w]`` like ``cv2.resize(..., INTER_LINEAR)``; float32.

    Half-pixel centres, edge pixels repeated, no antialiasing (cv2's special case of an exact 2x down-scale,
    which switches to area averaging, is not reproduced; the data path only up-samples 256 -> 448).
    """
    images = np.asarray(images, dtype=np.float32)
    out_h, out_w = size
    y0, y1, fy = _linear_taps(images.shape[-2], out_h)
    x0, x1, fx = _linear_taps(images.shape[-1], out_w)
    fy = fy.astype(np.float32)[:, None]
    fx = fx.astype(np.float32)
    rows = images[..., y0, :] * (1 - fy) + images[..., y1, :] * fy
    return rows[..., x0] * (1 - fx) + rows[..., x1] * fx


# --------------------------------------------------------------------------------------------------------------
# Slice stacks
# --------------------------------------------------------------------------------------------------------------


def stack_layout(
    num_slices: int, centres: np.ndarray | list[int], num_channels: int, edge: str = "shift"
) -> tuple[np.ndarray, np.ndarray]:
    """Which slices make each stack: ``(channel_slices [S, C], label_slice [S])`` for requested ``centres``.

    Indices refer to the volume the stacks are cut from (for ``"shift"``: the zero-padded one, see
    :func:`pad_for_shift`). ``label_slice`` is the slice a stack's label and prediction belong to.
    """
    if num_channels < 1 or num_channels % 2 == 0:
        raise ValueError(f"num_channels must be odd (a centre slice and its neighbours), got {num_channels}")
    if edge not in EDGE_RULES:
        raise ValueError(f"edge must be one of {EDGE_RULES}, got {edge!r}")
    half = num_channels // 2
    centres = np.asarray(centres, dtype=np.int64)
    if edge == "shift":
        # Upstream moves a centre near an end by `half` (not to the nearest valid centre); one shift, as upstream.
        centres = np.where(centres - half < 0, centres + half, np.where(centres + half >= num_slices,
                                                                         centres - half, centres))
        if np.any(centres - half < 0) or np.any(centres + half >= num_slices):
            raise ValueError(f"{num_slices} slices are too few for {num_channels}-slice stacks with edge='shift'")
        channels = centres[:, None] + np.arange(-half, half + 1)[None, :]
    else:
        channels = np.clip(centres[:, None] + np.arange(-half, half + 1)[None, :], 0, num_slices - 1)
    return channels, centres


def pad_for_shift(num_slices: int, num_channels: int) -> int:
    """Upstream's zero padding (slices added at each end) before ``"shift"`` stacking: ``C//2`` if Z < 2C."""
    return num_channels // 2 if num_slices < 2 * num_channels else 0


def select_slices(
    gland: np.ndarray, keep_background_fraction: float = 1.0, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Slices to keep (upstream ``filterBackground``): all if the fraction is 1, else every slice with gland == 1
    plus ``int(#others * fraction)`` others drawn without replacement; sorted."""
    if not 0.0 <= keep_background_fraction <= 1.0:
        raise ValueError(f"keep_background_fraction must be in [0, 1], got {keep_background_fraction}")
    num_slices = gland.shape[0]
    if keep_background_fraction == 1.0:
        return np.arange(num_slices)
    if rng is None:
        raise ValueError("a numpy Generator (rng) is needed to sample background slices")
    has_gland = np.any(gland == 1, axis=(1, 2))
    others = np.flatnonzero(~has_gland)
    chosen = rng.choice(others, size=int(len(others) * keep_background_fraction), replace=False)
    return np.sort(np.concatenate([np.flatnonzero(has_gland), chosen]).astype(np.int64))


@dataclasses.dataclass(frozen=True)
class SliceStack:
    """One case (one sequence) ready for a slice model.

    ``images`` [S, C, size, size] float32 (NCHW, upstream layout); ``labels`` [S, Y, X] uint8 class indices or
    ``None``; ``slice_position`` [S, 2] float32 raw ``(j, n)``; ``source_slice`` [S] the slice of the *original*
    volume each stack was made for, where its prediction is written (outside ``[0, Z)`` for the padding slices of
    a short volume); ``label_slice`` [S] the slice whose label it learns (the moved centre under ``"shift"``);
    ``volume_shape`` the original ``(Z, Y, X)``; ``grid`` the volume's world grid (:class:`Grid`) when it was read
    from files (:func:`case_slices`).
    """

    images: np.ndarray
    labels: np.ndarray | None
    slice_position: np.ndarray
    source_slice: np.ndarray
    label_slice: np.ndarray
    volume_shape: tuple[int, int, int]
    edge: str
    grid: Grid | None = None

    @property
    def num_stacks(self) -> int:
        return int(self.images.shape[0])

    def images_nhwc(self) -> np.ndarray:
        """[S, size, size, C] for the Flax model."""
        return np.ascontiguousarray(self.images.transpose(0, 2, 3, 1))


def make_slice_stack(
    volume: np.ndarray,
    gland: np.ndarray,
    cancer: np.ndarray | None = None,
    *,
    num_channels: int = MRI_CHANNELS,
    edge: str = "shift",
    image_size: int = MODEL_IMAGE_SIZE,
    keep_background_fraction: float = 1.0,
    rng: np.random.Generator | None = None,
    indolent_as_cspca: bool = False,
    name: str = "image",
) -> SliceStack:
    """Volume ``[Z, Y, X]`` (+ gland, optional raw cancer labels, same shape) -> :class:`SliceStack`.

    Steps 2-7 of the module docstring. Labels are built only when ``cancer`` is given.
    """
    volume = np.asarray(volume)
    gland = np.asarray(gland)
    if volume.ndim != 3:
        raise ValueError(f"{name}: expected a [Z, Y, X] volume, got shape {volume.shape}")
    if cancer is not None and np.shape(cancer) != volume.shape:
        raise ValueError(f"{name}: cancer labels {np.shape(cancer)} and volume {volume.shape} differ in shape")
    normalised = zscore_in_gland(volume, gland, name=name)
    resized = resize_bilinear(normalised, (image_size, image_size))
    labels = None
    if cancer is not None:
        labels = four_class_labels(gland, map_cancer_labels(cancer, indolent_as_cspca=indolent_as_cspca))

    padding = pad_for_shift(volume.shape[0], num_channels) if edge == "shift" else 0
    if padding:
        # Zero slices (= gland mean after the z-score) and background labels, as upstream's np.pad.
        resized = np.pad(resized, ((padding, padding), (0, 0), (0, 0)))
        gland = np.pad(gland, ((padding, padding), (0, 0), (0, 0)))
        if labels is not None:
            labels = np.pad(labels, ((padding, padding), (0, 0), (0, 0)))
    kept = select_slices(gland, keep_background_fraction, rng)
    channels, label_slice = stack_layout(resized.shape[0], kept, num_channels, edge)
    count = len(kept)
    position = np.stack([np.arange(count, dtype=np.float32), np.full(count, count, np.float32)], axis=1)
    return SliceStack(
        images=resized[channels],
        labels=None if labels is None else labels[label_slice],
        slice_position=position,
        source_slice=kept - padding,
        label_slice=label_slice - padding,
        volume_shape=tuple(int(s) for s in volume.shape),
        edge=edge,
    )


def load_case_slices(
    image_path: str | os.PathLike,
    gland_path: str | os.PathLike,
    cancer_path: str | os.PathLike | None = None,
    **options,
) -> SliceStack:
    """Read a case's image, gland mask and optional cancer label files and build its :class:`SliceStack`.

    The label files must share the image's voxel grid (upstream copies the image's origin and direction onto
    them and never resamples). For mpMRI call it once per sequence with the shared gland / cancer files.
    ``options`` go to :func:`make_slice_stack`.
    """
    volume, _ = read_image(image_path, role="image")
    gland, _ = read_image(gland_path, role="gland mask")
    cancer = read_image(cancer_path, role="cancer labels")[0] if cancer_path is not None else None
    for role, array, path in (("gland mask", gland, gland_path), ("cancer labels", cancer, cancer_path)):
        if array is not None and array.shape != volume.shape:
            raise DataError(f"{role} has shape {array.shape[::-1]} (file order), the image "
                            f"{os.fspath(image_path)} has {volume.shape[::-1]}", path=os.fspath(path))
    try:
        return make_slice_stack(volume, gland, cancer, name=os.fspath(image_path), **options)
    except ValueError as error:
        raise DataError(str(error), path=os.fspath(image_path)) from None


def crop_positions(sample: dict, count: int) -> np.ndarray:
    """``(j, n)`` [count, 2] float32 of a prepared crop's slices: j the volume slice each one was sampled at
    (``slice_origin`` + ``slice_coordinate``, rounded), n the volume's slice count (``num_slices``), so positions
    count from the volume's first slice whatever the crop (fields of :func:`slice_origin` and the crops of
    :mod:`transfer_jax.data.augment`). A sample without them (a bare array) is its own volume: (j, count)."""
    if "num_slices" not in sample:
        return np.stack([np.arange(count, dtype=np.float32), np.full(count, count, np.float32)], axis=1)
    coordinate = np.asarray(sample.get("slice_coordinate", np.arange(count)), np.float64)
    if coordinate.shape != (count,):
        raise ValueError(f"expected {count} slice coordinates, got shape {coordinate.shape}")
    index = np.rint(float(sample["slice_origin"]) + coordinate).astype(np.float32)
    return np.stack([index, np.full(count, float(sample["num_slices"]), np.float32)], axis=1)


def slice_origin(region_grid, source_grid) -> dict[str, np.ndarray]:
    """Where a prepared region (:class:`transfer_jax.data.nifti.Grid`) lies along the slices of its volume.

    The volume is the source (T2) grid at the region's spacing (the grid the region was cut from). Returns the
    sample fields ``slice_origin`` (float32: the volume slice of the region's slice 0; negative when the region
    starts before the volume) and ``num_slices`` (int32: the volume's slice count).
    """
    volume = source_grid.with_spacing(region_grid.spacing)
    origin = np.linalg.solve(volume.affine_dhw, region_grid.affine_dhw[:, 3])
    return {"slice_origin": np.float32(origin[0]), "num_slices": np.int32(volume.shape[0])}


def case_slices(case, sequence: str = "t2", *, spacing: tuple[float, float, float] | None = None,
                **options) -> SliceStack:
    """A manifest case (:class:`transfer_jax.data.manifest.Case`) -> the :class:`SliceStack` of one sequence.

    Upstream's path on the T2 file's own grid: whole native slices, no crop, no resampling when the sequence and
    the masks share that grid (upstream's assumption; others are sampled onto it, trilinear / nearest). With
    ``spacing`` (mm along (D, H, W), a run's ``data.spacing``) that grid is first resampled to it, same origin and
    extent, as the run's training data was. The gland mask is required (the z-score); no labels are built.
    ``options`` go to :func:`make_slice_stack`.
    """
    if case.path(sequence) is None:
        raise DataError(f"the manifest's {sequence!r} cell is empty", case_id=case.case_id)
    if case.gland_mask is None:
        raise DataError("ProViCNet inputs are z-scored inside the gland, but the manifest's 'gland_mask' cell is "
                        "empty", case_id=case.case_id)
    t2 = read_volume(case.t2, case_id=case.case_id, role="t2")
    grid = t2.grid if spacing is None else t2.grid.with_spacing(tuple(spacing))
    volume = t2 if sequence == "t2" else read_volume(case.path(sequence), case_id=case.case_id, role=sequence)
    gland = read_volume(case.gland_mask, case_id=case.case_id, role="gland_mask")
    try:
        stack = make_slice_stack(resample(volume, grid, order=1), np.rint(resample(gland, grid, order=0)),
                                 name=case.path(sequence), **options)
    except ValueError as error:
        raise DataError(str(error), case_id=case.case_id, path=case.path(sequence)) from None
    return dataclasses.replace(stack, grid=grid)


# --------------------------------------------------------------------------------------------------------------
# Back onto the volume
# --------------------------------------------------------------------------------------------------------------


def volume_from_slices(
    values: np.ndarray, stack: SliceStack, *, fill: float = 0
) -> np.ndarray:
    """Per-stack maps ``[S, h, w, ...]`` -> volume ``[Z, Y, X, ...]`` on the original slice grid.

    Each stack lands on its ``source_slice`` (upstream: output slot k on slice k); stacks made for padding slices
    are left out, and slices without a stack (dropped background slices) get ``fill``. Maps whose in-plane size
    differs from the volume's ``(Y, X)`` are resized: bilinear (half-pixel, as the input) for floats, nearest for
    integer labels.
    """
    values = np.asarray(values)
    if values.shape[0] != stack.num_stacks:
        raise ValueError(f"{values.shape[0]} slice predictions for a stack of {stack.num_stacks}")
    depth, height, width = stack.volume_shape
    if values.shape[1:3] != (height, width):
        if np.issubdtype(values.dtype, np.floating):
            moved = np.moveaxis(values, (1, 2), (-2, -1))
            values = np.moveaxis(resize_bilinear(moved, (height, width)), (-2, -1), (1, 2)).astype(values.dtype)
        else:
            rows = np.floor((np.arange(height) + 0.5) * values.shape[1] / height).astype(np.int64)
            cols = np.floor((np.arange(width) + 0.5) * values.shape[2] / width).astype(np.int64)
            values = values[:, rows][:, :, cols]
    out = np.full((depth, height, width) + values.shape[3:], fill, dtype=values.dtype)
    inside = (stack.source_slice >= 0) & (stack.source_slice < depth)
    out[stack.source_slice[inside]] = values[inside]
    return out


def write_prediction_nifti(
    volume_zyx: np.ndarray, reference: str | os.PathLike | nib.Nifti1Image, output_path: str | os.PathLike
) -> str:
    """Write a ``[Z, Y, X]`` (or ``[Z, Y, X, K]``, e.g. class probabilities) array as NIfTI on the reference
    image's geometry.

    The array is transposed to ``(X, Y, Z[, K])`` with no reorientation, so it overlays the reference (the T2 or TRUS
    input) voxel for voxel. A NIfTI reference lends its whole header (qform/sform and codes); one in another format
    (MetaImage, NRRD, a DICOM folder) lends its affine, converted to RAS like every reader's. The data type is the
    array's (uint8 labels, float32 probabilities); intensity scaling is switched off. Returns the written path.
    """
    if isinstance(reference, nib.Nifti1Image) or format_of(os.fspath(reference)) == NIFTI:
        ref = nib.load(os.fspath(reference)) if not isinstance(reference, nib.Nifti1Image) else reference
        shape, affine, header = tuple(ref.shape[:3]), ref.affine, ref.header.copy()
        qform = ref.get_qform(), int(ref.header["qform_code"])
        sform = ref.get_sform(), int(ref.header["sform_code"])
    else:
        array, affine = read_image(os.fspath(reference), role="reference image")
        shape, header = array.shape[::-1], None
        qform = sform = affine, 1
    volume_zyx = np.asarray(volume_zyx)
    if volume_zyx.shape[:3] != shape[::-1]:
        raise ValueError(f"prediction [Z, Y, X] {volume_zyx.shape} does not match the reference's {shape[::-1]}")
    if volume_zyx.ndim not in (3, 4):
        raise ValueError(f"prediction must be [Z, Y, X] or [Z, Y, X, K], got shape {volume_zyx.shape}")
    axes = (2, 1, 0) + tuple(range(3, volume_zyx.ndim))
    if header is not None:
        header.set_data_shape(tuple(volume_zyx.shape[i] for i in axes))
    image = nib.Nifti1Image(np.ascontiguousarray(volume_zyx.transpose(axes)), affine, header=header)
    image.set_data_dtype(volume_zyx.dtype)
    image.set_qform(*qform)
    image.set_sform(*sform)
    image.header.set_slope_inter(np.nan, np.nan)
    output_path = os.fspath(output_path)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    nib.save(image, output_path)
    return output_path
