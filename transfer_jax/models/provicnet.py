"""ProViCNet (pimed/ProViCNet, arXiv 2502.00366) in Flax NNX: slice-wise 2.5-D prostate cancer segmentation.

Every axial slice is a 2-D image made of the slice and its neighbours (MRI: 3 channels; TRUS: 9 channels squeezed to
3 by a 1x1 ``ChannelReducer``), run through a DINOv2 ViT-S/14 with 4 registers (``models/dinov2.py``) whose token
sequence carries two extra learned *slice-position* tokens:

    [cls, registers(4), axis_pos(slice index j), axis_max(slice count n), patches(gy * gx)]

``axis_pos`` / ``axis_max`` are ``Linear(1, width)`` of the raw floats ``j`` and ``n`` (no normalisation, no position
table entry). The final-norm patch tokens, as an NHWC map ``[B, gy, gx, width]``, go through ``conv_head8``
(3 x [nearest up x2, 3x3 conv], BatchNorm + ReLU after the first two) to class logits at ``8 * gy`` (256 x 256 for
the released 448 x 448 input). With ``slice_position=None`` the model falls back to plain DINOv2
``forward_features`` (no position tokens), as upstream does.

Also here: the DINO-style contrastive projection head ``CL_Head`` (weight-normed last layer), the mpMRI fusion head
``FusionModalities`` and the upstream inference-time overwrite of each fusion stream by its sequence model's head.

Conventions: images NHWC ``[B, H, W, C]``; slice positions ``[B, 2]`` float ``(j, n)``; logits NHWC
``[B, H', W', num_classes]``; BatchNorm eps 1e-5, PyTorch momentum 0.1 (Flax ``momentum=0.9``), running statistics
in eval mode (``model.eval()``). Attribute names mirror the PyTorch keys (``CL_Head``, ``ChannelReducer``,
``head.segmentation_conv[1]``, ``Stream_T2W.UpsampleModule``...) so conversion is a rename table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from transfer_jax.models.dinov2 import BackboneFeatures, DinoV2, DinoV2Config
from transfer_jax.models.layers import DenseConv, check_remat_policy, gelu, nearest_upsample2x

# Slice-position tokens inserted between the registers and the patch tokens (upstream ``additional_layers = 2``).
NUM_SLICE_POSITION_TOKENS = 2
# Order of the three mpMRI sequences everywhere (fusion inputs, stream names, concat order).
FUSION_SEQUENCES = ("T2W", "ADC", "DWI")


# --------------------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------------------


def _known_fields(cls, data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` as a dict after checking that every key is a field of the dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; expected a subset of {sorted(known)}")
    return dict(data)


@dataclasses.dataclass(frozen=True)
class ContrastiveHeadConfig:
    """``ContrastiveLearning_Head`` sizes (released: 384 -> 2048 -> 2048 -> 256, L2-norm, weight-normed -> 65536)."""

    hidden: int = 2048
    bottleneck: int = 256
    out_dim: int = 65536
    num_layers: int = 3

    def __post_init__(self):
        if self.num_layers < 2:
            # nlayers=1 upstream is a single un-indexed Linear (key CL_Head.mlp.weight); no released model uses it.
            raise ValueError(f"ContrastiveHeadConfig.num_layers must be >= 2, got {self.num_layers}")


@dataclasses.dataclass(frozen=True)
class ProViCNetConfig:
    """A slice model (``ProViCNet_contrastive`` for MRI, ``ProViCNet_contrastive_US`` for TRUS).

    ``reducer_in_channels``: input channels of the TRUS ``ChannelReducer`` (9 for ``TRUS_best.pth``), ``None`` for
    MRI models whose 3-channel input goes straight into the patch embedding.
    ``contrastive_head``: ``None`` for a model without ``CL_Head`` (not needed for segmentation or features).
    ``head_channels``: widths of the first two ``conv_head8`` convolutions (upstream hard-codes 128, 64).
    """

    backbone: DinoV2Config = dataclasses.field(default_factory=DinoV2Config)
    num_classes: int = 4
    head_channels: tuple[int, int] = (128, 64)
    reducer_in_channels: int | None = None
    contrastive_head: ContrastiveHeadConfig | None = dataclasses.field(default_factory=ContrastiveHeadConfig)
    remat: bool = False  # recompute each ViT block's activations in the backward pass: memory for FLOPs
    remat_policy: str = "nothing_saveable"  # with remat: what a block still saves (layers.REMAT_POLICIES)

    def __post_init__(self):
        check_remat_policy(self.remat_policy)

    @property
    def input_channels(self) -> int:
        return self.reducer_in_channels or self.backbone.in_channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ProViCNetConfig":
        """Inverse of :meth:`to_dict` (e.g. an artifact's ``model.json`` config); unknown fields are errors."""
        values = _known_fields(cls, data)
        if "backbone" in values:
            values["backbone"] = DinoV2Config(**_known_fields(DinoV2Config, values["backbone"]))
        if "head_channels" in values:
            values["head_channels"] = tuple(values["head_channels"])
        if values.get("contrastive_head") is not None:
            values["contrastive_head"] = ContrastiveHeadConfig(
                **_known_fields(ContrastiveHeadConfig, values["contrastive_head"])
            )
        return cls(**values)


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """``FusionModalities(embedding_size, target_channels, num_classes)``; released 384 / 128 / 4."""

    embedding: int = 384
    target_channels: int = 128
    num_classes: int = 4

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "FusionConfig":
        return cls(**_known_fields(cls, data))


# --------------------------------------------------------------------------------------------------------------
# Layers. Parameterless ones are modules too, so ``nnx.List`` indices equal the PyTorch ``nn.Sequential`` indices.
# --------------------------------------------------------------------------------------------------------------


class Upsample2x(nnx.Module):
    """``nn.Upsample(scale_factor=2)`` (nearest) on NHWC."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return nearest_upsample2x(x)


class ReLU(nnx.Module):
    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(x)


class GELU(nnx.Module):
    """Exact (erf) GELU, PyTorch ``nn.GELU()``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(x)


def conv3x3(in_channels: int, out_channels: int, rngs: nnx.Rngs, dtype=None) -> DenseConv:
    """``nn.Conv2d(in, out, 3, padding=1)`` with bias: `nnx.Conv`'s parameters and init, computed as XLA:CPU runs
    fastest (`cpu_conv.dense_conv`)."""
    return DenseConv(in_channels, out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)


def batch_norm(channels: int, rngs: nnx.Rngs, dtype=None) -> nnx.BatchNorm:
    """``nn.BatchNorm2d`` defaults: eps 1e-5, running-average momentum 0.1 (= Flax 0.9).

    Training mode normalises with the biased batch variance like PyTorch; the running variance update uses the
    biased variance too (PyTorch uses the unbiased one: a factor n/(n-1), negligible at 64x64 maps).
    """
    return nnx.BatchNorm(channels, momentum=0.9, epsilon=1e-5, use_fast_variance=False, dtype=dtype,
                         param_dtype=jnp.float32, rngs=rngs)


def run_layers(layers: nnx.List, x: jax.Array, collect: bool = False) -> jax.Array | list[jax.Array]:
    """Apply a Sequential-like ``nnx.List``; with ``collect`` return every layer's output (index = torch index).

    Without ``collect`` an up-sampling followed by a 3x3 conv runs as one layer on the low-resolution map
    (`DenseConv.after_upsample2x`): the same result without materialising the up-sampled map.
    """
    if collect:
        outputs = []
        for layer in layers:
            x = layer(x)
            outputs.append(x)
        return outputs
    index = 0
    while index < len(layers):
        layer = layers[index]
        following = layers[index + 1] if index + 1 < len(layers) else None
        if isinstance(layer, Upsample2x) and isinstance(following, DenseConv) and following.fuses_upsample2x:
            x = following.after_upsample2x(x)
            index += 2
        else:
            x = layer(x)
            index += 1
    return x


class ConvHead8(nnx.Module):
    """``conv_head8``: feature map [B, gy, gx, width] -> logits [B, 8 gy, 8 gx, num_classes].

    ``segmentation_conv`` indices as in PyTorch: 0 up, 1 conv, 2 BN, 3 ReLU, 4 up, 5 conv, 6 BN, 7 ReLU, 8 up, 9 conv.
    """

    def __init__(self, width: int, channels: tuple[int, int], num_classes: int, *, dtype=None, rngs: nnx.Rngs):
        first, second = channels
        self.segmentation_conv = nnx.List(
            [
                Upsample2x(),
                conv3x3(width, first, rngs, dtype),
                batch_norm(first, rngs, dtype),
                ReLU(),
                Upsample2x(),
                conv3x3(first, second, rngs, dtype),
                batch_norm(second, rngs, dtype),
                ReLU(),
                Upsample2x(),
                conv3x3(second, num_classes, rngs, dtype),
            ]
        )

    def __call__(self, feature_map: jax.Array, collect: bool = False) -> jax.Array | list[jax.Array]:
        return run_layers(self.segmentation_conv, feature_map, collect)


class WeightNormLinear(nnx.Module):
    """Bias-free Linear with weight normalisation (``nn.utils.weight_norm``, dim 0 in PyTorch terms).

    Parameters: ``g`` [out] (magnitude per output unit) and ``v`` [in, out] (direction, Dense-kernel layout). The
    effective kernel is ``v * g / ||v||`` with the norm over the ``in`` axis, i.e. per output row of PyTorch's
    ``[out, in]`` weight. Upstream fills ``g`` with 1 and freezes it (``norm_last_layer=True``).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        self.v = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (in_features, out_features), jnp.float32))
        self.g = nnx.Param(jnp.ones((out_features,), jnp.float32))

    def kernel(self) -> jax.Array:
        v = self.v[...]
        return v * (self.g[...] / jnp.linalg.norm(v, axis=0))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x @ self.kernel()


class ContrastiveHead(nnx.Module):
    """``CL_Head`` (DINO head clone): ``mlp`` (Linear, GELU, ..., Linear) -> L2 normalise -> ``last_layer``.

    Input [..., width], output [..., out_dim]. ``mlp`` indices equal the PyTorch ones (Linear at 0, 2, 4).
    """

    def __init__(self, width: int, config: ContrastiveHeadConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.truncated_normal(stddev=0.02)
        layers: list[nnx.Module] = [nnx.Linear(width, config.hidden, kernel_init=init, rngs=rngs), GELU()]
        for _ in range(config.num_layers - 2):
            layers += [nnx.Linear(config.hidden, config.hidden, kernel_init=init, rngs=rngs), GELU()]
        layers.append(nnx.Linear(config.hidden, config.bottleneck, kernel_init=init, rngs=rngs))
        self.mlp = nnx.List(layers)
        self.last_layer = WeightNormLinear(config.bottleneck, config.out_dim, rngs=rngs)

    def bottleneck(self, x: jax.Array) -> jax.Array:
        """``mlp`` then ``F.normalize(p=2, eps=1e-12)``: the unit vectors fed to the prototype layer."""
        x = run_layers(self.mlp, x)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.last_layer(self.bottleneck(x))


class ChannelReducer(nnx.Module):
    """TRUS ``ChannelReducer.reduce_channels``: 1x1 conv with bias, e.g. 9 -> 3 channels (NHWC)."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype=None, rngs: nnx.Rngs):
        self.reduce_channels = nnx.Conv(in_channels, out_channels, (1, 1), padding="VALID", dtype=dtype,
                                        param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.reduce_channels(images)


# --------------------------------------------------------------------------------------------------------------
# Slice model
# --------------------------------------------------------------------------------------------------------------


class ProViCNet(nnx.Module):
    """ProViCNet slice model (MRI ``ProViCNet_contrastive`` / TRUS ``ProViCNet_contrastive_US``).

    Inputs: ``images`` [B, H, W, input_channels] NHWC (448 x 448 for the released weights) and ``slice_position``
    [B, 2] float32 raw ``(slice index j, number of slices n)`` or ``None`` (plain DINOv2 tokens). ``dtype``: the
    compute dtype of the reducer, the ViT and the conv head (parameters stay fp32; ``None`` = fp32); ``CL_Head``
    computes in fp32 whatever its input.
    """

    def __init__(self, config: ProViCNetConfig, *, dtype=None, rngs: nnx.Rngs):
        self.config = config
        self.remat = config.remat  # a plain attribute: the evaluation graph turns it off (train/state.py)
        width = config.backbone.width
        self.ChannelReducer = (
            ChannelReducer(config.reducer_in_channels, config.backbone.in_channels, dtype=dtype, rngs=rngs)
            if config.reducer_in_channels
            else None
        )
        self.CL_Head = (
            ContrastiveHead(width, config.contrastive_head, rngs=rngs) if config.contrastive_head else None
        )
        self.backbone = DinoV2(config.backbone, dtype=dtype, rngs=rngs)
        self.head = ConvHead8(width, config.head_channels, config.num_classes, dtype=dtype, rngs=rngs)
        # Upstream init: normal(0, 0.02) weights, zero bias.
        token_init = nnx.initializers.normal(stddev=0.02)
        self.axis_pos = nnx.Linear(1, width, kernel_init=token_init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.axis_max = nnx.Linear(1, width, kernel_init=token_init, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def backbone_input(self, images: jax.Array) -> jax.Array:
        """The 3-channel image the ViT sees (TRUS: after ``ChannelReducer``)."""
        expected = self.config.input_channels
        if images.shape[-1] != expected:
            raise ValueError(
                f"ProViCNet expects NHWC images with {expected} channels, got shape {tuple(images.shape)}"
            )
        return self.ChannelReducer(images) if self.ChannelReducer is not None else images

    def prepare_tokens(self, images: jax.Array, slice_position: jax.Array | None) -> jax.Array:
        """Token sequence before the blocks (``images`` already through the reducer).

        With positions: ``[cls, registers, axis_pos, axis_max, patches]``; without: plain DINOv2 tokens.
        """
        if slice_position is None:
            return self.backbone.prepare_tokens(images)
        if slice_position.shape != (images.shape[0], 2):
            raise ValueError(
                f"slice_position must be [B, 2] = (slice index, number of slices), got {tuple(slice_position.shape)}"
            )
        tokens = self.backbone.embed_patches_with_positions(images)
        position = slice_position.astype(tokens.dtype)
        axis_pos = self.axis_pos(position[:, 0:1])[:, None]
        axis_max = self.axis_max(position[:, 1:2])[:, None]
        registers = self.backbone.registers(images.shape[0], tokens.dtype)
        return jnp.concatenate([tokens[:, :1], registers, axis_pos, axis_max, tokens[:, 1:]], axis=1)

    def forward_features(self, images: jax.Array, slice_position: jax.Array | None = None) -> BackboneFeatures:
        """Upstream ``forward_features_pos`` (or ``backbone.forward_features`` without positions).

        Unlike upstream's method this applies the TRUS ``ChannelReducer`` itself, so it takes the raw model input.
        ``extra_tokens`` holds the two normed slice-position tokens (empty without positions).
        """
        tokens = self.prepare_tokens(self.backbone_input(images), slice_position)
        num_extra = 0 if slice_position is None else NUM_SLICE_POSITION_TOKENS
        prenorm = self.backbone.run_blocks(tokens, self.remat, self.config.remat_policy)
        return self.backbone.split_normed(prenorm, num_extra)

    def feature_map(self, features: BackboneFeatures, images: jax.Array) -> jax.Array:
        """Patch tokens as the NHWC map [B, gy, gx, width] (upstream ``features`` in NCHW)."""
        grid_y, grid_x = self.config.backbone.patch_grid(images.shape[1], images.shape[2])
        batch, _, width = features.patch_tokens.shape
        return features.patch_tokens.reshape(batch, grid_y, grid_x, width)

    def __call__(
        self, images: jax.Array, slice_position: jax.Array | None = None, *, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Segmentation logits [B, 8 gy, 8 gx, num_classes]; with ``return_features`` also the [B, gy, gx, width]
        final-norm patch-token map (what the contrastive loss projects)."""
        feature_map = self.feature_map(self.forward_features(images, slice_position), images)
        logits = self.head(feature_map)
        return (logits, feature_map) if return_features else logits

    def project(self, vectors: jax.Array) -> jax.Array:
        """``CL_Head`` on patch vectors [..., width] -> [..., out_dim] (upstream ``forward(x, forward_head=True)``)."""
        if self.CL_Head is None:
            raise ValueError("this ProViCNet was built without a contrastive head (config.contrastive_head=None)")
        return self.CL_Head(vectors)


# --------------------------------------------------------------------------------------------------------------
# mpMRI fusion
# --------------------------------------------------------------------------------------------------------------


class ModalityStream(nnx.Module):
    """``ModalitySpecificStream.UpsampleModule``: 0 up x2, 1 conv 3x3, 2 BN, 3 ReLU."""

    def __init__(self, embedding: int, target_channels: int, *, rngs: nnx.Rngs):
        self.UpsampleModule = nnx.List(
            [Upsample2x(), conv3x3(embedding, target_channels, rngs), batch_norm(target_channels, rngs), ReLU()]
        )

    def __call__(self, feature_map: jax.Array, collect: bool = False) -> jax.Array | list[jax.Array]:
        return run_layers(self.UpsampleModule, feature_map, collect)


def tokens_to_square_map(tokens: jax.Array) -> jax.Array:
    """[N, side * side, C] row-major patch tokens -> NHWC [N, side, side, C] (upstream ``change_input_dim``)."""
    batch, count, channels = tokens.shape
    side = int(round(count**0.5))
    if side * side != count:
        raise ValueError(f"fusion expects a square patch grid, got {count} tokens per slice")
    return tokens.reshape(batch, side, side, channels)


class FusionModalities(nnx.Module):
    """mpMRI fusion: final-norm patch tokens of the frozen T2/ADC/DWI models -> 4-class logits.

    ``__call__(tokens_t2w, tokens_adc, tokens_dwi)``, each [N, gy * gx, embedding] -> logits [N, 8 gy, 8 gx,
    num_classes] (256 x 256 for 32 x 32 grids). Streams map each sequence to ``target_channels`` at 2x, the concat
    (T2W, ADC, DWI order) is decoded by ``FusionSegmentation`` (0 up, 1 conv, 2 BN, 3 ReLU, 4 up, 5 conv).

    Upstream inference replaces each stream's conv/BN by the sequence model's ``head.segmentation_conv[1]/[2]``
    (``load_partial_weights``), see :func:`overwrite_streams_with_sequence_heads`.
    """

    def __init__(self, config: FusionConfig, *, rngs: nnx.Rngs):
        self.config = config
        channels = config.target_channels
        self.Stream_T2W = ModalityStream(config.embedding, channels, rngs=rngs)
        self.Stream_ADC = ModalityStream(config.embedding, channels, rngs=rngs)
        self.Stream_DWI = ModalityStream(config.embedding, channels, rngs=rngs)
        self.FusionSegmentation = nnx.List(
            [
                Upsample2x(),
                conv3x3(3 * channels, channels, rngs),
                batch_norm(channels, rngs),
                ReLU(),
                Upsample2x(),
                conv3x3(channels, config.num_classes, rngs),
            ]
        )

    def stream(self, sequence: str) -> ModalityStream:
        if sequence not in FUSION_SEQUENCES:
            raise KeyError(f"unknown fusion sequence {sequence!r}; expected one of {FUSION_SEQUENCES}")
        return getattr(self, f"Stream_{sequence}")

    def fused_map(self, tokens_t2w: jax.Array, tokens_adc: jax.Array, tokens_dwi: jax.Array) -> jax.Array:
        """Concatenated stream outputs [N, 2 gy, 2 gx, 3 * target_channels]."""
        maps = [
            self.stream(name)(tokens_to_square_map(tokens))
            for name, tokens in zip(FUSION_SEQUENCES, (tokens_t2w, tokens_adc, tokens_dwi))
        ]
        return jnp.concatenate(maps, axis=-1)

    def __call__(self, tokens_t2w: jax.Array, tokens_adc: jax.Array, tokens_dwi: jax.Array) -> jax.Array:
        return run_layers(self.FusionSegmentation, self.fused_map(tokens_t2w, tokens_adc, tokens_dwi))


def overwrite_streams_with_sequence_heads(
    fusion: FusionModalities, sequence_models: Mapping[str, ProViCNet]
) -> None:
    """Reproduce upstream inference: copy each sequence model's first head conv + BN into its fusion stream.

    ``inference_mpMRI.py`` loads ``mpMRI_Fusion_best.pth`` and then calls
    ``load_partial_weights(MODELs[seq].head.segmentation_conv, Stream_X.UpsampleModule)``, which replaces the stream's
    ``1.{weight,bias}`` and ``2.{weight,bias,running_mean,running_var}`` by the sequence head's entries of the same
    names. The stored stream weights (trained further with lr x 0.25) are therefore never used at inference.
    ``sequence_models`` maps ``"T2W"``, ``"ADC"``, ``"DWI"`` to the matching slice models. In place.
    """
    missing = [name for name in FUSION_SEQUENCES if name not in sequence_models]
    if missing:
        raise KeyError(f"stream overwrite needs sequence models for {missing} (got {sorted(sequence_models)})")
    for name in FUSION_SEQUENCES:
        source = sequence_models[name].head.segmentation_conv
        target = fusion.stream(name).UpsampleModule
        for index in (1, 2):  # conv, BatchNorm
            src_state = nnx.state(source[index])
            dst_state = nnx.state(target[index])
            src_shapes = jax.tree.map(jnp.shape, src_state)
            dst_shapes = jax.tree.map(jnp.shape, dst_state)
            if src_shapes != dst_shapes:
                raise ValueError(
                    f"cannot copy {name} head.segmentation_conv[{index}] into Stream_{name}.UpsampleModule[{index}]: "
                    f"shapes {src_shapes} vs {dst_shapes}"
                )
            nnx.update(target[index], src_state)
