#!/usr/bin/env bash
# Create .venv and install smft_dist with the CPU build of torch, every package at the version the
# lock (constraints.txt) pins. Idempotent; ~2 minutes fresh.
# Usage: bash .ci/setup.sh   (from the repo root)
# .ci/lock.sh runs it with SMFT_VENV (a throwaway venv) and SMFT_CONSTRAINTS (torch alone) to refresh the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SMFT_VENV:-.venv}
LOCK=${SMFT_CONSTRAINTS:-constraints.txt}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
# Every pip call passes -c "$LOCK": nothing resolves past the lock, and nothing pulls a CUDA torch or torchvision.
PIP="$VENV/bin/pip -q --disable-pip-version-check"
# torch first: the lock's version, in its CPU build (a wheel of it is on local disk; never torchvision).
$PIP install -c "$LOCK" torch
# This package with its extras, and mosaicml-streaming's runtime needs (it comes without its deps below).
$PIP install -c "$LOCK" -e ".[dev,tensorboard,lmeval]" Brotli python-snappy zstd pillow catalogue
# mosaicml-streaming pins transformers<5 and torchvision: installed with --no-deps, and last, so that no
# later pip step's resolver reports those pins as conflicts.
$PIP install -c "$LOCK" --no-deps mosaicml-streaming
"$VENV/bin/python" -c "import torch, deepspeed, transformers, omegaconf, peft; import smft_dist.data.streaming_compat as s; s.import_streaming(); print('stack ok: torch', torch.__version__)"
