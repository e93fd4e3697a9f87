#!/usr/bin/env bash
# Create .venv with the pinned CPU build of PyTorch, install blockopt with the given extras, and
# build the fused CPU Adam-mini kernel (`blockopt build`).
#   bash scripts/setup.sh [bench|test]
# Environment: PYTHON (default python3), BLOCKOPT_VENV (default .venv),
#   BLOCKOPT_TORCH (default torch==2.13.0; "skip" to keep a torch already in the venv),
#   BLOCKOPT_TORCH_INDEX (an index to take torch from; where pip has no CPU wheel at hand, as on
#   plain PyPI for Linux, https://download.pytorch.org/whl/cpu gives the CPU build).
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
  "${pip[@]}" ${BLOCKOPT_TORCH_INDEX:+--index-url "$BLOCKOPT_TORCH_INDEX"} "$torch_spec"
fi
"${pip[@]}" -e ".[$extras]"

# Build the fused CPU kernel now, so that no training run pays the one-time build (~15 s). Without a
# compiler or ninja this prints why and set-up goes on: steps then run the batched implementation.
"$venv/bin/python" -m blockopt build || echo "setup: the fused CPU kernel was not built (see above); blockopt still works" >&2
