#!/usr/bin/env bash
# Create .venv and install smft_dist with the CPU build of torch. Idempotent; ~2 minutes fresh.
# Usage: bash .ci/setup.sh   (from the repo root)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
PIP=".venv/bin/pip -q --disable-pip-version-check"
# torch first, pinned by constraints.txt to the CPU build (never torchvision).
$PIP install -c constraints.txt torch
$PIP install -c constraints.txt -e ".[dev,tensorboard,lmeval]"
# mosaicml-streaming pins transformers<5 and torchvision; its runtime needs are listed here.
$PIP install --no-deps mosaicml-streaming==0.13.0
$PIP install -c constraints.txt Brotli python-snappy zstd pillow catalogue 2>&1 | grep -v "dependency resolver\|requires\|^$" || true
.venv/bin/python -c "import torch, deepspeed, transformers, omegaconf, peft; import smft_dist.data.streaming_compat as s; s.import_streaming(); print('stack ok: torch', torch.__version__)"
