"""Build the end-to-end prediction fixture for ProViCNet from the upstream code itself (torch venv only).

    git clone https://github.com/pimed/ProViCNet /src/ProViCNet            # at 1b016ac
    git clone https://github.com/facebookresearch/dinov2 /src/dinov2       # at b8931f7
    .venv-torch/bin/pip install torch numpy SimpleITK==2.3.1 albumentations==1.4.7 pandas nibabel icecream
    .venv-torch/bin/python scripts/make_provicnet_e2e_fixture.py --provicnet /src/ProViCNet --dinov2 /src/dinov2

Nothing of upstream is copied: both repositories are put on ``sys.path`` and their modules are imported. The
pieces upstream's inference needs but that are not installed here (``torchvision``, ``timm`` and the LoRA / base-ViT
baselines ``ProViCNet.py`` imports without using them for ``ProViCNet_contrastive``) are replaced by empty modules.
Two upstream names are re-pointed so that a small, random model can be built offline:

* ``torch.hub.load('facebookresearch/dinov2', name)`` (network) -> dinov2's own ``DinoVisionTransformer`` with the
  hub's ``dinov2_vits14_reg`` settings (img_size 518 -> a 37 x 37 position table, patch 14, 4 registers,
  LayerScale 1.0, antialiased position interpolation, offset 0) but width 32, depth 2, 2 heads;
* ``ContrastiveLearning_Head(in_dim=384, out_dim=65536)`` -> the same class with the model's width and a small
  head (hidden 64, bottleneck 16, out 128), so the release's key layout stays at a fraction of its size.

The weights are randomised away from their initial values (norms, LayerScale, BatchNorm statistics, slice-position
layers, a larger last conv) so the probabilities differ clearly between classes, pixels and slice positions.

The case: slices ``CASE_SLICES`` of the repository's sample (tests/data/prostate_mri_sample), written as NIfTI with
the affine moved accordingly. The reference is upstream's inference path on it for the ADC model (ADC holds many
zero voxels, which the intensity normalisation must treat as upstream does): ``US_MRI_Generator`` (gland z-score,
448 resize, 3-slice stacks with its edge rule) -> ``collate_prostate_position_CS`` (slice positions) ->
``tensor_shuffle(shuffle=False)`` -> ``ProViCNet_contrastive(Image, Posit)`` -> softmax over the 4 classes, output
slot k on slice k of the T2 grid (as upstream's ``saveData`` writes it).

Outputs in ``--output`` (default tests/fixtures/provicnet_e2e): the case files and ``manifest.csv``, ``adc.pth``
(the release's state-dict layout), ``reference.npz`` with ``probabilities`` [Z, 256 / STRIDE, 256 / STRIDE, 4]
(every STRIDE-th row and column; float32), ``slice_means`` [Z, 4] (each slice's mean probability over the whole
256 x 256 plane), ``positions`` [Z, 2] and ``input_means`` [Z, 3] (mean of each input channel at 448 x 448).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import types
from functools import partial

import nibabel as nib
import numpy as np
import torch

CASE_SLICES = (5, 11)  # [start, stop) of the sample's slices: gland on all six, lesion on 6..10
STRIDE = 4
WIDTH, DEPTH, HEADS = 32, 2, 2
SEQUENCE = "adc"
FILES = {"t2": "sample_t2.nii.gz", "adc": "sample_adc.nii.gz", "dwi": "sample_dwi.nii.gz",
         "gland_mask": "sample_mask.nii.gz", "lesion_mask": "sample_lesions.nii.gz"}


def write_case(sample: str, output: str) -> dict[str, str]:
    """The sample's slices CASE_SLICES as NIfTI files in `output` (same dtype and header, affine moved)."""
    start, stop = CASE_SLICES
    paths = {}
    for role, name in FILES.items():
        image = nib.load(os.path.join(sample, name))
        cut = image.slicer[:, :, start:stop]
        path = os.path.join(output, f"case_{role}.nii.gz")
        nib.save(cut, path)
        paths[role] = path
    with open(os.path.join(output, "manifest.csv"), "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["case_id", "t2", "adc", "dwi", "gland_mask", "lesion_mask", "split"])
        writer.writerow(["sample"] + [os.path.basename(paths[r]) for r in FILES] + ["test"])
    return paths


def import_upstream(provicnet: str, dinov2: str):
    """Upstream's model module and data generator, importable offline (see the module docstring)."""
    for name in ("timm", "torchvision", "ProViCNet.ModelArchitectures.lora", "ProViCNet.ModelArchitectures.base_vit"):
        try:
            __import__(name)
        except Exception:  # noqa: BLE001 - not installed, or needs what is not installed
            stub = types.ModuleType(name)
            stub._LoRA_qkv_timm = stub.ViT = stub.transforms = None
            sys.modules[name] = stub
    sys.path[:0] = [os.path.abspath(provicnet), os.path.abspath(dinov2)]
    from ProViCNet.ModelArchitectures.ProViCNet import ProViCNet as model_module
    from ProViCNet.util_functions import Prostate_DataGenerator as data_module
    from ProViCNet.util_functions import train_functions
    from dinov2.layers import MemEffAttention
    from dinov2.layers.block import NestedTensorBlock
    from dinov2.models.vision_transformer import DinoVisionTransformer

    def small_dinov2(repo, name):
        assert repo == "facebookresearch/dinov2" and name == "dinov2_vits14_reg", (repo, name)
        return DinoVisionTransformer(
            img_size=518, patch_size=14, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=4,
            init_values=1.0, block_chunks=0, num_register_tokens=4, interpolate_antialias=True,
            interpolate_offset=0.0, block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention))

    head_class = model_module.ContrastiveLearning_Head
    model_module.load = small_dinov2
    model_module.dino_backbones["dinov2_s_reg"]["embedding_size"] = WIDTH
    model_module.ContrastiveLearning_Head = lambda **kw: head_class(
        in_dim=WIDTH, out_dim=128, use_bn=kw["use_bn"], norm_last_layer=kw["norm_last_layer"], hidden_dim=64,
        bottleneck_dim=16)
    return model_module, data_module, train_functions


def randomise(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Move every parameter and BatchNorm statistic away from its initial value, deterministically."""
    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=generator) * std + mean

    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(normal(tensor.shape, 0.2, 1.0).abs() + 0.3)
            elif name.endswith("running_mean"):
                tensor.copy_(normal(tensor.shape, 0.3))
            elif name.split(".")[-2].startswith("norm"):  # LayerNorms
                tensor.copy_(normal(tensor.shape, 0.2, 1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("gamma"):
                tensor.copy_(normal(tensor.shape, 0.3, 1.0))
            elif name.startswith(("axis_pos", "axis_max")):
                tensor.copy_(normal(tensor.shape, 2.0))
            elif name.endswith("attn.qkv.weight"):  # sharper attention, so two position tokens among 1031 count
                tensor.copy_(normal(tensor.shape, 0.4))
            elif name.startswith("head.segmentation_conv.9"):
                tensor.copy_(normal(tensor.shape, 0.5))
            elif name.endswith("pos_embed") or name.endswith(("cls_token", "register_tokens")):
                tensor.copy_(normal(tensor.shape, 0.5))
            elif name.startswith("head.segmentation_conv.") and name.endswith("weight"):
                tensor.copy_(normal(tensor.shape, 1.0 / np.sqrt(tensor[0].numel())))
            elif tensor.ndim >= 1:
                tensor.add_(normal(tensor.shape, 0.02))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provicnet", required=True, help="checkout of pimed/ProViCNet (1b016ac)")
    parser.add_argument("--dinov2", required=True, help="checkout of facebookresearch/dinov2 (b8931f7)")
    parser.add_argument("--sample", default="tests/data/prostate_mri_sample")
    parser.add_argument("--output", default="tests/fixtures/provicnet_e2e")
    args = parser.parse_args()
    os.makedirs(args.output, exist_ok=True)
    torch.manual_seed(0)
    np.random.seed(0)
    paths = write_case(args.sample, args.output)
    model_module, data_module, train_functions = import_upstream(args.provicnet, args.dinov2)

    model = model_module.ProViCNet_contrastive(num_classes=4)
    randomise(model, torch.Generator().manual_seed(1))
    model.eval()
    torch.save(model.state_dict(), os.path.join(args.output, f"{SEQUENCE}.pth"))

    generator = data_module.US_MRI_Generator(
        imageFileName=[paths[SEQUENCE]], glandFileName=[paths["gland_mask"]], cancerFileName=[paths["lesion_mask"]],
        modality="MRI", cancerTo2=False, Augmentation=False, img_size=448)
    images, labels, positions = data_module.collate_prostate_position_CS([generator[0]])
    images, labels, positions = train_functions.tensor_shuffle(images, labels, "cpu", pos=positions, shuffle=False)
    with torch.no_grad():
        probabilities = torch.softmax(model(images, positions), dim=1).permute(0, 2, 3, 1).numpy()
        shifted = torch.softmax(model(images, positions + torch.tensor([1.0, 0.0])), dim=1).permute(0, 2, 3, 1)
    np.savez_compressed(
        os.path.join(args.output, "reference.npz"),
        probabilities=probabilities[:, ::STRIDE, ::STRIDE].astype(np.float32),
        slice_means=probabilities.mean(axis=(1, 2)).astype(np.float32),
        positions=positions.numpy().astype(np.float32),
        input_means=images.mean(dim=(2, 3)).numpy().astype(np.float32),
        stride=np.int32(STRIDE))
    spread = probabilities.std(axis=(0, 1, 2))
    moved = np.abs(shifted.numpy() - probabilities).max()
    print(f"probabilities {probabilities.shape}, per-class std {np.round(spread, 3)}, "
          f"max change when every slice index moves by one: {moved:.3f}")
    print("positions", positions.numpy().tolist())


if __name__ == "__main__":
    main()
