"""Build the PyTorch reference fixtures for the ProViCNet port (run with the torch venv, never imported by tests).

    .venv-torch/bin/python scripts/make_provicnet_fixtures.py [--output tests/fixtures/provicnet]

The reference modules below are written from the semantics of facebookresearch/dinov2 (``vision_transformer.py``,
``layers/{patch_embed,attention,block,mlp,layer_scale}.py`` at b8931f7, hub ``dinov2_vits14_reg``:
``init_values=1.0, num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0``) and of
pimed/ProViCNet (``ModelArchitectures/ProViCNet/ProViCNet.py`` at 1b016ac: ``ProViCNet_contrastive``,
``ProViCNet_contrastive_US``, ``conv_head8``, ``ContrastiveLearning_Head``, ``ChannelReducer``, ``FusionModalities``,
``load_partial_weights``). Module and parameter names reproduce the upstream state-dict keys exactly (compare with
``tests/data/provicnet_keys/*.tsv``); sizes are tiny so fixtures stay small:

* ViT: width 32, 2 blocks, 2 heads, patch 14, native position grid 10 (so a 112 input, grid 8, and a 56 input,
  grid 4, exercise the antialiased bicubic *down*-sampling of the table), 4 registers, mlp ratio 4.
* conv_head8 widths 16 / 8, 4 classes; CL head 32 -> 64 -> 64 -> 16 -> 128 (legacy ``weight_g``/``weight_v`` keys).
* TRUS: ChannelReducer 9 -> 3. Fusion: embedding 32, target channels 16 (= the sequence heads' first width, so the
  upstream stream overwrite applies).

Weights are random and deliberately non-trivial (LayerNorm/BatchNorm affine params away from 1/0, LayerScale
gammas spread, BatchNorm running statistics set, a large position table so its resize matters). Everything runs in
float32 on CPU and eval mode. Outputs are written as ``.pth`` state dicts (``torch.save``, zip format) plus ``.npz``
files of inputs and per-layer outputs in PyTorch layouts (NCHW maps, [B, tokens, width] sequences).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TINY_VIT = dict(width=32, depth=2, num_heads=2, patch=14, pos_grid=10, num_registers=4, mlp_ratio=4.0)
HEAD_CHANNELS = (16, 8)
NUM_CLASSES = 4
CL_HEAD = dict(hidden=64, bottleneck=16, out_dim=128, num_layers=3)
TRUS_CHANNELS = 9


# ------------------------------------------------------------------------------------------------------------------
# DINOv2 reference (eval semantics, no masks, no drop path, xformers-free attention)
# ------------------------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    def __init__(self, in_chans, width, patch):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        assert x.shape[2] % self.patch == 0 and x.shape[3] % self.patch == 0
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, H'W', C], row-major grid


class Attention(nn.Module):
    def __init__(self, width, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width, bias=True)
        self.proj = nn.Linear(width, width, bias=True)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in torch.unbind(qkv, 2))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()  # exact erf GELU
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, width, init_values=1.0):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(width))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, width, num_heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads)
        self.ls1 = LayerScale(width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.ls2 = LayerScale(width)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    def __init__(self, width, depth, num_heads, patch, pos_grid, num_registers, mlp_ratio, in_chans=3):
        super().__init__()
        self.patch_size = patch
        self.num_register_tokens = num_registers
        self.patch_embed = PatchEmbed(in_chans, width, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, width))
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, width))
        self.blocks = nn.ModuleList([Block(width, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, width))

    def interpolate_pos_encoding(self, num_tokens, height, width):
        """DINOv2 with interpolate_offset=0: explicit output size, bicubic, antialias=True; identity when equal."""
        npatch = num_tokens - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and height == width:
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, 0], self.pos_embed[:, 1:]
        dim = patch_pos.shape[-1]
        side = int(math.sqrt(n))
        grid = (height // self.patch_size, width // self.patch_size)
        patch_pos = F.interpolate(
            patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2), size=grid, mode="bicubic", antialias=True
        )
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((cls_pos.unsqueeze(0), patch_pos), dim=1)

    def embed(self, x):
        """[cls, patches] + pos; also returns the raw patch embedding for the trace."""
        _, _, height, width = x.shape
        patches = self.patch_embed(x)
        tokens = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), patches), dim=1)
        return tokens + self.interpolate_pos_encoding(tokens.shape[1], height, width), patches

    def prepare_tokens(self, x):
        tokens, _ = self.embed(x)
        regs = self.register_tokens.expand(x.shape[0], -1, -1)
        return torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)


# ------------------------------------------------------------------------------------------------------------------
# ProViCNet reference
# ------------------------------------------------------------------------------------------------------------------


class ConvHead8(nn.Module):
    def __init__(self, width, channels, num_classes):
        super().__init__()
        first, second = channels
        self.segmentation_conv = nn.Sequential(
            nn.Upsample(scale_factor=2),
            nn.Conv2d(width, first, 3, padding=1),
            nn.BatchNorm2d(first),
            nn.ReLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(first, second, 3, padding=1),
            nn.BatchNorm2d(second),
            nn.ReLU(),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(second, num_classes, 3, padding=1),
        )

    def forward(self, x, trace=None, prefix="head"):
        for index, layer in enumerate(self.segmentation_conv):
            x = layer(x)
            if trace is not None:
                trace[f"{prefix}_{index}"] = x
        return x


class ContrastiveLearningHead(nn.Module):
    def __init__(self, in_dim, hidden, bottleneck, out_dim, num_layers, parametrized_weight_norm=False):
        super().__init__()
        layers = [nn.Linear(in_dim, hidden), nn.GELU()]
        for _ in range(num_layers - 2):
            layers += [nn.Linear(hidden, hidden), nn.GELU()]
        layers.append(nn.Linear(hidden, bottleneck))
        self.mlp = nn.Sequential(*layers)
        linear = nn.Linear(bottleneck, out_dim, bias=False)
        if parametrized_weight_norm:
            self.last_layer = nn.utils.parametrizations.weight_norm(linear)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                self.last_layer = nn.utils.weight_norm(linear)  # keys weight_g / weight_v as in the release

    def bottleneck(self, x):
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x):
        return self.last_layer(self.bottleneck(x))


class ChannelReducer(nn.Module):
    def __init__(self, in_channels, out_channels=3):
        super().__init__()
        self.reduce_channels = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x):
        return self.reduce_channels(x)


class ProViCNetReference(nn.Module):
    """``ProViCNet_contrastive`` (reducer_in=None) or ``ProViCNet_contrastive_US`` (reducer_in=9)."""

    def __init__(self, reducer_in=None, with_cl_head=True, parametrized_weight_norm=False, vit=None,
                 head_channels=HEAD_CHANNELS, num_classes=NUM_CLASSES, cl_head=None):
        """The fixture sizes by default; `vit` / `head_channels` / `cl_head` build other sizes (the benchmark)."""
        super().__init__()
        vit = dict(TINY_VIT, **(vit or {}))
        width = vit["width"]
        if reducer_in:
            self.ChannelReducer = ChannelReducer(reducer_in, 3)
        if with_cl_head:
            self.CL_Head = ContrastiveLearningHead(width, parametrized_weight_norm=parametrized_weight_norm,
                                                   **(cl_head or CL_HEAD))
        self.backbone = DinoVisionTransformer(**vit)
        self.head = ConvHead8(width, head_channels, num_classes)
        self.axis_pos = nn.Linear(1, width)
        self.axis_max = nn.Linear(1, width)
        self.width = width

    def prepare_tokens_with_axispos(self, x, pos, trace):
        tokens, patches = self.backbone.embed(x)
        trace["patch_embed"] = patches
        axis_pos = self.axis_pos(pos[:, 0:1]).unsqueeze(1)
        axis_max = self.axis_max(pos[:, 1:2]).unsqueeze(1)
        regs = self.backbone.register_tokens.expand(x.shape[0], -1, -1)
        return torch.cat((tokens[:, :1], regs, axis_pos, axis_max, tokens[:, 1:]), dim=1)

    def forward(self, x, pos=None, trace=None):
        """Returns logits; fills ``trace`` with every stage (PyTorch layouts)."""
        trace = {} if trace is None else trace
        if hasattr(self, "ChannelReducer"):
            x = self.ChannelReducer(x)
            trace["reduced"] = x
        if pos is not None:
            tokens = self.prepare_tokens_with_axispos(x, pos, trace)
            first_patch = 1 + self.backbone.num_register_tokens + 2
        else:
            tokens = self.backbone.prepare_tokens(x)
            first_patch = 1 + self.backbone.num_register_tokens
        trace["tokens"] = tokens
        for index, block in enumerate(self.backbone.blocks):
            tokens = block(tokens)
            trace[f"block_{index}"] = tokens
        normed = self.backbone.norm(tokens)
        trace["final_norm"] = normed
        trace["cls"] = normed[:, 0]
        patch_tokens = normed[:, first_patch:]
        trace["patch_tokens"] = patch_tokens
        grid = (x.shape[2] // self.backbone.patch_size, x.shape[3] // self.backbone.patch_size)
        features = patch_tokens.permute(0, 2, 1).reshape(x.shape[0], self.width, *grid)
        logits = self.head(features, trace)
        trace["logits"] = logits
        return logits


class ModalitySpecificStream(nn.Module):
    def __init__(self, embedding, target_channels):
        super().__init__()
        self.UpsampleModule = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(embedding, target_channels, 3, padding=1),
            nn.BatchNorm2d(target_channels), nn.ReLU(),
        )

    def forward(self, x):
        return self.UpsampleModule(x)


class FusionModalities(nn.Module):
    def __init__(self, embedding, target_channels, num_classes):
        super().__init__()
        self.embedding = embedding
        self.Stream_T2W = ModalitySpecificStream(embedding, target_channels)
        self.Stream_ADC = ModalitySpecificStream(embedding, target_channels)
        self.Stream_DWI = ModalitySpecificStream(embedding, target_channels)
        self.FusionSegmentation = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.Conv2d(3 * target_channels, target_channels, 3, padding=1),
            nn.BatchNorm2d(target_channels), nn.ReLU(),
            nn.Upsample(scale_factor=2), nn.Conv2d(target_channels, num_classes, 3, padding=1),
        )

    def to_map(self, tokens):
        side = int(tokens.shape[1] ** 0.5)
        return tokens.permute(0, 2, 1).reshape(tokens.shape[0], self.embedding, side, side)

    def forward(self, t2w, adc, dwi, trace=None, prefix="fusion"):
        maps = [stream(self.to_map(tokens)) for stream, tokens in
                ((self.Stream_T2W, t2w), (self.Stream_ADC, adc), (self.Stream_DWI, dwi))]
        fused = torch.cat(maps, dim=1)
        if trace is not None:
            for name, value in zip(("T2W", "ADC", "DWI"), maps):
                trace[f"{prefix}_stream_{name}"] = value
            trace[f"{prefix}_concat"] = fused
        return self.FusionSegmentation(fused)


def load_partial_weights(source_sequential, target_stream):
    """Upstream semantics: the first len(target) entries of the source state dict, matched by name."""
    target = target_stream.state_dict()
    source = {k: v for i, (k, v) in enumerate(source_sequential.state_dict().items()) if i < len(target)}
    target_stream.load_state_dict({k: source[k] for k in target if k in source}, strict=True)


# ------------------------------------------------------------------------------------------------------------------
# Random non-trivial weights
# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def randomize_(model: nn.Module, generator: torch.Generator) -> None:
    def randn(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=generator) * std + mean

    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.copy_(randn(module.weight.shape, 0.2, 1.0))
            module.bias.copy_(randn(module.bias.shape, 0.1))
        elif isinstance(module, nn.BatchNorm2d):
            module.weight.copy_(randn(module.weight.shape, 0.2, 1.0))
            module.bias.copy_(randn(module.bias.shape, 0.1))
            module.running_mean.copy_(randn(module.running_mean.shape, 0.2))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=generator)))
        elif isinstance(module, LayerScale):
            module.gamma.copy_(torch.rand(module.gamma.shape, generator=generator) + 0.5)
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and not hasattr(module, "weight_g") and not hasattr(
            module, "parametrizations"
        ):
            fan_in = module.weight[0].numel()
            module.weight.copy_(randn(module.weight.shape, 1.0 / math.sqrt(fan_in)))
            if module.bias is not None:
                module.bias.copy_(randn(module.bias.shape, 0.1))
    for module in model.modules():
        if isinstance(module, DinoVisionTransformer):
            module.cls_token.copy_(randn(module.cls_token.shape, 0.5))
            module.pos_embed.copy_(randn(module.pos_embed.shape, 0.5))
            module.register_tokens.copy_(randn(module.register_tokens.shape, 0.5))
            module.mask_token.copy_(randn(module.mask_token.shape, 0.5))
        if isinstance(module, ContrastiveLearningHead):
            layer = module.last_layer
            if hasattr(layer, "weight_g"):
                layer.weight_g.copy_(torch.rand(layer.weight_g.shape, generator=generator) + 0.5)
                layer.weight_v.copy_(randn(layer.weight_v.shape))
            else:
                layer.parametrizations.weight.original0.copy_(
                    torch.rand(layer.parametrizations.weight.original0.shape, generator=generator) + 0.5
                )
                layer.parametrizations.weight.original1.copy_(randn(layer.parametrizations.weight.original1.shape))
    if isinstance(model, ProViCNetReference):
        # Slice positions are raw values up to ~20-256: keep their tokens O(1).
        model.axis_pos.weight.copy_(randn(model.axis_pos.weight.shape, 0.05))
        model.axis_max.weight.copy_(randn(model.axis_max.weight.shape, 0.02))


def to_numpy(trace: dict, prefix: str = "") -> dict[str, np.ndarray]:
    return {prefix + k: v.detach().numpy().astype(np.float32) for k, v in trace.items()}


def save_state_dict(model: nn.Module, path: str) -> None:
    torch.save(model.state_dict(), path)


# ------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "provicnet"))
    out = os.path.abspath(parser.parse_args().output)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1234)

    # ---- MRI slice model (ProViCNet_contrastive): full trace at 112 (grid 8 from native 10) -------------------
    mri = ProViCNetReference().eval()
    randomize_(mri, gen)
    images = torch.randn(2, 3, 112, 112, generator=gen)
    pos = torch.tensor([[3.0, 20.0], [17.0, 20.0]])
    trace: dict = {}
    mri(images, pos, trace)
    record = {"images": images.numpy(), "slice_position": pos.numpy()}
    record.update(to_numpy(trace))
    nopos: dict = {}
    mri(images, None, nopos)
    record.update(to_numpy({"patch_tokens": nopos["patch_tokens"], "logits": nopos["logits"],
                            "cls": nopos["cls"]}, "nopos_"))
    # Position-table resize on its own: down-sampling, identity, up-sampling and a non-square grid.
    for grid in ((8, 8), (4, 4), (10, 10), (12, 12), (6, 9)):
        table = mri.backbone.interpolate_pos_encoding(1 + grid[0] * grid[1], grid[0] * 14, grid[1] * 14)
        record[f"pos_embed_{grid[0]}x{grid[1]}"] = table.numpy()
    vectors = torch.randn(5, TINY_VIT["width"], generator=gen)
    record["cl_input"] = vectors.numpy()
    record["cl_bottleneck"] = mri.CL_Head.bottleneck(vectors).numpy()
    record["cl_output"] = mri.CL_Head(vectors).numpy()
    save_state_dict(mri, os.path.join(out, "mri_t2.pth"))
    np.savez_compressed(os.path.join(out, "mri_t2_io.npz"), **record)

    # ---- TRUS slice model (ProViCNet_contrastive_US, 9 -> 3 reducer) at 56 (grid 4) -------------------------
    trus = ProViCNetReference(reducer_in=TRUS_CHANNELS).eval()
    randomize_(trus, gen)
    images = torch.randn(2, TRUS_CHANNELS, 56, 56, generator=gen)
    pos = torch.tensor([[0.0, 110.0], [64.0, 110.0]])
    trace = {}
    trus(images, pos, trace)
    record = {"images": images.numpy(), "slice_position": pos.numpy()}
    record.update(to_numpy({k: trace[k] for k in ("reduced", "patch_embed", "tokens", "final_norm",
                                                   "patch_tokens", "cls", "logits")}))
    save_state_dict(trus, os.path.join(out, "trus.pth"))
    np.savez_compressed(os.path.join(out, "trus_io.npz"), **record)

    # ---- a slice model with the new-style weight-norm keys and no extra outputs (key-style coverage) ------------
    parametrized = ProViCNetReference(parametrized_weight_norm=True).eval()
    randomize_(parametrized, gen)
    vectors = torch.randn(3, TINY_VIT["width"], generator=gen)
    save_state_dict(parametrized, os.path.join(out, "mri_parametrized_weight_norm.pth"))
    np.savez_compressed(os.path.join(out, "mri_parametrized_weight_norm_io.npz"),
                        cl_input=vectors.numpy(), cl_output=parametrized.CL_Head(vectors).numpy())

    # ---- mpMRI: ADC and DWI models, fusion with and without the stream overwrite (inputs at 56, grid 4) -------
    sequences = {"T2W": mri}
    for name, file in (("ADC", "mri_adc.pth"), ("DWI", "mri_dwi.pth")):
        model = ProViCNetReference().eval()
        randomize_(model, gen)
        save_state_dict(model, os.path.join(out, file))
        sequences[name] = model
    fusion = FusionModalities(TINY_VIT["width"], HEAD_CHANNELS[0], NUM_CLASSES).eval()
    randomize_(fusion, gen)
    save_state_dict(fusion, os.path.join(out, "fusion.pth"))  # stored stream weights, as in the release
    pos = torch.tensor([[5.0, 20.0], [11.0, 20.0]])
    record = {"slice_position": pos.numpy()}
    tokens = {}
    for name, model in sequences.items():
        images = torch.randn(2, 3, 56, 56, generator=gen)
        trace = {}
        model(images, pos, trace)
        tokens[name] = trace["patch_tokens"]
        record[f"images_{name}"] = images.numpy()
        record[f"tokens_{name}"] = trace["patch_tokens"].numpy()
    trace = {}
    record["logits_stored_streams"] = fusion(tokens["T2W"], tokens["ADC"], tokens["DWI"], trace, "stored").numpy()
    for name, model in sequences.items():
        load_partial_weights(model.head.segmentation_conv, getattr(fusion, f"Stream_{name}").UpsampleModule)
    record["logits"] = fusion(tokens["T2W"], tokens["ADC"], tokens["DWI"], trace, "fusion").numpy()
    record.update(to_numpy({k: v for k, v in trace.items() if k.startswith("fusion_")}))
    np.savez_compressed(os.path.join(out, "fusion_io.npz"), **record)

    # ---- "another model": a bare DINOv2 backbone checkpoint (keys without the backbone. prefix) ---------------
    save_state_dict(mri.backbone, os.path.join(out, "dinov2_backbone_only.pth"))

    config = {"vit": TINY_VIT, "head_channels": HEAD_CHANNELS, "num_classes": NUM_CLASSES, "cl_head": CL_HEAD,
              "trus_channels": TRUS_CHANNELS, "torch": torch.__version__}
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    total = sum(os.path.getsize(os.path.join(out, name)) for name in os.listdir(out))
    print(f"wrote {len(os.listdir(out))} files, {total / 1e6:.2f} MB to {out}")


if __name__ == "__main__":
    main()
