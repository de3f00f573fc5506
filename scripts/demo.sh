#!/usr/bin/env bash
# The main job on a fresh machine: set up, then run the shipped model on the sample data.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. "${SYNOMALY_VENV:-.venv}/bin/activate"
synomaly demo -o "${1:-synomaly-demo}" --overwrite
