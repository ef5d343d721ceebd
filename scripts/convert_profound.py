"""Convert a ProFound PyTorch checkpoint into a transfer_jax artifact (Orbax state + model.json), without torch.

    python scripts/convert_profound.py --checkpoint checkpoint-799.pth --output artifacts/profound_conv
    python scripts/convert_profound.py --checkpoint profound_vit_checkpoint-799.pth --output artifacts/vit \\
        --variant vit [--with-decoder]

Handles the FCMAE (ProFound-Conv) and MAE (ProFound-ViT) pretraining checkpoints and the fine-tuned
classification / UPerNet checkpoints (`best.pth.tar`); sizes are inferred from the weights. Prints what was
converted, dropped and initialised; on failure prints every problem at once and exits with status 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transfer_jax.convert.artifact import ArtifactError  # noqa: E402
from transfer_jax.convert.profound import convert_to_artifact, summary  # noqa: E402
from transfer_jax.convert.table import ConversionError  # noqa: E402
from transfer_jax.convert.torch_pickle import CheckpointReadError  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help=".pth / .pth.tar / .safetensors file")
    parser.add_argument("--output", required=True, help="artifact directory to write")
    parser.add_argument("--variant", choices=("conv", "vit"), help="assert the backbone family (default: detect)")
    parser.add_argument("--with-decoder", action="store_true",
                        help="MAE (ViT) pretraining checkpoints: keep the decoder (to continue pretraining)")
    parser.add_argument("--img-size", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="ViT input size (default: inferred from the stored position table)")
    parser.add_argument("--num-heads", type=int, help="ViT attention heads (default: 12 for width 768)")
    parser.add_argument("--decoder-num-heads", type=int, help="MAE decoder attention heads (default: 16)")
    parser.add_argument("--out-indices", type=int, nargs=4, metavar="I",
                        help="ViT blocks feeding UPerNet (default: 3 5 7 11 for 12 blocks)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --output")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        converted = convert_to_artifact(
            args.checkpoint, args.output, overwrite=args.overwrite, variant=args.variant,
            with_decoder=args.with_decoder, img_size=args.img_size, num_heads=args.num_heads,
            decoder_num_heads=args.decoder_num_heads, out_indices=args.out_indices,
        )
    except (CheckpointReadError, ConversionError, ArtifactError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(converted, os.path.abspath(args.output)))
    print(f"  took {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
