"""The attention forms (transfer_jax/models/attention.py): the fused TPU kernel against the plain einsums, and the
form each target platform traces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transfer_jax.models.attention import dot_product_attention, fused_attention, plain_attention
from transfer_jax.models.cpu_conv import target_mesh, target_platform
from transfer_jax.models.dinov2 import DinoV2, DinoV2Config
from transfer_jax.train.mesh import batch_sharding, create_mesh, replicated

# 21 tokens: padded to one 128-token block, 107 padded keys masked. ViT head_dim.
BATCH, TOKENS, HEADS, HEAD_DIM = 2, 21, 2, 64


def _qkv_and_cotangent():
    keys = jax.random.split(jax.random.key(0), 4)
    return [jax.random.normal(k, (BATCH, TOKENS, HEADS, HEAD_DIM), jnp.float32) for k in keys]


def test_fused_kernel_matches_plain_attention_forward_and_gradient():
    """The TPU kernel, run in the Pallas interpreter, on a length that is not a whole block."""
    q, k, v, cotangent = _qkv_and_cotangent()
    scale = HEAD_DIM ** -0.5
    fused = lambda q, k, v: fused_attention(q, k, v, scale, interpret=True)
    plain = lambda q, k, v: plain_attention(q, k, v, scale)
    np.testing.assert_allclose(fused(q, k, v), plain(q, k, v), atol=2e-5)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2))(q, k, v) for f in (fused, plain)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_cpu_and_reference_targets_trace_the_plain_form():
    q, k, v, _ = _qkv_and_cotangent()
    want = plain_attention(q, k, v, 0.125)
    for platform in ("cpu", "reference"):
        with target_platform(platform):
            np.testing.assert_array_equal(jax.jit(dot_product_attention, static_argnums=3)(q, k, v, 0.125), want)


def _lowered_vit_s(mesh) -> str:
    """One ViT-S/14 block (with registers) on 8 images of 28 x 28 (9 tokens), lowered for `mesh`: the text."""
    graph, params = nnx.split(DinoV2(DinoV2Config(depth=1), dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)), params)
    images = jax.ShapeDtypeStruct((8, 28, 28, 3), jnp.bfloat16, sharding=batch_sharding(mesh))
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(nnx.merge(graph, p)(x).astype(jnp.float32))))
    with target_mesh(mesh):
        return grad.lower(params, images)


def test_tpu_lowering_of_vit_s_attention_uses_the_fused_kernel_and_cpu_lowering_does_not():
    pytest.importorskip("libtpu")
    from transfer_jax import aot

    tpu = _lowered_vit_s(create_mesh(devices=aot.topology_devices("v5e:2x2")))
    cpu = _lowered_vit_s(create_mesh(devices=jax.devices()[:1]))
    assert "tpu_custom_call" in tpu.as_text()
    assert "tpu_custom_call" not in cpu.as_text()
    # The kernel runs per batch shard, not on gathered inputs; its traffic is what the roofline adds to XLA's.
    compiled = tpu.compile().as_text()
    assert "all-gather" not in compiled
    per_tensor = 2 * 6 * 128 * HEAD_DIM * 2  # 2 images per chip, 6 heads, 9 tokens padded to 128, bf16
    assert aot.kernel_bytes(compiled) >= 11 * per_tensor  # q, k, v -> out; q, k, v, d out -> dq, dk, dv
    assert aot.kernel_bytes(cpu.compile().as_text()) == 0
