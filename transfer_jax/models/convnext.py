"""ProFound-Conv: the dense 3-D ConvNeXt-V2 encoder (upstream `models/convnextv2.py::ConvNeXtV2`).

Attribute names mirror the PyTorch state_dict (`downsample_layers.{s}.{i}`, `stages.{s}.{b}.dwconv`, ...), so the
checkpoint converter is a key table. Input is channels-last (N, D, H, W, C); channel order T2, DWI, ADC.

The ProFound variant replaces the last 2x2x2 downsample by a 1x1x1 stride-1 conv (total stride 16), which is
`last_downsample=(1, 1, 1)`.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from transfer_jax.models.layers import (DepthwiseConv, DropPath, PatchConv, check_remat_policy, gelu, layer_norm,
                                         rematerialised, trunc_normal)


@dataclasses.dataclass(frozen=True)
class ConvNeXtConfig:
    in_channels: int = 3
    depths: tuple[int, ...] = (3, 3, 9, 3)
    dims: tuple[int, ...] = (96, 192, 384, 768)
    drop_path_rate: float = 0.0
    stem_kernel: tuple[int, int, int] = (4, 4, 4)
    downsample_kernel: tuple[int, int, int] = (2, 2, 2)
    last_downsample: tuple[int, int, int] = (1, 1, 1)
    dtype: str = "float32"
    depthwise_impl: str = "auto"  # see cpu_conv.depthwise_conv: a speed choice, identical results
    remat: bool = False  # recompute each block's activations in the backward pass (nnx.remat): memory for FLOPs
    remat_policy: str = "nothing_saveable"  # with remat: what a block still saves (layers.REMAT_POLICIES)

    def __post_init__(self):
        check_remat_policy(self.remat_policy)
        if len(self.depths) != len(self.dims):
            raise ValueError(f"ConvNeXtConfig: depths {self.depths} and dims {self.dims} must have the same length")

    @property
    def total_stride(self) -> tuple[int, int, int]:
        stride = list(self.stem_kernel)
        for stage in range(1, len(self.dims)):
            kernel = self.last_downsample if stage == len(self.dims) - 1 else self.downsample_kernel
            stride = [s * k for s, k in zip(stride, kernel)]
        return tuple(stride)


class EncoderOutput(NamedTuple):
    pooled: jax.Array  # (N, C_last): LayerNorm of the global spatial mean
    stages: tuple[jax.Array, ...]  # raw (un-normalised) stage outputs, channels-last


def _patch_conv(in_ch: int, out_ch: int, kernel, *, dtype, rngs):
    """The stem and downsample convs: stride = kernel, no padding."""
    return PatchConv(in_ch, out_ch, tuple(kernel), kernel_init=trunc_normal(0.02),
                     bias_init=nnx.initializers.zeros_init(), dtype=dtype, rngs=rngs)


def _linear(in_f: int, out_f: int, *, dtype, rngs):
    return nnx.Linear(
        in_f, out_f, kernel_init=trunc_normal(0.02), bias_init=nnx.initializers.zeros_init(), dtype=dtype,
        param_dtype=jnp.float32, rngs=rngs,
    )


class GRN(nnx.Module):
    """Global response normalisation: per-sample, per-channel L2 norm over all spatial axes, divided by its
    channel mean; gamma and beta start at zero so a fresh block is the identity on this path."""

    def __init__(self, channels: int, *, dtype):
        self.gamma = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        spatial = tuple(range(1, x.ndim - 1))
        # The norm is accumulated in fp32 even under bf16 compute: it sums over every voxel of the volume.
        x32 = x.astype(jnp.float32)
        gx = jnp.sqrt(jnp.sum(jnp.square(x32), axis=spatial, keepdims=True))
        nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + 1e-6)
        out = self.gamma[...] * (x32 * nx) + self.beta[...] + x32
        return out.astype(self.dtype)


class Block(nnx.Module):
    """ConvNeXt-V2 block: depthwise 7^3 conv -> LN -> Linear 4C -> GELU -> GRN -> Linear C, plus residual."""

    def __init__(self, dim: int, drop_path: float, *, dtype, rngs: nnx.Rngs, depthwise_impl: str = "auto"):
        self.dwconv = DepthwiseConv(dim, (7, 7, 7), kernel_init=trunc_normal(0.02), dtype=dtype, rngs=rngs,
                                    implementation=depthwise_impl)
        self.norm = layer_norm(dim, dtype=dtype, rngs=rngs)
        self.pwconv1 = _linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
        self.grn = GRN(4 * dim, dtype=dtype)
        self.pwconv2 = _linear(4 * dim, dim, dtype=dtype, rngs=rngs)
        self.drop_path = DropPath(drop_path, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.dwconv(x)
        y = self.norm(y)
        y = gelu(self.pwconv1(y))
        y = self.grn(y)
        y = self.pwconv2(y)
        return x + self.drop_path(y)


class ConvNeXtV2(nnx.Module):
    def __init__(self, config: ConvNeXtConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.remat = config.remat  # a plain attribute: the evaluation graph turns it off (train/state.py)
        dtype = jnp.dtype(config.dtype)
        dims = config.dims
        stem = nnx.List([
            _patch_conv(config.in_channels, dims[0], config.stem_kernel, dtype=dtype, rngs=rngs),
            layer_norm(dims[0], dtype=dtype, rngs=rngs),
        ])
        layers = [stem]
        for stage in range(1, len(dims)):
            kernel = config.last_downsample if stage == len(dims) - 1 else config.downsample_kernel
            layers.append(nnx.List([
                layer_norm(dims[stage - 1], dtype=dtype, rngs=rngs),
                _patch_conv(dims[stage - 1], dims[stage], kernel, dtype=dtype, rngs=rngs),
            ]))
        self.downsample_layers = nnx.List(layers)

        total_blocks = sum(config.depths)
        rates = [config.drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
        stages, cursor = [], 0
        for stage, depth in enumerate(config.depths):
            stages.append(nnx.List([
                Block(dims[stage], rates[cursor + b], dtype=dtype, rngs=rngs,
                      depthwise_impl=config.depthwise_impl) for b in range(depth)
            ]))
            cursor += depth
        self.stages = nnx.List(stages)
        self.norm = layer_norm(dims[-1], dtype=dtype, rngs=rngs)

    @property
    def feature_channels(self) -> tuple[int, ...]:
        return tuple(self.config.dims)

    def __call__(self, x: jax.Array) -> EncoderOutput:
        """x: (N, D, H, W, C_in), D/H/W multiples of the total stride. Returns pooled feature + raw stages."""
        stride = self.config.total_stride
        bad = [size for size, s in zip(x.shape[1:4], stride) if size % s]
        if x.ndim != 5 or bad or x.shape[-1] != self.config.in_channels:
            raise ValueError(
                f"ConvNeXtV2 expects (N, D, H, W, {self.config.in_channels}) with D, H, W multiples of {stride}; "
                f"got {x.shape}"
            )
        stage_outputs = []
        for downsample, blocks in zip(self.downsample_layers, self.stages):
            for layer in downsample:
                x = layer(x)
            for block in blocks:
                x = rematerialised(block, x, self.config.remat_policy) if self.remat else block(x)
            stage_outputs.append(x)
        pooled = self.norm(jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3)).astype(x.dtype))
        return EncoderOutput(pooled=pooled, stages=tuple(stage_outputs))

    def hidden_states(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """The four stage maps that dense heads (UPerNet) consume."""
        return self(x).stages


def layer_id(path: tuple, depths: tuple[int, ...], scheme: str = "group") -> int:
    """Upstream's layer index for layer-wise lr decay (`util/convnext_optim.py`), on an encoder param path.

    "group" (upstream default) bins blocks in threes as written for a 27-block stage 2; "single" gives every
    block its own index. Parameters outside the encoder stages (final norm) get the top encoder index.
    """
    head, *rest = [str(p) for p in path]
    if scheme == "single":
        if head == "downsample_layers":
            return sum(depths[: int(rest[0])]) + 1
        if head == "stages":
            return sum(depths[: int(rest[0])]) + int(rest[1]) + 1
        return sum(depths) + 1
    if scheme != "group":
        raise ValueError(f"layer decay scheme must be 'group' or 'single', got {scheme!r}")
    if head == "downsample_layers":
        stage = int(rest[0])
        return {0: 0, 1: 2, 2: 3}.get(stage, 12)
    if head == "stages":
        stage, block = int(rest[0]), int(rest[1])
        return {0: 1, 1: 2}.get(stage, 3 + block // 3 if stage == 2 else 12)
    return 13
