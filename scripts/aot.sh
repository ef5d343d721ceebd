#!/usr/bin/env bash
# Compile a run for a Cloud TPU topology on this host (no TPU needed): memory per chip, fits, roofline speed.
#   scripts/aot.sh --config=configs/seg.py:full --topology=v5e:2x4 [--config.mesh.fsdp=8 --config.mesh.strategy=fsdp]
#   scripts/aot.sh --config=configs/seg.py:profound_vit,full --topology=v6e:2x4 --max_batch
# Sets up .venv with the test requirements on first use, and libtpu (the TPU compiler) when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh --test
if ! .venv/bin/python -c 'import libtpu' >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet libtpu==0.0.52
fi
exec .venv/bin/python -m transfer_jax.aot "$@"
