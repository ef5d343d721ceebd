#!/usr/bin/env bash
# Set up .venv (with test extras) if needed, then run the whole test suite on CPU. Extra args go to pytest:
#   scripts/test.sh -m "not slow"           # the quick loop: no whole training runs or multi-process tests
#   scripts/test.sh tests/test_data.py      # one file
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh --test
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
