#!/usr/bin/env bash
# Compile a run for a Cloud TPU topology on this host (no TPU needed): memory per chip, fits, roofline speed.
#   scripts/aot.sh --config=configs/seg.py:full --topology=v5e:2x4 [--config.mesh.fsdp=8 --config.mesh.strategy=fsdp]
#   scripts/aot.sh --config=configs/seg.py:profound_vit,full --topology=v6e:2x4 --max-batch
# Sets up .venv with the test requirements (they include libtpu, the TPU compiler) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh --test
exec .venv/bin/python -m transfer_jax.aot "$@"
