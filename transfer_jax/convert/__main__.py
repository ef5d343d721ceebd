"""Convert a released PyTorch checkpoint into a transfer_jax artifact (Orbax state + model.json), without torch.

    python -m transfer_jax.convert profound --checkpoint=checkpoint-799.pth --output=artifacts/profound_conv
    python -m transfer_jax.convert profound --checkpoint=profound_vit_checkpoint-799.pth \\
        --output=artifacts/profound_vit --variant=vit
    python -m transfer_jax.convert provicnet --checkpoint=T2_best.pth --output=artifacts/provicnet_t2
    python -m transfer_jax.convert provicnet --checkpoint=mpMRI_Fusion_best.pth --output=artifacts/fusion \\
        --t2=T2_best.pth --adc=ADC_best.pth --dwi=DWI_best.pth

profound: the FCMAE (ProFound-Conv) and MAE (ProFound-ViT) pretraining checkpoints and the fine-tuned
classification / UPerNet checkpoints (`best.pth.tar`). provicnet: the five released ProViCNet files (T2/ADC/DWI/TRUS
slice models, mpMRI fusion), the kind inferred from the keys. Sizes come from the weights. Each prints what was
converted, dropped and initialised; on failure it prints every problem at once and exits with status 1.
`python -m transfer_jax.convert profound --help` lists a converter's flags.
"""
from __future__ import annotations

import os
import sys
import textwrap
import time

from transfer_jax.cli import ArgumentParser

DESCRIPTIONS = {
    "profound": "Convert a ProFound checkpoint (.pth / .pth.tar / .safetensors: ProFound-Conv FCMAE, ProFound-ViT "
                "MAE, or a fine-tuned classification / UPerNet checkpoint); sizes are inferred from the weights.",
    "provicnet": "Convert a released ProViCNet checkpoint (T2/ADC/DWI/TRUS_best.pth or mpMRI_Fusion_best.pth); the "
                 "kind is inferred from the keys, the sizes from the shapes. The fusion needs the three sequence "
                 "checkpoints because upstream inference overwrites each stream's first conv + BatchNorm with that "
                 "sequence model's head (transfer_jax/convert/provicnet.py).",
}


def add_profound_flags(parser) -> None:
    parser.add_argument("--variant", choices=("conv", "vit"), help="assert the backbone family (default: detect)")
    parser.add_argument("--with_decoder", action="store_true",
                        help="MAE (ViT) pretraining checkpoints: keep the decoder (to continue pretraining)")
    parser.add_argument("--img_size", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="ViT input size (default: inferred from the stored position table)")
    parser.add_argument("--num_heads", type=int, help="ViT attention heads (default: 12 for width 768)")
    parser.add_argument("--decoder_num_heads", type=int, help="MAE decoder attention heads (default: 16)")
    parser.add_argument("--out_indices", type=int, nargs=4, metavar="I",
                        help="ViT blocks feeding UPerNet (default: 3 5 7 11 for 12 blocks)")


def add_provicnet_flags(parser) -> None:
    from transfer_jax.convert.provicnet import DEFAULT_HEAD_DIM, SEQUENCE_FILES

    parser.add_argument("--num_heads", type=int, default=None,
                        help=f"attention heads (not visible in the shapes; default width // {DEFAULT_HEAD_DIM})")
    parser.add_argument("--drop_cl_head", action="store_true",
                        help="slice models: leave out the contrastive projection head (halves the size)")
    for stream, flag in (("T2W", "--t2"), ("ADC", "--adc"), ("DWI", "--dwi")):
        parser.add_argument(flag, dest=stream, default=None,
                            help=f"fusion: {SEQUENCE_FILES[stream]} (.pth or converted artifact directory) whose "
                                 f"head overwrites Stream_{stream}, as upstream inference does")
    parser.add_argument("--keep_stored_streams", action="store_true",
                        help="fusion: keep the file's stream weights instead (NOT what upstream inference uses)")


def _examples(model: str) -> str:
    """The module docstring's example commands for one converter."""
    blocks, keep = [], False
    for line in __doc__.splitlines():
        if line.startswith("    python"):
            keep = f".convert {model} " in line
        elif not line.startswith("        "):
            keep = False
        if keep:
            blocks.append(line)
    return "\n".join(blocks)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser("transfer_jax.convert", __doc__)
    commands = parser.add_subparsers(dest="model", required=True, metavar="{profound,provicnet}",
                                     help="the checkpoint's model family")
    for name, add_flags in (("profound", add_profound_flags), ("provicnet", add_provicnet_flags)):
        sub = commands.add_parser(name, module="transfer_jax.convert", doc=f"{textwrap.fill(DESCRIPTIONS[name], 116)}\n\n{_examples(name)}",
                                  prog=f"{parser.prog} {name}", help=DESCRIPTIONS[name].split(" (")[0])
        sub.add_argument("--checkpoint", required=True, help="the PyTorch checkpoint file to convert")
        sub.add_argument("--output", required=True, help="artifact directory to write")
        sub.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --output")
        add_flags(sub)
    return parser


def convert_profound(args) -> str:
    from transfer_jax.convert.profound import convert_to_artifact, summary

    converted = convert_to_artifact(
        args.checkpoint, args.output, overwrite=args.overwrite, variant=args.variant,
        with_decoder=args.with_decoder, img_size=args.img_size, num_heads=args.num_heads,
        decoder_num_heads=args.decoder_num_heads, out_indices=args.out_indices,
    )
    return summary(converted, os.path.abspath(args.output))


def convert_provicnet(args) -> str:
    from transfer_jax.convert.provicnet import FUSION_SEQUENCES, convert_checkpoint

    sequences = {s: getattr(args, s) for s in FUSION_SEQUENCES if getattr(args, s)}
    converted = convert_checkpoint(
        args.checkpoint, sequence_sources=sequences, keep_stored_streams=args.keep_stored_streams,
        num_heads=args.num_heads, drop_contrastive_head=args.drop_cl_head,
    )
    directory = converted.save(args.output, overwrite=args.overwrite)
    return "\n".join([converted.report.summary(),
                      f"  model {converted.model_name} ({converted.kind}), config {converted.config.to_dict()}",
                      f"wrote {directory}"])


def main(argv=None) -> int:
    """The `transfer-jax-convert` console script and `python -m transfer_jax.convert`."""
    from transfer_jax.convert.table import ConversionError

    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        report = (convert_profound if args.model == "profound" else convert_provicnet)(args)
    except (ConversionError, ValueError) as error:  # CheckpointReadError / ArtifactError are ValueErrors
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report)
    print(f"  took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
