"""Features of a converted checkpoint: a converted artifact and input volumes (or a manifest) in, a features .npz out.

    python -m transfer_jax.extract --model=profound_conv --params=artifacts/profound_conv --input=volumes.npz \\
        --output=features.npz
    python -m transfer_jax.extract --model=profound_vit --params=artifacts/profound_vit --manifest=manifest.csv \\
        --split=test --crop 64 256 256 --output=features.npz
    python -m transfer_jax.extract --model=provicnet --params=artifacts/provicnet_t2 --manifest=manifest.csv \\
        --split=test --output=features.npz

`--params` is an artifact written by `python -m transfer_jax.convert`. What each model writes is documented by its
extractor (`transfer_jax.features.profound` for ProFound, `transfer_jax.features.provicnet` for ProViCNet).

`EXTRACTORS` maps a model name to `fn(params, input_path, output_path, *, batch_size, ...) -> {name: shape}` (or to
a "module:function" string, imported on first use so one model's dependencies never load another's); a port
registers its own entry here.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, Union

from transfer_jax.cli import ArgumentParser, reports_data_errors

__all__ = ["EXTRACTORS", "MANIFEST_MODELS", "get_extractor", "main"]

# model name -> the extractor, or "module:function" to import it on first use
EXTRACTORS: dict[str, Union[str, Callable[..., dict]]] = {
    "profound_conv": "transfer_jax.features.profound:extract_profound_conv",
    "profound_vit": "transfer_jax.features.profound:extract_profound_vit",
    "provicnet": "transfer_jax.features.provicnet:extract_features",
}
# Extractors that also read a dataset manifest (ProFound: 3-D volumes through the data pipeline's preprocessing;
# ProViCNet: whole native slices through upstream's slice path, as predict).
MANIFEST_MODELS = ("profound_conv", "profound_vit", "provicnet")


def get_extractor(model: str) -> Callable[..., dict]:
    if model not in EXTRACTORS:
        raise SystemExit(f"unknown --model {model!r}; available: {', '.join(sorted(EXTRACTORS))}")
    entry = EXTRACTORS[model]
    if callable(entry):
        return entry
    module, name = entry.split(":")
    return getattr(importlib.import_module(module), name)


@reports_data_errors
def main(argv=None) -> int:
    """The `transfer-jax-extract` console script and `python -m transfer_jax.extract`."""
    parser = ArgumentParser("transfer_jax.extract", __doc__.split("\n`EXTRACTORS`")[0])
    parser.add_argument("--model", required=True, choices=sorted(EXTRACTORS),
                        help="the model family of --params: " + ", ".join(sorted(EXTRACTORS)))
    parser.add_argument("--params", required=True, help="converted artifact directory")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help=".npz with 'image' in the upstream layout: (N, C, D, H, W) float32 volumes "
                                        "(ProFound) or (N, C, 448, 448) slices with slice_index, num_slices (ProViCNet)")
    source.add_argument("--manifest", help=f"dataset manifest CSV ({', '.join(MANIFEST_MODELS)} only)")
    parser.add_argument("--split", help="with --manifest: only cases of this split (train/val/test)")
    parser.add_argument("--crop", type=int, nargs=3, metavar=("D", "H", "W"),
                        help="with --manifest: centre-crop size (default: the ViT's img_size; required for conv)")
    parser.add_argument("--sequence", choices=("t2", "adc", "dwi"),
                        help="with --manifest and --model provicnet: the sequence the model reads (default t2)")
    parser.add_argument("--output", required=True, help="output .npz")
    parser.add_argument("--batch_size", type=int, default=2, help="inputs per model call")
    args = parser.parse_args(argv)

    extractor = get_extractor(args.model)
    options = {"batch_size": args.batch_size}
    if args.manifest is not None:
        if args.model not in MANIFEST_MODELS:
            parser.error(f"--manifest is not supported for --model {args.model}; pass --input")
        options.update(split=args.split, crop_size=args.crop)
        if args.sequence is not None:
            if args.model != "provicnet":
                parser.error("--sequence only applies to --model provicnet")
            options["sequence"] = args.sequence
        source_path = args.manifest
    else:
        if args.split is not None or args.crop is not None or args.sequence is not None:
            parser.error("--split, --crop and --sequence only apply with --manifest")
        source_path = args.input
    shapes = extractor(args.params, source_path, args.output, **options)
    for name, shape in shapes.items():
        print(f"{name}: {shape}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
