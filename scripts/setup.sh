#!/usr/bin/env bash
# Create .venv with the pinned CPU build of PyTorch, then install blockopt with the given extras.
#   bash scripts/setup.sh [bench|test]
# Environment: PYTHON (default python3), BLOCKOPT_VENV (default .venv),
#   BLOCKOPT_TORCH (default torch==2.13.0; "skip" to keep a torch already in the venv).
# Why torch first: an unpinned `torch` on a fresh machine pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-bench}
venv=${BLOCKOPT_VENV:-.venv}
torch_spec=${BLOCKOPT_TORCH:-torch==2.13.0}

if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ "$torch_spec" != "skip" ]; then
  "${pip[@]}" "$torch_spec"
fi
"${pip[@]}" -e ".[$extras]"
