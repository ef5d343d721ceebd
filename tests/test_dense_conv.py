"""The CPU forms of models/cpu_conv.py (dense "fold", the depthwise forms, the fused up-sampling conv) equal the lax
convolutions, forward and gradients; the modules of models/layers.py that use them match nnx.Conv."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transfer_jax.models import cpu_conv, layers
from transfer_jax.models.cpu_conv import dense_conv, depthwise_conv, upsample2x_conv3x3
from transfer_jax.models.layers import DenseConv
from transfer_jax.models.upernet import UPerNetConfig

HIGHEST = jax.lax.Precision.HIGHEST

# (input shape, kernel size): 3^3 on even and odd maps (depth-folded 2-D conv, and im2col below an 8x8 plane),
# 1x1 (matmul), a 2-D kernel and an anisotropic one.
CASES = [
    ((2, 4, 8, 8, 5), (3, 3, 3)),
    ((1, 5, 9, 11, 4), (3, 3, 3)),
    ((3, 2, 4, 4, 6), (3, 3, 3)),
    ((2, 1, 2, 3, 7), (3, 3, 3)),
    ((2, 3, 8, 9, 6), (1, 1, 1)),
    ((2, 4, 8, 8, 5), (1, 3, 3)),
    ((2, 10, 9, 4), (3, 3)),
    ((2, 3, 3, 4), (3, 3)),
    ((2, 5, 9, 8, 3), (3, 1, 3)),
]


def _reference(x, kernel, padding):
    letters = "DHW"[3 - (x.ndim - 2):]
    return jax.lax.conv_general_dilated(x, kernel, (1,) * (x.ndim - 2), list(padding), precision=HIGHEST,
                                        dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"))


@pytest.mark.parametrize("matmul_kernel_grad", [False, True])
@pytest.mark.parametrize("shape,kernel_size", CASES)
def test_fold_matches_lax_conv_forward_and_grads(shape, kernel_size, matmul_kernel_grad, monkeypatch):
    if matmul_kernel_grad:
        monkeypatch.setattr(cpu_conv, "_MATMUL_GRAD_MIN_POSITIONS", 0)
        monkeypatch.setattr(cpu_conv, "_MATMUL_GRAD_MIN_CHANNELS", 0)
    cout = 3
    kx, kw, kc = jax.random.split(jax.random.key(sum(shape) + sum(kernel_size)), 3)
    x = jax.random.normal(kx, shape, jnp.float32)
    kernel = jax.random.normal(kw, (*kernel_size, shape[-1], cout), jnp.float32) * 0.3
    cotangent = jax.random.normal(kc, (*shape[:-1], cout), jnp.float32)
    padding = tuple((k // 2, k // 2) for k in kernel_size)  # ConvModule's padding (SAME for odd kernels)

    def loss(fn):
        return lambda x, k: jnp.sum(fn(x, k) * cotangent)

    fold = jax.jit(lambda x, k: dense_conv(x, k, padding, implementation="fold", precision=HIGHEST))
    ref = jax.jit(lambda x, k: _reference(x, k, padding))
    np.testing.assert_allclose(fold(x, kernel), ref(x, kernel), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(loss(fold), argnums=(0, 1)))(x, kernel)
    grads_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, kernel)
    for g, r in zip(grads, grads_ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cout", [2, 9])  # the kernel gradient shifts the cotangent (cout <= cin) or x (cout > cin)
@pytest.mark.parametrize("shape,kernel_size,padding", [
    ((2, 9, 10, 5), (3, 2), ((1, 1), (0, 1))),
    ((2, 3, 8, 9, 4), (3, 3, 3), ((1, 1), (2, 0), (1, 1))),
])
def test_fold_kernel_gradient_for_wide_outputs_and_uneven_padding(shape, kernel_size, padding, cout, monkeypatch):
    monkeypatch.setattr(cpu_conv, "_MATMUL_GRAD_MIN_POSITIONS", 0)  # the matmul kernel gradient at test sizes
    monkeypatch.setattr(cpu_conv, "_MATMUL_GRAD_MIN_CHANNELS", 0)
    kx, kw, kc = jax.random.split(jax.random.key(cout), 3)
    x = jax.random.normal(kx, shape, jnp.float32)
    kernel = jax.random.normal(kw, (*kernel_size, shape[-1], cout), jnp.float32) * 0.3
    fold = jax.jit(lambda x, k: dense_conv(x, k, padding, implementation="fold", precision=HIGHEST))
    ref = jax.jit(lambda x, k: _reference(x, k, padding))
    out = fold(x, kernel)
    np.testing.assert_allclose(out, ref(x, kernel), rtol=1e-5, atol=1e-5)
    cotangent = jax.random.normal(kc, out.shape, jnp.float32)
    grads = jax.grad(lambda x, k: jnp.sum(fold(x, k) * cotangent), argnums=(0, 1))(x, kernel)
    want = jax.grad(lambda x, k: jnp.sum(ref(x, k) * cotangent), argnums=(0, 1))(x, kernel)
    for g, r in zip(grads, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_same_padding_string_and_even_kernel():
    x = jax.random.normal(jax.random.key(0), (1, 4, 9, 9, 3))
    kernel = jax.random.normal(jax.random.key(1), (2, 2, 2, 3, 2))
    got = dense_conv(x, kernel, "SAME", implementation="fold", precision=HIGHEST)
    want = jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), "SAME", precision=HIGHEST,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_dense_conv_module_matches_nnx_conv():
    """Same parameter layout, initial values (same rng use) and outputs as nnx.Conv, with and without bias."""
    x = jax.random.normal(jax.random.key(2), (2, 4, 8, 8, 6))
    for use_bias in (False, True):
        ours = DenseConv(6, 4, (3, 3, 3), padding=((1, 1),) * 3, use_bias=use_bias, dtype=jnp.float32,
                         precision=HIGHEST, implementation="fold", rngs=nnx.Rngs(0))
        theirs = nnx.Conv(6, 4, (3, 3, 3), padding=((1, 1),) * 3, use_bias=use_bias, dtype=jnp.float32,
                          precision=HIGHEST, rngs=nnx.Rngs(0))
        ours_state, theirs_state = nnx.to_pure_dict(nnx.state(ours)), nnx.to_pure_dict(nnx.state(theirs))
        assert jax.tree.structure(ours_state) == jax.tree.structure(theirs_state)
        jax.tree.map(np.testing.assert_array_equal, ours_state, theirs_state)
        if use_bias:
            theirs.bias[...] = jnp.arange(4.0)
            ours.bias[...] = jnp.arange(4.0)
        np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["fold", "conv"])
def test_bf16_compute_with_fp32_params(implementation):
    x = jax.random.normal(jax.random.key(3), (2, 4, 8, 8, 6))
    ours = DenseConv(6, 4, (3, 3, 3), dtype=jnp.bfloat16, implementation=implementation, rngs=nnx.Rngs(0))
    theirs = nnx.Conv(6, 4, (3, 3, 3), dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    assert ours.kernel[...].dtype == jnp.float32
    y, want = ours(x), theirs(x)
    assert y.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(want, np.float32), rtol=0.05, atol=0.05)


def test_bad_implementation_is_rejected():
    with pytest.raises(ValueError, match="auto\\|conv\\|fold"):
        DenseConv(2, 2, (3, 3, 3), implementation="im2col", rngs=nnx.Rngs(0))


def test_upernet_conv_impl_gives_the_same_model():
    """head_options.conv_impl changes the computation only: same parameters, same logits."""
    from transfer_jax.models.convnext import ConvNeXtConfig, ConvNeXtV2
    from transfer_jax.models.upernet import UPerNet

    x = jax.random.normal(jax.random.key(4), (1, 16, 32, 32, 3))
    outputs, states = [], []
    for impl in ("conv", "fold"):
        rngs = nnx.Rngs(0)
        encoder = ConvNeXtV2(ConvNeXtConfig(in_channels=3, depths=(1, 1, 1, 1), dims=(8, 16, 16, 32)), rngs=rngs)
        model = UPerNet(encoder, UPerNetConfig(num_classes=3, hidden_size=8, auxiliary_channels=8, conv_impl=impl),
                        in_channels=tuple(encoder.feature_channels), rngs=rngs)
        out = model(x)
        outputs.append((out.logits, out.aux_logits))
        states.append(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    jax.tree.map(np.testing.assert_array_equal, states[0], states[1])
    for a, b in zip(outputs[0], outputs[1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form,shape", [
    ("toeplitz", (2, 3, 8, 8, 4)), ("toeplitz", (1, 4, 5, 11, 3)), ("toeplitz", (2, 2, 6, 16, 5)),
    ("matrix", (2, 2, 4, 4, 5)), ("matrix", (3, 1, 2, 2, 4)), ("matrix", (2, 1, 1, 1, 3)), ("matrix", (2, 5, 6, 3)),
    ("shift_sum", (2, 3, 5, 4, 3)), ("shift_sum", (1, 9, 10, 2)), ("conv", (2, 3, 5, 4, 3)),
])
def test_depthwise_forms_match_grouped_conv(form, shape):
    """Every explicit depthwise form ("toeplitz" for 8-64 wide maps, "matrix" for maps of at most 128 voxels, also
    narrower than the kernel, "shift_sum" otherwise) against lax's grouped conv, forward and gradients."""
    channels, rank = shape[-1], len(shape) - 2
    kx, kw, kc = jax.random.split(jax.random.key(sum(shape)), 3)
    x = jax.random.normal(kx, shape, jnp.float32)
    kernel = jax.random.normal(kw, (*(7,) * rank, 1, channels), jnp.float32) * 0.1
    cotangent = jax.random.normal(kc, shape, jnp.float32)
    letters = "DHW"[3 - rank:]

    def grouped(x, k):
        return jax.lax.conv_general_dilated(x, k, (1,) * rank, [(3, 3)] * rank, precision=HIGHEST,
                                            dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
                                            feature_group_count=channels)

    def ours(x, k):
        with jax.default_matmul_precision("highest"):
            return depthwise_conv(x, k, implementation=form)

    np.testing.assert_allclose(jax.jit(ours)(x, kernel), jax.jit(grouped)(x, kernel), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda x, k: jnp.sum(ours(x, k) * cotangent), argnums=(0, 1)))(x, kernel)
    want = jax.jit(jax.grad(lambda x, k: jnp.sum(grouped(x, k) * cotangent), argnums=(0, 1)))(x, kernel)
    for g, r in zip(grads, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,patch", [((2, 8, 12, 16, 3), (4, 4, 4)), ((1, 9, 10, 7, 5), (2, 2, 2)),
                                         ((2, 4, 6, 6, 4), (1, 1, 1)), ((2, 28, 30, 3), (14, 14)),
                                         ((1, 16, 32, 32, 2), (8, 16, 16))])
def test_patch_conv_equals_the_strided_conv(shape, patch):
    """stride = kernel, VALID (also when a size is not a multiple of the patch): forward and both gradients."""
    from transfer_jax.models.layers import patch_conv

    x = jax.random.normal(jax.random.key(0), shape)
    kernel = jax.random.normal(jax.random.key(1), (*patch, shape[-1], 6))
    spatial = "DHW"[-len(patch):]

    def reference(x, kernel):
        numbers = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        return jax.lax.conv_general_dilated(x, kernel, patch, "VALID", dimension_numbers=numbers, precision=HIGHEST)

    with jax.default_matmul_precision("highest"):
        # sums of up to 4096 products of magnitude ~100: summation order alone moves the last digits
        np.testing.assert_allclose(patch_conv(x, kernel), reference(x, kernel), rtol=1e-5, atol=2e-4)
        probe = jax.random.normal(jax.random.key(2), reference(x, kernel).shape)
        for argnum in (0, 1):
            ours = jax.grad(lambda *a: jnp.sum(patch_conv(*a) * probe), argnums=argnum)(x, kernel)
            theirs = jax.grad(lambda *a: jnp.sum(reference(*a) * probe), argnums=argnum)(x, kernel)
            np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)


def test_patch_conv_module_matches_nnx_conv():
    from transfer_jax.models.layers import PatchConv

    ours = PatchConv(3, 8, (2, 4, 4), rngs=nnx.Rngs(0))
    theirs = nnx.Conv(3, 8, (2, 4, 4), strides=(2, 4, 4), padding="VALID", rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(ours.kernel[...], theirs.kernel[...])  # same initialisation and rng use
    x = jax.random.normal(jax.random.key(3), (2, 4, 8, 8, 3))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    half = PatchConv(3, 8, (2, 4, 4), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert half(x).dtype == jnp.bfloat16 and half.kernel[...].dtype == jnp.float32


def _upsample2x(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


# Output channels below and from `_PHASES_IN_CHANNELS_MAX_OUT` (phases as channels / four 2x2 convs), odd and
# non-square maps, a 1-pixel map (every tap but the centre reads padding).
@pytest.mark.parametrize("shape,cout", [((2, 4, 5, 6), 3), ((2, 4, 5, 6), 9), ((3, 1, 1, 4), 4), ((1, 3, 2, 5), 16)])
@pytest.mark.parametrize("implementation", ["fold", "conv", "auto for a TPU target"])
def test_upsample2x_conv3x3_equals_upsampling_then_convolving(shape, cout, implementation):
    kx, kw, kc = jax.random.split(jax.random.key(sum(shape) + cout), 3)
    x = jax.random.normal(kx, shape, jnp.float32)
    kernel = jax.random.normal(kw, (3, 3, shape[-1], cout), jnp.float32) * 0.3
    cotangent = jax.random.normal(kc, (shape[0], 2 * shape[1], 2 * shape[2], cout), jnp.float32)
    padding = ((1, 1), (1, 1))

    def fused(x, k):
        if implementation.endswith("TPU target"):  # the TPU form's lax conv, run here on the host
            with cpu_conv.target_platform("tpu"):
                return upsample2x_conv3x3(x, k, precision=HIGHEST)
        return upsample2x_conv3x3(x, k, implementation=implementation, precision=HIGHEST)

    def literal(x, k):
        return _reference(_upsample2x(x), k, padding)

    np.testing.assert_allclose(jax.jit(fused)(x, kernel), jax.jit(literal)(x, kernel), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda x, k: jnp.sum(fused(x, k) * cotangent), argnums=(0, 1)))(x, kernel)
    grads_ref = jax.jit(jax.grad(lambda x, k: jnp.sum(literal(x, k) * cotangent), argnums=(0, 1)))(x, kernel)
    for g, r in zip(grads, grads_ref):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_tpu_form_of_upsample2x_conv3x3_is_one_conv_on_the_low_resolution_map():
    """The four output phases as one conv with 4 x O output channels; the up-sampled map is never formed."""
    x, kernel = jnp.zeros((2, 8, 8, 64)), jnp.zeros((3, 3, 64, 4))
    with cpu_conv.target_platform("tpu"):
        jaxpr = jax.make_jaxpr(lambda x, k: upsample2x_conv3x3(x, k))(x, kernel)
    convs = [e for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 1 and convs[0].outvars[0].aval.shape == (2, 8, 8, 16)
    assert all(v.aval.shape[1:3] != (16, 16) or v.aval.shape[-1] == 4 for e in jaxpr.eqns for v in e.outvars)


def test_dense_conv_after_upsample2x_keeps_bias_and_rejects_other_kernels():
    conv = DenseConv(4, 5, (3, 3), padding=((1, 1), (1, 1)), bias_init=nnx.initializers.ones_init(),
                     rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 3, 4), jnp.float32)
    np.testing.assert_allclose(conv.after_upsample2x(x), conv(_upsample2x(x)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3x3 kernel with padding 1"):
        DenseConv(4, 5, (1, 1), rngs=nnx.Rngs(0)).after_upsample2x(x)


def test_cotangent_barrier_is_the_identity_for_values_and_gradients():
    x = jax.random.normal(jax.random.key(0), (3, 7), jnp.float32)

    def f(x, barrier):
        y = jnp.tanh(x) * 2.0
        return jnp.sum(jnp.sin(layers.cotangent_barrier(y) if barrier else y) ** 2)

    assert float(f(x, True)) == float(f(x, False))
    np.testing.assert_array_equal(jax.jit(jax.grad(lambda x: f(x, True)))(x),
                                  jax.jit(jax.grad(lambda x: f(x, False)))(x))
