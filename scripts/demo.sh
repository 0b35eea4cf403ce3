#!/usr/bin/env bash
# Set up, then train one DELTA task vector on the embedded SmolLM2-135M-Instruct (CPU, offline; 200 s of training, 3 min 55 s for the recipe on 2 CPU cores running three other jobs, OMP_NUM_THREADS=1, measured 2026-11-23).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1
out="outputs/sft_delta-$(date +%Y%m%d-%H%M%S)"
.venv/bin/delta-trl sft --config recipes/configs/sft_delta.yaml --output_dir "$out" "$@"  # = python recipes/sft_delta.py ...
