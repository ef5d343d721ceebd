"""The attention forms (transfer_jax/models/attention.py): the fused TPU kernel against the plain einsums, and the
form each target platform traces."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from transfer_jax.models.attention import fused_self_attention, self_attention
from transfer_jax.models.cpu_conv import target_mesh, target_platform
from transfer_jax.models.dinov2 import DinoV2, DinoV2Config
from transfer_jax.train.mesh import batch_sharding, create_mesh, replicated

# 21 tokens: padded to one 128-token block, 107 padded keys masked. ViT head_dim.
BATCH, TOKENS, HEADS, HEAD_DIM = 2, 21, 2, 64
WIDTH = HEADS * HEAD_DIM


def _projections_and_tokens():
    rngs = nnx.Rngs(0)
    qkv, proj = nnx.Linear(WIDTH, 3 * WIDTH, rngs=rngs), nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    for linear in (qkv, proj):  # biases that are not zero, so their placement is checked too
        linear.bias[...] = 0.1 * jax.random.normal(rngs.params(), linear.bias[...].shape)
    keys = jax.random.split(jax.random.key(1), 2)
    x, cotangent = (jax.random.normal(k, (BATCH, TOKENS, WIDTH), jnp.float32) for k in keys)
    return qkv, proj, x, cotangent


def _plain(qkv, proj, x):
    with target_platform("reference"):
        return self_attention(x, qkv, proj, HEADS)


def _fused(qkv, proj, x):
    return fused_self_attention(x, qkv, proj, HEADS, interpret=True)


def test_fused_form_matches_the_plain_form_forward_and_gradient():
    """The TPU form (head-major projections around the kernel, run in the Pallas interpreter) on a length that is
    not a whole block, against the plain einsums: outputs, and gradients of the input and both projections."""
    qkv, proj, x, cotangent = _projections_and_tokens()
    np.testing.assert_allclose(_fused(qkv, proj, x), _plain(qkv, proj, x), atol=2e-5)

    graph, state = nnx.split((qkv, proj))

    def grads(form):
        loss = lambda state, x: jnp.sum(form(*nnx.merge(graph, state), x) * cotangent)
        return jax.grad(loss, argnums=(0, 1))(state, x)

    got, want = grads(_fused), grads(_plain)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, atol=5e-5)


def test_plain_form_is_the_pytorch_split_of_the_fused_projection():
    """qkv output features [q | k | v], head-major inside each third: the reshape(B, N, 3, heads, head_dim) split."""
    qkv, proj, x, _ = _projections_and_tokens()
    split = qkv(x).reshape(BATCH, TOKENS, 3, HEADS, HEAD_DIM)
    q, k, v = (split[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
    weights = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) * HEAD_DIM**-0.5, axis=-1)
    want = proj((weights @ v).transpose(0, 2, 1, 3).reshape(BATCH, TOKENS, WIDTH))
    for platform in ("cpu", "reference"):
        with target_platform(platform):
            got = jax.jit(lambda x: self_attention(x, qkv, proj, HEADS))(x)
        np.testing.assert_allclose(got, want, atol=1e-5)


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
