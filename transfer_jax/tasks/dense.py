"""Model builders shared by the tasks: one UPerNet for every dense task, one MLP head for classification.

* Dense (segmentation logits, restoration / synthesis intensities): `UPerNet` over the backbone's four levels. A
  ProFound-Conv encoder hands it four channels-last stage maps; a ProFound-ViT encoder hands it four token levels
  (blocks `out_indices`) that the UPerNet `hidden_norm` normalises over tokens and `ViTAdapter` turns into a
  4-level pyramid (exactly `convert/profound.py::build_model` for upernet artifacts). The output is brought back to
  the input resolution by the UPerNet itself; `out_channels` is the number of classes or target channels.
* Classification: `Classifier(encoder, ClassifierHead)` (Linear -> BatchNorm1d -> ReLU -> Linear) on the encoder's
  first output: the normed pooled feature (conv) or the normed cls token (ViT), as upstream.
"""
from __future__ import annotations

from flax import nnx

from transfer_jax.models.classifier import Classifier, ClassifierHead
from transfer_jax.models.profound_vit import ProFoundViT
from transfer_jax.models.registry import build_backbone, compute_dtype, dataclass_from_dict
from transfer_jax.models.upernet import UPerNet, UPerNetConfig
from transfer_jax.models.vit_adapter import ViTAdapter


def backbone_from_config(model_config, rngs: nnx.Rngs, **overrides) -> nnx.Module:
    return build_backbone(model_config.backbone, {**model_config.backbone_options.to_dict(), **overrides}, rngs=rngs)


def build_dense_model(model_config, out_channels: int, rngs: nnx.Rngs, **head_overrides) -> UPerNet:
    """UPerNet(out_channels) over the configured backbone (`model.backbone_options`, `model.head_options`)."""
    encoder = backbone_from_config(model_config, rngs)
    dtype = compute_dtype(model_config.backbone_options)
    head = dataclass_from_dict(UPerNetConfig, {**model_config.head_options.to_dict(), "num_classes": out_channels,
                                               "dtype": dtype.name, **head_overrides})
    adapter, tokens = None, False
    if isinstance(encoder, ProFoundViT):
        adapter = ViTAdapter(encoder.config.width, encoder.config.grid_size, dtype=dtype, rngs=rngs)
        tokens = True
    return UPerNet(encoder, head, in_channels=tuple(encoder.feature_channels), rngs=rngs, adapter=adapter,
                   token_hidden_states=tokens, out_channels=out_channels)


def feature_width(encoder: nnx.Module) -> int:
    """Width of the encoder's first output (what the classification head reads)."""
    if isinstance(encoder, ProFoundViT):
        return encoder.config.width
    return int(encoder.feature_channels[-1])


def build_classifier(model_config, num_classes: int, rngs: nnx.Rngs, bottleneck_dim: int = 256) -> Classifier:
    encoder = backbone_from_config(model_config, rngs)
    dtype = compute_dtype(model_config.backbone_options)
    head = ClassifierHead(feature_width(encoder), num_classes, bottleneck_dim=bottleneck_dim, dtype=dtype, rngs=rngs)
    return Classifier(encoder, head)
