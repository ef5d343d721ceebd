"""Write the ProFound parity fixtures under tests/fixtures/profound/ (run with the torch side venv).

    .venv-torch/bin/python scripts/make_parity_fixtures.py            # rewrite the committed fixtures
    .venv-torch/bin/python scripts/make_parity_fixtures.py --full-size-fcmae /tmp/fcmae_tiny.pth
                                                                      # + a full-size random FCMAE checkpoint

The PyTorch modules below are small reference implementations written for this script with the upstream
state_dict key layout and forward semantics (ProFound `demo` branch: `models/convnextv2.py`, `models/util.py`,
`models/upernet_module.py`, `models/classifier.py`, `models/mae.py`; CausalProbing `models/vit.py`; timm's ViT
`Block`). Weights are random and deliberately moved away from their init (LayerNorm/GRN/BatchNorm affine,
BatchNorm running statistics) so every parameter influences the outputs. Reference outputs are computed in float64
from the float32 weights and stored as float32, channels-last (N, D, H, W, C); the input is stored in the upstream
layout (N, C, D, H, W).

Files (all small; the whole folder stays well under 5 MB):

* `inputs.npz`: `image` (2, 3, 16, 32, 32), shared by every model (also a valid `extract` input).
* `conv_classifier.pth.tar` + `conv_classifier_ref.npz`: ConvNeXt-V2 (dims 8,16,24,32; depths 1,1,2,1) +
  classification head (4 classes), saved like upstream `{'model', 'args' (argparse.Namespace), 'epoch'}`.
* `conv_upernet.pth.tar` + `conv_upernet_ref.npz`: the same encoder shape + UPerNet (hidden 8, aux 4, K=1).
* `conv_fcmae.pth` + `conv_fcmae_ref.npz`: an FCMAE pretraining checkpoint in the *sparse* Minkowski key layout
  (derived from a dense encoder by the inverse of upstream's `remap_checkpoint_keys`), with decoder, optimizer,
  scaler and args, and the dense encoder's outputs (final norm at its ones/zeros init, as the converter fills it).
* `vit_mae.pth` + `vit_mae_ref.npz`: MAE ViT (width 24, 4 blocks, 3 heads, patch 4x8x8 on 16x32x32; decoder
  width 12, 1 block, 2 heads): encoder outputs, every block, and one MAE forward with fixed noise.
* `vit_upernet.pth` (a bare state dict) + `vit_upernet_ref.npz`: ViT + ViTAdapter + UPerNet (K=2,
  out_indices 0,1,2,3).
* `vit_classifier.pth.tar` + `vit_classifier_ref.npz`: ViT + classification head (3 classes).
* `reader_dtypes.pth` + `reader_dtypes_ref.npz`: tensors of every dtype the reader supports, with views
  (offset, transposed, sliced) sharing storages.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "profound")

CONV_DIMS = (8, 16, 24, 32)
CONV_DEPTHS = (1, 1, 2, 1)
IMAGE = (16, 32, 32)
VIT = dict(width=24, depth=4, heads=3, patch=(4, 8, 8), dec_width=12, dec_depth=1, dec_heads=2)
UPER = dict(hidden=8, aux=4)


# ----------------------------------------------------------------------------------------------------------------
# ConvNeXt-V2 (dense) and its pieces


class ChannelNorm(nn.Module):
    """LayerNorm over dim 1 with an affine on that dim (upstream `LayerNorm(data_format='channels_first')`); on a
    3-D (N, L, C) input it normalises over L and applies the affine along C (the ViT UPerNet quirk)."""

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if x.dim() == 3:
            return self.weight * y + self.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.weight.view(shape) * y + self.bias.view(shape)


class GRN(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, 1, dim))

    def forward(self, x):  # channels-last (N, D, H, W, C)
        gx = torch.norm(x, p=2, dim=(1, 2, 3), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv3d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 4, 1)
        y = self.pwconv2(self.grn(F.gelu(self.pwconv1(self.norm(y)))))
        return x + y.permute(0, 4, 1, 2, 3)


class ConvNeXtV2(nn.Module):
    def __init__(self, in_chans=3, depths=CONV_DEPTHS, dims=CONV_DIMS):
        super().__init__()
        self.downsample_layers = nn.ModuleList([
            nn.Sequential(nn.Conv3d(in_chans, dims[0], kernel_size=4, stride=4), ChannelNorm(dims[0]))
        ])
        for i in range(3):
            k = 1 if i == 2 else 2  # ProFound: the last downsample is a 1x1x1 stride-1 conv
            self.downsample_layers.append(
                nn.Sequential(ChannelNorm(dims[i]), nn.Conv3d(dims[i], dims[i + 1], kernel_size=k, stride=k)))
        self.stages = nn.ModuleList([nn.Sequential(*[ConvNeXtBlock(d) for _ in range(n)])
                                     for d, n in zip(dims, depths)])
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.embed_dim = dims[-1]

    def forward(self, x, ret_hids=False):
        hids = []
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
            hids.append(x)
        pooled = self.norm(x.mean([-3, -2, -1]))
        return (pooled, hids) if ret_hids else pooled


# ----------------------------------------------------------------------------------------------------------------
# UPerNet


class ConvModule(nn.Module):
    def __init__(self, cin, cout, k, padding=0):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size=k, padding=padding, bias=False)
        self.batch_norm = ChannelNorm(cout)  # a LayerNorm despite its name, as upstream

    def forward(self, x):
        return F.gelu(self.batch_norm(self.conv(x)))


def _resize(x, size):
    return F.interpolate(x, size=size, mode="trilinear", align_corners=False)


class UperHead(nn.Module):
    def __init__(self, in_channels, hidden, out_channels, pool_scales=(1, 2, 3, 6)):
        super().__init__()
        self.pool_scales = pool_scales
        self.classifier = nn.Conv3d(hidden, out_channels, kernel_size=1)
        self.psp_modules = nn.ModuleList([
            nn.Sequential(nn.AdaptiveAvgPool3d(s), ConvModule(in_channels[-1], hidden, 1)) for s in pool_scales])
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * hidden, hidden, 3, padding=1)
        self.lateral_convs = nn.ModuleList([ConvModule(c, hidden, 1) for c in in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(hidden, hidden, 3, padding=1) for _ in in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(in_channels) * hidden, hidden, 3, padding=1)

    def forward(self, feats):
        top = feats[-1]
        psp = [top] + [_resize(m(top), top.shape[2:]) for m in self.psp_modules]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats)]
        laterals.append(self.bottleneck(torch.cat(psp, 1)))
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(l) for conv, l in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        outs = [outs[0]] + [_resize(o, outs[0].shape[2:]) for o in outs[1:]]
        return self.classifier(self.fpn_bottleneck(torch.cat(outs, 1)))


class FCNHead(nn.Module):
    def __init__(self, in_channels, hidden, out_channels, in_index=2):
        super().__init__()
        self.in_index = in_index
        self.convs = nn.Sequential(ConvModule(in_channels[in_index], hidden, 3, padding=1))
        self.classifier = nn.Conv3d(hidden, out_channels, kernel_size=1)

    def forward(self, feats):
        return self.classifier(self.convs(feats[self.in_index]))


class UperNet(nn.Module):
    def __init__(self, encoder, in_channels, out_channels, hidden=UPER["hidden"], aux=UPER["aux"], adapter=None,
                 out_indices=None):
        super().__init__()
        self.encoder = encoder
        self.adapter = adapter
        self.out_indices = out_indices
        self.decode_head = UperHead(in_channels, hidden, out_channels)
        self.auxiliary_head = FCNHead(in_channels, aux, out_channels)
        self.hidden_norm = nn.ModuleList([ChannelNorm(c) for c in in_channels])
        self.record = {}

    def forward(self, x):
        hids = self.encoder(x, ret_hids=True)[-1]
        if self.out_indices:
            hids = [hids[i] for i in self.out_indices]
        hids = [norm(h) for norm, h in zip(self.hidden_norm, hids)]
        if self.adapter is not None:
            hids = self.adapter(hids)
        self.record["levels"] = hids
        logits = _resize(self.decode_head(hids), x.shape[2:])
        if not self.training:
            return logits
        return [logits, _resize(self.auxiliary_head(hids), x.shape[2:])]


class Classifier(nn.Module):
    def __init__(self, encoder, num_classes, bottleneck=256):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(encoder.embed_dim, bottleneck), nn.BatchNorm1d(bottleneck), nn.ReLU(),
                                  nn.Linear(bottleneck, num_classes))

    def forward(self, x):
        out = self.encoder(x)
        if isinstance(out, tuple):
            out = out[0]
        return self.head(out)


# ----------------------------------------------------------------------------------------------------------------
# ViT / MAE


def sincos_table(dim, grid):
    """Upstream's 3-D sin-cos table (scrambled 'xy' meshgrid + plain reshape), with a zero cls row."""
    gd, gh, gw = grid
    mesh = np.meshgrid(np.arange(gd, dtype=np.float32), np.arange(gw, dtype=np.float32),
                       np.arange(gh, dtype=np.float32))
    coords = np.stack(mesh).reshape(3, -1)
    third = dim // 3
    omega = 1.0 / 10000 ** (np.arange(third // 2, dtype=np.float64) / (third / 2.0))
    parts = []
    for axis in range(3):
        angles = np.outer(coords[axis].astype(np.float64), omega)
        parts += [np.sin(angles), np.cos(angles)]
    table = np.concatenate(parts, axis=1)
    return np.concatenate([np.zeros((1, dim)), table], axis=0).astype(np.float32)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
        out = attn.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class ViTBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch, in_chans, dim):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT(nn.Module):
    def __init__(self, img=IMAGE, patch=VIT["patch"], in_chans=3, dim=VIT["width"], depth=VIT["depth"],
                 heads=VIT["heads"]):
        super().__init__()
        self.grid = tuple(i // p for i, p in zip(img, patch))
        self.patch_embed = PatchEmbed(patch, in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_table(dim, self.grid))[None], requires_grad=False)
        self.blocks = nn.ModuleList([ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.embed_dim = dim

    def forward(self, x, ret_hids=False):
        x = self.patch_embed(x) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], 1)
        hids = []
        for blk in self.blocks:
            x = blk(x)
            hids.append(x[:, 1:])
        x = self.norm(x)
        return (x[:, 0], x[:, 1:], hids) if ret_hids else (x[:, 0], x[:, 1:])


class MAE(ViT):
    """Encoder keys of `ViT` plus the decoder keys of upstream `MaskedAutoencoderViT`."""

    def __init__(self, mask_ratio=0.75, **kw):
        super().__init__(**kw)
        dim, dec = VIT["width"], VIT["dec_width"]
        self.mask_ratio = mask_ratio
        self.decoder_embed = nn.Linear(dim, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.decoder_pos_embed = nn.Parameter(torch.from_numpy(sincos_table(dec, self.grid))[None],
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([ViTBlock(dec, VIT["dec_heads"]) for _ in range(VIT["dec_depth"])])
        self.decoder_norm = nn.LayerNorm(dec, eps=1e-6)
        self.decoder_pred = nn.Linear(dec, math.prod(VIT["patch"]) * 3)

    def patchify(self, imgs):
        b, c = imgs.shape[:2]
        (gd, gh, gw), (pd, ph, pw) = self.grid, VIT["patch"]
        x = imgs.reshape(b, c, gd, pd, gh, ph, gw, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
        return x.reshape(b, gd * gh * gw, pd * ph * pw * c)

    def mae_forward(self, imgs, noise, norm_pix):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        n, length, d = x.shape
        keep = int(length * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, d))
        mask = torch.ones(n, length, dtype=x.dtype)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1)
        x = torch.cat([cls, x], 1)
        for blk in self.blocks:
            x = blk(x)
        latent = self.norm(x)
        y = self.decoder_embed(latent)
        tokens = torch.cat([y[:, 1:], self.mask_token.repeat(n, length + 1 - y.shape[1], 1)], 1)
        tokens = torch.gather(tokens, 1, ids_restore[:, :, None].expand(-1, -1, y.shape[2]))
        y = torch.cat([y[:, :1], tokens], 1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            y = blk(y)
        pred = self.decoder_pred(self.decoder_norm(y))[:, 1:]
        target = self.patchify(imgs)
        if norm_pix:
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(-1)
        return (loss * mask).sum() / mask.sum(), pred, mask, ids_restore, latent


class ViTAdapter(nn.Module):
    def __init__(self, dim, grid):
        super().__init__()
        self.grid = grid
        self.fpn1 = nn.Sequential(
            nn.ConvTranspose3d(dim, dim, (1, 2, 2), (1, 2, 2)), nn.BatchNorm3d(dim), nn.GELU(),
            nn.ConvTranspose3d(dim, dim, 2, 2), nn.BatchNorm3d(dim), nn.GELU(),
            nn.ConvTranspose3d(dim, dim, 2, 2))
        self.fpn2 = nn.Sequential(nn.ConvTranspose3d(dim, dim, (1, 2, 2), (1, 2, 2)), nn.BatchNorm3d(dim), nn.GELU(),
                                  nn.ConvTranspose3d(dim, dim, 2, 2))
        self.fpn3 = nn.Sequential(nn.ConvTranspose3d(dim, dim, (1, 2, 2), (1, 2, 2)))
        self.fpn4 = nn.MaxPool3d((2, 1, 1), (2, 1, 1))

    def forward(self, hids):
        maps = [h.reshape(h.shape[0], *self.grid, h.shape[-1]).permute(0, 4, 1, 2, 3) for h in hids]
        return [op(m) for op, m in zip([self.fpn1, self.fpn2, self.fpn3, self.fpn4], maps)]


# ----------------------------------------------------------------------------------------------------------------
# Weights, outputs, files


def perturb(module: nn.Module, gen: torch.Generator) -> None:
    """Move every norm/GRN/BN/token parameter away from its init; give BN non-trivial running statistics."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("pos_embed"):
                continue
            if leaf in ("gamma", "beta") or "token" in leaf:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 and leaf == "weight":
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1 and leaf == "bias":
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.num_batches_tracked.fill_(7)


def last(t: torch.Tensor) -> np.ndarray:
    """float32 numpy, channels moved last for NCDHW maps."""
    t = t.detach()
    if t.dim() == 5:
        t = t.permute(0, 2, 3, 4, 1)
    return t.to(torch.float32).numpy().copy()


def record_blocks(model: nn.Module, block_type, store: dict, prefix: str):
    """Forward hooks that store every `block_type` output under `{prefix}{module name}`."""
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, block_type):
            key = prefix + name.removeprefix("encoder.")
            handles.append(m.register_forward_hook(lambda _m, _i, out, k=key: store.__setitem__(k, out)))
    return handles


def save_checkpoint(path, state_dict, **extra):
    sd = collections.OrderedDict((k, v.detach().to(torch.float32).clone()) for k, v in state_dict.items())
    obj = dict(model=sd, **extra) if extra else sd
    torch.save(obj, path)


def npz(path, **arrays):
    np.savez(path, **{k: np.asarray(v, dtype=np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
                      for k, v in arrays.items()})


def conv_reference(encoder_outputs, hooks_store):
    out = {"pooled": last(encoder_outputs[0])}
    for i, h in enumerate(encoder_outputs[1]):
        out[f"stage{i + 1}"] = last(h)
    for name, v in hooks_store.items():
        out[name] = last(v)
    return out


def make_conv_classifier(gen, image):
    model = Classifier(ConvNeXtV2(), num_classes=4, bottleneck=12)
    perturb(model, gen)
    # The checkpoint holds the float32 weights and the statistics from *before* the training-mode forward.
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model.double()  # in place
    store = {}
    handles = record_blocks(ref, ConvNeXtBlock, store, "block.")
    with torch.no_grad():
        ref.eval()
        enc = ref.encoder(image, ret_hids=True)
        stem = ref.encoder.downsample_layers[0](image)
        logits_eval = ref(image)
        for h in handles:
            h.remove()
        ref.train()
        logits_train = ref(image)
    bn = ref.head[1]
    arrays = conv_reference(enc, store)
    arrays.update(stem=last(stem), logits_eval=last(logits_eval), logits_train=last(logits_train),
                  bn_mean_after_train=last(bn.running_mean), bn_var_after_train=last(bn.running_var))
    return sd, arrays


def make_conv_upernet(gen, image):
    model = UperNet(ConvNeXtV2(), in_channels=list(CONV_DIMS), out_channels=1)
    perturb(model, gen)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model.double()
    with torch.no_grad():
        ref.eval()
        seg_eval = ref(image)
        levels = ref.record["levels"]
        ref.train()
        seg_train, aux_train = ref(image)
    arrays = dict(seg_eval=last(seg_eval), seg_train=last(seg_train), aux_train=last(aux_train))
    arrays.update({f"normed_level{i}": last(l) for i, l in enumerate(levels)})
    return sd, arrays


def dense_to_sparse(dense: dict) -> dict:
    """The FCMAE (Minkowski) layout of a dense encoder state dict: the exact inverse of upstream
    `remap_checkpoint_keys` (kernel offsets with D fastest, ln/linear sub-modules, (1, C) biases and GRN params)."""
    sparse = collections.OrderedDict()
    for key, v in dense.items():
        parts = key.split(".")
        if key.startswith("downsample_layers.0."):
            sparse["encoder." + key] = v
        elif key.startswith("downsample_layers.") and parts[2] == "0":
            sparse["encoder." + ".".join(parts[:3] + ["ln", parts[3]])] = v
        elif key.startswith("downsample_layers.") and parts[2] == "1":
            base = "encoder." + ".".join(parts[:3])
            if parts[3] == "weight":
                o, i, k = v.shape[0], v.shape[1], v.shape[2]
                kernel = v.permute(0, 1, 4, 3, 2).reshape(o, i, k ** 3).permute(2, 1, 0)
                sparse[base + ".kernel"] = kernel[0] if k == 1 else kernel
            else:
                sparse[base + ".bias"] = v.reshape(1, -1)
        elif key.startswith("stages."):
            base = "encoder." + ".".join(parts[:4])
            leaf = parts[4]
            if parts[3] == "dwconv" and leaf == "weight":
                c, k = v.shape[0], v.shape[2]
                sparse[base + ".kernel"] = v.permute(0, 1, 4, 3, 2).reshape(c, k ** 3).t()
            elif parts[3] == "dwconv":
                sparse[base + ".bias"] = v.reshape(1, -1)
            elif parts[3] == "norm":
                sparse[base + ".ln." + leaf] = v
            elif parts[3] in ("pwconv1", "pwconv2"):
                sparse[base + ".linear." + leaf] = v
            elif parts[3] == "grn":
                sparse[base + "." + leaf] = v.reshape(1, -1)
            else:
                raise KeyError(key)
        elif key.startswith("norm."):
            continue  # the sparse pretraining encoder has no final norm
        else:
            raise KeyError(key)
    return sparse


def make_conv_fcmae(gen, image):
    encoder = ConvNeXtV2()
    perturb(encoder, gen)
    with torch.no_grad():  # the pretraining checkpoint lacks the final norm: the converter starts it at 1 / 0
        encoder.norm.weight.fill_(1.0)
        encoder.norm.bias.fill_(0.0)
    dense = {k: v.clone() for k, v in encoder.state_dict().items()}
    sparse = dense_to_sparse(dense)
    dec = 16
    decoder = collections.OrderedDict()
    decoder["mask_token"] = torch.randn(1, dec, 1, 1, 1, generator=gen)
    decoder["proj.weight"] = torch.randn(dec, CONV_DIMS[-1], 1, 1, 1, generator=gen)
    decoder["proj.bias"] = torch.randn(dec, generator=gen)
    for k, v in ConvNeXtBlock(dec).state_dict().items():
        decoder[f"decoder.0.{k}"] = v
    decoder["pred.weight"] = torch.randn(4 * 4 * 4 * 3, dec, 1, 1, 1, generator=gen)
    decoder["pred.bias"] = torch.randn(4 * 4 * 4 * 3, generator=gen)
    sd = collections.OrderedDict(list(sparse.items()) + list(decoder.items()))
    ref = encoder.double()
    store = {}
    handles = record_blocks(ref, ConvNeXtBlock, store, "block.")
    with torch.no_grad():
        enc = ref(image, ret_hids=True)
    for h in handles:
        h.remove()
    return sd, conv_reference(enc, store)


def make_vit_mae(gen, image):
    model = MAE()
    perturb(model, gen)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model.double()
    n_tokens = math.prod(ref.grid)
    noise = torch.rand(image.shape[0], n_tokens, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        cls, tokens, hids = ref(image, ret_hids=True)
        loss, pred, mask, ids_restore, latent = ref.mae_forward(image, noise, norm_pix=False)
        loss_norm_pix, *_ = ref.mae_forward(image, noise, norm_pix=True)
    arrays = dict(cls=last(cls), tokens=last(tokens), noise=last(noise), mask=last(mask),
                  ids_restore=ids_restore.numpy().astype(np.int32), pred=last(pred), latent=last(latent),
                  loss=last(loss), loss_norm_pix=last(loss_norm_pix), pos_embed=last(ref.pos_embed))
    arrays.update({f"block.{i}": last(h) for i, h in enumerate(hids)})
    return sd, arrays


def make_vit_upernet(gen, image):
    vit = ViT()
    model = UperNet(vit, in_channels=[VIT["width"]] * 4, out_channels=2, adapter=ViTAdapter(VIT["width"], vit.grid),
                    out_indices=[0, 1, 2, 3])
    perturb(model, gen)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model.double()
    with torch.no_grad():
        ref.eval()
        seg_eval = ref(image)
        levels = ref.record["levels"]
        ref.train()
        seg_train, aux_train = ref(image)
    # Full-resolution maps are subsampled (every 2nd voxel; levels 0/1 every 4th/2nd) to keep the fixture small.
    arrays = dict(seg_eval=last(seg_eval), seg_train_sub2=last(seg_train)[:, ::2, ::2, ::2],
                  aux_train_sub2=last(aux_train)[:, ::2, ::2, ::2],
                  fpn1_bn1_mean_after_train=last(ref.adapter.fpn1[1].running_mean),
                  fpn1_bn1_var_after_train=last(ref.adapter.fpn1[1].running_var))
    step = {0: 4, 1: 2}
    arrays.update({f"adapter_level{i}_sub{step.get(i, 1)}": last(l)[:, ::step.get(i, 1), ::step.get(i, 1),
                                                                    ::step.get(i, 1)]
                   for i, l in enumerate(levels)})
    return sd, arrays


def make_vit_classifier(gen, image):
    model = Classifier(ViT(), num_classes=3, bottleneck=10)
    perturb(model, gen)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model.double()
    with torch.no_grad():
        ref.eval()
        logits_eval = ref(image)
        ref.train()
        logits_train = ref(image)
    return sd, dict(logits_eval=last(logits_eval), logits_train=last(logits_train))


def make_reader_dtypes(path, ref_path, gen):
    base = torch.randn(5, 6, generator=gen)
    tensors = collections.OrderedDict(
        float32=base,
        transposed=base.t(),  # shares base's storage with permuted strides
        sliced=base[1:4, 2:5],  # storage offset + non-contiguous
        float16=torch.randn(3, 4, generator=gen).half(),
        bfloat16=torch.randn(7, generator=gen).bfloat16(),
        float64=torch.randn(2, 2, generator=gen).double(),
        int64=torch.arange(-3, 9).reshape(3, 4),
        int32=torch.arange(5, dtype=torch.int32),
        uint8=torch.arange(250, 256, dtype=torch.uint8),
        bool=torch.tensor([True, False, True]),
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
        parameter=nn.Parameter(torch.ones(2, 3)),
    )
    torch.save({"state_dict": tensors, "epoch": 11, "note": "dtypes"}, path)
    expected = {k: (v.detach().float() if v.dtype == torch.bfloat16 else v.detach()).numpy() for k, v in
                tensors.items()}
    np.savez(ref_path, **expected)


def make_full_size_fcmae(path, gen):
    """A random ProFound-Conv (Tiny) FCMAE pretraining checkpoint in the sparse layout, like checkpoint-799.pth."""
    dims, depths = (96, 192, 384, 768), (3, 3, 9, 3)
    encoder = ConvNeXtV2(depths=depths, dims=dims)
    with torch.no_grad():
        for p in encoder.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    sparse = dense_to_sparse(encoder.state_dict())
    dec = 512
    extra = collections.OrderedDict(mask_token=torch.zeros(1, dec, 1, 1, 1))
    extra["proj.weight"] = torch.randn(dec, 768, 1, 1, 1, generator=gen) * 0.02
    extra["proj.bias"] = torch.zeros(dec)
    for k, v in ConvNeXtBlock(dec).state_dict().items():
        extra[f"decoder.0.{k}"] = v
    extra["pred.weight"] = torch.randn(16 ** 3 * 3, dec, 1, 1, 1, generator=gen) * 0.02
    extra["pred.bias"] = torch.zeros(16 ** 3 * 3)
    sd = collections.OrderedDict(list(sparse.items()) + list(extra.items()))
    n_values = sum(v.numel() for v in sd.values())
    args = argparse.Namespace(model="convnext", input_size=(64, 224, 224), mask_ratio=0.6, norm_pix_loss=True,
                              epochs=800, blr=1e-3)
    torch.save({"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799, "scaler": {},
                "args": args}, path)
    print(f"wrote {path}: {len(sd)} tensors, {n_values:,} values "
          f"({sum(v.numel() for k, v in sd.items() if k.startswith('encoder.')):,} in the encoder)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=OUT, help="fixture directory (default: tests/fixtures/profound)")
    parser.add_argument("--full-size-fcmae", metavar="PATH",
                        help="also write a full-size random Tiny FCMAE checkpoint here (not a committed fixture)")
    parser.add_argument("--only-full-size", action="store_true", help="write only --full-size-fcmae")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)
    if args.full_size_fcmae:
        make_full_size_fcmae(args.full_size_fcmae, gen)
        if args.only_full_size:
            return
    os.makedirs(args.out, exist_ok=True)
    out = lambda name: os.path.join(args.out, name)  # noqa: E731

    image32 = torch.randn(2, 3, *IMAGE, generator=gen)
    np.savez(out("inputs.npz"), image=image32.numpy())
    image = image32.double()

    sd, ref = make_conv_classifier(gen, image)
    run_args = argparse.Namespace(model="profound_conv", dataset="risk", crop_spatial_size=IMAGE, num_classes=4,
                                  lr=1e-4, layer_decay=np.float64(0.6), seed=np.int64(0))
    save_checkpoint(out("conv_classifier.pth.tar"), sd, args=run_args, epoch=3)
    npz(out("conv_classifier_ref.npz"), **ref)

    sd, ref = make_conv_upernet(gen, image)
    run_args = argparse.Namespace(model="profound_conv", dataset="UCL", out_channels=1, crop_spatial_size=IMAGE)
    save_checkpoint(out("conv_upernet.pth.tar"), sd, args=run_args, epoch=3)
    npz(out("conv_upernet_ref.npz"), **ref)

    sd, ref = make_conv_fcmae(gen, image)
    first = next(iter(sd.values()))
    optimizer = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros_like(first),
                               "exp_avg_sq": torch.zeros_like(first)}},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.05, "params": [0]}]}
    run_args = argparse.Namespace(model="convnext", input_size=IMAGE, mask_ratio=0.6, norm_pix_loss=True,
                                  epochs=800, blr=1e-3)
    save_checkpoint(out("conv_fcmae.pth"), sd, optimizer=optimizer, epoch=799,
                    scaler={"scale": 65536.0, "growth_factor": 2.0}, args=run_args)
    npz(out("conv_fcmae_ref.npz"), **ref)

    sd, ref = make_vit_mae(gen, image)
    run_args = argparse.Namespace(model="mae_vit_base_patch16", input_size=IMAGE, mask_ratio=0.75,
                                  norm_pix_loss=False)
    save_checkpoint(out("vit_mae.pth"), sd, optimizer={"state": {}, "param_groups": []}, epoch=799, args=run_args)
    npz(out("vit_mae_ref.npz"), **ref)

    sd, ref = make_vit_upernet(gen, image)
    save_checkpoint(out("vit_upernet.pth"), sd)  # a bare state dict, no {'model': ...} wrapper
    npz(out("vit_upernet_ref.npz"), **ref)

    sd, ref = make_vit_classifier(gen, image)
    save_checkpoint(out("vit_classifier.pth.tar"), sd, epoch=5)
    npz(out("vit_classifier_ref.npz"), **ref)

    make_reader_dtypes(out("reader_dtypes.pth"), out("reader_dtypes_ref.npz"), gen)

    total = sum(os.path.getsize(out(f)) for f in os.listdir(args.out))
    print(f"wrote {len(os.listdir(args.out))} files to {os.path.abspath(args.out)} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    sys.exit(main())
