#!/usr/bin/env bash
# Create (or update) the project's Python 3.12 virtual environment in .venv from the pinned requirements.
# Idempotent: does nothing when .venv already matches requirements*.txt. Usage: scripts/setup_env.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."

find_python312() {
  local candidates=(python3.12)
  for dir in "$HOME"/.pyenv/versions/3.12*/bin /usr/local/bin /usr/bin; do
    [ -x "$dir/python3.12" ] && candidates+=("$dir/python3.12")
  done
  for candidate in "${candidates[@]}"; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then
      echo "$candidate"; return 0
    fi
  done
  echo "error: Python 3.12 not found (jax 0.12 needs it); install it or put python3.12 on PATH" >&2
  return 1
}

requirements=requirements.txt
[ "${1:-}" = "--test" ] && requirements=requirements-test.txt
stamp=".venv/.installed-$(cat requirements.txt "$requirements" pyproject.toml | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  if [ ! -x .venv/bin/python ]; then
    "$(find_python312)" -m venv .venv
  fi
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r "$requirements"
  .venv/bin/python -m pip install --quiet --no-deps -e .
  rm -f .venv/.installed-* && touch "$stamp"
fi
