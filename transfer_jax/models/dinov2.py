"""DINOv2 vision transformer (ViT with register tokens and LayerScale) in Flax NNX.

This is the backbone of ProViCNet (``torch.hub.load('facebookresearch/dinov2', 'dinov2_vits14_reg')``), written
from the semantics of ``dinov2/models/vision_transformer.py`` and ``dinov2/layers/*`` (snapshot b8931f7):

* patch embedding: a ``patch x patch`` convolution with stride ``patch`` and bias, no norm;
* tokens: ``[cls, registers..., patches...]``; the position table (native grid ``pos_grid x pos_grid`` + one cls
  entry) is added to cls and patches only, registers get no position;
* pre-norm blocks: ``x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))`` with a fused qkv projection (output rows
  ordered ``[q | k | v]``, head-major inside each third), exact (erf) GELU, LayerNorm eps 1e-6, LayerScale vectors;
* the position table is resized to the input's patch grid on every forward with antialiased bicubic interpolation
  to an explicit output size (the ``_reg`` hub models use ``interpolate_antialias=True, interpolate_offset=0``);
  ``jax.image.resize(..., 'bicubic', antialias=True)`` reproduces ``F.interpolate(mode='bicubic', antialias=True)``
  both for down- and up-sampling. As upstream, the table is used unchanged when the grid already matches.

Layout conventions: images are NHWC ``[B, H, W, C]`` (PyTorch callers transpose from NCHW); patch tokens are
ordered row-major over the patch grid (token ``t = gx * y + x``), exactly like PyTorch's ``flatten(2)`` of the NCHW
conv output, so ``tokens.reshape(B, gy, gx, D)`` is the NHWC feature map.

Attribute names mirror the PyTorch state-dict keys (``blocks[i].attn.qkv``, ``ls1.gamma``, ``patch_embed.proj``...)
so checkpoint conversion is a flat rename table.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from transfer_jax.models.attention import self_attention
from transfer_jax.models.layers import PatchConv, cotangent_barrier, gelu, layer_norm, rematerialised

# DINOv2's timm-style initialisation: truncated normal (std 0.02) for Linear weights and the position table.
_TRUNC_NORMAL_002 = nnx.initializers.truncated_normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
    """Sizes of a DINOv2 ViT. Defaults are ViT-S/14 with 4 registers (``dinov2_vits14_reg``).

    ``pos_grid`` is the side of the *native* position table (518 / 14 = 37); inputs of any multiple of ``patch``
    get the table resized to their own grid.
    """

    width: int = 384
    depth: int = 12
    num_heads: int = 6
    patch: int = 14
    pos_grid: int = 37
    num_registers: int = 4
    mlp_ratio: float = 4.0
    in_channels: int = 3
    layerscale_init: float = 1.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        if self.width % self.num_heads:
            raise ValueError(f"DinoV2Config: width {self.width} is not divisible by num_heads {self.num_heads}")

    @property
    def mlp_hidden(self) -> int:
        # DINOv2 uses int(dim * mlp_ratio) for the hidden width.
        return int(self.width * self.mlp_ratio)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of an input image; raises if the image is not a multiple of the patch size (as upstream)."""
        if height % self.patch or width % self.patch:
            raise ValueError(
                f"input image {height}x{width} is not a multiple of the patch size {self.patch} "
                "(DINOv2 PatchEmbed asserts H % patch == 0 and W % patch == 0)"
            )
        return height // self.patch, width // self.patch


def _linear(in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, kernel_init=_TRUNC_NORMAL_002, dtype=dtype, param_dtype=jnp.float32,
                      rngs=rngs)


class PatchEmbed(nnx.Module):
    """``patch_embed.proj``: [B, H, W, C] -> [B, gy * gx, width] (row-major over the grid)."""

    def __init__(self, config: DinoV2Config, *, dtype=None, rngs: nnx.Rngs):
        p = config.patch
        self.proj = PatchConv(config.in_channels, config.width, (p, p), dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        features = self.proj(images)
        batch, grid_y, grid_x, width = features.shape
        return features.reshape(batch, grid_y * grid_x, width)


class Attention(nnx.Module):
    """Multi-head self-attention with DINOv2's fused ``qkv`` projection and ``proj`` output, both with bias."""

    def __init__(self, config: DinoV2Config, *, dtype=None, rngs: nnx.Rngs):
        self.num_heads = config.num_heads
        self.qkv = _linear(config.width, 3 * config.width, dtype=dtype, rngs=rngs)
        self.proj = _linear(config.width, config.width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self_attention(x, self.qkv, self.proj, self.num_heads)


class Mlp(nnx.Module):
    """``fc1 -> exact GELU -> fc2``."""

    def __init__(self, config: DinoV2Config, *, dtype=None, rngs: nnx.Rngs):
        self.fc1 = _linear(config.width, config.mlp_hidden, dtype=dtype, rngs=rngs)
        self.fc2 = _linear(config.mlp_hidden, config.width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class LayerScale(nnx.Module):
    """Per-channel residual scale ``gamma`` (PyTorch key ``ls{1,2}.gamma``)."""

    def __init__(self, width: int, init_value: float):
        self.gamma = nnx.Param(jnp.full((width,), init_value, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block with LayerScale (DINOv2 ``NestedTensorBlock`` at inference, drop path 0)."""

    def __init__(self, config: DinoV2Config, *, dtype=None, rngs: nnx.Rngs):
        self.norm1 = layer_norm(config.width, epsilon=config.norm_eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.ls1 = LayerScale(config.width, config.layerscale_init)
        self.norm2 = layer_norm(config.width, epsilon=config.norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(config, dtype=dtype, rngs=rngs)
        self.ls2 = LayerScale(config.width, config.layerscale_init)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = cotangent_barrier(x)
        x = cotangent_barrier(x + self.ls1(self.attn(self.norm1(x))))
        return x + self.ls2(self.mlp(self.norm2(x)))


class BackboneFeatures(NamedTuple):
    """Outputs of a ViT feature pass (all ``[B, ..., width]``; the ``*_tokens`` after the final LayerNorm).

    ``extra_tokens`` are tokens that sit between the registers and the patches (ProViCNet's two slice-position
    tokens); empty (``[B, 0, width]``) for plain DINOv2.
    """

    cls_token: jax.Array  # [B, width]
    register_tokens: jax.Array  # [B, num_registers, width]
    extra_tokens: jax.Array  # [B, num_extra, width]
    patch_tokens: jax.Array  # [B, gy * gx, width], row-major over the patch grid
    prenorm_tokens: jax.Array  # [B, all tokens, width], input of the final norm


class DinoV2(nnx.Module):
    """DINOv2 ViT backbone. Parameter names follow the PyTorch keys ``backbone.*``.

    ``mask_token`` is kept as a parameter so converted checkpoints round-trip every key, but it is only used by
    DINOv2's masked-image pre-training (``prepare_tokens_with_masks(x, masks)``), never at inference or here.
    ``dtype`` is the compute dtype (e.g. bfloat16; parameters stay fp32); ``None`` computes in fp32.
    """

    def __init__(self, config: DinoV2Config, *, dtype=None, rngs: nnx.Rngs):
        self.config = config
        width = config.width
        self.patch_embed = PatchEmbed(config, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, width), jnp.float32))
        self.pos_embed = nnx.Param(_TRUNC_NORMAL_002(rngs.params(), (1, 1 + config.pos_grid**2, width), jnp.float32))
        self.register_tokens = nnx.Param(
            1e-6 * jax.random.normal(rngs.params(), (1, config.num_registers, width), jnp.float32)
        )
        self.mask_token = nnx.Param(jnp.zeros((1, width), jnp.float32))
        self.blocks = nnx.List([Block(config, dtype=dtype, rngs=rngs) for _ in range(config.depth)])
        self.norm = layer_norm(width, epsilon=config.norm_eps, dtype=dtype, rngs=rngs)

    def interpolated_pos_embed(self, grid_y: int, grid_x: int) -> jax.Array:
        """Position table for a ``grid_y x grid_x`` patch grid: ``[1, 1 + grid_y * grid_x, width]``.

        The cls entry is kept; the native ``pos_grid x pos_grid`` patch table is resized with antialiased bicubic
        to the explicit output size (rows = image height), recomputed on every call so it stays differentiable.
        """
        table = self.pos_embed[...]
        native = self.config.pos_grid
        if (grid_y, grid_x) == (native, native):
            return table
        width = table.shape[-1]
        patch_table = table[0, 1:].reshape(native, native, width)
        resized = jax.image.resize(patch_table, (grid_y, grid_x, width), method="bicubic", antialias=True)
        return jnp.concatenate([table[:, :1], resized.reshape(1, grid_y * grid_x, width)], axis=1)

    def embed_patches_with_positions(self, images: jax.Array) -> jax.Array:
        """``[cls, patches] + pos``: [B, 1 + gy * gx, width] (registers not yet inserted)."""
        batch, height, width_px, _ = images.shape
        grid_y, grid_x = self.config.patch_grid(height, width_px)
        patches = self.patch_embed(images)
        cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype), (batch, 1, self.config.width))
        tokens = jnp.concatenate([cls, patches], axis=1)
        return tokens + self.interpolated_pos_embed(grid_y, grid_x).astype(patches.dtype)

    def registers(self, batch: int, dtype=jnp.float32) -> jax.Array:
        return jnp.broadcast_to(self.register_tokens[...].astype(dtype),
                                (batch, self.config.num_registers, self.config.width))

    def prepare_tokens(self, images: jax.Array) -> jax.Array:
        """Plain DINOv2 token sequence ``[cls, registers, patches]``: [B, 1 + R + gy * gx, width]."""
        tokens = self.embed_patches_with_positions(images)
        return jnp.concatenate([tokens[:, :1], self.registers(images.shape[0], tokens.dtype), tokens[:, 1:]], axis=1)

    def run_blocks(self, tokens: jax.Array, remat: bool = False, remat_policy: str = "nothing_saveable") -> jax.Array:
        """The blocks; with `remat` each block's activations are recomputed in the backward pass, except those that
        `remat_policy` (layers.REMAT_POLICIES) saves."""
        for block in self.blocks:
            tokens = rematerialised(block, tokens, remat_policy) if remat else block(tokens)
        return tokens

    def split_normed(self, prenorm: jax.Array, num_extra: int) -> BackboneFeatures:
        """Final LayerNorm, then split ``[cls, registers, extra..., patches]``."""
        normed = self.norm(prenorm)
        first_patch = 1 + self.config.num_registers + num_extra
        return BackboneFeatures(
            cls_token=normed[:, 0],
            register_tokens=normed[:, 1 : 1 + self.config.num_registers],
            extra_tokens=normed[:, 1 + self.config.num_registers : first_patch],
            patch_tokens=normed[:, first_patch:],
            prenorm_tokens=prenorm,
        )

    def forward_features(self, images: jax.Array) -> BackboneFeatures:
        """DINOv2 ``forward_features`` (no masks): images NHWC -> normed cls / register / patch tokens."""
        return self.split_normed(self.run_blocks(self.prepare_tokens(images)), num_extra=0)

    def __call__(self, images: jax.Array) -> jax.Array:
        """DINOv2 ``forward`` at inference with its Identity head: the normed cls token [B, width]."""
        return self.forward_features(images).cls_token
