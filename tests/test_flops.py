"""Model FLOPs (`train/flops.py`): the traced count equals the architectures' closed forms, ignores the CPU
rewrites and resizes, and follows nested jaxprs; the device peaks behind the logged MFU."""
from __future__ import annotations

import math
import types

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from transfer_jax.data.phantom import random_crop_batch
from transfer_jax.models.dinov2 import DinoV2, DinoV2Config
from transfer_jax.tasks.registry import get_task
from transfer_jax.train.flops import device_peak_flops, jaxpr_flops, train_step_flops
from transfer_jax.train.state import model_graph

from helpers import load_config


def convnext_upernet_step_flops(config, num_classes: int) -> float:
    """ConvNeXt-V2 + UPerNet + FCN auxiliary head, by hand: 2 FLOPs per MAC of every conv and linear, x3."""
    bo, ho = config.model.backbone_options, config.model.head_options
    dims, depths = tuple(bo.dims), tuple(bo.depths)
    stem, down = tuple(bo.get("stem_kernel", (4, 4, 4))), tuple(bo.get("downsample_kernel", (2, 2, 2)))
    last = tuple(bo.get("last_downsample", (1, 1, 1)))  # ProFound keeps the last stage's resolution
    shape = [c // k for c, k in zip(config.data.crop_size, stem)]
    macs = math.prod(shape) * math.prod(stem) * len(config.data.channels) * dims[0]
    volumes = []
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        if i:
            kernel = last if i == len(dims) - 1 else down
            shape = [s // k for s, k in zip(shape, kernel)]
            macs += math.prod(shape) * math.prod(kernel) * dims[i - 1] * dim
        volumes.append(math.prod(shape))
        macs += depth * volumes[-1] * dim * (343 + 8 * dim)  # depthwise 7^3 + pwconv C -> 4C -> C
    hidden, scales = int(ho.hidden_size), tuple(ho.pool_scales)
    macs += sum(s ** 3 * dims[-1] * hidden for s in scales)  # PSP 1x1 convs on the pooled maps
    macs += volumes[-1] * 27 * (dims[-1] + len(scales) * hidden) * hidden  # PSP bottleneck 3^3
    for i in range(len(dims) - 1):
        macs += volumes[i] * dims[i] * hidden + volumes[i] * 27 * hidden * hidden  # lateral 1x1 + fpn 3^3
    macs += volumes[0] * 27 * len(dims) * hidden * hidden + volumes[0] * hidden * num_classes  # fuse + classifier
    aux = int(ho.auxiliary_channels)
    macs += volumes[2] * 27 * dims[2] * aux + volumes[2] * aux * num_classes  # FCN auxiliary head on stage 3
    return 3 * 2 * macs * config.batch_size


@pytest.mark.parametrize("preset", ["smoke", "default"])
def test_convnext_upernet_count_equals_closed_form(preset):
    """On CPU the "auto" depthwise conv traces as a Toeplitz / matrix product with more MACs than the model
    has; the count must still be the model's 343 MACs per voxel and channel."""
    config = load_config("seg", preset)
    task = get_task(config)
    graph, params, rest = model_graph(task.build_model)
    batch = random_crop_batch(task.make_sample, config.data.crop_size, len(config.data.channels), config.batch_size)
    counted = train_step_flops(graph, params, rest, batch, task, jnp.float32)
    assert counted == pytest.approx(convnext_upernet_step_flops(config, task.num_classes), rel=1e-9)


def test_dinov2_count_equals_vit_formula():
    """Patch embedding, qkv, attention scores and mixing, projection and MLP of every block; the bicubic
    position-table resize (a 5 x 4 grid from the native 4 x 4) is not model FLOPs."""
    config = DinoV2Config(width=32, depth=2, num_heads=2, pos_grid=4, num_registers=4)
    model = DinoV2(config, rngs=nnx.Rngs(0))
    images = jax.ShapeDtypeStruct((3, 70, 56, 3), jnp.float32)
    counted = jaxpr_flops(jax.make_jaxpr(model.forward_features)(images))
    patches, d, hidden = 5 * 4, config.width, config.mlp_hidden
    tokens = 1 + config.num_registers + patches
    per_block = tokens * (3 * d * d + d * d + 2 * d * hidden) + 2 * tokens * tokens * d
    expected = 2 * 3 * (patches * 14 * 14 * 3 * d + config.depth * per_block)
    assert counted == pytest.approx(expected, rel=1e-9)


def test_nested_jaxprs_scan_cond_and_while():
    a = jnp.ones((4, 8))
    b = jnp.ones((8, 16))
    matmul = 2 * 4 * 8 * 16

    def scanned(a, b):
        return jax.lax.scan(lambda carry, _: (carry, jax.checkpoint(jnp.dot)(a, b)), 0.0, None, length=5)[1]

    assert jaxpr_flops(jax.make_jaxpr(scanned)(a, b)) == 5 * matmul

    def branches(pred, a, b):
        return jax.lax.cond(pred, lambda: jnp.dot(a, b) + jnp.dot(a, b), lambda: jnp.dot(a, b))

    assert jaxpr_flops(jax.make_jaxpr(branches)(True, a, b)) == 2 * matmul
    looped = jax.make_jaxpr(lambda a, b: jax.lax.while_loop(lambda x: x.sum() < 0, lambda x: x @ b[:, :8], a))(a, b)
    with pytest.raises(ValueError, match="while loop"):
        jaxpr_flops(looped)


def test_device_peaks():
    def device(kind):
        return types.SimpleNamespace(device_kind=kind)

    assert device_peak_flops(device("NVIDIA H100 80GB HBM3")) == 989e12
    assert device_peak_flops(device("TPU v5 lite")) == 197e12
    assert device_peak_flops(device("TPU v5p")) == 459e12
    assert device_peak_flops(device("cpu")) is None
    assert device_peak_flops(device("cpu"), override_tflops=0.5) == 0.5e12
    with pytest.raises(ValueError, match="logging.peak_tflops"):
        device_peak_flops(device("cpu"), override_tflops=-1.0)
