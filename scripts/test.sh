#!/usr/bin/env bash
# Set up, then run the default (CPU, offline) test selection.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
.venv/bin/python -m pytest -m "not slow and not gpu and not distributed" "$@"
