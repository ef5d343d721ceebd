#!/usr/bin/env bash
# Set up .venv (with test extras) if needed, then run the whole test suite on CPU. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_env.sh --test
exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" "$@"
