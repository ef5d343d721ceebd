"""Multi-head softmax attention in the form the target platform runs well.

The plain form writes the [batch, heads, tokens, tokens] score and probability tensors to memory; at ProViCNet's
1029 tokens they dominate a TPU train step's HBM traffic. On TPU targets the same attention runs as a fused Pallas
kernel (splash attention, `jax.experimental.pallas.ops.tpu.splash_attention`: forward and a fused backward) that
keeps the scores in VMEM and writes only q, k, v, the output, their gradients and one log-sum-exp per query row.
The kernel needs the sequence in whole blocks, so queries and keys are zero-padded to a multiple of 128 tokens and
the padded keys are masked out (a static mask: padded queries attend to the real keys and are sliced off).

The form follows `models.cpu_conv.current_target()` (the platform the trace is compiled for, not the host's), so
CPU and "reference" traces (model FLOP counting) keep the plain einsums. A Pallas kernel is one custom call that
XLA's SPMD partitioner cannot split, so on a mesh it runs under `shard_map`, one call per batch shard.

Interface: `dot_product_attention(q, k, v, scale)` on [batch, tokens, heads, head_dim] arrays, and
`fused_attention(..., interpret=True)` to run the TPU kernel in the Pallas interpreter (tests, on CPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from transfer_jax.models.cpu_conv import current_target

# Padded lengths are multiples of _ALIGN; the kernel's query and key blocks are the largest multiple of it that
# divides the padded length, up to _MAX_BLOCK: fewer blocks re-read each key/value block fewer times and leave
# fewer partial query gradients to sum (ProViCNet's 1029 tokens run as one 1152-token block; the score tile,
# 1152² fp32, fits the TPU's VMEM).
_ALIGN = 128
_MAX_BLOCK = 1152


def plain_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q kᵀ · scale) v per head, softmax in fp32; [B, N, H, D] in and out."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """Attention of [B, N, H, D] queries, keys and values (scores scaled by `scale`) in the target's form."""
    platform, mesh = current_target()
    if platform != "tpu":
        return plain_attention(q, k, v, scale)
    return fused_attention(q, k, v, scale, mesh=mesh)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float, *, mesh=None,
                    interpret: bool = False) -> jax.Array:
    """The TPU splash-attention kernel on [B, N, H, D] arrays; on a `mesh`, one kernel per shard of the batch
    (split over all mesh axes, as the batch is). `interpret`: run the kernel in the Pallas interpreter."""
    batch, tokens, heads, _ = q.shape
    kernel = _splash_kernel(tokens, heads, interpret)

    def run(q, k, v):
        padded = -(-tokens // _ALIGN) * _ALIGN
        pad = lambda x: jnp.pad(x.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, padded - tokens), (0, 0)))
        out = jax.vmap(kernel)(pad(q * jnp.asarray(scale, q.dtype)), pad(k), pad(v))
        return out[:, :, :tokens].transpose(0, 2, 1, 3)

    if mesh is None or mesh.devices.size == 1 or batch % mesh.devices.size:
        return run(q, k, v)  # unsharded, or a batch that does not split: XLA runs the kernel on gathered inputs
    spec = P(tuple(mesh.axis_names))
    return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


@functools.lru_cache(maxsize=None)
def _splash_kernel(tokens: int, heads: int, interpret: bool):
    """A splash kernel for `heads` heads over `tokens` tokens padded to whole blocks, the padded keys masked."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    padded = -(-tokens // _ALIGN) * _ALIGN
    block = max(b for b in range(_ALIGN, min(padded, _MAX_BLOCK) + 1, _ALIGN) if padded % b == 0)
    real_keys = np.broadcast_to(np.arange(padded)[None, :] < tokens, (padded, padded))
    # Sequence-minor q, k, v: the kernel takes [head_dim, tokens] tiles, whose lanes are tokens, so a 64-wide head
    # dimension is not padded to a tile's 128 lanes; on ViT-S the compiled step also moves less around the kernel.
    seq_minor = splash.QKVLayout.SEQ_MINOR
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                              block_kv_dkv_compute=block, use_fused_bwd_kernel=True,
                              q_layout=seq_minor, k_layout=seq_minor, v_layout=seq_minor)
    return splash.make_splash_mha(masks.MultiHeadMask([masks.NumpyMask(real_keys)] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)
