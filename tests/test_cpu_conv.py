"""cpu_conv.target_platform: the "auto" forms follow the platform a trace is for, not the host's backend.

The form is chosen while tracing, so lowering on this CPU host inside `target_platform("tpu")` shows the program a
TPU would compile; no TPU runtime is needed.
"""
from __future__ import annotations

import re
import threading

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from transfer_jax.models.convnext import Block
from transfer_jax.models.cpu_conv import dense_conv, depthwise_conv, target_platform, upsample2x_conv3x3
from transfer_jax.models.layers import DenseConv, DepthwiseConv
from transfer_jax.models.upernet import ConvModule

# 4 x 16 x 16 = 1024 voxels, 16 wide: the CPU target's "auto" picks the Toeplitz form here.
DEPTHWISE_INPUT = (1, 4, 16, 16, 8)


def _convolutions(hlo: str) -> list[dict]:
    """Spatial rank and feature_group_count of each `stablehlo.convolution` in a lowered module's text."""
    found = []
    for line in hlo.splitlines():
        if "stablehlo.convolution" in line:
            lhs_layout = re.search(r"dim_numbers = \[([^\]]*)\]", line).group(1)
            groups = int(re.search(r"feature_group_count = (\d+)", line).group(1))
            found.append({"spatial": sum(c.strip().isdigit() for c in lhs_layout.split(",")), "groups": groups})
    return found


def _lower_module(module: nnx.Module, x: jax.Array) -> str:
    graphdef, state = nnx.split(module)
    return jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).as_text()


def _depthwise_hlo(implementation: str, shape=DEPTHWISE_INPUT) -> str:
    x, kernel = jnp.zeros(shape), jnp.zeros((*(7,) * (len(shape) - 2), 1, shape[-1]))
    return jax.jit(lambda x, k: depthwise_conv(x, k, implementation)).lower(x, kernel).as_text()


def _dense_hlo(implementation: str) -> str:
    x, kernel = jnp.zeros((1, 4, 8, 8, 6)), jnp.zeros((3, 3, 3, 6, 5))
    return jax.jit(lambda x, k: dense_conv(x, k, "SAME", implementation=implementation)).lower(x, kernel).as_text()


@pytest.mark.parametrize("platform", ["tpu", "gpu", "cuda", "rocm", "reference"])
def test_accelerator_targets_trace_a_convnext_blocks_depthwise_conv_as_one_grouped_convolution(platform):
    block = Block(8, 0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.zeros(DEPTHWISE_INPUT)
    with target_platform(platform):
        hlo = _lower_module(block, x)
    assert _convolutions(hlo) == [{"spatial": 3, "groups": 8}]


def test_cpu_target_rewrites_a_convnext_blocks_depthwise_conv():
    block = Block(8, 0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    with target_platform("cpu"):
        hlo = _lower_module(block, jnp.zeros(DEPTHWISE_INPUT))
    assert _convolutions(hlo) == []
    assert hlo == _lower_module_with_depthwise(block, "toeplitz")


def _lower_module_with_depthwise(block: Block, implementation: str) -> str:
    explicit = nnx.clone(block)
    explicit.dwconv.implementation = implementation
    return _lower_module(explicit, jnp.zeros(DEPTHWISE_INPUT))


def test_upernet_head_conv_is_one_3d_convolution_for_tpu_and_depth_folded_for_cpu():
    conv = ConvModule(8, 8, 3, dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 4, 8, 8, 8))
    with target_platform("tpu"):
        assert _convolutions(_lower_module(conv, x)) == [{"spatial": 3, "groups": 1}]
    with target_platform("cpu"):
        assert _convolutions(_lower_module(conv, x)) == [{"spatial": 2, "groups": 1}]


@pytest.mark.parametrize("shape,form", [
    ((1, 2, 4, 4, 3), "matrix"),       # 32 voxels
    ((1, 8, 8, 2), "matrix"),          # 2-D, 64 voxels
    (DEPTHWISE_INPUT, "toeplitz"),     # 3-D, 16 wide
    ((1, 4, 16, 4, 3), "shift_sum"),   # 3-D, 4 wide
    ((1, 16, 16, 3), "shift_sum"),     # 2-D, 256 voxels
])
def test_auto_picks_the_cpu_form_for_the_shape_and_the_grouped_conv_elsewhere(shape, form):
    with target_platform("cpu"):
        assert _depthwise_hlo("auto", shape) == _depthwise_hlo(form, shape)
    with target_platform("tpu"):
        assert _depthwise_hlo("auto", shape) == _depthwise_hlo("conv", shape)


def test_dense_and_upsampling_convs_follow_the_target():
    x, kernel = jnp.zeros((1, 4, 5, 6)), jnp.zeros((3, 3, 6, 4))

    def upsampling(implementation):
        fn = jax.jit(lambda x, k: upsample2x_conv3x3(x, k, implementation=implementation))
        return fn.lower(x, kernel).as_text()

    with target_platform("cpu"):
        assert _dense_hlo("auto") == _dense_hlo("fold") != _dense_hlo("conv")
        assert upsampling("auto") == upsampling("fold") != upsampling("conv")
    with target_platform("gpu"):
        assert _dense_hlo("auto") == _dense_hlo("conv")
        assert upsampling("auto") == upsampling("conv")


def test_outside_any_context_the_default_backend_decides():
    host = "cpu" if jax.default_backend() == "cpu" else "tpu"
    with target_platform(host):
        want = _depthwise_hlo("auto")
    assert _depthwise_hlo("auto") == want


def test_contexts_nest_and_restore_the_outer_platform():
    toeplitz, grouped, default = _depthwise_hlo("toeplitz"), _depthwise_hlo("conv"), _depthwise_hlo("auto")
    with target_platform("cpu"):
        with target_platform("tpu"):
            assert _depthwise_hlo("auto") == grouped
            with target_platform("cpu"):
                assert _depthwise_hlo("auto") == toeplitz
            assert _depthwise_hlo("auto") == grouped
        assert _depthwise_hlo("auto") == toeplitz
        with pytest.raises(RuntimeError, match="inside"):
            with target_platform("reference"):
                raise RuntimeError("inside")
        assert _depthwise_hlo("auto") == toeplitz
    assert _depthwise_hlo("auto") == default


def test_one_jitted_function_is_traced_again_for_another_target():
    """The target is part of jit's cache key: a trace for the CPU is not reused for a TPU."""
    block = Block(8, 0.0, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(block)
    step = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    x = jnp.zeros(DEPTHWISE_INPUT)
    with target_platform("cpu"):
        assert _convolutions(step.lower(state, x).as_text()) == []
    with target_platform("tpu"):
        assert _convolutions(step.lower(state, x).as_text()) == [{"spatial": 3, "groups": 8}]
    with target_platform("cpu"):
        assert _convolutions(step.lower(state, x).as_text()) == []


def test_each_thread_has_its_own_target():
    entered, traced = threading.Event(), threading.Event()
    seen = {}

    def other_thread():
        seen["outside"] = _depthwise_hlo("auto")
        with target_platform("tpu"):
            entered.set()
            traced.wait(timeout=60)
            seen["tpu"] = _depthwise_hlo("auto")

    default = _depthwise_hlo("auto")
    with target_platform("cpu"):
        thread = threading.Thread(target=other_thread)
        thread.start()
        assert entered.wait(timeout=60)
        seen["cpu"] = _depthwise_hlo("auto")  # while the other thread is inside target_platform("tpu")
        traced.set()
        thread.join(timeout=60)
    assert seen == {"outside": default, "tpu": _depthwise_hlo("conv"), "cpu": _depthwise_hlo("toeplitz")}


def test_unknown_platform_and_implementation_names_are_one_line_errors():
    with pytest.raises(ValueError, match="unknown platform; use one of cpu, tpu, gpu") as error:
        with target_platform("metal"):
            pass
    assert "\n" not in str(error.value)
    x = jnp.zeros((1, 4, 4, 4, 2))
    cases = [
        (lambda: depthwise_conv(x, jnp.zeros((3, 3, 3, 1, 2)), "fold"), "auto|conv|shift_sum|toeplitz|matrix"),
        (lambda: DepthwiseConv(2, (3, 3, 3), kernel_init=nnx.initializers.zeros_init(), dtype=jnp.float32,
                               rngs=nnx.Rngs(0), implementation="winograd"), "backbone_options.depthwise_impl"),
        (lambda: dense_conv(x, jnp.zeros((3, 3, 3, 2, 2)), "SAME", implementation="toeplitz"), "auto|conv|fold"),
        (lambda: upsample2x_conv3x3(x[:, 0], jnp.zeros((3, 3, 2, 2)), implementation="im2col"), "auto|conv|fold"),
        (lambda: DenseConv(2, 2, (3, 3, 3), implementation="im2col", rngs=nnx.Rngs(0)), "head_options.conv_impl"),
    ]
    for make, valid in cases:
        with pytest.raises(ValueError, match=re.escape(valid)) as error:
            make()
        assert "\n" not in str(error.value)


def test_toeplitz_form_rejects_2d_maps():
    with pytest.raises(ValueError, match="3-D only"):
        depthwise_conv(jnp.zeros((1, 16, 16, 2)), jnp.zeros((7, 7, 1, 2)), "toeplitz")
