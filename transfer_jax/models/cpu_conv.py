"""Stride-1 convolutions in the forms the platform a step is compiled for runs fast.

TPUs and GPUs run every `lax.conv_general_dilated` on their convolution units (the TPU MXU, cuDNN). XLA:CPU does
not: its grouped and 3-D convolution emitters reach a fraction of its matmul speed, so on CPU the same
convolutions are rewritten as matmuls, 2-D convolutions or shifted sums, with identical results up to summation
order. The form is picked while tracing, from the input shape and the *target* platform: `target_platform(p)`
around a trace (a jit, `lower`, `make_jaxpr`) makes it pick the forms for `p` whatever the host's default backend
is, and `target_platform("reference")` picks the plain lax convolutions for counting the model's own FLOPs.

Interface: `target_platform` (with `target_mesh` and `current_target`, which models/attention.py reads too),
`depthwise_conv`, `dense_conv`, `upsample2x_conv3x3`, `cotangent_barrier` (a fusion fence on a residual stream that
only XLA:CPU needs), and `check_implementation` for modules that validate an explicit implementation name when they
are built. Channels-last throughout: (N, *spatial, C) inputs,
(*k, C_in, C_out) kernels.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# --------------------------------------------------------------------------------------------------------------
# Target platform
# --------------------------------------------------------------------------------------------------------------

# Platform -> the family of forms its "auto" implementations use: the XLA:CPU rewrites or the lax convolutions.
_PLATFORM_FORMS = {"cpu": "cpu", "tpu": "lax", "gpu": "lax", "cuda": "lax", "rocm": "lax", "reference": "lax"}

# The target in effect: None outside any `target_platform` (follow `jax.default_backend()`), else (platform, mesh).
# A jax user context is thread-local and part of jit's tracing and compilation cache keys, so a function traced for
# one target is traced again, not reused, when it is called under another.
_TARGET = jax.make_user_context(None)


@contextlib.contextmanager
def target_platform(platform: str, mesh=None) -> Iterator[None]:
    """Traces inside pick the "auto" forms for `platform` (a `jax.Device.platform`, or "reference" for the plain
    lax convolutions and plain attention on any backend); nested contexts override and restore the outer one.
    `mesh`: the mesh the traced program runs on, for forms that run per device shard (`target_mesh`)."""
    if platform not in _PLATFORM_FORMS:
        raise ValueError(f"target_platform({platform!r}): unknown platform; use one of {', '.join(_PLATFORM_FORMS)}")
    with _TARGET((platform, mesh)):
        yield


def target_mesh(mesh) -> contextlib.AbstractContextManager[None]:
    """`target_platform` of the platform of the mesh's devices (what its programs are compiled for, which may not
    be the host's backend), with the mesh known to forms that split their work over its devices."""
    from transfer_jax.train.mesh import mesh_platform

    return target_platform(mesh_platform(mesh), mesh)


def current_target() -> tuple[str, object]:
    """(platform, mesh or None) the current trace targets: the innermost `target_platform`, else the host's
    default backend and no mesh."""
    target = _TARGET.value
    return (jax.default_backend(), None) if target is None else target


def _cpu_rewrites() -> bool:
    """Whether "auto" picks the XLA:CPU rewrites in the current trace."""
    return _PLATFORM_FORMS.get(current_target()[0]) == "cpu"


@jax.custom_vjp
def _materialised_cotangent(x: jax.Array) -> jax.Array:
    return x


_materialised_cotangent.defvjp(lambda x: (x, None), lambda _, grad: (jax.lax.optimization_barrier(grad),))


def cotangent_barrier(x: jax.Array) -> jax.Array:
    """Identity; on XLA:CPU targets its cotangent is materialised (`lax.optimization_barrier`) on the way back.

    On a pre-norm transformer's residual stream: without it XLA:CPU fuses the LayerNorm backward of every later
    block into each block's transposed weight-gradient operand and recomputes that chain per block (ProViCNet's
    default step: 49 ms of such fusions; with the barrier at each residual add the step is 9 % faster). Other
    targets fuse well across it and it only stands in their way (a ViT-S/14 block's backward on v5e moves 2.4 %
    more HBM bytes with it), so there it is the plain identity.
    """
    return _materialised_cotangent(x) if _cpu_rewrites() else x


# --------------------------------------------------------------------------------------------------------------
# Implementation names
# --------------------------------------------------------------------------------------------------------------

_IMPLEMENTATIONS = {
    "depthwise": ("auto", "conv", "shift_sum", "toeplitz", "matrix"),
    "dense": ("auto", "conv", "fold"),
}
_CONFIG_FIELDS = {"depthwise": "backbone_options.depthwise_impl", "dense": "head_options.conv_impl"}


def check_implementation(kind: str, implementation: str) -> str:
    """`implementation` back if it names a form of the `kind` ("depthwise" or "dense") conv."""
    valid = _IMPLEMENTATIONS[kind]
    if implementation not in valid:
        raise ValueError(f"{kind} conv implementation {implementation!r} ({_CONFIG_FIELDS[kind]}) is unknown; "
                         f"use one of {'|'.join(valid)}")
    return implementation


def _lax_conv(x: jax.Array, kernel: jax.Array, padding, *, groups: int = 1, precision=None) -> jax.Array:
    spatial = kernel.shape[:-2]
    letters = "DHW"[3 - len(spatial):]  # 1-D to 3-D
    return jax.lax.conv_general_dilated(
        x, kernel, (1,) * len(spatial), list(padding),
        dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
        feature_group_count=groups, precision=precision)


def _same_padding(kernel_size: Sequence[int]) -> tuple[tuple[int, int], ...]:
    return tuple(((k - 1) // 2, k // 2) for k in kernel_size)


# --------------------------------------------------------------------------------------------------------------
# Depthwise conv
# --------------------------------------------------------------------------------------------------------------

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
    if x.ndim != 5:
        raise ValueError(f"the toeplitz depthwise conv is 3-D only, got input shape {x.shape}")
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


def _depthwise_lax(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """The grouped lax convolution (feature_group_count = channels)."""
    return _lax_conv(x, kernel, [(k // 2, k - 1 - k // 2) for k in kernel.shape[:-2]], groups=x.shape[-1])


_DEPTHWISE_FORMS = {"conv": _depthwise_lax, "shift_sum": _depthwise_shift_sum, "toeplitz": _depthwise_toeplitz,
                    "matrix": _depthwise_matrix}


def _cpu_depthwise_form(x: jax.Array) -> str:
    if math.prod(x.shape[1:-1]) <= _MATRIX_MAX_VOXELS:
        return "matrix"
    if x.ndim == 5 and _TOEPLITZ_MIN_WIDTH <= x.shape[-2] <= _TOEPLITZ_MAX_WIDTH:
        return "toeplitz"
    return "shift_sum"


def depthwise_conv(x: jax.Array, kernel: jax.Array, implementation: str = "auto") -> jax.Array:
    """Depthwise (groups = channels), stride-1, same-padded conv of (N, *spatial, C) with a (*k, 1, C) kernel.

    `implementation`: "conv" (the grouped lax convolution), "shift_sum" (`_depthwise_shift_sum`), "toeplitz"
    (3-D only, `_depthwise_toeplitz`), "matrix" (`_depthwise_matrix`) or "auto": for a CPU target the matrix for
    maps of at most 128 voxels, toeplitz for 3-D maps 8-64 wide and shift_sum otherwise; the grouped convolution
    for any other target.
    """
    implementation = check_implementation("depthwise", implementation)
    if implementation == "auto":
        implementation = _cpu_depthwise_form(x) if _cpu_rewrites() else "conv"
    return _DEPTHWISE_FORMS[implementation](x, kernel)


# --------------------------------------------------------------------------------------------------------------
# Dense conv
# --------------------------------------------------------------------------------------------------------------

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
    return _lax_conv(x, kernel, padding, precision=precision)


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


def _dense_fold(x: jax.Array, kernel: jax.Array, padding, precision) -> jax.Array:
    """What XLA:CPU runs fast: 1x1 convs as matmuls, im2col for few positions per slice, 3-D kernels depth-folded
    into a 2-D conv, 2-D convs with a matmul kernel gradient on large maps."""
    spatial = kernel.shape[:-2]
    if len(spatial) not in (2, 3):
        raise ValueError(f"dense conv takes 2-D or 3-D kernels, got kernel shape {kernel.shape}")
    if all(k == 1 for k in spatial) and not any(lo or hi for lo, hi in padding):
        return _matmul_1x1(x, kernel, precision)
    if math.prod(_output_plane(x, kernel, padding)) < _IM2COL_MAX_PLANE:
        return _im2col(x, kernel, padding, precision)
    if len(spatial) == 3:
        return _depth_folded(x, kernel, padding, precision)
    return _conv2d_fold(x, kernel, padding, precision)


def _auto(implementation: str) -> str:
    """A dense conv's implementation with "auto" resolved for the target platform."""
    implementation = check_implementation("dense", implementation)
    if implementation == "auto":
        return "fold" if _cpu_rewrites() else "conv"
    return implementation


def dense_conv(x: jax.Array, kernel: jax.Array, padding, *, implementation: str = "auto",
               precision=None) -> jax.Array:
    """Stride-1 dense conv of a channels-last (N, *spatial, C) array with a (*k, C, O) kernel; `padding` is "SAME"
    or one (low, high) pair per spatial axis.

    "conv": lax.conv_general_dilated. "fold": what XLA:CPU runs fast. Its 3-D convolution emitter reaches 15-35
    GFLOP/s fwd+bwd on the UPerNet head's 3^3 convs, while its 2-D convolutions and matmuls reach 100-170 on the
    same two cores, so 1x1 convs become matmuls, 3-D kernels fold their depth taps into the channels and run as
    a 2-D conv over (N*D) slices (kd x the input in memory, 2.5-6x faster fwd+bwd) whose kernel gradient is one
    matmul on large maps, and maps with few positions per slice use im2col. "auto": fold for a CPU target, conv
    for any other (cuDNN / the TPU convolution unit are fast).
    """
    implementation = _auto(implementation)
    if padding == "SAME":
        padding = _same_padding(kernel.shape[:-2])
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if implementation == "conv":
        return _lax_conv(x, kernel, padding, precision=precision)
    return _dense_fold(x, kernel, padding, precision)


# --------------------------------------------------------------------------------------------------------------
# Nearest x2 up-sampling + 3x3 conv
# --------------------------------------------------------------------------------------------------------------

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
    up-sampled map ("fold"; identical up to summation order) or literally ("conv"); "auto": fold for a CPU
    target, the four phases as one lax conv for a TPU target, literally elsewhere."""
    if kernel.shape[:2] != (3, 3):
        raise ValueError(f"upsample2x_conv3x3 takes a 3x3 kernel, got kernel shape {kernel.shape}")
    tpu = implementation == "auto" and current_target()[0] == "tpu"
    implementation = _auto(implementation)
    if implementation == "conv" and not tpu:
        return _lax_conv(nearest_upsample2x(x), kernel, ((1, 1), (1, 1)), precision=precision)
    n, h, w, c = x.shape
    out = kernel.shape[-1]
    taps = jnp.asarray(_PHASE_TAPS, kernel.dtype)
    phase_kernel = jnp.einsum("ark,bsl,klco->rscabo", taps, taps, kernel)  # [3, 3, C, 2, 2, O]
    if tpu or out < _PHASES_IN_CHANNELS_MAX_OUT:
        # The four phases as one conv with 4 * O outputs. On a TPU (as one lax conv) it neither writes nor reads
        # the up-sampled map and gives the MXU 4x the output channels: ProViCNet's full train step moves 1.1 %
        # fewer HBM bytes on v5e (its last conv has 4 outputs at 256 x 256).
        phases, same = phase_kernel.reshape(3, 3, c, 4 * out), ((1, 1), (1, 1))
        y = _lax_conv(x, phases, same, precision=precision) if tpu else _dense_fold(x, phases, same, precision)
        y = y.reshape(n, h, w, 2, 2, out)
        return y.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, out)
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    phases = [[_dense_fold(padded[:, a:a + h + 1, b:b + w + 1], phase_kernel[a:a + 2, b:b + 2, :, a, b],
                           ((0, 0), (0, 0)), precision)
               for b in range(2)] for a in range(2)]
    y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # [N, H, a, W, b, O]
    return y.reshape(n, 2 * h, 2 * w, out)
