"""ProFound-ViT: the 3-D MAE vision transformer (upstream `models/mae.py`, encoder-only `models/vit.py` of the
sibling CausalProbing repo) and its MAE decoder, masking, patchify and loss for pretraining.

Layouts and conventions:

* Input volumes are channels-last (N, D, H, W, C); channel order T2, DWI, ADC. The size must equal
  `ViTConfig.img_size` (upstream's patch embedding is strict and the position table is tied to the grid).
* Patch embedding is a Conv3d with kernel = stride = patch; tokens are flattened in D, H, W raster order (the
  same order as torch's `flatten(2)` on NCDHW).
* `pos_embed` (1, 1 + T, C) is fixed (not trained) but stored in the checkpoint; it is kept in a `Buffer` variable
  (not an `nnx.Param`, so optimisers leave it alone) and loaded from the checkpoint. For random init,
  `sincos_pos_embed_3d` reproduces upstream's numpy generator bit-for-bit, including its scrambled grid (numpy
  `meshgrid(d, w, h)` with 'xy' indexing followed by a plain reshape), and the zero cls row.
* Blocks are timm's pre-norm `Block`: LN(eps 1e-6) -> fused qkv attention (rows of the qkv kernel are
  [q | k | v], each head-major) -> residual, LN -> MLP (exact GELU) -> residual; no layer-scale.
* `ProFoundViT.__call__` mirrors upstream `forward(ret_hids=True)`: normed cls, normed patch tokens, and every
  block's output tokens (cls removed, not normed). `hidden_states` picks `ViTConfig.out_indices` for UPerNet.
* MAE patches are flattened (pd, ph, pw, C) with C fastest, patches in D, H, W raster order; masking keeps the
  tokens with the smallest uniform noise; the loss is the per-patch MSE averaged over masked patches, with
  optional per-patch normalisation by mean and *unbiased* variance (+1e-6).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from transfer_jax.models.layers import PatchConv, check_remat_policy, gelu, layer_norm, rematerialised

__all__ = [
    "ViTConfig", "MAEDecoderConfig", "Buffer", "ViTOutput", "MAEOutput", "ProFoundViT", "MAEDecoder", "MAE",
    "sincos_pos_embed_3d", "patchify", "unpatchify", "random_masking", "mae_loss", "layer_id",
]


def _tuple_fields(cls, values: dict):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown fields {unknown}; expected a subset of {sorted(known)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    img_size: tuple[int, int, int] = (64, 256, 256)
    patch_size: tuple[int, int, int] = (16, 32, 32)
    in_channels: int = 3
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    # Block outputs handed to dense heads (sibling `build_segment.py`: UPerNet takes blocks 3, 5, 7, 11).
    out_indices: tuple[int, ...] = (3, 5, 7, 11)
    dtype: str = "float32"
    remat: bool = False  # recompute each block's activations in the backward pass (nnx.remat): memory for FLOPs
    remat_policy: str = "nothing_saveable"  # with remat: what a block still saves (layers.REMAT_POLICIES)

    def __post_init__(self):
        check_remat_policy(self.remat_policy)
        bad = [(s, p) for s, p in zip(self.img_size, self.patch_size) if s % p]
        if bad or len(self.img_size) != 3 or len(self.patch_size) != 3:
            raise ValueError(f"ViTConfig: img_size {self.img_size} must be a multiple of patch_size "
                             f"{self.patch_size} on each of the 3 axes")
        if self.width % self.num_heads:
            raise ValueError(f"ViTConfig: width {self.width} is not divisible by num_heads {self.num_heads}")
        if any(not 0 <= i < self.depth for i in self.out_indices):
            raise ValueError(f"ViTConfig: out_indices {self.out_indices} must lie in [0, depth={self.depth})")

    @property
    def grid_size(self) -> tuple[int, int, int]:
        return tuple(s // p for s, p in zip(self.img_size, self.patch_size))

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid_size)

    @classmethod
    def from_dict(cls, values: dict) -> "ViTConfig":
        return _tuple_fields(cls, values)


@dataclasses.dataclass(frozen=True)
class MAEDecoderConfig:
    width: int = 384
    depth: int = 8
    num_heads: int = 16
    mlp_ratio: float = 4.0
    layer_norm_eps: float = 1e-6
    mask_ratio: float = 0.75
    norm_pix_loss: bool = False

    @classmethod
    def from_dict(cls, values: dict) -> "MAEDecoderConfig":
        return _tuple_fields(cls, values)


class Buffer(nnx.Variable):
    """A fixed array stored with the weights (a torch buffer / `requires_grad=False` parameter); not trained."""


# --------------------------------------------------------------------------------------------------------------
# Fixed 3-D sin-cos position embedding


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension per axis, got {dim}")
    # float64 frequencies (numpy default), float32 positions: upstream's einsum promotes to float64.
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions.reshape(-1).astype(np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_pos_embed_3d(embed_dim: int, grid_size: Sequence[int], cls_token: bool = True) -> np.ndarray:
    """Upstream's fixed position table, (1 + D*H*W, embed_dim) float32 (row 0 = zeros for the cls token).

    The coordinate grid is built as numpy's `meshgrid(d, w, h)` ('xy' indexing, so arrays of shape (W, D, H))
    and then *reshaped*, not transposed, to (D, H, W). The three channel thirds therefore encode scrambled
    coordinates (for grid (4, 8, 8), token (d, h, w) gets h mod 4, 2d + h // 4 and w); the checkpoint holds the
    same scrambled table, so we reproduce it instead of "fixing" it.
    """
    if embed_dim % 3:
        raise ValueError(f"3-D sin-cos embedding needs embed_dim divisible by 3, got {embed_dim}")
    gd, gh, gw = (int(g) for g in grid_size)
    d = np.arange(gd, dtype=np.float32)
    h = np.arange(gh, dtype=np.float32)
    w = np.arange(gw, dtype=np.float32)
    # 'xy' meshgrid of (d, w, h): output axis 0 follows w, axis 1 follows d, axis 2 follows h.
    coords = np.stack([
        np.broadcast_to(d[None, :, None], (gw, gd, gh)),
        np.broadcast_to(w[:, None, None], (gw, gd, gh)),
        np.broadcast_to(h[None, None, :], (gw, gd, gh)),
    ]).reshape(3, gd * gh * gw)
    third = embed_dim // 3
    table = np.concatenate([_sincos_1d(third, coords[i]) for i in range(3)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return table.astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Transformer parts (timm Block layout)


def _xavier_linear(in_f: int, out_f: int, *, use_bias: bool = True, dtype, rngs: nnx.Rngs) -> nnx.Linear:
    # MAE initialises every Linear with xavier_uniform and zero bias (following the JAX ViT).
    return nnx.Linear(in_f, out_f, use_bias=use_bias, kernel_init=nnx.initializers.xavier_uniform(),
                      bias_init=nnx.initializers.zeros_init(), dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention with one fused `qkv` projection (torch rows [q | k | v], head-major)."""

    def __init__(self, width: int, num_heads: int, *, qkv_bias: bool, dtype, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = _xavier_linear(width, 3 * width, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = _xavier_linear(width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim ** -0.5, k)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        return self.proj(out)


class Mlp(nnx.Module):
    def __init__(self, width: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = _xavier_linear(width, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = _xavier_linear(hidden, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool, eps: float, dtype,
                 rngs: nnx.Rngs):
        self.norm1 = layer_norm(width, epsilon=eps, dtype=dtype, rngs=rngs)
        self.attn = Attention(width, num_heads, qkv_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(width, epsilon=eps, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(width, int(width * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = patch, then flatten the (D', H', W') grid to tokens in raster order."""

    def __init__(self, config: ViTConfig, *, dtype, rngs: nnx.Rngs):
        patch = tuple(config.patch_size)
        # MAE initialises the patch projection like a Linear on the flattened patch (xavier on (C, in*prod(p))).
        fan_in = config.in_channels * math.prod(patch)
        limit = math.sqrt(6.0 / (fan_in + config.width))
        self.proj = PatchConv(
            config.in_channels, config.width, patch,
            kernel_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -limit, limit),
            bias_init=nnx.initializers.zeros_init(), dtype=dtype, rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.proj(x)
        return y.reshape(y.shape[0], -1, y.shape[-1])


class ViTOutput(NamedTuple):
    cls: jax.Array  # (N, C) cls token after the final norm (what the classification head reads)
    tokens: jax.Array  # (N, T, C) patch tokens after the final norm
    hidden_states: tuple[jax.Array, ...]  # every block's output tokens (N, T, C), cls removed, not normed


class ProFoundViT(nnx.Module):
    """The encoder-only ViT (sibling `models/vit.py`); state names mirror the torch keys."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.remat = config.remat  # a plain attribute: the evaluation graph turns it off (train/state.py)
        dtype = jnp.dtype(config.dtype)
        self.patch_embed = PatchEmbed(config, dtype=dtype, rngs=rngs)
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, config.width), jnp.float32))
        self.pos_embed = Buffer(jnp.asarray(sincos_pos_embed_3d(config.width, config.grid_size))[None])
        self.blocks = nnx.List([
            Block(config.width, config.num_heads, config.mlp_ratio, qkv_bias=config.qkv_bias,
                  eps=config.layer_norm_eps, dtype=dtype, rngs=rngs)
            for _ in range(config.depth)
        ])
        self.norm = layer_norm(config.width, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)

    @property
    def feature_channels(self) -> tuple[int, ...]:
        return (self.config.width,) * len(self.config.out_indices)

    def _check_input(self, x: jax.Array) -> None:
        expected = (*self.config.img_size, self.config.in_channels)
        if x.ndim != 5 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ProFoundViT expects (N, {', '.join(map(str, expected))}) channels-last volumes (the "
                             f"position table is tied to img_size {self.config.img_size}); got {x.shape}")

    def embed_patches(self, x: jax.Array) -> jax.Array:
        """Patch tokens plus their position embedding, without the cls token: (N, T, C)."""
        self._check_input(x)
        tokens = self.patch_embed(x)
        return tokens + self.pos_embed[...][:, 1:].astype(tokens.dtype)

    def prepend_cls(self, tokens: jax.Array) -> jax.Array:
        cls = (self.cls_token[...] + self.pos_embed[...][:, :1]).astype(tokens.dtype)
        return jnp.concatenate([jnp.broadcast_to(cls, (tokens.shape[0], 1, cls.shape[-1])), tokens], axis=1)

    def run_blocks(self, x: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Blocks on a cls-first sequence; returns the normed sequence and each block's output without cls."""
        hidden = []
        for block in self.blocks:
            x = rematerialised(block, x, self.config.remat_policy) if self.remat else block(x)
            hidden.append(x[:, 1:])
        return self.norm(x), tuple(hidden)

    def __call__(self, x: jax.Array) -> ViTOutput:
        normed, hidden = self.run_blocks(self.prepend_cls(self.embed_patches(x)))
        return ViTOutput(cls=normed[:, 0], tokens=normed[:, 1:], hidden_states=hidden)

    def hidden_states(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """Block outputs at `config.out_indices` (token arrays), the levels a UPerNet (with adapter) consumes."""
        hidden = self(x).hidden_states
        return tuple(hidden[i] for i in self.config.out_indices)


def layer_id(path: tuple, depth: int) -> int:
    """Layer index for layer-wise lr decay of a parameter path inside the encoder (BEiT / MAE fine-tuning, the
    sibling's `param_groups_lrd`): the embeddings (cls token, position table, patch projection) are layer 0,
    block i is layer i + 1, everything after the blocks (the final norm) is layer depth + 1, which keeps the
    full learning rate."""
    head = str(path[0]) if path else ""
    if head in ("cls_token", "pos_embed", "patch_embed"):
        return 0
    if head == "blocks":
        return int(path[1]) + 1
    return depth + 1


# --------------------------------------------------------------------------------------------------------------
# MAE pretraining parts


def patchify(images: jax.Array, patch_size: Sequence[int]) -> jax.Array:
    """(N, D, H, W, C) -> (N, T, pd*ph*pw*C): patches in D, H, W raster order, each flattened (pd, ph, pw, C)."""
    n, d, h, w, c = images.shape
    pd, ph, pw = patch_size
    x = images.reshape(n, d // pd, pd, h // ph, ph, w // pw, pw, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(n, (d // pd) * (h // ph) * (w // pw), pd * ph * pw * c)


def unpatchify(patches: jax.Array, patch_size: Sequence[int], grid_size: Sequence[int], channels: int) -> jax.Array:
    """Inverse of `patchify` -> (N, D, H, W, C). (Upstream hard-codes 3 channels; here `channels` is explicit.)"""
    n = patches.shape[0]
    pd, ph, pw = patch_size
    gd, gh, gw = grid_size
    x = patches.reshape(n, gd, gh, gw, pd, ph, pw, channels)
    x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(n, gd * pd, gh * ph, gw * pw, channels)


def random_masking(tokens: jax.Array, noise: jax.Array, mask_ratio: float):
    """Per-sample random masking by sorting noise (small noise = kept).

    tokens (N, T, C), noise (N, T) -> (kept tokens (N, keep, C), mask (N, T) with 1 = removed, ids_restore (N, T)).
    keep = int(T * (1 - mask_ratio)), as upstream.
    """
    n, length, width = tokens.shape
    keep = int(length * (1 - mask_ratio))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    kept = jnp.take_along_axis(tokens, ids_shuffle[:, :keep, None], axis=1)
    mask = (ids_restore >= keep).astype(tokens.dtype)
    return kept, mask, ids_restore


def mae_loss(images: jax.Array, pred: jax.Array, mask: jax.Array, patch_size: Sequence[int],
             norm_pix_loss: bool) -> jax.Array:
    """Mean over masked patches of the per-patch MSE between `pred` (N, T, P) and the patchified images."""
    target = patchify(images, patch_size).astype(jnp.float32)
    if norm_pix_loss:
        mean = jnp.mean(target, axis=-1, keepdims=True)
        var = jnp.var(target, axis=-1, keepdims=True, ddof=1)  # torch.Tensor.var is unbiased
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    per_patch = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=-1)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAEDecoder(nnx.Module):
    """Light MAE decoder: embed -> insert mask tokens -> + fixed position table -> blocks -> norm -> pixels."""

    def __init__(self, encoder_config: ViTConfig, config: MAEDecoderConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(encoder_config.dtype)
        self.config = config
        self.decoder_embed = _xavier_linear(encoder_config.width, config.width, dtype=dtype, rngs=rngs)
        self.mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, config.width), jnp.float32))
        self.decoder_pos_embed = Buffer(jnp.asarray(sincos_pos_embed_3d(config.width, encoder_config.grid_size))[None])
        self.decoder_blocks = nnx.List([
            Block(config.width, config.num_heads, config.mlp_ratio, qkv_bias=True, eps=config.layer_norm_eps,
                  dtype=dtype, rngs=rngs)
            for _ in range(config.depth)
        ])
        self.decoder_norm = layer_norm(config.width, epsilon=config.layer_norm_eps, dtype=dtype, rngs=rngs)
        patch_values = math.prod(encoder_config.patch_size) * encoder_config.in_channels
        self.decoder_pred = _xavier_linear(config.width, patch_values, dtype=dtype, rngs=rngs)

    def __call__(self, latent: jax.Array, ids_restore: jax.Array) -> jax.Array:
        """latent (N, 1 + keep, C_enc) cls first, ids_restore (N, T) -> predicted patches (N, T, P)."""
        x = self.decoder_embed(latent)
        n, length = ids_restore.shape
        mask_tokens = jnp.broadcast_to(self.mask_token[...].astype(x.dtype),
                                       (n, length + 1 - x.shape[1], x.shape[-1]))
        shuffled = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
        unshuffled = jnp.take_along_axis(shuffled, ids_restore[:, :, None], axis=1)
        x = jnp.concatenate([x[:, :1], unshuffled], axis=1) + self.decoder_pos_embed[...].astype(x.dtype)
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


class MAEOutput(NamedTuple):
    loss: jax.Array
    pred: jax.Array  # (N, T, P) predicted (possibly normalised) patch pixels
    mask: jax.Array  # (N, T), 1 = removed
    ids_restore: jax.Array


class MAE(nnx.Module):
    """Masked autoencoder: `encoder` (ProFoundViT) + `decoder` (MAEDecoder); torch keys without prefixes."""

    def __init__(self, encoder_config: ViTConfig, decoder_config: MAEDecoderConfig, *, rngs: nnx.Rngs):
        self.encoder = ProFoundViT(encoder_config, rngs=rngs)
        self.decoder = MAEDecoder(encoder_config, decoder_config, rngs=rngs)

    def forward_encoder(self, images: jax.Array, noise: jax.Array):
        ratio = self.decoder.config.mask_ratio
        kept, mask, ids_restore = random_masking(self.encoder.embed_patches(images), noise, ratio)
        latent, _ = self.encoder.run_blocks(self.encoder.prepend_cls(kept))
        return latent, mask, ids_restore

    def __call__(self, images: jax.Array, *, key: Optional[jax.Array] = None,
                 noise: Optional[jax.Array] = None) -> MAEOutput:
        """images (N, D, H, W, C). Pass a PRNG `key` (uniform noise is drawn) or the `noise` (N, T) itself."""
        if (key is None) == (noise is None):
            raise ValueError("MAE needs exactly one of key= or noise=")
        if noise is None:
            noise = jax.random.uniform(key, (images.shape[0], self.encoder.config.num_patches))
        latent, mask, ids_restore = self.forward_encoder(images, noise)
        pred = self.decoder(latent, ids_restore)
        loss = mae_loss(images, pred, mask, self.encoder.config.patch_size, self.decoder.config.norm_pix_loss)
        return MAEOutput(loss=loss, pred=pred, mask=mask, ids_restore=ids_restore)
