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

On TPU targets the projections around the kernel take the kernel's layout too: the tokens are padded once, before
the fused qkv projection, which writes q, k and v head-major ([batch, heads, tokens, head_dim], the layout the
kernel reads) straight from one einsum, and the output projection contracts heads and head_dim of the kernel's
output in place. Projecting to [batch, tokens, 3, heads, head_dim] and transposing and padding each of q, k, v
around the kernel costs copies of each in both passes: compiled for v5e, a ViT-S/14 block at 1029 tokens (20
images, forward and backward) moves 4.60 GB that way and 3.89 GB this way.

Interface: `self_attention(x, qkv, proj, num_heads)`, a transformer's attention from its two `nnx.Linear`
projections, and `fused_self_attention(..., interpret=True)` to run the TPU form in the Pallas interpreter (tests,
on CPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from transfer_jax.models.cpu_conv import current_target

# Padded lengths are multiples of _ALIGN; the kernel's query and key blocks are the largest multiple of it that
# divides the padded length, up to _MAX_BLOCK: fewer blocks re-read each key/value block fewer times and leave
# fewer partial query gradients to sum (ProViCNet's 1029 tokens run as one 1152-token block; the score tile,
# 1152² fp32, fits the TPU's VMEM).
_ALIGN = 128
_MAX_BLOCK = 1152
# Chips whose VMEM cannot hold a 1152-token block's fused backward (on v4 the compile asks for 18 MiB of its 16):
# their blocks stay at 384 tokens. v5e, v5p and v6e compile the 1152-token block.
_SMALL_VMEM_CHIPS = ("TPU v2", "TPU v3", "TPU v4")
_SMALL_VMEM_MAX_BLOCK = 384


def plain_attention(q: jax.Array, k: jax.Array, v: jax.Array, scale: float) -> jax.Array:
    """softmax(q kᵀ · scale) v per head, softmax in fp32; [B, N, H, D] in and out."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def self_attention(x: jax.Array, qkv: nnx.Linear, proj: nnx.Linear, num_heads: int) -> jax.Array:
    """softmax(q kᵀ / √head_dim) v of [B, N, width] tokens, projected by `qkv` (output features ordered
    [q | k | v], head-major inside each third, as PyTorch's reshape(B, N, 3, heads, head_dim) splits them) and
    then by `proj`; in the target's form."""
    batch, tokens, width = x.shape
    head_dim = width // num_heads
    platform, mesh = current_target()
    if platform != "tpu":
        # [B, N, 3, heads, head_dim]: the split PyTorch does with reshape(B, N, 3, heads, C // heads).
        split = qkv(x).reshape(batch, tokens, 3, num_heads, head_dim)
        q, k, v = split[:, :, 0], split[:, :, 1], split[:, :, 2]
        return proj(plain_attention(q, k, v, head_dim**-0.5).reshape(batch, tokens, width))
    return fused_self_attention(x, qkv, proj, num_heads, mesh=mesh)


def fused_self_attention(x: jax.Array, qkv: nnx.Linear, proj: nnx.Linear, num_heads: int, *, mesh=None,
                         interpret: bool = False) -> jax.Array:
    """`self_attention`'s TPU form: tokens padded to whole kernel blocks, q, k, v projected head-major by one einsum,
    the splash kernel (per batch shard on a `mesh`), the output projected from head-major. `interpret`: run the
    kernel in the Pallas interpreter."""
    batch, tokens, width = x.shape
    head_dim = width // num_heads
    dtype = _compute_dtype(x, qkv)
    padded = _padded_length(tokens)
    x = jnp.pad(x.astype(dtype), ((0, 0), (0, padded - tokens), (0, 0)))
    w_in = qkv.kernel[...].astype(dtype).reshape(width, 3, num_heads, head_dim)
    b_in = qkv.bias[...].astype(dtype).reshape(3, 1, num_heads, 1, head_dim)
    q, k, v = jnp.einsum("bnw,wthd->tbhnd", x, w_in) + b_in
    kernel = _splash_kernel(tokens, num_heads, interpret, _max_block(mesh))
    out = _run_per_shard(kernel, q * jnp.asarray(head_dim**-0.5, dtype), k, v, mesh)
    w_out = proj.kernel[...].astype(dtype).reshape(num_heads, head_dim, width)
    return jnp.einsum("bhnd,hdw->bnw", out[:, :, :tokens], w_out) + proj.bias[...].astype(dtype)


def _compute_dtype(x: jax.Array, linear: nnx.Linear):
    """The dtype `linear(x)` computes in: its own `dtype`, else the promotion of the input and the kernel."""
    return linear.dtype or jnp.promote_types(x.dtype, linear.kernel[...].dtype)


def _padded_length(tokens: int) -> int:
    return -(-tokens // _ALIGN) * _ALIGN


def _max_block(mesh) -> int:
    """The longest kernel block the VMEM of the mesh's chips holds (the default without a mesh)."""
    kind = mesh.devices.flat[0].device_kind if mesh is not None else ""
    return _SMALL_VMEM_MAX_BLOCK if kind.startswith(_SMALL_VMEM_CHIPS) else _MAX_BLOCK


def _run_per_shard(kernel, q: jax.Array, k: jax.Array, v: jax.Array, mesh) -> jax.Array:
    """`kernel` on each image of [B, H, N_padded, D] q, k, v; on a mesh, one call per shard of the batch."""
    run = jax.vmap(kernel)
    if mesh is None or mesh.devices.size == 1 or q.shape[0] % mesh.devices.size:
        return run(q, k, v)  # unsharded, or a batch that does not split: XLA runs the kernel on gathered inputs
    spec = P(tuple(mesh.axis_names))
    return jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


@functools.lru_cache(maxsize=None)
def _splash_kernel(tokens: int, heads: int, interpret: bool, max_block: int = _MAX_BLOCK):
    """A splash kernel for `heads` heads over `tokens` tokens padded to whole blocks of at most `max_block`, the
    padded keys masked."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    padded = _padded_length(tokens)
    block = max(b for b in range(_ALIGN, min(padded, max_block) + 1, _ALIGN) if padded % b == 0)
    real_keys = np.broadcast_to(np.arange(padded)[None, :] < tokens, (padded, padded))
    # Sequence-minor q, k, v: the kernel takes [head_dim, tokens] tiles, whose lanes are tokens, so a 64-wide head
    # dimension is not padded to a tile's 128 lanes; on ViT-S the compiled step also moves less around the kernel.
    seq_minor = splash.QKVLayout.SEQ_MINOR
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                              block_kv_dkv_compute=block, use_fused_bwd_kernel=True,
                              q_layout=seq_minor, k_layout=seq_minor, v_layout=seq_minor)
    return splash.make_splash_mha(masks.MultiHeadMask([masks.NumpyMask(real_keys)] * heads), block_sizes=sizes,
                                  head_shards=1, q_seq_shards=1, interpret=interpret)
