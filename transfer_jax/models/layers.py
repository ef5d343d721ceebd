"""Small building blocks shared by the ports, each matching its PyTorch counterpart numerically.

All spatial tensors are channels-last: (N, D, H, W, C) for volumes, (N, H, W, C) for slices. The convolution
modules hold the parameters; how their stride-1 convolutions are computed for the target platform is
`models/cpu_conv.py`'s business.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from transfer_jax.models.cpu_conv import check_implementation, dense_conv, depthwise_conv, upsample2x_conv3x3
from transfer_jax.models.cpu_conv import cotangent_barrier  # noqa: F401  (a layer whose form is the target's)
from transfer_jax.models.cpu_conv import nearest_upsample2x  # noqa: F401  (a layer; defined by its fused conv)


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's default `nn.GELU()`, x / 2 * (1 + erf(x / sqrt 2)), in the same erf form.

    `jax.nn.gelu` defaults to the tanh approximation (off by up to 5e-4), and its exact form goes through erfc,
    which XLA:CPU lowers to two selected branches with an exp: measured 2.4x slower forward and 1.5x slower
    forward + backward than erf on a ViT MLP's [2272, 512] activations (the two differ by < 1e-6).
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))  # Python floats keep x's dtype


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


class DepthwiseConv(nnx.Module):
    """Depthwise (groups = channels), stride 1, same-padded conv; params `kernel` (*k, 1, C) and `bias` (C,).

    `implementation`: "auto" or an explicit form of `cpu_conv.depthwise_conv` (a speed choice: identical results
    up to summation order).
    """

    def __init__(self, channels: int, kernel_size: tuple[int, ...], *, kernel_init, dtype, rngs: nnx.Rngs,
                 implementation: str = "auto"):
        self.implementation = check_implementation("depthwise", implementation)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (*kernel_size, 1, channels), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = depthwise_conv(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.implementation)
        return y + self.bias[...].astype(self.dtype)


# `backbone_options.remat_policy`: which intermediates of a rematerialised block the backward pass keeps instead of
# recomputing. Matmuls and convolutions are the costly recomputations; the no-batch-dims variant keeps the linear
# projections but not the attention matmuls, whose scores grow with the square of the sequence length.
# "everything_saveable" is left out: it stores what remat=False stores and still pays for the remat bookkeeping.
REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat_policy(name: str) -> str:
    """`name` back if it is one of `REMAT_POLICIES`; called when a model config is built, so that a typo fails
    there and not inside the traced training step."""
    if not isinstance(name, str) or name not in REMAT_POLICIES:
        raise ValueError(f"backbone_options.remat_policy={name!r} is not a known remat policy; "
                         f"use one of {', '.join(REMAT_POLICIES)}")
    return name


def _call_block(block: nnx.Module, x: jax.Array) -> jax.Array:
    return block(x)


def remat_variants(fn):
    """`fn` under `nnx.remat` once per `REMAT_POLICIES` name: nnx.remat fixes its policy when it is built."""
    return {name: nnx.remat(fn, policy=policy) for name, policy in REMAT_POLICIES.items()}


_REMATERIALISED_CALLS = remat_variants(_call_block)


def rematerialised(block: nnx.Module, x: jax.Array, policy: str = "nothing_saveable") -> jax.Array:
    """`block(x)` with its activations recomputed in the backward pass (`nnx.remat`), except the intermediates
    that `policy` (a `REMAT_POLICIES` name) saves: memory for FLOPs."""
    return _REMATERIALISED_CALLS[check_remat_policy(policy)](block, x)


class DenseConv(nnx.Module):
    """Drop-in for a stride-1 `nnx.Conv`: same parameters (`kernel` (*k, Cin, Cout), optional `bias` (Cout,)),
    same initialisation and rng use, same dtype behaviour (inputs, kernel and bias cast to `dtype`, fp32 params),
    computed by `cpu_conv.dense_conv` with `implementation` ("auto" or an explicit form): identical results up
    to summation order.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], *, padding="SAME",
                 use_bias: bool = True, dtype=None, param_dtype=jnp.float32, precision=None,
                 kernel_init: nnx.Initializer = nnx.initializers.lecun_normal(),
                 bias_init: nnx.Initializer = nnx.initializers.zeros_init(), implementation: str = "auto",
                 rngs: nnx.Rngs):
        self.implementation = check_implementation("dense", implementation)
        kernel_size = tuple(int(k) for k in kernel_size)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (*kernel_size, in_features, out_features), param_dtype))
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
        else:
            self.bias = nnx.data(None)
        self.padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        self.dtype = dtype
        self.precision = precision

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._apply(x, functools.partial(dense_conv, padding=self.padding))

    @property
    def fuses_upsample2x(self) -> bool:
        """Whether `after_upsample2x` applies: a 3x3 kernel with padding 1."""
        return self.kernel.shape[:-2] == (3, 3) and self.padding == ((1, 1), (1, 1))

    def after_upsample2x(self, x: jax.Array) -> jax.Array:
        """This conv applied to the nearest x2 up-sampled `x` (`upsample2x_conv3x3`): 3x3 kernels, padding 1."""
        if not self.fuses_upsample2x:
            raise ValueError(f"after_upsample2x needs a 3x3 kernel with padding 1, this conv has kernel "
                             f"{self.kernel.shape} and padding {self.padding}")
        return self._apply(x, upsample2x_conv3x3)

    def _apply(self, x: jax.Array, conv) -> jax.Array:
        kernel = self.kernel[...]
        bias = None if self.bias is None else self.bias[...]
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, kernel)
        y = conv(x.astype(dtype), kernel.astype(dtype), implementation=self.implementation, precision=self.precision)
        if bias is not None:
            y = y + bias.astype(dtype)
        return y


def patch_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Convolution with stride = kernel and no padding (patch embeddings, ConvNeXt stem and downsamples) as one
    matmul over non-overlapping patches: (N, *S, Cin) x (*k, Cin, Cout) -> (N, *(S // k), Cout).

    Trailing voxels that do not fill a patch are dropped, as a VALID strided conv drops them. XLA:CPU runs the
    strided conv and its kernel gradient 3-8x slower than this matmul; on accelerators both are one matmul.
    """
    patch = kernel.shape[:-2]
    dims = len(patch)
    grid = [size // k for size, k in zip(x.shape[1:1 + dims], patch)]
    x = x[(slice(None), *[slice(0, g * k) for g, k in zip(grid, patch)])]
    # The last patch axis stays merged with the channels (one contiguous run in both layouts), and the barrier
    # keeps XLA from fusing the flattening reshape into the transpose: fused, XLA:CPU computes a 6-D source index
    # per element (ProViCNet's [32, 112, 112, 3] -> [2048, 588] patches: 5.1 ms, against 0.4 ms unfused).
    split = [x.shape[0]] + [n for g, k in zip(grid, patch) for n in (g, k)][:-1] + [patch[-1] * x.shape[-1]]
    order = [0, *range(1, 2 * dims, 2), *range(2, 2 * dims + 1, 2)]
    patches = jax.lax.optimization_barrier(x.reshape(split).transpose(order)).reshape(x.shape[0], *grid, -1)
    return patches @ kernel.reshape(-1, kernel.shape[-1])


class PatchConv(nnx.Module):
    """Drop-in for `nnx.Conv(..., kernel_size=k, strides=k, padding="VALID")`: same parameters (`kernel` (*k, Cin,
    Cout), `bias` (Cout,)), initialisation and dtype behaviour, computed by `patch_conv`."""

    def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], *,
                 kernel_init: nnx.Initializer = nnx.initializers.lecun_normal(),
                 bias_init: nnx.Initializer = nnx.initializers.zeros_init(), dtype=None,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        kernel_size = tuple(int(k) for k in kernel_size)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (*kernel_size, in_features, out_features), param_dtype))
        self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.kernel[...], self.bias[...]
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, kernel)
        return patch_conv(x.astype(dtype), kernel.astype(dtype)) + bias.astype(dtype)


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


def layer_norm(num_features: int, *, rngs: nnx.Rngs, dtype=None, epsilon: float = 1e-6) -> nnx.LayerNorm:
    """LayerNorm over the last (channel) axis as PyTorch computes it: two-pass variance (the E[x^2] - E[x]^2 form
    loses digits on a large residual stream), fp32 parameters, the port's epsilon made explicit."""
    return nnx.LayerNorm(num_features, epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


def trunc_normal(std: float = 0.02) -> nnx.Initializer:
    """timm's trunc_normal_(std) truncates at +-2 absolute, i.e. at +-100 std for std=0.02: effectively a normal."""
    return nnx.initializers.truncated_normal(stddev=std, lower=-2.0 / std, upper=2.0 / std)
