#!/usr/bin/env bash
# Smoke test on an accelerator: a few training steps, one detection and the benchmarks, all on DEVICE.
# Usage: bash scripts/gpu-smoke.sh [DEVICE] [OUT]   (DEVICE: cuda (default), mps or cpu; after scripts/setup.sh)
# Training draws every random number on the data's device, so a CPU/GPU mix fails here, not in a user's run.
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE="${1:-cuda}"
OUT="${2:-runs/gpu-smoke}"
# shellcheck disable=SC1091
. "${SYNOMALY_VENV:-.venv}/bin/activate"
mkdir -p "$OUT"
python -c "import torch; print('torch', torch.__version__, 'cuda' if torch.cuda.is_available() else 'no cuda', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
synomaly train --data br35h:no:0:32 --val-data br35h:no:900:908 -o "$OUT/smoke.safetensors" --iterations 20 \
    --batch-size 8 --device "$DEVICE" --contrast-remap 0.5 --t-max 300 --checkpoint-every 10 --progress none
synomaly demo-data -o "$OUT/data"
synomaly detect "$OUT/data/demo_lesion.nrrd" -o "$OUT/detect" --overwrite --device "$DEVICE"
synomaly bench --device "$DEVICE" --repeat 2
# the engine against the authors' loop on their BraTS network (98.6 M, 128 x 128): the issue's GPU figure
synomaly bench-authors --device "$DEVICE" --rounds 3 --progress none
echo "gpu smoke test passed on $DEVICE"
