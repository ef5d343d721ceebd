"""ViT -> UPerNet adapter (upstream `models/upernet_module.py::ViTAdapter`, used by the sibling `build_segment.py`).

It turns four token levels (N, T, C) of the ViT (already normed by the UPerNet `hidden_norm`) into a 4-level
feature pyramid, channels-last. With ProFound's patch (16, 32, 32) the token grid has stride (16, 32, 32); the
branches bring it to isotropic strides 4, 8, 16 and 32:

* `fpn1`: ConvT(1,2,2) -> BN -> GELU -> ConvT(2,2,2) -> BN -> GELU -> ConvT(2,2,2)   (x (4, 8, 8))
* `fpn2`: ConvT(1,2,2) -> BN -> GELU -> ConvT(2,2,2)                                  (x (2, 4, 4))
* `fpn3`: ConvT(1,2,2)                                                                (x (1, 2, 2))
* `fpn4`: MaxPool(2,1,1), no parameters                                               (/ (2, 1, 1))

Each branch is an `nnx.List` whose indices equal the torch `Sequential` indices (the GELUs are parameter-free
entries), so `adapter.fpn1.3.kernel` is torch `adapter.fpn1.3.weight`. BatchNorm3d keeps running statistics
(`TorchBatchNorm`, eps 1e-5, torch momentum 0.1). Upstream only builds these layers for patch (16, 32, 32); here
the same layers are built for any patch (tests use a tiny one).

Transposed convs with stride == kernel do not overlap, so each is one einsum:
out[n, kd*d + a, kh*h + b, kw*w + c, o] = sum_i x[n, d, h, w, i] * K[a, b, c, i, o] + bias[o], which sidesteps
flax's kernel-flip conventions. K is stored (kd, kh, kw, C_in, C_out) (torch (C_in, C_out, kd, kh, kw)).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from transfer_jax.models.classifier import Activation, TorchBatchNorm
from transfer_jax.models.layers import gelu

__all__ = ["PatchConvTranspose", "Branch", "ViTAdapter"]


class PatchConvTranspose(nnx.Module):
    """ConvTranspose3d with stride == kernel size, as an einsum (see module docstring)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int], *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kernel = tuple(int(k) for k in kernel)
        # PyTorch's default init for ConvTranspose3d: fan_in is computed from weight.size(1) = C_out per group.
        bound = 1.0 / math.sqrt(out_channels * math.prod(kernel))
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (*kernel, in_channels, out_channels),
                                                   jnp.float32, -bound, bound))
        self.bias = nnx.Param(jax.random.uniform(rngs.params(), (out_channels,), jnp.float32, -bound, bound))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n, d, h, w, _ = x.shape
        kd, kh, kw, _, out = self.kernel.shape
        y = jnp.einsum("ndhwi,abcio->ndahbwco", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        y = y.reshape(n, d * kd, h * kh, w * kw, out)
        return y + self.bias[...].astype(self.dtype)


class Branch(nnx.List):
    """Layers applied in order; list indices mirror the torch `Sequential`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self:
            x = layer(x)
        return x


class ViTAdapter(nnx.Module):
    def __init__(self, width: int, grid_size: Sequence[int], *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.grid_size = tuple(int(g) for g in grid_size)
        self.width = width

        def up(kernel):
            return PatchConvTranspose(width, width, kernel, dtype=dtype, rngs=rngs)

        def bn():
            return TorchBatchNorm(width, dtype=dtype)

        self.fpn1 = Branch([up((1, 2, 2)), bn(), Activation(gelu), up((2, 2, 2)), bn(), Activation(gelu),
                            up((2, 2, 2))])
        self.fpn2 = Branch([up((1, 2, 2)), bn(), Activation(gelu), up((2, 2, 2))])
        self.fpn3 = Branch([up((1, 2, 2))])

    @staticmethod
    def fpn4(x: jax.Array) -> jax.Array:
        """MaxPool3d kernel = stride = (2, 1, 1): max over depth pairs (an odd last slice is dropped, as torch)."""
        n, d, h, w, c = x.shape
        x = x[:, : 2 * (d // 2)]
        return jnp.max(x.reshape(n, d // 2, 2, h, w, c), axis=2)

    def __call__(self, hidden_states: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        """Four (N, T, C) token arrays -> four channels-last maps at strides 4, 8, 16, 32 (for patch 16x32x32)."""
        branches = (self.fpn1, self.fpn2, self.fpn3, self.fpn4)
        if len(hidden_states) != len(branches):
            raise ValueError(f"ViTAdapter takes {len(branches)} token levels, got {len(hidden_states)}")
        outputs = []
        for tokens, branch in zip(hidden_states, branches):
            n, length, width = tokens.shape
            if length != math.prod(self.grid_size) or width != self.width:
                raise ValueError(f"ViTAdapter expects (N, {math.prod(self.grid_size)}, {self.width}) tokens for grid "
                                 f"{self.grid_size}; got {tokens.shape}")
            outputs.append(branch(tokens.reshape(n, *self.grid_size, width)))
        return tuple(outputs)
