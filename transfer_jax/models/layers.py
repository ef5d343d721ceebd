"""Small building blocks shared by the ports, each matching its PyTorch counterpart numerically.

All spatial tensors are channels-last: (N, D, H, W, C) for volumes, (N, H, W, C) for slices.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's default GELU is the exact erf form; JAX defaults to the tanh approximation (off by up to 5e-4)."""
    return jax.nn.gelu(x, approximate=False)


def resize_linear(x: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
    """(Tri)linear resize of the spatial axes, equal to torch `interpolate(mode='*linear', align_corners=False)`.

    antialias must stay off: with it a 6 -> 4 down-sample differs from torch by ~0.5.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    if tuple(x.shape[1:-1]) == spatial_shape:
        return x
    target = (x.shape[0], *spatial_shape, x.shape[-1])
    return jax.image.resize(x, target, method="linear", antialias=False).astype(x.dtype)


def _adaptive_bins(size_in: int, size_out: int) -> list[tuple[int, int]]:
    # torch's AdaptiveAvgPool bin i covers [floor(i*n/o), ceil((i+1)*n/o)); bins overlap when o does not divide n.
    return [
        (math.floor(i * size_in / size_out), math.ceil((i + 1) * size_in / size_out)) for i in range(size_out)
    ]


def adaptive_avg_pool(x: jax.Array, output_size: Sequence[int]) -> jax.Array:
    """torch AdaptiveAvgPool{2,3}d over the spatial axes of a channels-last array (static bins)."""
    out = x
    for axis, size_out in enumerate(output_size, start=1):
        bins = _adaptive_bins(out.shape[axis], int(size_out))
        pieces = [
            jnp.mean(jax.lax.slice_in_dim(out, start, stop, axis=axis), axis=axis, keepdims=True)
            for start, stop in bins
        ]
        out = jnp.concatenate(pieces, axis=axis)
    return out


def _depthwise_shift_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Same-padded depthwise conv as a scan over kernel offsets: out += shift(x, offset) * w[offset].

    XLA:CPU lowers grouped 3-D convolutions to a generic loop that is ~7x slower (fwd+bwd) than this; the scan
    keeps compile time flat (one body) and memory at a few activation-sized buffers.
    """
    spatial = kernel.shape[:-2]
    pads = [(k // 2, k - 1 - k // 2) for k in spatial]
    padded = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    offsets = jnp.stack(jnp.meshgrid(*[jnp.arange(k) for k in spatial], indexing="ij"), -1).reshape(-1, len(spatial))
    weights = kernel.reshape(-1, kernel.shape[-1]).astype(x.dtype)

    def accumulate(out, offset_and_weight):
        offset, weight = offset_and_weight
        start = (0, *[offset[i] for i in range(len(spatial))], 0)
        return out + jax.lax.dynamic_slice(padded, start, x.shape) * weight, None

    out, _ = jax.lax.scan(accumulate, jnp.zeros_like(x), (offsets, weights))
    return out


class DepthwiseConv(nnx.Module):
    """Depthwise (groups = channels), stride 1, same-padded conv; params `kernel` (*k, 1, C) and `bias` (C,).

    `implementation`: "conv" (lax grouped convolution), "shift_sum" (see `_depthwise_shift_sum`) or "auto",
    which picks shift_sum on CPU and the grouped convolution on GPU/TPU, where it is fast.
    """

    def __init__(self, channels: int, kernel_size: tuple[int, ...], *, kernel_init, dtype, rngs: nnx.Rngs,
                 implementation: str = "auto"):
        if implementation not in ("auto", "conv", "shift_sum"):
            raise ValueError(f"depthwise implementation must be auto|conv|shift_sum, got {implementation!r}")
        self.kernel = nnx.Param(kernel_init(rngs.params(), (*kernel_size, 1, channels), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.implementation = implementation
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        implementation = self.implementation
        if implementation == "auto":
            implementation = "shift_sum" if jax.default_backend() == "cpu" else "conv"
        if implementation == "shift_sum":
            y = _depthwise_shift_sum(x, kernel)
        else:
            spatial = kernel.shape[:-2]
            letters = "DHW"[3 - len(spatial):]  # 2-D or 3-D
            y = jax.lax.conv_general_dilated(
                x, kernel, (1,) * len(spatial), [(k // 2, k - 1 - k // 2) for k in spatial],
                dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
                feature_group_count=x.shape[-1],
            )
        return y + self.bias[...].astype(self.dtype)


class DropPath(nnx.Module):
    """Stochastic depth on the residual branch, per sample (timm semantics: survivors are scaled by 1/keep)."""

    def __init__(self, rate: float, *, rngs: nnx.Rngs | None = None):
        self.rate = float(rate)
        self.deterministic = False
        # An own Rngs per layer (not a shared reference) keeps the module a tree, as NNX tree mode requires.
        self.rngs = nnx.Rngs(dropout=rngs.dropout()) if (rngs is not None and self.rate > 0.0) else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.rate == 0.0 or self.deterministic:
            return x
        keep = 1.0 - self.rate
        mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.rngs.dropout(), keep, mask_shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def layer_norm(num_features: int, *, dtype, rngs: nnx.Rngs, epsilon: float = 1e-6) -> nnx.LayerNorm:
    """LayerNorm over the last (channel) axis with the PyTorch-port epsilon made explicit."""
    return nnx.LayerNorm(num_features, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


def trunc_normal(std: float = 0.02) -> nnx.Initializer:
    """timm's trunc_normal_(std) truncates at +-2 absolute, i.e. at +-100 std for std=0.02: effectively a normal."""
    return nnx.initializers.truncated_normal(stddev=std, lower=-2.0 / std, upper=2.0 / std)


def torch_default_kernel_init() -> nnx.Initializer:
    """PyTorch's default Conv/Linear init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
