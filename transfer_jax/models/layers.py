"""Small building blocks shared by the ports, each matching its PyTorch counterpart numerically.

All spatial tensors are channels-last: (N, D, H, W, C) for volumes, (N, H, W, C) for slices.
"""
from __future__ import annotations

import contextlib
import functools
import math
import threading
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


_FORMS = threading.local()


def cpu_forms() -> bool:
    """Whether the "auto" implementations pick their XLA:CPU rewrites (on the CPU backend, outside
    `reference_forms`); elsewhere they run the plain lax convolution every accelerator is fast at."""
    return jax.default_backend() == "cpu" and not getattr(_FORMS, "reference", False)


@contextlib.contextmanager
def reference_forms() -> Iterator[None]:
    """Trace the "auto" implementations as their plain lax convolutions on any backend: the model's own FLOPs
    (`train/flops.py`), not those of a CPU rewrite (the Toeplitz depthwise conv does (W + 6) / 7 x the MACs)."""
    previous = getattr(_FORMS, "reference", False)
    _FORMS.reference = True
    try:
        yield
    finally:
        _FORMS.reference = previous


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


# The Toeplitz form costs (W + kw - 1) / kw times the shift-sum's FLOPs, as matmuls. Measured fwd+bwd on 2 cores
# against the shift-sum: W=8 5x, W=16 4x, W=32 4x, W=56 (ConvNeXt-T's first stage) 3.4x faster, W=4 even; wider
# maps were not measured.
_TOEPLITZ_MIN_WIDTH = 8
_TOEPLITZ_MAX_WIDTH = 64


def _depthwise_toeplitz(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Same-padded 3-D depthwise conv as one batched matmul per channel (channels are the batch dimension).

    Along W each channel's taps form a banded (Toeplitz) (W + kw - 1, W) matrix; stacking the kh row taps into the
    contraction and the kd depth taps into the output columns makes the whole conv one
    (N*D'*H, kh*(W+kw-1)) @ (kh*(W+kw-1), kd*W) matmul per channel (D' = padded depth), after which the kd
    depth-shifted column blocks are summed. The shift-sum makes kd*kh*kw passes over the activations (and as many
    reductions for the kernel gradient); here the backward is two matmuls as well. Memory: about kd*D'/D times
    the output for the matmul result, kh*(W+kw-1)/W times the input for the stacked rows.
    """
    kd, kh, kw = kernel.shape[:3]
    n, d, h, w, c = x.shape
    pads = [(k // 2, k - 1 - k // 2) for k in (kd, kh, kw)]
    padded = jnp.pad(jnp.moveaxis(x, -1, 0), ((0, 0), (0, 0), *pads))  # (C, N, D', H', W')
    dp, wp = padded.shape[2], w + kw - 1
    band = (np.arange(wp)[None, :, None] - np.arange(w)[None, None, :] == np.arange(kw)[:, None, None])
    toeplitz = jnp.einsum("abjc,jvw->cbvaw", kernel[:, :, :, 0, :], band.astype(kernel.dtype))
    toeplitz = toeplitz.reshape(c, kh * wp, kd * w)
    rows = jnp.stack([jax.lax.slice_in_dim(padded, b, b + h, axis=3) for b in range(kh)], axis=4)  # C,N,D',H,kh,W'
    y = jax.lax.dot_general(rows.reshape(c, n * dp * h, kh * wp), toeplitz, (((2,), (1,)), ((0,), (0,))))
    y = y.reshape(c, n, dp, h, kd, w)
    out = None
    for a in range(kd):
        tap = jax.lax.slice_in_dim(y[:, :, :, :, a], a, a + d, axis=2)
        out = tap if out is None else out + tap
    return jnp.moveaxis(out, 0, -1)


# Maps of at most this many voxels use the dense per-channel matrix (`_depthwise_matrix`): V^2 multiply-adds per
# voxel and channel instead of the kernel volume, in two einsums instead of a kernel-volume-long scan.
_MATRIX_MAX_VOXELS = 128


def _axis_taps(size: int, kernel: int) -> np.ndarray:
    """[out, in, tap] one-hot: input position `in` feeds output `out` through tap `tap` (same padding)."""
    low = kernel // 2
    out, inp, tap = np.meshgrid(np.arange(size), np.arange(size), np.arange(kernel), indexing="ij")
    return (inp - out + low == tap).astype(np.float32)


def _depthwise_matrix(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Same-padded depthwise conv of a small map as one (V x V) matrix per channel, V = the map's voxel count.

    The matrix is assembled from the kernel with per-axis tap one-hots (taps that fall outside the map, i.e. onto
    the zero padding, have no entry), then applied as a batched matmul; both steps are plain einsums, forward and
    backward.
    """
    spatial, channels = x.shape[1:-1], x.shape[-1]
    letters_out, letters_in, letters_tap = "ijk"[:len(spatial)], "def"[:len(spatial)], "abc"[:len(spatial)]
    taps = [jnp.asarray(_axis_taps(s, k), x.dtype) for s, k in zip(spatial, kernel.shape[:-2])]
    spec = (f"{letters_tap}q," + ",".join(f"{o}{i}{t}" for o, i, t in zip(letters_out, letters_in, letters_tap))
            + f"->{letters_out}{letters_in}q")
    voxels = math.prod(spatial)
    matrix = jnp.einsum(spec, kernel[..., 0, :], *taps).reshape(voxels, voxels, channels)
    y = jnp.einsum("nvc,uvc->nuc", x.reshape(x.shape[0], voxels, channels), matrix)
    return y.reshape(x.shape)


class DepthwiseConv(nnx.Module):
    """Depthwise (groups = channels), stride 1, same-padded conv; params `kernel` (*k, 1, C) and `bias` (C,).

    `implementation`: "conv" (lax grouped convolution), "shift_sum" (see `_depthwise_shift_sum`), "toeplitz"
    (3-D only, see `_depthwise_toeplitz`), "matrix" (see `_depthwise_matrix`) or "auto": on CPU the matrix for
    maps of at most 128 voxels, toeplitz for 3-D maps 8-64 wide and shift_sum otherwise; the grouped convolution
    on GPU/TPU, where it is fast.
    """

    def __init__(self, channels: int, kernel_size: tuple[int, ...], *, kernel_init, dtype, rngs: nnx.Rngs,
                 implementation: str = "auto"):
        if implementation not in ("auto", "conv", "shift_sum", "toeplitz", "matrix"):
            raise ValueError(
                f"depthwise implementation must be auto|conv|shift_sum|toeplitz|matrix, got {implementation!r}")
        self.kernel = nnx.Param(kernel_init(rngs.params(), (*kernel_size, 1, channels), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.implementation = implementation
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        implementation = self.implementation
        if implementation == "auto":
            if not cpu_forms():
                implementation = "conv"
            elif math.prod(x.shape[1:-1]) <= _MATRIX_MAX_VOXELS:
                implementation = "matrix"
            elif x.ndim == 5 and _TOEPLITZ_MIN_WIDTH <= x.shape[-2] <= _TOEPLITZ_MAX_WIDTH:
                implementation = "toeplitz"
            else:
                implementation = "shift_sum"
        if implementation == "toeplitz" and x.ndim != 5:
            raise ValueError(f"the toeplitz depthwise conv is 3-D only, got input shape {x.shape}")
        if implementation == "shift_sum":
            y = _depthwise_shift_sum(x, kernel)
        elif implementation == "toeplitz":
            y = _depthwise_toeplitz(x, kernel)
        elif implementation == "matrix":
            y = _depthwise_matrix(x, kernel)
        else:
            spatial = kernel.shape[:-2]
            letters = "DHW"[3 - len(spatial):]  # 2-D or 3-D
            y = jax.lax.conv_general_dilated(
                x, kernel, (1,) * len(spatial), [(k // 2, k - 1 - k // 2) for k in spatial],
                dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
                feature_group_count=x.shape[-1],
            )
        return y + self.bias[...].astype(self.dtype)


@jax.custom_vjp
def cotangent_barrier(x: jax.Array) -> jax.Array:
    """Identity whose cotangent is materialised (`lax.optimization_barrier`) on the way back.

    On a pre-norm transformer's residual stream: without it XLA:CPU fuses the LayerNorm backward of every later
    block into each block's transposed weight-gradient operand and recomputes that chain per block (ProViCNet's
    default step: 49 ms of such fusions; with the barrier at each residual add the step is 9 % faster).
    """
    return x


cotangent_barrier.defvjp(lambda x: (x, None), lambda _, grad: (jax.lax.optimization_barrier(grad),))


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


def _same_padding(kernel_size: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple(((k - 1) // 2, k // 2) for k in kernel_size)


# Below this many output positions per slice XLA:CPU's 2-D convolution is slower than one big im2col matmul
# (measured: 2x7x7 and 2x2x2 maps 3-6x, 4x4 about even, 8x8 and larger the 2-D conv wins).
_IM2COL_MAX_PLANE = 64


def _matmul_1x1(x: jax.Array, kernel: jax.Array, precision) -> jax.Array:
    # Flattened to 2-D: measured 1.5-3x faster fwd+bwd on XLA:CPU than the rank-5 dot (and than a 1x1 conv).
    y = jnp.dot(x.reshape(-1, x.shape[-1]), kernel.reshape(kernel.shape[-2], kernel.shape[-1]), precision=precision)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


def _im2col(x: jax.Array, kernel: jax.Array, padding, precision) -> jax.Array:
    spatial = kernel.shape[:-2]
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    out_shape = [p - k + 1 for p, k in zip(padded.shape[1:-1], spatial)]
    columns = []
    for offset in np.ndindex(*spatial):
        start = (0, *offset, 0)
        columns.append(jax.lax.slice(padded, start, (x.shape[0], *[o + s for o, s in zip(offset, out_shape)],
                                                      x.shape[-1])))
    # Offset-major, channel-minor: the row order of kernel.reshape(-1, O).
    return _matmul_1x1(jnp.concatenate(columns, axis=-1), kernel.reshape(1, -1, kernel.shape[-1]), precision)


# From this many output positions (N * H * W of the 2-D conv) and input channels the kernel gradient runs as one
# matmul (`_conv2d_kernel_grad`). Measured fwd+bwd on 2 cores: 2x faster with 96-384 input channels (the whole
# ProFound-ViT default step: 1.5x), even at 8192 positions; slower on the smoke sizes (2048 positions) and with
# 8-32 input channels (ProViCNet's head: up to 2.5x slower), where XLA's own kernel gradient is better.
_MATMUL_GRAD_MIN_POSITIONS = 8192
_MATMUL_GRAD_MIN_CHANNELS = 64


def _conv2d(x: jax.Array, kernel: jax.Array, padding, precision) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), list(padding), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=precision)


def _output_plane(x: jax.Array, kernel: jax.Array, padding) -> tuple[int, int]:
    """(H, W) of a stride-1 conv's output: the last two spatial sizes after padding, minus the kernel's reach."""
    return tuple(s + lo + hi - k + 1 for s, (lo, hi), k in zip(x.shape[-3:-1], padding[-2:], kernel.shape[-4:-2]))


def _conv2d_fold(x: jax.Array, kernel: jax.Array, padding, precision) -> jax.Array:
    positions = x.shape[0] * math.prod(_output_plane(x, kernel, padding))
    if positions >= _MATMUL_GRAD_MIN_POSITIONS and x.shape[-1] >= _MATMUL_GRAD_MIN_CHANNELS:
        return _conv2d_matmul_grad(x, kernel, padding, precision)
    return _conv2d(x, kernel, padding, precision)


def _conv2d_kernel_grad(x: jax.Array, grad: jax.Array, kernel_shape, padding, precision) -> jax.Array:
    """d(loss)/d(kernel) of a stride-1 NHWC 2-D conv as one matmul over all positions.

    kernel_grad[a, b, c, o] = sum_{n,p,q} x_pad[n, p, q, c] * grad[n, p - a, q - b, o]: the tap shifts go onto the
    operand with fewer channels (shifted zero-padded copies of `grad`, or im2col columns of `x`), then a single
    [C, positions] x [positions, taps * O] product. XLA:CPU's kernel-gradient convolution reaches 20-50 GFLOP/s on
    the UPerNet head's maps; this runs near matmul speed (2-2.5x faster, measured on 2 cores).
    """
    kh, kw, cin, cout = kernel_shape
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    n, hp, wp, _ = padded.shape
    ho, wo = grad.shape[1:3]
    taps = [(a, b) for a in range(kh) for b in range(kw)]
    if cout <= cin:
        shifted = jnp.concatenate([jnp.pad(grad, ((0, 0), (a, hp - ho - a), (b, wp - wo - b), (0, 0)))
                                   for a, b in taps], axis=-1)
        out = jax.lax.dot_general(padded.reshape(-1, cin), shifted.reshape(-1, len(taps) * cout),
                                  (((0,), (0,)), ((), ())), precision=precision)  # [C, taps * O]
        return out.reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)
    columns = jnp.concatenate([jax.lax.slice(padded, (0, a, b, 0), (n, a + ho, b + wo, cin)) for a, b in taps],
                              axis=-1)
    out = jax.lax.dot_general(columns.reshape(-1, len(taps) * cin), grad.reshape(-1, cout),
                              (((0,), (0,)), ((), ())), precision=precision)  # [taps * C, O]
    return out.reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d_matmul_grad(x: jax.Array, kernel: jax.Array, padding, precision) -> jax.Array:
    """`_conv2d` whose kernel gradient is `_conv2d_kernel_grad` (the input gradient stays XLA's)."""
    return _conv2d(x, kernel, padding, precision)


def _conv2d_matmul_grad_fwd(x, kernel, padding, precision):
    return _conv2d(x, kernel, padding, precision), (x, kernel)


def _conv2d_matmul_grad_bwd(padding, precision, residuals, grad):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda inputs: _conv2d(inputs, kernel, padding, precision), x)
    kernel_grad = _conv2d_kernel_grad(x, grad, kernel.shape, padding, precision)
    return input_vjp(grad)[0], kernel_grad.astype(kernel.dtype)


_conv2d_matmul_grad.defvjp(_conv2d_matmul_grad_fwd, _conv2d_matmul_grad_bwd)


def _depth_folded(x: jax.Array, kernel: jax.Array, padding, precision) -> jax.Array:
    """3-D conv as a 2-D conv: the kd depth taps go into the channels, the output depth into the batch."""
    kd, kh, kw, cin, cout = kernel.shape
    padded = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
    depth = padded.shape[1] - kd + 1
    taps = jnp.concatenate([jax.lax.slice_in_dim(padded, a, a + depth, axis=1) for a in range(kd)], axis=-1)
    n, _, h, w, c = taps.shape
    kernel2d = jnp.moveaxis(kernel, 0, 2).reshape(kh, kw, kd * cin, cout)  # tap-major channels, as concatenated
    y = _conv2d_fold(taps.reshape(n * depth, h, w, c), kernel2d, padding[1:], precision)
    return y.reshape(n, depth, *y.shape[1:])


def dense_conv(x: jax.Array, kernel: jax.Array, padding, *, implementation: str = "auto",
               precision=None) -> jax.Array:
    """Stride-1 dense conv of a channels-last (N, *spatial, C) array with a (*k, C, O) kernel.

    "conv": lax.conv_general_dilated. "fold": what XLA:CPU runs fast. Its 3-D convolution emitter reaches 15-35
    GFLOP/s fwd+bwd on the UPerNet head's 3^3 convs, while its 2-D convolutions and matmuls reach 100-170 on the
    same two cores, so 1x1 convs become matmuls, 3-D kernels fold their depth taps into the channels and run as
    a 2-D conv over (N*D) slices (kd x the input in memory, 2.5-6x faster fwd+bwd) whose kernel gradient is one
    matmul on large maps, and maps with few positions per slice use im2col. "auto": fold on CPU, conv on GPU/TPU
    (cuDNN / the TPU convolution unit are fast).
    """
    spatial = kernel.shape[:-2]
    if padding == "SAME":
        padding = _same_padding(spatial)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if implementation == "auto":
        implementation = "fold" if cpu_forms() else "conv"
    if implementation == "conv":
        letters = "DHW"[3 - len(spatial):]
        return jax.lax.conv_general_dilated(
            x, kernel, (1,) * len(spatial), list(padding),
            dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"), precision=precision)
    if implementation != "fold":
        raise ValueError(f"dense conv implementation must be auto|conv|fold, got {implementation!r}")
    if len(spatial) not in (2, 3):
        raise ValueError(f"dense conv takes 2-D or 3-D kernels, got kernel shape {kernel.shape}")
    if all(k == 1 for k in spatial) and not any(lo or hi for lo, hi in padding):
        return _matmul_1x1(x, kernel, precision)
    if math.prod(_output_plane(x, kernel, padding)) < _IM2COL_MAX_PLANE:
        return _im2col(x, kernel, padding, precision)
    if len(spatial) == 3:
        return _depth_folded(x, kernel, padding, precision)
    return _conv2d_fold(x, kernel, padding, precision)


# Nearest x2 up-sampling followed by a 3x3 conv (padding 1), on the low-resolution map: output pixel (2i + a,
# 2j + b) only sees input rows i - 1 + a .. i + a and columns j - 1 + b .. j + b, so each of the four output
# phases (a, b) is a 2x2 conv of the input whose taps are sums of the 3x3 taps. _PHASE_TAPS[a, r, k]: weight of
# kernel row k in phase a's row r (r = offsets -1, 0, +1 of the low-resolution input).
_PHASE_TAPS = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 0]],
                        [[0, 0, 0], [1, 1, 0], [0, 0, 1]]], np.float32)
# Below this many output channels the four phases run as one conv with 4 * O outputs (a wider matmul); from it on
# as four 2x2 convs (2.25x fewer FLOPs). Measured fwd+bwd on 2 cores against up-sampling then convolving:
# ProViCNet's head 128->32 at 8->16 px 1.4x, 32->16 at 16->32 px 1.7x, 16->4 at 32->64 px 3.7x faster.
_PHASES_IN_CHANNELS_MAX_OUT = 8


def nearest_upsample2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 up-sampling of the two spatial axes of an NHWC map (`nn.Upsample(scale_factor=2)`)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def upsample2x_conv3x3(x: jax.Array, kernel: jax.Array, *, implementation: str = "auto",
                       precision=None) -> jax.Array:
    """`dense_conv(nearest_upsample2x(x), kernel, padding 1)` for a (3, 3, C, O) kernel, computed without the
    up-sampled map ("fold"; identical up to summation order) or literally ("conv"; "auto": fold on CPU)."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"upsample2x_conv3x3 takes a 3x3 kernel, got kernel shape {kernel.shape}")
    if implementation == "auto":
        implementation = "fold" if cpu_forms() else "conv"
    if implementation == "conv":
        return dense_conv(nearest_upsample2x(x), kernel, ((1, 1), (1, 1)), implementation="conv", precision=precision)
    n, h, w, c = x.shape
    out = kernel.shape[-1]
    taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
    phase_kernel = jnp.einsum("ark,bsl,klco->rscabo", taps, taps, kernel)  # [3, 3, C, 2, 2, O]
    if out < _PHASES_IN_CHANNELS_MAX_OUT:
        y = dense_conv(x, phase_kernel.reshape(3, 3, c, 4 * out), ((1, 1), (1, 1)), implementation=implementation,
                       precision=precision).reshape(n, h, w, 2, 2, out)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, out)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    phases = [[dense_conv(padded[:, a:a + h + 1, b:b + w + 1], phase_kernel[a:a + 2, b:b + 2, :, a, b],
                          ((0, 0), (0, 0)), implementation=implementation, precision=precision)
               for b in range(2)] for a in range(2)]
    y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # [N, H, a, W, b, O]
    return y.reshape(n, 2 * h, 2 * w, out)


class DenseConv(nnx.Module):
    """Drop-in for a stride-1 `nnx.Conv`: same parameters (`kernel` (*k, Cin, Cout), optional `bias` (Cout,)),
    same initialisation and rng use, same dtype behaviour (inputs, kernel and bias cast to `dtype`, fp32 params),
    with the computation picked by `implementation` (see `dense_conv`): identical results up to summation order.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: Sequence[int], *, padding="SAME",
                 use_bias: bool = True, dtype=None, param_dtype=jnp.float32, precision=None,
                 kernel_init: nnx.Initializer = nnx.initializers.lecun_normal(),
                 bias_init: nnx.Initializer = nnx.initializers.zeros_init(), implementation: str = "auto",
                 rngs: nnx.Rngs):
        if implementation not in ("auto", "conv", "fold"):
            raise ValueError(f"dense conv implementation must be auto|conv|fold, got {implementation!r}")
        kernel_size = tuple(int(k) for k in kernel_size)
        self.kernel = nnx.Param(kernel_init(rngs.params(), (*kernel_size, in_features, out_features), param_dtype))
        if use_bias:
            self.bias = nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
        else:
            self.bias = nnx.data(None)
        self.padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        self.dtype = dtype
        self.precision = precision
        self.implementation = implementation

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


def torch_default_kernel_init() -> nnx.Initializer:
    """PyTorch's default Conv/Linear init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    return nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
