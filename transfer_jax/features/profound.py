"""Feature extraction from converted ProFound artifacts (the logic behind `python -m transfer_jax.extract`).

Input: either an `.npz` with `image` float32 (N, C, D, H, W) in the upstream layout (channels T2, DWI, ADC), or a
dataset manifest (`transfer_jax.data.manifest`): each case is read, resampled, z-scored and centre-cropped by the
data pipeline's own preprocessing (`prepare_case` + `center_crop`) with `region_centre="volume"`: the crop is
MONAI's `CenterSpatialCrop` + `SpatialPad` of the whole volume, upstream's validation and test input.

Output `.npz`, float32, eval mode (running statistics, no auxiliary head), channels-last:

* `profound_conv`: `stage1` ... `stage4` (N, D_s, H_s, W_s, C_s), the raw (un-normalised) stage outputs;
  `pooled` (N, C) the normed global-average feature; plus `logits` (N, K) when the artifact has a classification
  head and `seg_logits` (N, D, H, W, K) when it has a UPerNet head.
* `profound_vit`: `tokens` (N, 1 + T, C), cls first, after the final norm; `cls` (N, C); plus `logits` /
  `seg_logits` likewise.
* In manifest mode, also `case_id` (N,) strings, in manifest order.

Batches have a fixed size (the last one zero-padded and trimmed), so the jitted function compiles once.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfer_jax.convert.profound import CONV_MODEL, VIT_MODEL, EncoderOnly, load_profound
from transfer_jax.data.augment import center_crop
from transfer_jax.data.manifest import cases_in_split, read_manifest
from transfer_jax.data.preprocess import PreprocessConfig, prepare_case
from transfer_jax.features.common import run_in_batches, save_features
from transfer_jax.models.classifier import Classifier
from transfer_jax.models.profound_vit import MAE
from transfer_jax.models.upernet import UPerNet

__all__ = ["ExtractionInputError", "read_npz_volumes", "read_manifest_volumes", "profound_feature_fn",
           "extract_profound", "extract_profound_conv", "extract_profound_vit"]


class ExtractionInputError(ValueError):
    pass


def read_npz_volumes(path: str | os.PathLike, in_channels: int) -> np.ndarray:
    """`image` (N, C, D, H, W) of an `.npz` -> float32 (N, D, H, W, C)."""
    path = os.fspath(path)
    try:
        with np.load(path) as data:
            if "image" not in data:
                raise ExtractionInputError(f"{path}: no 'image' array (found {sorted(data.files)}); expected float32 "
                                           "(N, C, D, H, W)")
            image = np.asarray(data["image"], np.float32)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ExtractionInputError):
            raise
        raise ExtractionInputError(f"{path}: cannot read the input .npz ({exc})") from exc
    if image.ndim != 5 or image.shape[1] != in_channels:
        raise ExtractionInputError(f"{path}: 'image' has shape {image.shape}; expected (N, {in_channels}, D, H, W)")
    return np.ascontiguousarray(image.transpose(0, 2, 3, 4, 1))


def read_manifest_volumes(manifest: str | os.PathLike, crop_size: Sequence[int], *, split: Optional[str] = None,
                          spacing: Optional[Sequence[float]] = (1.0, 0.5, 0.5)) -> tuple[list[str], np.ndarray]:
    """Cases of a manifest (optionally one split) preprocessed as upstream's validation -> (case ids,
    (N, D, H, W, C))."""
    cases = read_manifest(os.fspath(manifest))
    if split is not None:
        cases = cases_in_split(cases, split)
    if not cases:
        raise ExtractionInputError(f"{manifest}: no cases" + (f" in split {split!r}" if split else ""))
    config = PreprocessConfig(spacing=None if spacing is None else tuple(spacing),
                              crop_size=tuple(int(c) for c in crop_size), region_margin=1.0, region_centre="volume")
    images = []
    for case in cases:
        prepared = prepare_case(case, config)
        images.append(center_crop({"image": prepared.image}, config.crop_size)["image"])
    return [c.case_id for c in cases], np.stack(images).astype(np.float32)


def profound_feature_fn(model: nnx.Module, model_name: str) -> Callable[[jax.Array], dict[str, jax.Array]]:
    """A jitted `images (N, D, H, W, C) -> {name: array}` for any ProFound artifact model, in eval mode."""
    if model_name not in (CONV_MODEL, VIT_MODEL):
        raise ValueError(f"not a ProFound model name: {model_name!r}")
    model.eval()
    graphdef, state = nnx.split(model)

    def features(state, images):
        model = nnx.merge(graphdef, state)
        out = model.encoder(images)
        if model_name == CONV_MODEL:
            result = {f"stage{i + 1}": s for i, s in enumerate(out.stages)}
            result["pooled"] = out.pooled
        else:
            result = {"tokens": jnp.concatenate([out.cls[:, None], out.tokens], axis=1), "cls": out.cls}
        if isinstance(model, Classifier):
            result["logits"] = model(images)
        elif isinstance(model, UPerNet):
            result["seg_logits"] = model(images).logits
        elif not isinstance(model, (EncoderOnly, MAE)):
            raise TypeError(f"no feature extraction for {type(model).__name__}")
        return {k: v.astype(jnp.float32) for k, v in result.items()}

    jitted = jax.jit(features)
    return lambda images: jitted(state, images)


def extract_profound(
    params: str | os.PathLike,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    expect: str,
    batch_size: int = 2,
    split: Optional[str] = None,
    crop_size: Optional[Sequence[int]] = None,
) -> dict[str, tuple[int, ...]]:
    """Load the artifact `params`, read `input_path` (.npz, or a manifest .csv with `crop_size` [and `split`]),
    write the features to `output_path`; returns {name: shape}."""
    model, config = load_profound(params, expect=expect)
    encoder_config = config["encoder"]
    input_path = os.fspath(input_path)
    case_ids = None
    if input_path.endswith(".csv"):
        if crop_size is None:
            crop_size = encoder_config.get("img_size")
            if crop_size is None:
                raise ExtractionInputError("manifest input needs a crop size (--crop D H W) for this model")
        case_ids, images = read_manifest_volumes(input_path, crop_size, split=split)
    else:
        images = read_npz_volumes(input_path, int(encoder_config["in_channels"]))
    fn = profound_feature_fn(model, expect)
    arrays = run_in_batches(lambda batch: fn(batch["images"]), {"images": images}, batch_size=batch_size)
    if case_ids is not None:
        arrays["case_id"] = np.asarray(case_ids)
    return save_features(output_path, arrays)


def extract_profound_conv(params, input_path, output_path, **options):
    return extract_profound(params, input_path, output_path, expect=CONV_MODEL, **options)


def extract_profound_vit(params, input_path, output_path, **options):
    return extract_profound(params, input_path, output_path, expect=VIT_MODEL, **options)
