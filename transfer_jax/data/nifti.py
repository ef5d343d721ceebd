"""Volumes on world grids: reading (every format of `readers`), affine-aware resampling, writing NIfTI.

Array convention (the upstream one): a volume with voxel axes (i, j, k) is returned as an array of shape
(D, H, W) = (k, j, i), i.e. the reversed file axes, without any reorientation; this is also what SimpleITK's
`GetArrayFromImage` gives. `Grid.affine` maps (i, j, k) to world RAS millimetres whichever format was read, and
`Grid.affine_dhw` maps (d, h, w, 1) voxel indices to world millimetres, so resampling between two grids is one
4x4 matrix: target index -> world -> source index.
"""
from __future__ import annotations

import dataclasses
import os

import nibabel as nib
import numpy as np
from scipy import ndimage

from transfer_jax.data.errors import DataError
from transfer_jax.data.readers import NIFTI, format_of, read_image

# (d, h, w) -> (i, j, k): reverse the axes.
_DHW_TO_IJK = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class Grid:
    """A voxel grid: shape in (D, H, W) and the NIfTI affine (i, j, k) -> world (RAS mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def affine_dhw(self) -> np.ndarray:
        return self.affine @ _DHW_TO_IJK

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (D, H, W)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine_dhw[:3, :3], axis=0))

    def with_spacing(self, spacing_dhw: tuple[float, float, float]) -> "Grid":
        """Same origin (centre of voxel 0) and direction, new voxel size; size rounded like SimpleITK pipelines."""
        old = np.asarray(self.spacing)
        new = np.asarray(spacing_dhw, dtype=np.float64)
        shape = tuple(max(1, int(round(n * o / s))) for n, o, s in zip(self.shape, old, new))
        scale = np.diag([*(new / old)[::-1], 1.0])  # in (i, j, k) order
        return Grid(shape=shape, affine=self.affine @ scale)

    def crop(self, start_dhw: tuple[int, int, int], shape_dhw: tuple[int, int, int]) -> "Grid":
        """Sub-grid starting at a (possibly negative) voxel offset: the geometry of a crop or pad."""
        shift = np.eye(4)
        shift[:3, 3] = np.asarray(start_dhw, dtype=np.float64)[::-1]
        return Grid(shape=tuple(int(s) for s in shape_dhw), affine=self.affine @ shift)


@dataclasses.dataclass
class Volume:
    array: np.ndarray  # (D, H, W) float32
    grid: Grid
    path: str


def read_volume(path: str, *, case_id: str | None = None, role: str = "image") -> Volume:
    """Read one 3-D image (any format `readers` knows) as float32 (D, H, W); failures are DataErrors."""
    data, affine = read_image(path, case_id=case_id, role=role, dtype=np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        raise DataError(f"{role} has {int(bad.sum())} NaN/Inf voxel(s)", case_id=case_id, path=path)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(f"{role} has a singular or non-finite affine:\n{affine}", case_id=case_id, path=path)
    return Volume(array=data, grid=Grid(tuple(data.shape), affine), path=path)


def source_index_map(source: Grid, target: Grid) -> np.ndarray:
    """4x4 matrix taking target (d, h, w, 1) voxel indices to source voxel indices."""
    return np.linalg.inv(source.affine_dhw) @ target.affine_dhw


def overlap_fraction(source: Grid, target: Grid, samples: int = 16) -> float:
    """Fraction of the target grid (probed on a samples^3 lattice) that falls inside the source grid."""
    axes = [np.linspace(0, n - 1, min(n, samples)) for n in target.shape]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    homog = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    src = (source_index_map(source, target) @ homog.T)[:3].T
    inside = np.all((src >= -0.5) & (src <= np.asarray(source.shape) - 0.5), axis=1)
    return float(inside.mean())


def resample(volume: Volume, target: Grid, *, order: int = 1) -> np.ndarray:
    """Sample `volume` on `target` (trilinear for images, order 0 for label maps); outside the source is 0.

    Target points within `_EDGE_TOLERANCE` voxels outside the source count as on its edge: a target plane that
    coincides with the source's first or last plane (the first one always does after `Grid.with_spacing`) lands a
    rounding error either side of it, and that rounding (float32 NIfTI affines, another reader) must not decide
    between the plane's values and zeros.
    """
    if volume.grid.shape == target.shape and np.allclose(volume.grid.affine, target.affine, atol=1e-5):
        return volume.array
    matrix = source_index_map(volume.grid, target)
    out = ndimage.affine_transform(
        volume.array, matrix[:3, :3], offset=matrix[:3, 3], output_shape=target.shape, order=order,
        mode="constant", cval=0.0, prefilter=False,
    ).astype(np.float32)
    edge = _edge_points(matrix, volume.grid.shape, target.shape)
    edge = edge[out[tuple(edge.T)] == 0]  # a point scipy found outside came back as the zero outside
    if len(edge):
        points = np.einsum("ij,nj->in", matrix[:3, :3], edge) + matrix[:3, 3:]
        points = np.clip(points, 0, np.asarray(volume.grid.shape)[:, None] - 1)
        out[tuple(edge.T)] = ndimage.map_coordinates(volume.array, points, order=order, prefilter=False)
    return out


_EDGE_TOLERANCE = 1e-3


def _edge_points(matrix: np.ndarray, source_shape, target_shape) -> np.ndarray:
    """(N, 3) target indices whose source position is within `_EDGE_TOLERANCE` voxels of the source's border.

    Points inside by less than the tolerance come along (sampling them again changes nothing), and corners may
    come twice. Along a target row (fixed d, h) every source coordinate is linear in w, so each condition is one
    interval of w per row: the target grid is never evaluated as a whole.
    """
    depth, height, width = target_shape
    rows = np.stack(np.meshgrid(np.arange(depth), np.arange(height), indexing="ij"), axis=-1).reshape(-1, 2)
    starts = [matrix[axis, 3] + rows[:, 0] * matrix[axis, 0] + rows[:, 1] * matrix[axis, 1] for axis in range(3)]

    def interval(axis: int, low: float, high: float):
        """Per row, the w range [lo, hi) where low <= source coordinate `axis` <= high."""
        start, slope = starts[axis], matrix[axis, 2]
        if slope == 0:
            hit = (start >= low) & (start <= high)
            return np.where(hit, 0, width), np.where(hit, width, 0)
        a, b = (low - start) / slope, (high - start) / slope
        return (np.clip(np.ceil(np.minimum(a, b)), 0, width).astype(np.int64),
                np.clip(np.floor(np.maximum(a, b)) + 1, 0, width).astype(np.int64))

    near_lo, near_hi = np.zeros(len(rows), np.int64), np.full(len(rows), width, np.int64)
    for axis, n in enumerate(source_shape):
        lo, hi = interval(axis, -_EDGE_TOLERANCE, n - 1 + _EDGE_TOLERANCE)
        near_lo, near_hi = np.maximum(near_lo, lo), np.minimum(near_hi, hi)
    pieces = [np.zeros((0, 3), np.int64)]
    for axis, n in enumerate(source_shape):
        for border in (0.0, n - 1.0):
            lo, hi = interval(axis, border - _EDGE_TOLERANCE, border + _EDGE_TOLERANCE)
            lo = np.maximum(lo, near_lo)
            count = np.maximum(np.minimum(hi, near_hi) - lo, 0)
            w = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count - lo, count)
            pieces.append(np.column_stack([np.repeat(rows, count, axis=0), w]))
    return np.concatenate(pieces)


def write_like(array_dhw: np.ndarray, grid: Grid, path: str, *, reference: str | None = None) -> None:
    """Write a (D, H, W) array as NIfTI on `grid`; a NIfTI reference lends its header (units, descriptions).

    The geometry is `grid`'s in every case, so a reference in another format (MetaImage, a DICOM folder) only
    means there is no NIfTI header to copy.
    """
    header = None
    if reference is not None and format_of(reference) == NIFTI:
        header = nib.load(reference).header.copy()
        header.set_data_dtype(array_dhw.dtype)
    image = nib.Nifti1Image(np.asarray(array_dhw).transpose(2, 1, 0), grid.affine, header=header)
    image.set_qform(grid.affine, code=1)
    image.set_sform(grid.affine, code=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".partial.nii.gz" if path.endswith(".gz") else path + ".partial.nii"
    nib.save(image, tmp)
    os.replace(tmp, path)
