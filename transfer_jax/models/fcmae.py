"""ProFound-Conv pretraining: FCMAE (fully convolutional masked autoencoder) of the 3-D ConvNeXt-V2.

Upstream (`models/fcmae.py`, spec `profound.md` §3 and the §10 addendum) runs the encoder as sparse
MinkowskiEngine convolutions on the visible sites only. Here the same computation is emulated densely: the
visibility mask, nearest-upsampled from the patch grid to each stage's resolution, is applied after the stem
LayerNorm, after each downsample LayerNorm (at the previous stage's resolution) and conv, after each depthwise
conv, after GELU, after GRN and after each residual add, so no masked site ever contributes to a visible one; and
GRN, which on the sparse tensor of a whole batch takes its L2 norm over every visible site of every sample, is
batch-pooled here too (the fine-tuning encoder's GRN stays per sample). Drop path is not used in pretraining
(upstream pretrains with rate 0); the encoder's `drop_path_rate` must be 0.

Masking: per sample, `int(L * (1 - mask_ratio))` of the L patches of the final-stage grid are kept, chosen by
sorting noise (`profound_vit.random_masking`); the patch size is the encoder's total stride (16 for ProFound-Conv).
A `key` draws uniform noise where upstream draws Gaussian: any i.i.d. continuous noise ranks into the same uniformly
random subset, so only the individual draws differ. With `remat` in the encoder config each masked block is
recomputed in the backward pass (under the encoder's `remat_policy`), as in the fine-tuning forward.

Decoder (dense, as upstream): `proj` 1x1x1 conv to `decoder_dim`, masked sites replaced by the learned
`mask_token`, `decoder_depth` ConvNeXt-V2 blocks, `pred` 1x1x1 conv to patch_volume x C values per site, read as
patches in D, H, W raster order each flattened (pd, ph, pw, C). Loss: per-patch MSE against the (optionally
per-patch normalised) image patches, averaged over masked patches (`profound_vit.mae_loss`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from transfer_jax.models.convnext import Block, ConvNeXtConfig, ConvNeXtV2, trunc_normal
from transfer_jax.models.layers import gelu, remat_variants
from transfer_jax.models.profound_vit import mae_loss, random_masking


@dataclasses.dataclass(frozen=True)
class FCMAEConfig:
    mask_ratio: float = 0.6
    decoder_dim: int = 512
    decoder_depth: int = 1
    norm_pix_loss: bool = False

    def __post_init__(self):
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"FCMAEConfig: mask_ratio must be in [0, 1), got {self.mask_ratio}")


class FCMAEOutput(NamedTuple):
    loss: jax.Array
    pred: jax.Array  # (N, L, P) predicted (possibly normalised) patch voxels
    mask: jax.Array  # (N, L), 1 = hidden


def patch_mask(noise: jax.Array, mask_ratio: float) -> jax.Array:
    """(N, L) noise -> (N, L) mask, 1 = hidden: the `int(L * (1 - ratio))` smallest noise values are kept."""
    # The noise doubles as a one-channel token so the MAE's masking rule is shared, not restated.
    _, mask, _ = random_masking(noise[..., None].astype(jnp.float32), noise, mask_ratio)
    return mask


def _upsample(visible: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """(N, gd, gh, gw) patch-grid visibility -> (N, d, h, w, 1) at a stage resolution (nearest)."""
    out = visible
    for axis, size in enumerate(shape, start=1):
        factor, remainder = divmod(size, out.shape[axis])
        if remainder:
            raise ValueError(f"stage size {shape} is not a multiple of the mask grid {visible.shape[1:]}")
        out = jnp.repeat(out, factor, axis=axis)
    return out[..., None]


def pooled_grn(grn, x: jax.Array, visible: jax.Array) -> jax.Array:
    """GRN whose L2 norm runs over the visible sites of the whole batch (MinkowskiGRN on a batched sparse tensor).

    `x` is zero at hidden sites, so summing over every site of every sample is the sum over the visible ones.
    """
    x32 = x.astype(jnp.float32)
    gx = jnp.sqrt(jnp.sum(jnp.square(x32), axis=tuple(range(x.ndim - 1)), keepdims=True))
    nx = gx / (jnp.mean(gx, axis=-1, keepdims=True) + 1e-6)
    out = grn.gamma[...] * (x32 * nx) + grn.beta[...] + x32
    return (out * visible).astype(x.dtype)


def _masked_block(block: Block, x: jax.Array, visible: jax.Array) -> jax.Array:
    y = block.dwconv(x) * visible
    y = gelu(block.pwconv1(block.norm(y))) * visible
    y = pooled_grn(block.grn, y, visible)
    y = block.pwconv2(y)
    return (x + y) * visible


_REMAT_MASKED_BLOCK = remat_variants(_masked_block)


def masked_stages(encoder: ConvNeXtV2, images: jax.Array, visible: jax.Array) -> tuple[jax.Array, ...]:
    """The four stage maps of the sparse (masked) encoder forward; hidden sites are zero.

    `visible` (N, gd, gh, gw): 1 where the patch is kept, on the final-stage grid.
    """
    x = images
    stages = []
    for stage, (downsample, blocks) in enumerate(zip(encoder.downsample_layers, encoder.stages)):
        if stage == 0:
            conv, norm = downsample
            x = norm(conv(x))
        else:
            norm, conv = downsample
            x = conv(norm(x) * _upsample(visible, x.shape[1:4]))
        here = _upsample(visible, x.shape[1:4])
        x = x * here
        for block in blocks:
            masked_block = _REMAT_MASKED_BLOCK[encoder.config.remat_policy] if encoder.remat else _masked_block
            x = masked_block(block, x, here)
        stages.append(x)
    return tuple(stages)


class FCMAE(nnx.Module):
    """`encoder` (ConvNeXtV2, its parameters are the fine-tuning encoder's) + the FCMAE decoder."""

    def __init__(self, encoder_config: ConvNeXtConfig, config: FCMAEConfig, *, rngs: nnx.Rngs):
        if encoder_config.drop_path_rate:
            raise ValueError("FCMAE pretrains without drop path: set the encoder's drop_path_rate to 0 "
                             f"(got {encoder_config.drop_path_rate})")
        self.config = config
        self.encoder = ConvNeXtV2(encoder_config, rngs=rngs)
        dtype = jnp.dtype(encoder_config.dtype)
        self.patch_size = tuple(encoder_config.total_stride)
        self.in_channels = encoder_config.in_channels
        init = dict(kernel_init=trunc_normal(0.02), bias_init=nnx.initializers.zeros_init(), dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)
        self.proj = nnx.Linear(encoder_config.dims[-1], config.decoder_dim, **init)
        self.mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (config.decoder_dim,), jnp.float32))
        self.decoder = nnx.List([
            Block(config.decoder_dim, 0.0, dtype=dtype, rngs=rngs, depthwise_impl=encoder_config.depthwise_impl)
            for _ in range(config.decoder_depth)])
        self.pred = nnx.Linear(config.decoder_dim, math.prod(self.patch_size) * self.in_channels, **init)

    def grid_size(self, images: jax.Array) -> tuple[int, int, int]:
        bad = [s for s, p in zip(images.shape[1:4], self.patch_size) if s % p]
        if images.ndim != 5 or bad or images.shape[-1] != self.in_channels:
            raise ValueError(f"FCMAE expects (N, D, H, W, {self.in_channels}) with D, H, W multiples of the patch size "
                             f"{self.patch_size}; got {images.shape}")
        return tuple(s // p for s, p in zip(images.shape[1:4], self.patch_size))

    def __call__(self, images: jax.Array, *, key: Optional[jax.Array] = None,
                 noise: Optional[jax.Array] = None) -> FCMAEOutput:
        """images (N, D, H, W, C). Pass a PRNG `key` (uniform noise is drawn) or the `noise` (N, L) itself."""
        if (key is None) == (noise is None):
            raise ValueError("FCMAE needs exactly one of key= or noise=")
        grid = self.grid_size(images)
        length = math.prod(grid)
        if noise is None:
            noise = jax.random.uniform(key, (images.shape[0], length))
        mask = patch_mask(noise, self.config.mask_ratio)
        hidden = mask.reshape((images.shape[0], *grid, 1)).astype(images.dtype)
        latent = masked_stages(self.encoder, images, 1.0 - hidden[..., 0])[-1]
        x = self.proj(latent)
        x = x * (1.0 - hidden) + self.mask_token[...].astype(x.dtype) * hidden
        for block in self.decoder:
            x = block(x)
        pred = self.pred(x).reshape(images.shape[0], length, -1)
        loss = mae_loss(images, pred, mask, self.patch_size, self.config.norm_pix_loss)
        return FCMAEOutput(loss=loss, pred=pred, mask=mask)
