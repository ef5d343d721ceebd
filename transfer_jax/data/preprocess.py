"""From a manifest row to model-ready arrays: read, put every sequence on one grid, normalise, crop around the gland.

Steps (ProFound's conventions, `profound.md` §1.1):
1. the T2 grid, resampled to the target spacing (same origin and direction), is the reference grid;
2. DWI, ADC and the masks are sampled from their own grids onto it in one affine-aware interpolation
   (trilinear for images, nearest for masks), so sequences acquired on other grids line up;
3. each channel is z-scored over its non-zero voxels (population std; zeros stay zero), unless `intensity` is
   "raw" (ProViCNet normalises the raw intensities itself, inside the gland: `data/slices.py`);
4. a region of `crop_size * region_margin` voxels centred on the gland is kept, zero-padded where it leaves the
   volume; training crops/zooms inside it, evaluation takes its centre (`augment.center_crop`). With
   `region_centre="volume"` (or no gland mask) it is centred on the whole volume instead, placed so that its
   centre crop is exactly MONAI's `CenterSpatialCrop` + `SpatialPad` of the volume (`augment.center_start`):
   ProFound's validation and test view, which never looks at a mask. With `region_centre="whole_slices"` an axis
   no longer than the crop is kept whole, centred so that the evaluation crop holds all of it (ProViCNet:
   upstream feeds whole 256 x 256 slices of the whole volume), and only a longer one is cut around the gland.

Channels are stacked channels-last in the order of `channels` (ProFound: T2, DWI, ADC).

Prepared cases live in one cache shared by every run (`data.cache_dir`, default `default_cache_dir()`), one file
per case named by `cache_key`: a hash of the source files' identity and every preprocessing setting, so runs with
the same data and settings prepare each case once, and a changed file or setting makes a new entry. A file is
written under a temporary name and renamed into place, so processes preparing the same case at once each leave a
complete file and a reader never sees half of one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import numbers
import os
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from transfer_jax.data.augment import center_start
from transfer_jax.data.errors import BadCasesError, DataError
from transfer_jax.data.manifest import Case
from transfer_jax.data.nifti import Grid, Volume, overlap_fraction, read_volume, resample
from transfer_jax.data.readers import source_files

INTENSITY_MODES = ("zscore_nonzero", "raw")
REGION_CENTRES = ("gland", "volume", "whole_slices")
# 2: resampling keeps target planes lying on the source border (nifti.resample); 3: zero voxels left out of the
# stored arrays, file headers in the key; 4: region starts rounded as MONAI's centre crop rounds
CACHE_VERSION = 4
CACHE_DIR_ENV = "TRANSFER_JAX_CACHE_DIR"
HEADER_BYTES = 4096  # of every source file, hashed into the cache key
MAX_AUTO_WORKERS = 8
ARRAYS = ("image", "gland", "lesion")  # the arrays of a PreparedCase


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    spacing: Optional[tuple[float, float, float]] = (1.0, 0.5, 0.5)  # mm along (D, H, W); None keeps T2's
    crop_size: tuple[int, int, int] = (64, 224, 224)  # (D, H, W) voxels fed to the model
    region_margin: float = 1.25  # stored region = crop * margin, room for translation/zoom augmentation
    channels: tuple[str, ...] = ("t2", "dwi", "adc")
    intensity: str = "zscore_nonzero"  # or "raw": the resampled intensities as read
    # "volume": centred on the whole volume (MONAI's centre crop); "whole_slices": axes that fit the crop whole,
    # longer ones around the gland
    region_centre: str = "gland"
    min_overlap: float = 0.5  # fraction of the T2 grid another sequence must cover
    # Label maps (`data.*_labels`): the mask values that mean the structure; 0 and the *_background_labels values
    # are background; any other value is an error. Masks are binarised through them before resampling.
    gland_labels: tuple[int, ...] = (1,)
    gland_background_labels: tuple[int, ...] = ()
    lesion_labels: tuple[int, ...] = (1, 2, 3, 4, 5)
    lesion_background_labels: tuple[int, ...] = ()
    # Masks ("gland", "lesion") that keep their label values (e.g. ISUP grades) instead of becoming 0 / 1: a value
    # in *_labels stays as it is, background values become 0 (`data.graded_masks`).
    graded_masks: tuple[str, ...] = ()

    @property
    def region_size(self) -> tuple[int, int, int]:
        return tuple(int(np.ceil(c * self.region_margin)) for c in self.crop_size)


@dataclasses.dataclass
class PreparedCase:
    case_id: str
    image: np.ndarray  # (D, H, W, C) float32, the stored region
    gland: Optional[np.ndarray]  # (D, H, W) uint8 or None
    lesion: Optional[np.ndarray]  # (D, H, W) uint8 (1 = lesion) or None
    region_grid: Grid  # world geometry of `image`
    source_grid: Grid  # the T2 file's own grid, for writing predictions back
    label: Optional[str]

    def save(self, path: str) -> None:
        """Atomically: a complete file at `path` or none, whoever else writes the same path meanwhile."""
        stored = {name: getattr(self, name) for name in ARRAYS if getattr(self, name) is not None}
        arrays = {}
        for name, array in stored.items():
            arrays[f"{name}_nonzero"], arrays[f"{name}_values"] = pack_nonzero(array)
        meta = {
            "case_id": self.case_id, "label": self.label,
            "shapes": {name: list(array.shape) for name, array in stored.items()},
            "region_shape": list(self.region_grid.shape), "region_affine": self.region_grid.affine.tolist(),
            "source_shape": list(self.source_grid.shape), "source_affine": self.source_grid.affine.tolist(),
        }
        folder, name = os.path.split(os.path.abspath(path))
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
        try:
            with os.fdopen(handle, "wb") as f:
                np.savez(f, meta=np.asarray(json.dumps(meta)), **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str) -> "PreparedCase":
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
            arrays = {name: unpack_nonzero(z[f"{name}_nonzero"], z[f"{name}_values"], shape)
                      for name, shape in meta["shapes"].items()}
        return cls(
            case_id=meta["case_id"], image=arrays["image"], gland=arrays.get("gland"), lesion=arrays.get("lesion"),
            label=meta["label"],
            region_grid=Grid(tuple(meta["region_shape"]), np.asarray(meta["region_affine"])),
            source_grid=Grid(tuple(meta["source_shape"]), np.asarray(meta["source_affine"])),
        )


def pack_nonzero(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bitmap of the non-zero elements, their values): lossless, and the zero padding around a volume (often half
    of a prepared region) costs one bit per element. An element counts as zero only if all its bits are (-0.0 is
    kept as a value)."""
    bits = np.ascontiguousarray(array).view(f"u{array.dtype.itemsize}") != 0
    return np.packbits(bits, axis=None), array[bits]


def unpack_nonzero(bitmap: np.ndarray, values: np.ndarray, shape) -> np.ndarray:
    """The array `pack_nonzero` packed (a new, writeable array)."""
    shape = tuple(shape)
    nonzero = np.unpackbits(bitmap, count=int(np.prod(shape))).view(bool).reshape(shape)
    out = np.zeros(shape, values.dtype)
    out[nonzero] = values
    return out


def zscore_nonzero(channel: np.ndarray) -> np.ndarray:
    """MONAI NormalizeIntensity(nonzero=True): z-score the non-zero voxels only, std 0 treated as 1."""
    nonzero = channel != 0
    if not nonzero.any():
        return channel
    values = channel[nonzero]
    mean, std = float(values.mean()), float(values.std())
    out = channel.copy()
    out[nonzero] = (values - mean) / (std if std > 0 else 1.0)
    return out


def label_map_problems(name: str, labels, background) -> list[str]:
    """What is wrong with one mask's label map (`data.<name>_labels` / `data.<name>_background_labels`)."""
    values = list(labels) + list(background)
    if not list(labels):
        return [f"data.{name}_labels is empty: name the mask value(s) that mean {name}"]
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0 for v in values):
        return [f"data.{name}_labels {tuple(labels)} / data.{name}_background_labels {tuple(background)} must be "
                "positive integers (0 is always background)"]
    both = sorted(set(labels) & set(background))
    return [f"value(s) {both} are in both data.{name}_labels and data.{name}_background_labels"] if both else []


def _binarise_mask(volume: Volume, labels: tuple[int, ...], background: tuple[int, ...], case_id: str,
                   role: str, graded: bool = False) -> Volume:
    """The mask as 0/1 through its label map (`graded`: the label values themselves, background values 0); a value
    the map does not name is an error, not background."""
    values = np.unique(volume.array)
    non_integer = values[values != np.round(values)]
    if non_integer.size:
        raise DataError(f"{role} must hold integer labels, found values like {non_integer[:5].tolist()}",
                        case_id=case_id, path=volume.path)
    name = role.removesuffix("_mask")
    unexpected = sorted(set(values.astype(int).tolist()) - {0, *labels, *background})
    if unexpected:
        raise DataError(f"{role} has unexpected label value(s) {unexpected}; data.{name}_labels = {list(labels)}, "
                        f"background: {[0, *background]}", case_id=case_id, path=volume.path)
    foreground = np.isin(volume.array, labels)
    array = np.where(foreground, volume.array, 0.0) if graded else foreground
    return dataclasses.replace(volume, array=array.astype(np.float32))


def _on_reference(volume: Volume, target: Grid, reference: Grid, config: PreprocessConfig, case_id: str,
                  role: str, order: int) -> np.ndarray:
    fraction = overlap_fraction(volume.grid, reference)
    if fraction < config.min_overlap:
        raise DataError(
            f"{role} grid covers only {fraction:.0%} of the T2 grid (need >= {config.min_overlap:.0%}): the "
            "sequences do not overlap in world space; check the affines/registration",
            case_id=case_id, path=volume.path,
        )
    return resample(volume, target, order=order)


def _region_start(center: np.ndarray, region: tuple[int, ...]) -> tuple[int, int, int]:
    """A window of `region` around the point `center` (voxel coordinates), as MONAI centres a crop on a voxel: the
    nearest voxel (halves up), then back region // 2."""
    return tuple(int(np.floor(c + 0.5)) - r // 2 for c, r in zip(center, region))


def volume_region_start(shape: tuple[int, ...], region: tuple[int, ...],
                        crop: tuple[int, ...]) -> tuple[int, int, int]:
    """Start of a `region` around the middle of a volume of `shape` whose centre crop of `crop` (`center_crop`) is
    MONAI's `CenterSpatialCrop(crop)` + `SpatialPad(crop)` of the volume: ProFound's validation and test input."""
    return tuple(center_start(n, c) - center_start(r, c) for n, r, c in zip(shape, region, crop))


def crop_or_pad(array: np.ndarray, start: tuple[int, ...], size: tuple[int, ...]) -> np.ndarray:
    """Window of `size` starting at `start` (may be negative or run past the end: zero padding)."""
    out = np.zeros(tuple(size) + array.shape[len(size):], dtype=array.dtype)
    src, dst = [], []
    for s, n, total in zip(start, size, array.shape):
        lo, hi = max(s, 0), min(s + n, total)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def prepare_case(case: Case, config: PreprocessConfig) -> PreparedCase:
    t2 = read_volume(case.t2, case_id=case.case_id, role="t2")
    target = t2.grid if config.spacing is None else t2.grid.with_spacing(tuple(config.spacing))
    channels = {"t2": resample(t2, target, order=1)}
    for role in ("adc", "dwi"):
        volume = read_volume(case.path(role), case_id=case.case_id, role=role)
        channels[role] = _on_reference(volume, target, t2.grid, config, case.case_id, role, order=1)
    unknown = [c for c in config.channels if c not in channels]
    if unknown:
        raise DataError(f"unknown channel(s) {unknown} in data.channels; available: {sorted(channels)}")
    if config.intensity not in INTENSITY_MODES:
        raise ValueError(f"data.intensity must be one of {INTENSITY_MODES}, got {config.intensity!r}")
    normalise = zscore_nonzero if config.intensity == "zscore_nonzero" else np.asarray
    image = np.stack([normalise(channels[c]) for c in config.channels], axis=-1)

    masks = {}
    for role, labels, background in (
            ("gland_mask", config.gland_labels, config.gland_background_labels),
            ("lesion_mask", config.lesion_labels, config.lesion_background_labels)):
        path = case.path(role)
        if path is None:
            masks[role] = None
            continue
        graded = role.removesuffix("_mask") in config.graded_masks
        volume = _binarise_mask(read_volume(path, case_id=case.case_id, role=role), labels, background,
                                case.case_id, role, graded)
        resampled = _on_reference(volume, target, t2.grid, config, case.case_id, role, order=0)
        masks[role] = np.rint(resampled) if graded else resampled > 0

    gland = masks["gland_mask"]
    if config.region_centre not in REGION_CENTRES:
        raise ValueError(f"data.region_centre must be one of {REGION_CENTRES}, got {config.region_centre!r}")
    region = config.region_size
    if config.region_centre != "volume" and gland is not None and gland.any():
        start = _region_start(np.argwhere(gland).mean(axis=0), region)
    else:
        start = volume_region_start(target.shape, region, config.crop_size)
    if config.region_centre == "whole_slices":
        # The evaluation crop starts (region - crop) // 2 into the region: this start puts the axis inside it.
        start = tuple(-((r - n) // 2) if n <= c else s
                      for s, r, n, c in zip(start, region, target.shape, config.crop_size))
    as_region = lambda a: None if a is None else crop_or_pad(a.astype(np.uint8), start, region)  # noqa: E731
    return PreparedCase(
        case_id=case.case_id, image=crop_or_pad(image, start, region), gland=as_region(gland),
        lesion=as_region(masks["lesion_mask"]), region_grid=target.crop(start, region), source_grid=t2.grid,
        label=case.label,
    )


def user_cache_dir() -> str:
    """The user's cache folder for transfer_jax: $XDG_CACHE_HOME/transfer_jax, else ~/.cache/transfer_jax."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "transfer_jax")


def default_cache_dir() -> str:
    """The prepared-case cache when `data.cache_dir` is empty: $TRANSFER_JAX_CACHE_DIR, else
    `user_cache_dir()/prepared`."""
    return os.environ.get(CACHE_DIR_ENV) or os.path.join(user_cache_dir(), "prepared")


def _file_identity(name: str) -> list:
    """Absolute path, size, modification time and a hash of the first bytes (the header) of a source file: a file
    replaced by another of the same size and modification time (a copy that kept its time) still changes the key
    when its header differs."""
    stat = os.stat(name)
    with open(name, "rb") as f:
        header = hashlib.sha1(f.read(HEADER_BYTES)).hexdigest()
    return [os.path.abspath(name), stat.st_size, stat.st_mtime_ns, header]


def cache_key(case: Case, config: PreprocessConfig) -> str:
    """Changes when any preprocessing setting, the case's id or label, or any input file changes.

    An image spread over several files (a DICOM folder, a detached .mhd/.nhdr header) counts every one of them.
    """
    files = []
    for role in ("t2", "adc", "dwi", "gland_mask", "lesion_mask"):
        path = case.path(role)
        if path is not None and os.path.exists(path):
            files += [[role, *_file_identity(name)] for name in source_files(path)]
        else:
            files.append([role, path])
    blob = json.dumps([CACHE_VERSION, dataclasses.asdict(config), case.case_id, case.label, files], default=list)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def cache_path(cache_dir: str, case: Case, config: PreprocessConfig) -> str:
    """The case's entry in `cache_dir`: `<case id, filename-safe>-<cache_key>.npz`."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", case.case_id)[:80]
    return os.path.join(cache_dir, f"{name}-{cache_key(case, config)}.npz")


def preprocess_workers(workers: int) -> int:
    """Processes that prepare cases for `data.preprocess_workers`: -1 = one fewer than this process's CPU cores, at
    most MAX_AUTO_WORKERS (a 2-core machine prepares in the main process and keeps a core free); 0 or 1 = the main
    process; N = N worker processes."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < -1:
        raise ValueError(f"config.data.preprocess_workers must be -1 (automatic), 0 (in this process) or a number of "
                         f"processes, got {workers!r}")
    if workers == -1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(MAX_AUTO_WORKERS, cores - 1))
    return max(workers, 1)


@dataclasses.dataclass
class PreprocessReport:
    paths: dict[str, str]  # case_id -> cached npz of the prepared case
    problems: list[DataError]
    prepared: int = 0  # cases prepared by this call (the others were in the cache already)
    seconds: float = 0.0


def _prepare_to(case: Case, config: PreprocessConfig, path: str) -> Optional[DataError]:
    try:
        prepare_case(case, config).save(path)
    except DataError as exc:
        return exc
    return None


def _prepare_missing(cases: list[Case], config: PreprocessConfig, paths: dict[str, str], workers: int,
                     done: Callable[[], None]) -> dict[str, Optional[DataError]]:
    """case_id -> the problem (or None) of preparing each case into `paths`, in `workers` processes; `done()` after
    each case. Worker processes are spawned, not forked: the parent may already run JAX's threads."""
    if workers <= 1 or len(cases) <= 1:
        problems = {}
        for case in cases:
            problems[case.case_id] = _prepare_to(case, config, paths[case.case_id])
            done()
        return problems
    pool = ProcessPoolExecutor(min(workers, len(cases)), mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(_prepare_to, c, config, paths[c.case_id]): c.case_id for c in cases}
        problems = {}
        for future in as_completed(futures):
            problems[futures[future]] = future.result()
            done()
        return problems
    finally:
        pool.shutdown(cancel_futures=True)


def preprocess_cases(cases: list[Case], config: PreprocessConfig, cache_dir: str, *, on_bad_case: str = "error",
                     workers: int = 1, validate=None, progress: bool = False) -> PreprocessReport:
    """Prepare every case not yet in `cache_dir` (a pre-flight check: nothing reaches training unchecked).

    `workers` as `data.preprocess_workers` (`preprocess_workers`); `progress` shows a progress bar (with ETA) on
    stderr. `validate(case, prepared_path)` may raise DataError for task-specific problems (e.g. a missing mask).
    With on_bad_case='error' all problems are raised together before any training starts; with 'skip' the bad
    cases are left out and returned in the report.
    """
    if on_bad_case not in ("error", "skip"):
        raise ValueError(f"data.on_bad_case must be 'error' or 'skip', got {on_bad_case!r}")
    workers = preprocess_workers(workers)
    start = time.perf_counter()
    os.makedirs(cache_dir, exist_ok=True)
    paths = {c.case_id: cache_path(cache_dir, c, config) for c in cases}
    missing = [c for c in cases if not os.path.exists(paths[c.case_id])]
    with tqdm(total=len(cases), initial=len(cases) - len(missing), desc="prepare", unit="case", dynamic_ncols=True,
              disable=not progress) as bar:
        problems = _prepare_missing(missing, config, paths, workers, bar.update)
    report = PreprocessReport(paths={}, problems=[], prepared=len(missing))
    for case in tqdm(cases, desc="check", unit="case", dynamic_ncols=True, disable=not progress or validate is None):
        problem = problems.get(case.case_id)
        if problem is None and validate is not None:
            try:
                validate(case, paths[case.case_id])
            except DataError as exc:
                problem = exc
        if problem is not None:
            report.problems.append(problem)
        else:
            report.paths[case.case_id] = paths[case.case_id]
    report.seconds = time.perf_counter() - start
    if report.problems and on_bad_case == "error":
        raise BadCasesError(report.problems)
    return report
