"""A deterministic synthetic prostate mpMRI phantom: the embedded default dataset.

Each case is drawn in patient millimetres and sampled onto realistic, deliberately awkward grids:
- T2 on an anisotropic grid (in-plane finer than slice thickness); ADC and high-b DWI on a coarser grid with its
  own origin, so reading them exercises the affine-aware resampling onto T2;
- one random rigid pose (rotation up to ~12 degrees about each axis + translation) in every affine;
- a gland (ellipsoid) with a peripheral zone (posterior outer shell, bright on T2, high ADC) and a transition zone;
- 0-2 lesions inside the gland, dark on T2 and ADC and bright on high-b DWI, whose size sets the case label
  (0: none, 1-3: increasing size and conspicuity, a PI-RADS-like 2..5 scale minus 2);
- a smooth multiplicative bias field on T2 and Rician noise (magnitude of complex Gaussian noise) everywhere.

Files are written as NIfTI (uint16, like scanner exports) with a manifest, once per (seed, size) into a cache
folder, so a default run reads exactly the same path as real data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile

import nibabel as nib
import numpy as np

from transfer_jax.data.manifest import Case, write_manifest
from transfer_jax.data.preprocess import user_cache_dir

PHANTOM_VERSION = 1


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
    num_cases: int = 24
    num_val: int = 4
    num_test: int = 4
    seed: int = 0
    t2_shape: tuple[int, int, int] = (96, 96, 20)  # NIfTI (i, j, k)
    t2_spacing: tuple[float, float, float] = (1.0, 1.0, 3.0)  # mm (x, y, z)
    diffusion_shape: tuple[int, int, int] = (48, 48, 20)
    diffusion_spacing: tuple[float, float, float] = (2.0, 2.0, 3.0)
    noise: float = 0.03  # Rician sigma relative to the bright-tissue level


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    ax, ay, az = np.deg2rad(rng.uniform(-max_deg, max_deg, 3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(rotation: np.ndarray, spacing, shape, centre_world: np.ndarray, offset_vox=(0.0, 0.0, 0.0)):
    """Affine whose grid centre (shifted by offset_vox voxels) sits at centre_world."""
    linear = rotation @ np.diag(spacing)
    centre_index = (np.asarray(shape) - 1) / 2.0 + np.asarray(offset_vox)
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre_world - linear @ centre_index
    return affine


def _patient_coords(affine: np.ndarray, shape, pose: np.ndarray, origin: np.ndarray) -> np.ndarray:
    """Voxel centres of a grid in the patient frame (mm), shape (i, j, k, 3)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(np.float64)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    return (world - origin) @ pose  # pose is orthonormal: inverse rotation = transpose


def _soft(inside_distance: np.ndarray, width: float = 0.6) -> np.ndarray:
    """Partial-volume edge: ~1 inside, ~0 outside, smooth over ~width mm."""
    return 1.0 / (1.0 + np.exp(-inside_distance / width))


def _ellipsoid_depth(p: np.ndarray, centre, radii) -> np.ndarray:
    """Approximate signed depth (mm, positive inside) of points p in an axis-aligned ellipsoid."""
    q = (p - np.asarray(centre)) / np.asarray(radii)
    r = np.sqrt(np.sum(q * q, axis=-1))
    return (1.0 - r) * float(np.min(radii))


@dataclasses.dataclass
class _Anatomy:
    gland_radii: np.ndarray
    lesions: list[tuple[np.ndarray, np.ndarray]]  # (centre, radii)
    bias: np.ndarray  # polynomial coefficients
    label: int


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    gland_radii = np.array([22.0, 16.0, 18.0]) * rng.uniform(0.85, 1.15, 3)
    count = rng.choice([0, 1, 1, 2])
    lesions = []
    for _ in range(count):
        # inside the gland, biased to the posterior (peripheral-zone) half
        direction = rng.normal(size=3)
        direction[1] = -abs(direction[1])
        direction /= np.linalg.norm(direction)
        centre = direction * gland_radii * rng.uniform(0.2, 0.55)
        radii = rng.uniform(3.0, 8.0) * rng.uniform(0.8, 1.2, 3)
        lesions.append((centre, radii))
    largest = max((float(np.mean(r)) for _, r in lesions), default=0.0)
    label = 0 if not lesions else 1 + int(largest >= 4.8) + int(largest >= 6.5)
    return _Anatomy(gland_radii, lesions, rng.normal(scale=0.08, size=(4,)), label)


def _render(p: np.ndarray, anatomy: _Anatomy) -> dict[str, np.ndarray]:
    """Noise-free T2, ADC (x1e-3 mm^2/s), DWI and the gland / lesion occupancies at patient points p."""
    body = _soft(_ellipsoid_depth(p, (0, 0, 0), (70.0, 55.0, 200.0)), 1.5)
    gland = _soft(_ellipsoid_depth(p, (0, 0, 0), anatomy.gland_radii))
    inner = _soft(_ellipsoid_depth(p, (0, 6.0, 0), anatomy.gland_radii * np.array([0.72, 0.65, 0.8])))
    peripheral = gland * (1.0 - inner)
    lesion = np.zeros(p.shape[:-1])
    for centre, radii in anatomy.lesions:
        lesion = np.maximum(lesion, _soft(_ellipsoid_depth(p, centre, radii)) * gland)
    conspicuity = 0.6 + 0.2 * anatomy.label
    texture = 0.04 * np.sin(p[..., 0] / 3.1) * np.cos(p[..., 1] / 2.3)
    t2 = body * (0.35 + texture) + gland * 0.15 + peripheral * 0.35
    t2 = t2 * (1 - lesion * conspicuity * 0.7) + lesion * conspicuity * 0.1
    adc = body * 1.2 + gland * 0.0 + peripheral * 0.5 - inner * gland * 0.1
    adc = adc * (1 - lesion * conspicuity * 0.5)
    dwi = body * 0.25 + gland * 0.1 + lesion * conspicuity * 0.9
    return {"t2": t2, "adc": adc, "dwi": dwi, "gland": gland, "lesion": lesion}


def _bias_field(p: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    x, y, z = p[..., 0] / 60.0, p[..., 1] / 60.0, p[..., 2] / 60.0
    return np.exp(coeffs[0] * x + coeffs[1] * y + coeffs[2] * z + coeffs[3] * (x * x - y * y))


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    real = signal + rng.normal(scale=sigma, size=signal.shape)
    imag = rng.normal(scale=sigma, size=signal.shape)
    return np.sqrt(real * real + imag * imag)


def _save(array: np.ndarray, affine: np.ndarray, path: str, dtype) -> None:
    image = nib.Nifti1Image(array.astype(dtype), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, path)


def write_case(directory: str, case_id: str, rng: np.random.Generator, config: PhantomConfig) -> tuple[dict, int]:
    anatomy = _draw_anatomy(rng)
    pose = _rotation(rng, 12.0)
    origin = rng.uniform(-20, 20, 3)
    t2_affine = _affine(pose, config.t2_spacing, config.t2_shape, origin)
    dwi_affine = _affine(pose, config.diffusion_spacing, config.diffusion_shape, origin,
                         offset_vox=rng.uniform(-0.5, 0.5, 3))
    p_t2 = _patient_coords(t2_affine, config.t2_shape, pose, origin)
    p_dwi = _patient_coords(dwi_affine, config.diffusion_shape, pose, origin)
    on_t2, on_dwi = _render(p_t2, anatomy), _render(p_dwi, anatomy)
    t2 = _rician(on_t2["t2"] * _bias_field(p_t2, anatomy.bias), config.noise, rng)
    adc = _rician(on_dwi["adc"], config.noise * 1.5, rng)
    dwi = _rician(on_dwi["dwi"], config.noise, rng)
    files = {}
    for role, array, affine, scale, dtype in (
        ("t2", t2, t2_affine, 1000.0, np.uint16),
        ("adc", adc, dwi_affine, 1000.0, np.uint16),
        ("dwi", dwi, dwi_affine, 100.0, np.uint16),
        ("gland_mask", on_t2["gland"] > 0.5, t2_affine, 1.0, np.uint8),
        ("lesion_mask", on_t2["lesion"] > 0.5, t2_affine, 1.0, np.uint8),
    ):
        path = os.path.join(directory, f"{case_id}_{role}.nii.gz")
        _save(np.round(array * scale), affine, path, dtype)
        files[role] = path
    return files, anatomy.label


def generate_phantom_dataset(directory: str, config: PhantomConfig = PhantomConfig()) -> str:
    """Write `config.num_cases` cases + `manifest.csv` into `directory` (atomically); returns the manifest path."""
    manifest = os.path.join(directory, "manifest.csv")
    if os.path.isfile(manifest):
        return manifest
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".phantom-", dir=parent)
    try:
        cases = []
        num_train = config.num_cases - config.num_val - config.num_test
        if num_train < 1:
            raise ValueError(f"PhantomConfig: {config.num_cases} cases leave no training cases")
        for index in range(config.num_cases):
            rng = np.random.default_rng([config.seed, index])
            case_id = f"phantom{index:04d}"
            files, label = write_case(staging, case_id, rng, config)
            split = "train" if index < num_train else ("val" if index < num_train + config.num_val else "test")
            cases.append(Case(case_id=case_id, split=split, label=str(label), **files))
        # Paths are written relative to the manifest, so they stay valid after the folder is renamed.
        write_manifest(os.path.join(staging, "manifest.csv"), cases)
        try:
            os.rename(staging, directory)
        except OSError:
            if not os.path.isfile(manifest):  # another process may have won the race; anything else is an error
                raise
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)
    return manifest


def default_data_root() -> str:
    return os.environ.get("TRANSFER_JAX_DATA_DIR") or user_cache_dir()


def default_phantom_manifest(config: PhantomConfig = PhantomConfig(), root: str | None = None) -> str:
    """The embedded default dataset, generated on first use."""
    root = root or default_data_root()
    digest = hashlib.sha1(repr((PHANTOM_VERSION, dataclasses.astuple(config))).encode()).hexdigest()[:10]
    name = f"phantom-seed{config.seed}-n{config.num_cases}-{digest}"
    return generate_phantom_dataset(os.path.join(root, name), config)


def random_crop_batch(make_sample, crop, channels: int, count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """`count` prepared crops of Gaussian noise ([*crop, channels]) with a centred gland box and a lesion box
    inside it and a case label of 1 (as a manifest cell), each through `make_sample` (a task's), stacked: a
    training batch without reading any file (the benchmark's steps, tests of the step, TPU compiles)."""
    rng = np.random.default_rng(seed)
    crop = tuple(int(c) for c in crop)
    gland = np.zeros(crop, np.uint8)
    gland[tuple(slice(c // 4, c - c // 4) for c in crop)] = 1
    lesion = np.zeros(crop, np.uint8)
    lesion[tuple(slice(c // 3, c // 2 + 1) for c in crop)] = 1
    samples = [make_sample({"image": rng.normal(size=(*crop, channels)).astype(np.float32),
                            "gland": gland, "lesion": lesion, "label": "1"}) for _ in range(count)]
    return {k: np.stack([s[k] for s in samples]) for k in samples[0]}
