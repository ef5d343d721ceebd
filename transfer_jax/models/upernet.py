"""UPerNet decode head + FCN auxiliary head over a 4-level encoder (upstream `models/upernet_module.py`).

Attribute names mirror the PyTorch keys (`decode_head.psp_modules.{i}`, `lateral_convs`, `fpn_convs`,
`fpn_bottleneck`, `classifier`, `auxiliary_head.convs`, `hidden_norm.{i}`); the torch `ConvModule.batch_norm` is
a LayerNorm and is called `norm` here. Everything is channels-last.

Upstream quirks kept on purpose: the encoder's own final norm is not used (each stage gets its own `hidden_norm`);
for token-shaped hidden states (ViT encoders) `hidden_norm` normalises over the *token* axis with a per-channel
affine; the auxiliary head only runs in training mode.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from transfer_jax.models.layers import DenseConv, adaptive_avg_pool, gelu, layer_norm, resize_linear


@dataclasses.dataclass(frozen=True)
class UPerNetConfig:
    num_classes: int = 2
    hidden_size: int = 512
    auxiliary_channels: int = 256
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    use_auxiliary_head: bool = True
    auxiliary_in_index: int = 2
    dtype: str = "float32"
    conv_impl: str = "auto"  # see cpu_conv.dense_conv: a speed choice, identical results


class SegmentationOutput(NamedTuple):
    logits: jax.Array  # (N, D, H, W, K) at the input resolution
    aux_logits: Optional[jax.Array]  # same shape, training mode only


class HiddenNorm(nnx.Module):
    """LayerNorm over one axis with a per-channel affine (channels last).

    `axis=-1` is the usual channel LayerNorm of the conv encoder's stage maps; `axis=1` on (N, L, C) token arrays
    reproduces upstream's channels-first LayerNorm meeting ViT tokens, which normalises over tokens.
    """

    def __init__(self, channels: int, *, axis: int = -1, epsilon: float = 1e-6, dtype=jnp.float32):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.axis = axis
        self.epsilon = epsilon
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=self.axis, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=self.axis, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class ConvModule(nnx.Module):
    """Conv (no bias) -> channel LayerNorm (eps 1e-6) -> exact GELU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, dtype, rngs: nnx.Rngs, spatial_dims: int = 3,
                 conv_impl: str = "auto"):
        pad = kernel // 2
        self.conv = DenseConv(
            in_ch, out_ch, (kernel,) * spatial_dims, padding=((pad, pad),) * spatial_dims, use_bias=False,
            dtype=dtype, param_dtype=jnp.float32, rngs=rngs, implementation=conv_impl,
        )
        self.norm = layer_norm(out_ch, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return gelu(self.norm(self.conv(x)))


def _classifier(in_ch: int, out_ch: int, *, dtype, rngs: nnx.Rngs, spatial_dims: int = 3,
                conv_impl: str = "auto") -> DenseConv:
    return DenseConv(in_ch, out_ch, (1,) * spatial_dims, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                     implementation=conv_impl)


class UPerHead(nnx.Module):
    """PSP on the deepest level + FPN top-down fusion, then a 1x1 classifier at the finest level."""

    def __init__(self, in_channels: tuple[int, ...], config: UPerNetConfig, out_channels: int, *, rngs):
        dtype = jnp.dtype(config.dtype)
        hidden = config.hidden_size
        kw = dict(dtype=dtype, rngs=rngs, conv_impl=config.conv_impl)
        self.pool_scales = tuple(config.pool_scales)
        self.psp_modules = nnx.List([ConvModule(in_channels[-1], hidden, 1, **kw) for _ in self.pool_scales])
        self.bottleneck = ConvModule(in_channels[-1] + len(self.pool_scales) * hidden, hidden, 3, **kw)
        self.lateral_convs = nnx.List([ConvModule(c, hidden, 1, **kw) for c in in_channels[:-1]])
        self.fpn_convs = nnx.List([ConvModule(hidden, hidden, 3, **kw) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(in_channels) * hidden, hidden, 3, **kw)
        self.classifier = _classifier(hidden, out_channels, **kw)

    def features(self, hidden_states: tuple[jax.Array, ...]) -> jax.Array:
        """The fused finest-level feature map before the classifier (shared with dense regression heads)."""
        deepest = hidden_states[-1]
        spatial = deepest.shape[1:-1]
        pooled = [
            resize_linear(module(adaptive_avg_pool(deepest, (scale,) * len(spatial))), spatial)
            for scale, module in zip(self.pool_scales, self.psp_modules)
        ]
        laterals = [conv(h) for conv, h in zip(self.lateral_convs, hidden_states)]
        laterals.append(self.bottleneck(jnp.concatenate([deepest, *pooled], axis=-1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + resize_linear(laterals[i], laterals[i - 1].shape[1:-1])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        finest = outs[0].shape[1:-1]
        outs = [outs[0]] + [resize_linear(o, finest) for o in outs[1:]]
        return self.fpn_bottleneck(jnp.concatenate(outs, axis=-1))

    def __call__(self, hidden_states: tuple[jax.Array, ...]) -> jax.Array:
        return self.classifier(self.features(hidden_states))


class FCNHead(nnx.Module):
    def __init__(self, in_ch: int, config: UPerNetConfig, out_channels: int, *, rngs):
        dtype = jnp.dtype(config.dtype)
        self.in_index = config.auxiliary_in_index
        kw = dict(dtype=dtype, rngs=rngs, conv_impl=config.conv_impl)
        self.convs = nnx.List([ConvModule(in_ch, config.auxiliary_channels, 3, **kw)])
        self.classifier = _classifier(config.auxiliary_channels, out_channels, **kw)

    def __call__(self, hidden_states: tuple[jax.Array, ...]) -> jax.Array:
        x = hidden_states[self.in_index]
        for conv in self.convs:
            x = conv(x)
        return self.classifier(x)


class UPerNet(nnx.Module):
    """encoder -> per-level hidden_norm -> [adapter] -> UPerHead (+ FCN aux head in training).

    `encoder.hidden_states(x)` must return the four levels; channels-last maps, or (N, L, C) tokens when an
    `adapter` turns tokens into maps (ProFound-ViT).
    """

    def __init__(
        self,
        encoder: nnx.Module,
        config: UPerNetConfig,
        *,
        in_channels: tuple[int, ...],
        rngs: nnx.Rngs,
        adapter: Optional[nnx.Module] = None,
        token_hidden_states: bool = False,
        out_channels: Optional[int] = None,
    ):
        self.config = config
        self.encoder = encoder
        self.adapter = adapter
        dtype = jnp.dtype(config.dtype)
        axis = 1 if token_hidden_states else -1
        self.hidden_norm = nnx.List([HiddenNorm(c, axis=axis, dtype=dtype) for c in in_channels])
        out_channels = config.num_classes if out_channels is None else out_channels
        self.decode_head = UPerHead(tuple(in_channels), config, out_channels, rngs=rngs)
        self.auxiliary_head = (
            FCNHead(in_channels[config.auxiliary_in_index], config, out_channels, rngs=rngs)
            if config.use_auxiliary_head else None
        )
        self.deterministic = False

    def normed_hidden_states(self, x: jax.Array) -> tuple[jax.Array, ...]:
        hidden = [norm(h) for norm, h in zip(self.hidden_norm, self.encoder.hidden_states(x))]
        if self.adapter is not None:
            hidden = self.adapter(hidden)
        return tuple(hidden)

    def __call__(self, x: jax.Array) -> SegmentationOutput:
        hidden = self.normed_hidden_states(x)
        spatial = x.shape[1:-1]
        logits = resize_linear(self.decode_head(hidden), spatial)
        aux = None
        if self.auxiliary_head is not None and not self.deterministic:
            aux = resize_linear(self.auxiliary_head(hidden), spatial)
        return SegmentationOutput(logits=logits, aux_logits=aux)
