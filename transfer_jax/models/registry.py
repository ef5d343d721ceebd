"""Backbones by name, built from plain option dicts (the `model` block of a config or a converted artifact)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax.numpy as jnp
from flax import nnx

from transfer_jax.models import convnext, profound_vit
from transfer_jax.models.convnext import ConvNeXtConfig, ConvNeXtV2
from transfer_jax.models.profound_vit import ProFoundViT, ViTConfig
from transfer_jax.models.provicnet import ProViCNet, ProViCNetConfig


def dataclass_from_dict(cls, values: dict[str, Any]):
    """Build a frozen config dataclass, turning lists into tuples and naming unknown fields in the error."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; expected a subset of {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def compute_dtype(backbone_options) -> jnp.dtype:
    """The dtype a model computes in (`model.backbone_options.dtype`; parameters stay fp32)."""
    return jnp.dtype(backbone_options.get("dtype", "float32"))


def _profound_conv(options: dict, rngs: nnx.Rngs) -> ConvNeXtV2:
    return ConvNeXtV2(dataclass_from_dict(ConvNeXtConfig, options), rngs=rngs)


def _profound_vit(options: dict, rngs: nnx.Rngs) -> ProFoundViT:
    return ProFoundViT(dataclass_from_dict(ViTConfig, options), rngs=rngs)


def _provicnet(options: dict, rngs: nnx.Rngs) -> ProViCNet:
    """The whole ProViCNet slice model (ViT + slice-position tokens + conv head); its task builds it directly."""
    return ProViCNet(ProViCNetConfig.from_dict({k: v for k, v in options.items() if k != "dtype"}),
                     dtype=compute_dtype(options), rngs=rngs)


BACKBONES: dict[str, Callable[[dict, nnx.Rngs], nnx.Module]] = {
    "profound_conv": _profound_conv,
    "provicnet": _provicnet,
    "profound_vit": _profound_vit,
}


def build_backbone(name: str, options: dict, *, rngs: nnx.Rngs) -> nnx.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {sorted(BACKBONES)}")
    return BACKBONES[name](dict(options), rngs)


LayerIdFn = Callable[[tuple], int]


def _profound_conv_layers(options: dict, scheme: str) -> tuple[LayerIdFn, int]:
    depths = dataclass_from_dict(ConvNeXtConfig, options).depths
    return (lambda path: convnext.layer_id(path, depths, scheme)), sum(depths)


def _profound_vit_layers(options: dict, scheme: str) -> tuple[LayerIdFn, int]:
    del scheme  # one scheme: every block its own layer
    depth = dataclass_from_dict(ViTConfig, options).depth
    return (lambda path: profound_vit.layer_id(path, depth)), depth


LAYER_IDS: dict[str, Callable[[dict, str], tuple[Optional[LayerIdFn], int]]] = {
    "profound_conv": _profound_conv_layers,
    "profound_vit": _profound_vit_layers,
    "provicnet": lambda options, scheme: (None, 0),  # trained without layer-wise decay, as upstream
}


def layer_ids(backbone: str, options, scheme: str = "group") -> tuple[Optional[LayerIdFn], int]:
    """`(fn, L)` for layer-wise lr decay: `fn` maps a parameter path inside the backbone (a tuple of str / int
    keys) to its layer index and a parameter's lr scale is layer_decay ** (L + 1 - index); `(None, 0)` for a
    backbone trained without it. `scheme` ("group" or "single") only applies to ProFound-Conv."""
    if backbone not in LAYER_IDS:
        raise ValueError(f"unknown backbone {backbone!r}; available: {sorted(LAYER_IDS)}")
    return LAYER_IDS[backbone](dict(options), scheme)


def encoder_feature_sites(encoder: nnx.Module, x, **kwargs) -> dict:
    """Named (N, D) features of an encoder, the sites where alignment (MMD/CKA) is measured.

    ProFound-Conv: `pooled` (the normed global feature) and `stage1`..`stage4` (raw stage maps, spatially averaged).
    ProViCNet (the whole slice model; built by its task, not here): `cls` and `mean_patch` of the final-norm tokens.
    ProFound-ViT: `cls` (the normed cls token the classifier reads) and `mean_patch` (normed patch tokens, averaged).
    """
    if isinstance(encoder, ConvNeXtV2):
        out = encoder(x)
        sites = {"pooled": out.pooled}
        for i, stage in enumerate(out.stages, start=1):
            sites[f"stage{i}"] = stage.astype(jnp.float32).mean(axis=(1, 2, 3))
        return {k: v.astype(jnp.float32) for k, v in sites.items()}
    if isinstance(encoder, ProFoundViT):  # `cls`: the normed cls token; `mean_patch`: normed patch tokens averaged
        out = encoder(x)
        return {"cls": out.cls.astype(jnp.float32), "mean_patch": out.tokens.astype(jnp.float32).mean(axis=1)}
    if isinstance(encoder, ProViCNet):  # per slice; kwargs: slice_position [B, 2] or None
        out = encoder.forward_features(x, kwargs.get("slice_position"))
        return {"cls": out.cls_token.astype(jnp.float32),
                "mean_patch": out.patch_tokens.astype(jnp.float32).mean(axis=1)}
    raise ValueError(f"no alignment feature sites defined for {type(encoder).__name__}")
