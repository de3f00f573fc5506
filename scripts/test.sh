#!/usr/bin/env bash
# The test suite on a fresh machine: set up, then run pytest (slow tests excluded; add `-m slow` for them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${SYNOMALY_VENV:-.venv}/bin/activate"
python -m pytest -q "$@"
