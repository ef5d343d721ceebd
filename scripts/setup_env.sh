#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv from the pinned requirements, with Python 3.12
# (preferred) or 3.13, the versions jax 0.12 supports.
# Idempotent: does nothing when .venv already matches requirements*.txt. Usage: scripts/setup_env.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

# The first working interpreter of 3.12, then 3.13: on PATH, from pyenv, or in the usual prefixes. Each candidate is
# run, since a pyenv shim can exist for a version that is not active.
find_python() {
  local version dir candidate
  for version in 3.12 3.13; do
    local candidates=("python$version")
    for dir in "$HOME"/.pyenv/versions/"$version".*/bin /usr/local/bin /usr/bin; do
      [ -x "$dir/python$version" ] && candidates+=("$dir/python$version")
    done
    for candidate in "${candidates[@]}"; do
      if "$candidate" -c "import sys; assert sys.version_info[:2] == (${version/./, })" >/dev/null 2>&1; then
        echo "$candidate"; return 0
      fi
    done
  done
  echo "error: neither python3.12 nor python3.13 found (jax 0.12 needs one of them); install one or put it on PATH" >&2
  return 1
}

requirements=requirements.txt
[ "${1:-}" = "--test" ] && requirements=requirements-test.txt
stamp=".venv/.installed-$(cat requirements.txt "$requirements" pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  if [ ! -x .venv/bin/python ]; then
    python=$(find_python)
    "$python" -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r "$requirements"
  .venv/bin/python -m pip install --quiet --no-deps -e .
  rm -f .venv/.installed-* && touch "$stamp"
fi
