"""ProViCNet inference over slices, data-sharded in fixed-size batches (:mod:`transfer_jax.features.common`), and
the feature extractor.

* :func:`predict_slices` -- a :class:`~transfer_jax.models.provicnet.ProViCNet` over a case's slice stack
  (e.g. :class:`transfer_jax.data.slices.SliceStack`: ``predict_slices(model, stack.images,
  stack.slice_position)``), eval mode, returning any of ``logits`` [S, 256, 256, 4], ``patch_tokens``
  [S, 1024, 384], ``cls`` [S, 384] (final-norm tokens).
* :func:`predict_fusion` -- the mpMRI fusion head over the three sequences' patch tokens.
* :func:`predict_case` / :func:`write_case_prediction` -- a manifest case through upstream's data path
  (:func:`transfer_jax.data.slices.case_slices`) and a segmentation model to class probabilities on the case's T2
  grid, and their NIfTI files (``python -m transfer_jax.predict``).
* :func:`extract_features` -- ``python -m transfer_jax.extract --model provicnet --params DIR --input IN.npz
  --output OUT.npz``: IN holds ``image`` float32 [N, C, 448, 448] (upstream NCHW), ``slice_index`` [N] and
  ``num_slices`` [N] (raw values, as upstream's position input); OUT gets float32 ``patch_tokens`` [N, 1024, 384]
  and ``cls`` [N, 384] after the final norm, and ``seg_logits`` [N, 256, 256, 4] (channels last, eval mode).
  ``--manifest M.csv [--split S] [--sequence adc]`` instead builds every case's slices with upstream's data path
  (:func:`transfer_jax.data.slices.case_slices`, as ``predict``) and adds ``case_id`` [N] and ``slice_position``
  [N, 2] (raw (j, n)) to OUT.
"""

from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from transfer_jax.convert.provicnet import SLICE_MODEL_NAME, load_provicnet
from transfer_jax.data import slices as slice_data
from transfer_jax.data.manifest import cases_in_split, read_manifest
from transfer_jax.data.nifti import Volume, read_volume, resample
from transfer_jax.features.common import batch_size_for, make_data_mesh, run_in_batches, save_features
from transfer_jax.models.provicnet import FUSION_SEQUENCES, FusionModalities, ProViCNet

SLICE_OUTPUTS = ("logits", "patch_tokens", "cls")


def _eval_fn(module: nnx.Module, mesh: jax.sharding.Mesh,
             body: Callable[[nnx.Module, dict[str, jax.Array]], dict[str, jax.Array]]
             ) -> Callable[[dict[str, jax.Array]], dict[str, jax.Array]]:
    """A jitted ``batch -> body(eval-mode copy of module, batch)`` with the weights replicated on ``mesh``."""
    graphdef, state = nnx.split(module)
    state = jax.device_put(state, NamedSharding(mesh, P()))

    @jax.jit
    def apply(state, batch):
        net = nnx.merge(graphdef, state)
        net.eval()
        return body(net, batch)

    return lambda batch: apply(state, batch)


def slice_model_fn(
    model: ProViCNet, mesh: jax.sharding.Mesh, outputs: Sequence[str] = SLICE_OUTPUTS
) -> Callable[[dict[str, jax.Array]], dict[str, jax.Array]]:
    """A jitted ``batch -> outputs`` function of an eval-mode copy of ``model`` (weights replicated on ``mesh``).

    The batch holds ``images`` NHWC and ``slice_position`` [B, 2].
    """
    unknown = sorted(set(outputs) - set(SLICE_OUTPUTS))
    if unknown:
        raise ValueError(f"unknown outputs {unknown}; choose from {SLICE_OUTPUTS}")

    def apply(net, batch):
        features = net.forward_features(batch["images"], batch["slice_position"])
        result = {}
        if "logits" in outputs:
            result["logits"] = net.head(net.feature_map(features, batch["images"]))
        if "patch_tokens" in outputs:
            result["patch_tokens"] = features.patch_tokens
        if "cls" in outputs:
            result["cls"] = features.cls_token
        return result

    return _eval_fn(model, mesh, apply)


def predict_slices(
    model: ProViCNet,
    images: np.ndarray,
    slice_position: np.ndarray,
    *,
    layout: str = "NCHW",
    outputs: Sequence[str] = ("logits",),
    batch_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, np.ndarray]:
    """Run a slice model over a case's stacks: ``images`` [S, C, H, W] (``layout='NCHW'``, the data path's) or
    [S, H, W, C], ``slice_position`` [S, 2] raw ``(j, n)``. Returns the requested ``outputs`` as float32 numpy.

    Batches of ``batch_size`` (rounded up to a multiple of the device count) sharded over ``mesh`` (default: all
    devices).
    """
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC', got {layout!r}")
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise ValueError(f"images must be 4-D [S, C, H, W] or [S, H, W, C], got shape {images.shape}")
    if layout == "NCHW":
        images = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    position = np.asarray(slice_position, dtype=np.float32)
    if position.shape != (images.shape[0], 2):
        raise ValueError(f"slice_position must be [{images.shape[0]}, 2], got {position.shape}")
    mesh = mesh or make_data_mesh()
    fn = slice_model_fn(model, mesh, outputs)
    return run_in_batches(fn, {"images": images, "slice_position": position},
                          batch_size=batch_size_for(mesh, batch_size), mesh=mesh)


def predict_fusion(
    fusion: FusionModalities,
    tokens: Mapping[str, np.ndarray],
    *,
    batch_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Fusion logits [S, 8 g, 8 g, classes] from ``tokens[name]`` [S, g * g, width] for ``T2W``, ``ADC``, ``DWI``
    (the sequence models' ``patch_tokens`` from :func:`predict_slices`)."""
    missing = [name for name in FUSION_SEQUENCES if name not in tokens]
    if missing:
        raise KeyError(f"fusion needs patch tokens for {list(FUSION_SEQUENCES)}; missing {missing}")
    mesh = mesh or make_data_mesh()
    fn = _eval_fn(fusion, mesh, lambda net, batch: {"logits": net(*(batch[name] for name in FUSION_SEQUENCES))})
    inputs = {name: np.asarray(tokens[name], np.float32) for name in FUSION_SEQUENCES}
    return run_in_batches(fn, inputs, batch_size=batch_size_for(mesh, batch_size), mesh=mesh)["logits"]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Float32 softmax (max-shifted)."""
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return (shifted / shifted.sum(axis=axis, keepdims=True)).astype(np.float32)


def predict_case(
    model: ProViCNet,
    case,
    *,
    sequence: str = "t2",
    image_size: int = slice_data.MODEL_IMAGE_SIZE,
    edge: str = "shift",
    spacing: Sequence[float] | None = None,
    batch_size: int = 8,
    mesh: jax.sharding.Mesh | None = None,
) -> np.ndarray:
    """Class probabilities [Z, Y, X, classes] float32 of a segmentation model on a manifest case's T2 grid.

    Upstream's inference: the whole native slices of ``sequence`` (gland z-score, resize to ``image_size``,
    3-slice stacks with the ``edge`` rule, positions (j, Z)), softmax over the classes, output slot k on slice k,
    resized back to the slice's in-plane size when that differs from the model's output. With ``spacing`` (a
    run's ``data.spacing``) the slices are cut from the T2 grid resampled to it and the probabilities are sampled
    back onto the T2 file's grid (trilinear).
    """
    stack = slice_data.case_slices(case, sequence, spacing=spacing, edge=edge, image_size=image_size,
                                   num_channels=model.config.input_channels)
    logits = predict_slices(model, stack.images, stack.slice_position, batch_size=batch_size, mesh=mesh)["logits"]
    probabilities = slice_data.volume_from_slices(softmax(logits), stack)
    if spacing is None:
        return probabilities
    native = read_volume(case.t2, case_id=case.case_id, role="t2").grid
    return np.stack([resample(Volume(probabilities[..., k], stack.grid, case.t2), native, order=1)
                     for k in range(probabilities.shape[-1])], axis=-1).astype(np.float32)


def write_case_prediction(probabilities: np.ndarray, case, output: str | os.PathLike, *,
                          save_probabilities: bool = False) -> list[str]:
    """``<case_id>_seg.nii.gz`` (argmax class, uint8) and, with ``save_probabilities``,
    ``<case_id>_probabilities.nii.gz`` (float32, classes on the last axis), both on the case's T2 grid."""
    labels = probabilities.argmax(axis=-1).astype(np.uint8)
    paths = [slice_data.write_prediction_nifti(labels, case.t2, os.path.join(output, f"{case.case_id}_seg.nii.gz"))]
    if save_probabilities:
        paths.append(slice_data.write_prediction_nifti(
            probabilities.astype(np.float32), case.t2, os.path.join(output, f"{case.case_id}_probabilities.nii.gz")))
    return paths


# --------------------------------------------------------------------------------------------------------------
# Feature extraction (registered as "provicnet" in transfer_jax.extract.EXTRACTORS)
# --------------------------------------------------------------------------------------------------------------


def read_extraction_input(path: str | os.PathLike, in_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images NCHW float32, slice_position [N, 2])`` from an input ``.npz``; errors name the file and field."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"{path}: input file does not exist")
    try:
        data = np.load(path)
    except Exception as exc:  # zipfile / pickle errors for non-npz files
        raise ValueError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("image", "slice_index", "num_slices") if k not in data.files]
    if missing:
        raise ValueError(f"{path}: missing field(s) {missing}; expected 'image' float32 [N, C, 448, 448], "
                         "'slice_index' [N] and 'num_slices' [N]")
    images = data["image"]
    if images.ndim != 4 or images.shape[1] != in_channels:
        raise ValueError(f"{path}: field 'image' has shape {images.shape}, expected [N, {in_channels}, H, W] "
                         "(upstream NCHW layout; 448 x 448 for the released models)")
    if not np.issubdtype(images.dtype, np.floating):
        raise ValueError(f"{path}: field 'image' has dtype {images.dtype}, expected float32 z-scored slices")
    count = images.shape[0]
    fields = {}
    for key in ("slice_index", "num_slices"):
        value = np.asarray(data[key])
        if value.shape != (count,):
            raise ValueError(f"{path}: field {key!r} has shape {value.shape}, expected ({count},) (one per image)")
        fields[key] = value.astype(np.float32)
    return images.astype(np.float32), np.stack([fields["slice_index"], fields["num_slices"]], axis=1)


def read_manifest_slices(manifest: str | os.PathLike, in_channels: int, *, split: str | None = None,
                         sequence: str = "t2") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every case of a manifest (optionally one split) through upstream's slice path -> (images NCHW, slice_position
    [N, 2], case_id [N]), the cases' slices one after the other in manifest order."""
    cases = read_manifest(os.fspath(manifest))
    if split is not None:
        cases = cases_in_split(cases, split)
    if not cases:
        raise ValueError(f"{os.fspath(manifest)}: no cases" + (f" in split {split!r}" if split else ""))
    stacks = [slice_data.case_slices(case, sequence, num_channels=in_channels) for case in cases]
    case_ids = np.concatenate([np.full(s.num_stacks, c.case_id) for c, s in zip(cases, stacks)])
    return (np.concatenate([s.images for s in stacks]), np.concatenate([s.slice_position for s in stacks]),
            case_ids)


def extract_features(
    params: str | os.PathLike,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    batch_size: int = 8,
    split: str | None = None,
    crop_size: Sequence[int] | None = None,
    sequence: str = "t2",
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, tuple[int, ...]]:
    """Write ``patch_tokens``, ``cls`` and ``seg_logits`` of a converted ProViCNet slice model; returns shapes.

    ``input_path`` is an ``.npz`` of prepared slices or a manifest ``.csv`` (whole native slices, no crop)."""
    model = load_provicnet(params, expect=SLICE_MODEL_NAME)
    extra = {}
    if os.fspath(input_path).endswith(".csv"):
        if crop_size is not None:
            raise ValueError("--crop does not apply to ProViCNet: its inputs are the whole native slices")
        images, position, extra["case_id"] = read_manifest_slices(
            input_path, model.config.input_channels, split=split, sequence=sequence)
        extra["slice_position"] = position
    else:
        images, position = read_extraction_input(input_path, model.config.input_channels)
    result = predict_slices(model, images, position, outputs=SLICE_OUTPUTS, batch_size=batch_size, mesh=mesh)
    arrays = {
        "patch_tokens": result["patch_tokens"].astype(np.float32),
        "cls": result["cls"].astype(np.float32),
        "seg_logits": result["logits"].astype(np.float32),
        **extra,
    }
    return save_features(output_path, arrays)
