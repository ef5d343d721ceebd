#!/usr/bin/env bash
# Set up .venv if needed, then fine-tune on the embedded default data (or pass your own flags), with tcmalloc
# preloaded when it is installed (scripts/host_allocator.sh; TRANSFER_JAX_ALLOCATOR=system keeps glibc malloc).
#   scripts/run.sh                                  # configs/seg.py on the synthetic phantom, outputs in runs/seg
#   scripts/run.sh --config=configs/seg.py:full --workdir=runs/seg-full --config.data.manifest=/data/picai.csv
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh
source scripts/host_allocator.sh
preload_host_allocator
if [ "$#" -eq 0 ]; then
  set -- --config=configs/seg.py --workdir=runs/seg
fi
exec .venv/bin/python -m transfer_jax.main "$@"
