"""Size and load time of one prepared case in the storage formats considered for the prepared-case cache.

    python scripts/cache_formats.py [--preset full] [--repeats 5]

Prepares the real sample case (tests/data/prostate_mri_sample) with the preset's geometry, writes it as
  float32 .npz (the former format), the cache's format (zero voxels left out: `PreparedCase.save`),
  deflate-compressed float32 (`np.savez_compressed`) and float16 .npz,
and prints MB per case, the best-of-N load time (warm page cache) and, for float16, its error on the z-scored
image. Figures: benchmarks/RESULTS.md.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from helpers import sample_case  # noqa: E402
from transfer_jax.config import PRESETS, apply_full, apply_smoke, base_config  # noqa: E402
from transfer_jax.data.dataset import preprocess_config  # noqa: E402
from transfer_jax.data.preprocess import PreparedCase, prepare_case  # noqa: E402


def best_seconds(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="full", choices=PRESETS)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = base_config()
    {"full": apply_full, "smoke": apply_smoke}.get(args.preset, lambda c: None)(config)
    prepared = prepare_case(sample_case(os.path.join(REPO, "tests", "data", "prostate_mri_sample")),
                            preprocess_config(config.data))
    arrays = {"image": prepared.image, "gland": prepared.gland, "lesion": prepared.lesion}
    print(f"preset {args.preset}: region {prepared.image.shape}, {np.mean(prepared.image == 0):.0%} zero voxels")

    def npz_reader(path):
        def read():
            with np.load(path) as z:
                return [z[k] for k in z.files]
        return read

    with tempfile.TemporaryDirectory() as folder:
        rows = []
        path = os.path.join(folder, "cache.npz")
        start = time.perf_counter()
        prepared.save(path)
        rows.append(("zero voxels left out (cache)", path, time.perf_counter() - start,
                     lambda: PreparedCase.load(path)))
        for name, save, dtype in (("float32 .npz (former)", np.savez, np.float32),
                                  ("float32 deflate (savez_compressed)", np.savez_compressed, np.float32),
                                  ("float16 .npz", np.savez, np.float16)):
            file = os.path.join(folder, f"{len(rows)}.npz")
            start = time.perf_counter()
            save(file, **{**arrays, "image": prepared.image.astype(dtype)})
            rows.append((name, file, time.perf_counter() - start, npz_reader(file)))
        for name, file, write_s, read in rows:
            load_ms = 1e3 * best_seconds(read, args.repeats)
            print(f"{name:36s} {os.path.getsize(file) / 1e6:7.1f} MB  write {write_s:5.2f} s  load {load_ms:6.0f} ms")
    image = prepared.image
    error = np.abs(image.astype(np.float16).astype(np.float32) - image)
    print(f"float16 on the z-scored image: max abs error {error.max():.2g} (values {image.min():.2f} .. "
          f"{image.max():.2f}), mean {error[image != 0].mean():.2g}")


if __name__ == "__main__":
    main()
