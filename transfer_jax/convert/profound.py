"""ProFound checkpoints -> Flax NNX state: key tables, size inference, model registry, artifact writing.

Handled checkpoint kinds, detected from the keys (spec `profound.md` §2.2, §3.2, §4.2, §5, §7):

* `fcmae`: FCMAE pretraining, `encoder.*` in the sparse Minkowski layout (`.kernel`, `.ln.`, `.linear.`) plus
  decoder keys -> the ProFound-Conv encoder (model name `profound_conv`).
* `conv`: a dense encoder, bare (`downsample_layers.*`) or as `encoder.*` of a fine-tuned model, optionally with a
  classification `head.*` or a UPerNet (`decode_head.*`, `auxiliary_head.*`, `hidden_norm.*`) -> `profound_conv`
  with that head.
* `mae`: MAE pretraining (`patch_embed.*`, `blocks.*`, decoder keys) -> ProFound-ViT (`profound_vit`), decoder
  kept on request.
* `vit`: a fine-tuned ViT (`encoder.patch_embed.*`) with `head.*` or a UPerNet with `adapter.*` -> `profound_vit`
  with that head.

Every artifact's state starts with `encoder` (the backbone, torch prefix `encoder.`), followed by `head`
(classification), `hidden_norm` + `decode_head` + `auxiliary_head` (+ `adapter` for the ViT) for UPerNet, or
`decoder` for an MAE with its decoder kept. `build_model(name, config)` rebuilds the module tree the state fits.

Sizes (stages, depths, widths, blocks, classes, head widths, patch, image grid) are inferred from tensor shapes.
Attention head counts cannot be: they default to upstream's (`12` for a 768-wide encoder, `16` for 1024, `16` for
the MAE decoder) and must be given for other widths. The ViT image size is found by matching the stored sin-cos
position table against every grid with the right number of tokens.

FCMAE specifics: the sparse kernels are remapped with the rule of upstream `remap_checkpoint_keys` (kernel offsets
D-fastest), the decoder (`proj`, `mask_token`, `decoder.*`, `pred`) is dropped, and the encoder's final LayerNorm,
absent from the pretraining checkpoint, starts at ones/zeros; all of it is listed in the report.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfer_jax.convert import artifact
from transfer_jax.convert.table import (
    CONV3D,
    CONV_TRANSPOSE3D,
    IDENTITY,
    LINEAR,
    RESHAPE,
    SPARSE_CONV3D,
    SPARSE_DEPTHWISE3D,
    ConversionError,
    ConversionReport,
    Default,
    Ignore,
    Rule,
    convert_state,
    flatten,
    target_spec,
    transformer_block_rules,
    unflatten,
)
from transfer_jax.convert.torch_pickle import extract_state_dict, load_torch_checkpoint
from transfer_jax.models.classifier import Classifier, ClassifierHead
from transfer_jax.models.convnext import ConvNeXtConfig, ConvNeXtV2
from transfer_jax.models.profound_vit import (
    MAE,
    MAEDecoderConfig,
    ProFoundViT,
    ViTConfig,
    sincos_pos_embed_3d,
)
from transfer_jax.models.registry import dataclass_from_dict
from transfer_jax.models.upernet import UPerNet, UPerNetConfig
from transfer_jax.models.vit_adapter import ViTAdapter

__all__ = [
    "CONV_MODEL", "VIT_MODEL", "ConvertedProFound", "EncoderOnly", "build_model", "convert_profound",
    "convert_to_artifact", "load_profound", "instantiate", "summary", "detect_kind", "conv_encoder_rules",
    "sparse_conv_encoder_rules", "vit_encoder_rules", "mae_decoder_rules", "classifier_head_rules", "upernet_rules",
    "vit_adapter_rules",
]

CONV_MODEL = "profound_conv"
VIT_MODEL = "profound_vit"

# Head counts are not visible in the weights; these are upstream's factories (mae_vit_{base,large}_patch16).
DEFAULT_ENCODER_HEADS = {768: 12, 1024: 16}
DEFAULT_DECODER_HEADS = 16
# Sibling build_segment.py: the ViT UPerNet reads blocks 3, 5, 7, 11 of the 12-block encoder.
DEFAULT_OUT_INDICES_12 = (3, 5, 7, 11)
UPSTREAM_POOL_SCALES = (1, 2, 3, 6)


# ----------------------------------------------------------------------------------------------------------------
# Model registry


class EncoderOnly(nnx.Module):
    """A bare encoder under the attribute `encoder`, so every artifact's state tree starts with `encoder`."""

    def __init__(self, encoder: nnx.Module):
        self.encoder = encoder

    def __call__(self, x):
        return self.encoder(x)


def build_model(model_name: str, config: Mapping[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
    """The module an artifact's state fits: `config = {"encoder": {...}, "head": None | {...}, "decoder": ...}`.

    `head` is `{"type": "classification", "num_classes", "bottleneck_dim"}` or `{"type": "upernet",
    **UPerNetConfig fields}`; `decoder` (ViT only) holds `MAEDecoderConfig` fields.
    """
    head = config.get("head")
    decoder = config.get("decoder")
    if model_name == CONV_MODEL:
        encoder_config = dataclass_from_dict(ConvNeXtConfig, config["encoder"])
        encoder = ConvNeXtV2(encoder_config, rngs=rngs)
        width, levels, adapter, tokens = encoder_config.dims[-1], tuple(encoder_config.dims), None, False
        if decoder:
            raise ValueError("profound_conv artifacts carry no decoder")
    elif model_name == VIT_MODEL:
        encoder_config = dataclass_from_dict(ViTConfig, config["encoder"])
        if decoder:
            if head:
                raise ValueError("a profound_vit artifact holds either an MAE decoder or a head, not both")
            return MAE(encoder_config, dataclass_from_dict(MAEDecoderConfig, decoder), rngs=rngs)
        encoder = ProFoundViT(encoder_config, rngs=rngs)
        width = encoder_config.width
        levels = encoder.feature_channels
        adapter = None
        tokens = True
        if head and head.get("type") == "upernet":
            adapter = ViTAdapter(width, encoder_config.grid_size, dtype=np.dtype(encoder_config.dtype), rngs=rngs)
    else:
        raise ValueError(f"unknown ProFound model {model_name!r}; expected {CONV_MODEL!r} or {VIT_MODEL!r}")
    if not head:
        return EncoderOnly(encoder)
    options = {k: v for k, v in head.items() if k != "type"}
    if head.get("type") == "classification":
        return Classifier(encoder, ClassifierHead(width, int(options["num_classes"]),
                                                  bottleneck_dim=int(options.get("bottleneck_dim", 256)), rngs=rngs))
    if head.get("type") == "upernet":
        return UPerNet(encoder, dataclass_from_dict(UPerNetConfig, options), in_channels=tuple(levels), rngs=rngs,
                       adapter=adapter, token_hidden_states=tokens)
    raise ValueError(f"unknown head type {head.get('type')!r}; expected 'classification' or 'upernet'")


# ----------------------------------------------------------------------------------------------------------------
# Key tables


def _escape(prefix: str) -> str:
    return re.escape(prefix)


def _conv_stem_rules(p: str, dst: str) -> list[Rule]:
    """The stem: a dense Conv3d + channels-first LayerNorm, in the dense and in the sparse (FCMAE) encoder."""
    return [
        Rule(rf"{p}downsample_layers\.0\.0\.weight", f"{dst}downsample_layers.0.0.kernel", CONV3D),
        Rule(rf"{p}downsample_layers\.0\.0\.bias", f"{dst}downsample_layers.0.0.bias"),
        Rule(rf"{p}downsample_layers\.0\.1\.weight", f"{dst}downsample_layers.0.1.scale"),
        Rule(rf"{p}downsample_layers\.0\.1\.bias", f"{dst}downsample_layers.0.1.bias"),
    ]


def conv_encoder_rules(src: str = "encoder.", dst: str = "encoder.") -> list[Rule]:
    """Dense ConvNeXt-V2 encoder (spec §2.2): torch `src*` -> Flax `dst*`."""
    p = _escape(src)
    return [
        *_conv_stem_rules(p, dst),
        Rule(rf"{p}downsample_layers\.([1-9]\d*)\.0\.weight", rf"{dst}downsample_layers.\1.0.scale"),
        Rule(rf"{p}downsample_layers\.([1-9]\d*)\.0\.bias", rf"{dst}downsample_layers.\1.0.bias"),
        Rule(rf"{p}downsample_layers\.([1-9]\d*)\.1\.weight", rf"{dst}downsample_layers.\1.1.kernel", CONV3D),
        Rule(rf"{p}downsample_layers\.([1-9]\d*)\.1\.bias", rf"{dst}downsample_layers.\1.1.bias"),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.dwconv\.weight", rf"{dst}stages.\1.\2.dwconv.kernel", CONV3D),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.dwconv\.bias", rf"{dst}stages.\1.\2.dwconv.bias"),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.norm\.weight", rf"{dst}stages.\1.\2.norm.scale"),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.norm\.bias", rf"{dst}stages.\1.\2.norm.bias"),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.(pwconv[12])\.weight", rf"{dst}stages.\1.\2.\3.kernel", LINEAR),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.(pwconv[12])\.bias", rf"{dst}stages.\1.\2.\3.bias"),
        # GRN (1, 1, 1, 1, 4C) -> (4C,)
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.grn\.(gamma|beta)", rf"{dst}stages.\1.\2.grn.\3", RESHAPE),
        Rule(rf"{p}norm\.weight", f"{dst}norm.scale"),
        Rule(rf"{p}norm\.bias", f"{dst}norm.bias"),
    ]


def sparse_conv_encoder_rules(src: str = "encoder.", dst: str = "encoder.") -> list[Rule]:
    """FCMAE's sparse encoder (spec §3.2): Minkowski kernels, `ln`/`linear` sub-modules, (1, C) biases and GRN."""
    p = _escape(src)
    return [
        *_conv_stem_rules(p, dst),
        Rule(rf"{p}downsample_layers\.([1-9]\d*)\.0\.ln\.weight", rf"{dst}downsample_layers.\1.0.scale"),
        Rule(rf"{p}downsample_layers\.([1-9]\d*)\.0\.ln\.bias", rf"{dst}downsample_layers.\1.0.bias"),
        Rule(rf"{p}downsample_layers\.([1-9]\d*)\.1\.kernel", rf"{dst}downsample_layers.\1.1.kernel",
             SPARSE_CONV3D),
        Rule(rf"{p}downsample_layers\.([1-9]\d*)\.1\.bias", rf"{dst}downsample_layers.\1.1.bias", RESHAPE),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.dwconv\.kernel", rf"{dst}stages.\1.\2.dwconv.kernel", SPARSE_DEPTHWISE3D),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.dwconv\.bias", rf"{dst}stages.\1.\2.dwconv.bias", RESHAPE),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.norm\.ln\.weight", rf"{dst}stages.\1.\2.norm.scale"),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.norm\.ln\.bias", rf"{dst}stages.\1.\2.norm.bias"),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.(pwconv[12])\.linear\.weight", rf"{dst}stages.\1.\2.\3.kernel", LINEAR),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.(pwconv[12])\.linear\.bias", rf"{dst}stages.\1.\2.\3.bias"),
        Rule(rf"{p}stages\.(\d+)\.(\d+)\.grn\.(gamma|beta)", rf"{dst}stages.\1.\2.grn.\3", RESHAPE),
    ]


FCMAE_DECODER = Ignore(r"mask_token|(proj|decoder|pred)\..+", "FCMAE decoder (pretraining only)")
FCMAE_FINAL_NORM = [
    Default(r"encoder\.norm\.scale", "ones", "the FCMAE pretraining encoder has no final norm (upstream loads the "
                                             "encoder non-strictly and keeps this init)"),
    Default(r"encoder\.norm\.bias", "zeros", "the FCMAE pretraining encoder has no final norm (upstream loads the "
                                             "encoder non-strictly and keeps this init)"),
]
BATCHNORM_COUNTER = Ignore(r"(.+\.)?num_batches_tracked", "BatchNorm batch counter (unused: fixed momentum)")


def vit_encoder_rules(src: str = "", dst: str = "encoder.") -> list[Rule]:
    """The ViT encoder (spec §4.2), including its stored (fixed) position table."""
    p = _escape(src)
    return [
        Rule(rf"{p}(cls_token|pos_embed)", rf"{dst}\1", IDENTITY),
        Rule(rf"{p}patch_embed\.proj\.weight", f"{dst}patch_embed.proj.kernel", CONV3D),
        Rule(rf"{p}patch_embed\.proj\.bias", f"{dst}patch_embed.proj.bias"),
        *transformer_block_rules(f"{src}blocks.", f"{dst}blocks."),
        Rule(rf"{p}norm\.weight", f"{dst}norm.scale"),
        Rule(rf"{p}norm\.bias", f"{dst}norm.bias"),
    ]


def mae_decoder_rules(dst: str = "decoder.") -> list[Rule]:
    return [
        Rule(r"(mask_token|decoder_pos_embed)", rf"{dst}\1", IDENTITY),
        Rule(r"(decoder_embed|decoder_pred)\.weight", rf"{dst}\1.kernel", LINEAR),
        Rule(r"(decoder_embed|decoder_pred)\.bias", rf"{dst}\1.bias"),
        *transformer_block_rules("decoder_blocks.", f"{dst}decoder_blocks."),
        Rule(r"decoder_norm\.weight", f"{dst}decoder_norm.scale"),
        Rule(r"decoder_norm\.bias", f"{dst}decoder_norm.bias"),
    ]


MAE_DECODER = Ignore(r"mask_token|decoder_pos_embed|(decoder_embed|decoder_blocks|decoder_norm|decoder_pred)\..+",
                     "MAE decoder (pretraining only; convert with the decoder kept to continue pretraining)")


def classifier_head_rules() -> list[Rule]:
    """`head = Sequential(Linear, BatchNorm1d, ReLU, Linear)`: indices 0, 1, 3 kept as list indices."""
    return [
        Rule(r"head\.(0|3)\.weight", r"head.\1.kernel", LINEAR),
        Rule(r"head\.(0|3)\.bias", r"head.\1.bias"),
        Rule(r"head\.1\.weight", "head.1.scale"),
        Rule(r"head\.1\.bias", "head.1.bias"),
        Rule(r"head\.1\.running_mean", "head.1.mean"),
        Rule(r"head\.1\.running_var", "head.1.var"),
    ]


def _conv_module_rules(src: str, dst: str) -> list[Rule]:
    # UPerNet ConvModule: Conv3d without bias + a LayerNorm that torch calls `batch_norm`.
    return [
        Rule(rf"{src}\.conv\.weight", rf"{dst}.conv.kernel", CONV3D),
        Rule(rf"{src}\.batch_norm\.weight", rf"{dst}.norm.scale"),
        Rule(rf"{src}\.batch_norm\.bias", rf"{dst}.norm.bias"),
    ]


def upernet_rules() -> list[Rule]:
    """UPerNet decode head, FCN auxiliary head and per-level `hidden_norm` (spec §5.2); names kept, `psp_modules.{i}.1`
    (index 0 is the parameter-free pooling) -> `psp_modules.{i}`."""
    return [
        *_conv_module_rules(r"decode_head\.psp_modules\.(\d+)\.1", r"decode_head.psp_modules.\1"),
        *_conv_module_rules(r"decode_head\.(bottleneck|fpn_bottleneck)", r"decode_head.\1"),
        *_conv_module_rules(r"decode_head\.(lateral_convs|fpn_convs)\.(\d+)", r"decode_head.\1.\2"),
        *_conv_module_rules(r"auxiliary_head\.convs\.(\d+)", r"auxiliary_head.convs.\1"),
        Rule(r"(decode_head|auxiliary_head)\.classifier\.weight", r"\1.classifier.kernel", CONV3D),
        Rule(r"(decode_head|auxiliary_head)\.classifier\.bias", r"\1.classifier.bias"),
        Rule(r"hidden_norm\.(\d+)\.weight", r"hidden_norm.\1.scale"),
        Rule(r"hidden_norm\.(\d+)\.bias", r"hidden_norm.\1.bias"),
    ]


_ADAPTER_CONVT = r"fpn1\.(?:0|3|6)|fpn2\.(?:0|3)|fpn3\.0"
_ADAPTER_BN = r"fpn1\.(?:1|4)|fpn2\.1"


def vit_adapter_rules() -> list[Rule]:
    """ViTAdapter branches: ConvTranspose3d at torch indices fpn1.{0,3,6}, fpn2.{0,3}, fpn3.0; BatchNorm3d at
    fpn1.{1,4}, fpn2.1 (the GELUs in between have no parameters; Flax list indices equal torch's)."""
    return [
        Rule(rf"adapter\.({_ADAPTER_CONVT})\.weight", r"adapter.\1.kernel", CONV_TRANSPOSE3D),
        Rule(rf"adapter\.({_ADAPTER_CONVT})\.bias", r"adapter.\1.bias"),
        Rule(rf"adapter\.({_ADAPTER_BN})\.weight", r"adapter.\1.scale"),
        Rule(rf"adapter\.({_ADAPTER_BN})\.bias", r"adapter.\1.bias"),
        Rule(rf"adapter\.({_ADAPTER_BN})\.running_mean", r"adapter.\1.mean"),
        Rule(rf"adapter\.({_ADAPTER_BN})\.running_var", r"adapter.\1.var"),
    ]


# ----------------------------------------------------------------------------------------------------------------
# Detection and size inference


@dataclasses.dataclass(frozen=True)
class _Kind:
    backbone: str  # "fcmae" | "conv" | "mae" | "vit"
    prefix: str  # torch prefix of the encoder keys ("" or "encoder.")
    head: Optional[str]  # None | "classification" | "upernet"

    @property
    def model_name(self) -> str:
        return CONV_MODEL if self.backbone in ("fcmae", "conv") else VIT_MODEL


def _fail(path: str, target: str, *problems: str):
    raise ConversionError(path, target, list(problems))


def detect_kind(sd: Mapping[str, np.ndarray], path: str = "checkpoint", variant: Optional[str] = None) -> _Kind:
    """Which ProFound checkpoint this is; `variant` ('conv' / 'vit') asserts the backbone family."""
    keys = set(sd)
    sparse = any(k.startswith("encoder.") and (k.endswith(".kernel") or ".ln." in k or ".linear." in k)
                 for k in keys)
    if sparse:
        kind = _Kind("fcmae", "encoder.", None)
    elif "encoder.downsample_layers.0.0.weight" in keys:
        kind = _Kind("conv", "encoder.", None)
    elif "downsample_layers.0.0.weight" in keys:
        kind = _Kind("conv", "", None)
    elif "encoder.patch_embed.proj.weight" in keys:
        kind = _Kind("vit", "encoder.", None)
    elif "patch_embed.proj.weight" in keys:
        kind = _Kind("mae", "", None)
    else:
        sample = ", ".join(sorted(keys)[:6])
        _fail(path, "a ProFound model", "not a ProFound checkpoint: expected ConvNeXt keys "
              "('[encoder.]downsample_layers.0.0.weight' or sparse 'encoder.*.kernel') or ViT keys "
              f"('[encoder.]patch_embed.proj.weight'); found {len(keys)} keys such as {sample}")
    if "head.0.weight" in keys:
        kind = dataclasses.replace(kind, head="classification")
    elif "decode_head.classifier.weight" in keys:
        kind = dataclasses.replace(kind, head="upernet")
    if variant is not None:
        family = "conv" if kind.backbone in ("fcmae", "conv") else "vit"
        if variant not in ("conv", "vit"):
            raise ValueError(f"variant must be 'conv' or 'vit', got {variant!r}")
        if family != variant:
            names = {"conv": "ProFound-Conv (ConvNeXt-V2)", "vit": "ProFound-ViT"}
            _fail(path, names[variant], f"expected a {names[variant]} checkpoint (--variant {variant}), but the keys "
                  f"are those of {names[family]} (e.g. {_example_key(keys, family)!r})")
    return kind


def _example_key(keys, family):
    marker = "downsample_layers" if family == "conv" else "patch_embed"
    return next((k for k in sorted(keys) if marker in k), sorted(keys)[0])


def _indices(keys, pattern: str) -> list[int]:
    regex = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := regex.fullmatch(k))})


def _require(sd, key, path, target):
    if key not in sd:
        _fail(path, target, f"cannot infer the model size: key {key!r} is missing")
    return np.shape(sd[key])


def infer_conv_config(sd: Mapping[str, np.ndarray], kind: _Kind, path: str) -> dict[str, Any]:
    """ConvNeXtConfig fields from the shapes: stages, depths, widths, stem/downsample kernels, input channels."""
    p = kind.prefix
    target = "ProFound-Conv encoder"
    stem = _require(sd, f"{p}downsample_layers.0.0.weight", path, target)
    stages = _indices(sd, rf"{re.escape(p)}stages\.(\d+)\..+")
    if not stages or stages != list(range(len(stages))):
        _fail(path, target, f"cannot infer the stages: found stage indices {stages}")
    depths, dims = [], []
    for s in stages:
        blocks = _indices(sd, rf"{re.escape(p)}stages\.{s}\.(\d+)\..+")
        depths.append(max(blocks) + 1)
        bias = _require(sd, f"{p}stages.{s}.0.dwconv.bias", path, target)
        dims.append(int(np.prod(bias)))  # (C,) dense, (1, C) sparse

    def kernel_of(stage):
        key = f"{p}downsample_layers.{stage}.1.{'kernel' if kind.backbone == 'fcmae' else 'weight'}"
        shape = _require(sd, key, path, target)
        if kind.backbone != "fcmae":
            return tuple(int(k) for k in shape[2:])
        k = 1 if len(shape) == 2 else round(shape[0] ** (1 / 3))
        return (k, k, k)

    last = len(stages) - 1
    return dict(
        in_channels=int(stem[1]), depths=tuple(depths), dims=tuple(dims), drop_path_rate=0.0,
        stem_kernel=tuple(int(k) for k in stem[2:]),
        downsample_kernel=kernel_of(1) if last > 1 else (2, 2, 2),
        last_downsample=kernel_of(last) if last >= 1 else (1, 1, 1),
        dtype="float32",
    )


def _factorisations(n: int):
    for a in range(1, n + 1):
        if n % a:
            continue
        for b in range(1, n // a + 1):
            if (n // a) % b == 0:
                yield (a, b, n // a // b)


def infer_vit_grid(pos_embed: np.ndarray, path: str) -> tuple[int, int, int]:
    """The token grid whose upstream sin-cos table equals the stored `pos_embed` (1, 1 + T, C)."""
    table = np.asarray(pos_embed, np.float32).reshape(pos_embed.shape[-2], pos_embed.shape[-1])
    tokens, width = table.shape[0] - 1, table.shape[1]
    matches = []
    if width % 6 == 0:
        for grid in _factorisations(tokens):
            if np.allclose(sincos_pos_embed_3d(width, grid), table, atol=1e-5):
                matches.append(grid)
    if len(matches) != 1:
        _fail(path, "ProFound-ViT", f"cannot infer the image grid from pos_embed {tuple(pos_embed.shape)}: "
              f"{len(matches)} sin-cos grids match ({matches}); pass img_size explicitly (--img-size D H W)")
    return matches[0]


def _heads(width: int, given: Optional[int], default: Optional[int], what: str, path: str) -> int:
    heads = given if given is not None else default
    if heads is None or width % heads:
        _fail(path, "ProFound-ViT", f"the number of {what} attention heads cannot be read from the weights and has "
              f"no upstream default for width {width}; pass it explicitly (--{what.replace(' ', '-')}-heads)")
    return int(heads)


def infer_vit_config(sd: Mapping[str, np.ndarray], kind: _Kind, path: str, *, img_size=None, num_heads=None,
                     out_indices=None) -> tuple[dict[str, Any], list[str]]:
    p = kind.prefix
    target = "ProFound-ViT encoder"
    notes = []
    proj = _require(sd, f"{p}patch_embed.proj.weight", path, target)
    width, in_channels, patch = int(proj[0]), int(proj[1]), tuple(int(k) for k in proj[2:])
    depth = len(_indices(sd, rf"{re.escape(p)}blocks\.(\d+)\..+"))
    fc1 = _require(sd, f"{p}blocks.0.mlp.fc1.weight", path, target)
    pos = sd.get(f"{p}pos_embed")
    if img_size is None:
        if pos is None:
            _fail(path, target, f"key {p + 'pos_embed'!r} is missing; pass img_size explicitly")
        grid = infer_vit_grid(pos, path)
        img_size = tuple(g * q for g, q in zip(grid, patch))
        notes.append(f"image size {img_size} inferred from the stored sin-cos position table (grid {grid})")
    if out_indices is None:
        out_indices = DEFAULT_OUT_INDICES_12 if depth == 12 else tuple(
            max(0, depth * q // 4 - 1) for q in (1, 2, 3, 4))
        notes.append(f"UPerNet levels read blocks {out_indices}"
                     + (" (upstream's choice)" if depth == 12 else " (evenly spaced; not in the weights)"))
    heads = _heads(width, num_heads, DEFAULT_ENCODER_HEADS.get(width), "num", path)
    config = dict(img_size=tuple(int(s) for s in img_size), patch_size=patch, in_channels=in_channels, width=width,
                  depth=depth, num_heads=heads, mlp_ratio=float(fc1[0]) / width,
                  qkv_bias=f"{p}blocks.0.attn.qkv.bias" in sd, layer_norm_eps=1e-6,
                  out_indices=tuple(int(i) for i in out_indices), dtype="float32")
    return config, notes


def infer_mae_decoder_config(sd, path, *, decoder_num_heads=None, args=None) -> dict[str, Any]:
    embed = _require(sd, "decoder_embed.weight", path, "MAE decoder")
    width = int(embed[0])
    fc1 = _require(sd, "decoder_blocks.0.mlp.fc1.weight", path, "MAE decoder")
    config = dict(width=width, depth=len(_indices(sd, r"decoder_blocks\.(\d+)\..+")),
                  num_heads=_heads(width, decoder_num_heads, DEFAULT_DECODER_HEADS, "decoder num", path),
                  mlp_ratio=float(fc1[0]) / width, layer_norm_eps=1e-6)
    # Pretraining settings live in the checkpoint's argparse args (upstream main_pretrain flags) when present.
    config["mask_ratio"] = float(getattr(args, "mask_ratio", MAEDecoderConfig.mask_ratio))
    config["norm_pix_loss"] = bool(getattr(args, "norm_pix_loss", MAEDecoderConfig.norm_pix_loss))
    return config


def infer_head_config(sd, kind: _Kind, path: str) -> Optional[dict[str, Any]]:
    if kind.head == "classification":
        first = _require(sd, "head.0.weight", path, "classification head")
        last = _require(sd, "head.3.weight", path, "classification head")
        return {"type": "classification", "num_classes": int(last[0]), "bottleneck_dim": int(first[0])}
    if kind.head == "upernet":
        classifier = _require(sd, "decode_head.classifier.weight", path, "UPerNet head")
        psp = _indices(sd, r"decode_head\.psp_modules\.(\d+)\..+")
        if len(psp) != len(UPSTREAM_POOL_SCALES):
            _fail(path, "UPerNet head", f"{len(psp)} pyramid-pooling modules found; the pooling scales are not in "
                  f"the weights and only upstream's {UPSTREAM_POOL_SCALES} are known")
        aux = "auxiliary_head.classifier.weight" in sd
        aux_channels = int(np.shape(sd["auxiliary_head.convs.0.conv.weight"])[0]) if aux else 256
        return {"type": "upernet", "num_classes": int(classifier[0]), "hidden_size": int(classifier[1]),
                "auxiliary_channels": aux_channels, "pool_scales": UPSTREAM_POOL_SCALES, "use_auxiliary_head": aux,
                "auxiliary_in_index": 2, "dtype": "float32"}
    return None


# ----------------------------------------------------------------------------------------------------------------
# Conversion


@dataclasses.dataclass
class ConvertedProFound:
    model_name: str
    config: dict[str, Any]
    state: dict[str, np.ndarray]  # flat dotted paths -> arrays
    report: ConversionReport
    source_kind: str
    epoch: Optional[int] = None
    num_params: int = 0  # trainable values (nnx.Param), excluding buffers and batch statistics

    def report_dict(self) -> dict[str, Any]:
        return {**self.report.to_dict(), "source_kind": self.source_kind, "checkpoint_epoch": self.epoch,
                "num_params": self.num_params}


def _table(kind: _Kind, with_decoder: bool):
    rules, ignores, defaults = [], [BATCHNORM_COUNTER], []
    if kind.backbone == "fcmae":
        rules += sparse_conv_encoder_rules()
        ignores.append(FCMAE_DECODER)
        defaults += FCMAE_FINAL_NORM
    elif kind.backbone == "conv":
        rules += conv_encoder_rules(src=kind.prefix)
    else:
        rules += vit_encoder_rules(src=kind.prefix)
        if kind.backbone == "mae":
            if with_decoder:
                rules += mae_decoder_rules()
            else:
                ignores.append(MAE_DECODER)
    if kind.head == "classification":
        rules += classifier_head_rules()
    elif kind.head == "upernet":
        rules += upernet_rules()
        if kind.backbone == "vit":
            rules += vit_adapter_rules()
    return rules, ignores, defaults


def _describe_target(name: str, config: Mapping[str, Any]) -> str:
    head = config.get("head")
    what = {CONV_MODEL: "ProFound-Conv", VIT_MODEL: "ProFound-ViT"}[name]
    if config.get("decoder"):
        what += " MAE (encoder + decoder)"
    elif head:
        classes = head["num_classes"]
        what += f" + {head['type']} head ({classes} class{'es' if classes != 1 else ''})"
    else:
        what += " encoder"
    return what


def convert_profound(
    path: str | os.PathLike,
    *,
    variant: Optional[str] = None,
    with_decoder: bool = False,
    img_size: Optional[Sequence[int]] = None,
    num_heads: Optional[int] = None,
    decoder_num_heads: Optional[int] = None,
    out_indices: Optional[Sequence[int]] = None,
) -> ConvertedProFound:
    """Read a ProFound checkpoint and fill the matching Flax state. Raises `CheckpointReadError` for unreadable
    files and one `ConversionError` listing every problem otherwise (wrong model, renamed keys, wrong shapes)."""
    path = os.fspath(path)
    checkpoint = load_torch_checkpoint(path)
    sd = extract_state_dict(checkpoint, path)
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    epoch = checkpoint.get("epoch") if isinstance(checkpoint, dict) else None
    kind = detect_kind(sd, path, variant)
    notes = []
    if with_decoder and kind.backbone != "mae":
        _fail(path, "ProFound model", "with_decoder only applies to MAE (ViT) pretraining checkpoints; the FCMAE "
              "decoder is always dropped and fine-tuned checkpoints have none")
    if kind.model_name == CONV_MODEL:
        config = {"encoder": infer_conv_config(sd, kind, path)}
    else:
        encoder, notes = infer_vit_config(sd, kind, path, img_size=img_size, num_heads=num_heads,
                                          out_indices=out_indices)
        config = {"encoder": encoder}
        if with_decoder:
            config["decoder"] = infer_mae_decoder_config(sd, path, decoder_num_heads=decoder_num_heads, args=args)
    config["head"] = infer_head_config(sd, kind, path)

    abstract = nnx.eval_shape(lambda: build_model(kind.model_name, config, rngs=nnx.Rngs(0)))
    spec = target_spec(abstract)
    rules, ignores, defaults = _table(kind, with_decoder)
    flat, report = convert_state(sd, rules, spec, ignore=ignores, defaults=defaults, source_name=path,
                                 target_name=_describe_target(kind.model_name, config))
    report.notes.extend(notes)
    num_params = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
    return ConvertedProFound(kind.model_name, config, flat, report, kind.backbone,
                             epoch=int(epoch) if isinstance(epoch, (int, np.integer)) else None,
                             num_params=num_params)


def convert_to_artifact(path: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False,
                        **options) -> ConvertedProFound:
    """`convert_profound` + `artifact.save_converted`."""
    converted = convert_profound(path, **options)
    artifact.save_converted(output, converted.model_name, converted.config, converted.state,
                            converted.report_dict(), overwrite=overwrite)
    return converted


def load_profound(directory: str | os.PathLike, *, expect: Optional[str] = None) -> tuple[nnx.Module, dict]:
    """Rebuild the Flax module of a ProFound artifact and load its state. Returns (module, config)."""
    loaded = artifact.load_converted(directory)
    if loaded.model_name not in (CONV_MODEL, VIT_MODEL) or (expect is not None and loaded.model_name != expect):
        wanted = repr(expect) if expect else f"{CONV_MODEL!r} or {VIT_MODEL!r}"
        raise artifact.ArtifactError(directory, f"holds a {loaded.model_name!r} model, expected {wanted}")
    try:
        model = instantiate(loaded.model_name, loaded.config, flatten(loaded.state))
    except ValueError as exc:
        raise artifact.ArtifactError(directory, str(exc)) from exc
    return model, loaded.config


def instantiate(model_name: str, config: Mapping[str, Any], flat_state: Mapping[str, np.ndarray]) -> nnx.Module:
    """`build_model` with `flat_state` (dotted paths) loaded; the state must match the module tree exactly.

    The module is built abstractly (no random init: eager init compiles one tiny XLA program per parameter) and
    filled with the given arrays; only RNG state (stochastic-depth streams) is created concretely.
    """
    abstract = nnx.eval_shape(lambda: build_model(model_name, config, rngs=nnx.Rngs(0)))
    spec = target_spec(abstract)
    problems = [f"missing {k}" for k in spec if k not in flat_state]
    problems += [f"unexpected {k}" for k in flat_state if k not in spec]
    problems += [f"{k}: shape {tuple(flat_state[k].shape)} != {tuple(spec[k].shape)}" for k in spec
                 if k in flat_state and tuple(flat_state[k].shape) != tuple(spec[k].shape)]
    if problems:
        raise ValueError("state does not match its model config: " + "; ".join(problems[:20])
                         + (f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""))
    graphdef, rng_state, weights = nnx.split(abstract, nnx.RngState, ...)
    if len(nnx.to_flat_state(rng_state)):
        # One compiled init program instead of one eager op per parameter.
        model = nnx.jit(lambda: build_model(model_name, config, rngs=nnx.Rngs(0)))()
        nnx.update(model, nnx.State(unflatten({k: np.asarray(flat_state[k], spec[k].dtype) for k in spec})))
        return model
    nnx.replace_by_pure_dict(weights, unflatten({k: jnp.asarray(flat_state[k], spec[k].dtype) for k in spec}))
    return nnx.merge(graphdef, rng_state, weights)


def summary(converted: ConvertedProFound, output: Optional[str] = None) -> str:
    """Human-readable summary for the convert script."""
    lines = [converted.report.summary(),
             f"  model {converted.model_name}: {converted.num_params:,} trainable parameters "
             f"({converted.report.num_parameters:,} values incl. statistics and fixed tables)",
             f"  source kind: {converted.source_kind}" + (f", epoch {converted.epoch}" if converted.epoch is not None
                                                           else "")]
    if output:
        lines.append(f"  artifact written to {output}")
    return "\n".join(lines)
