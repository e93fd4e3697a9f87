#!/usr/bin/env bash
# Set up (scripts/setup.sh bench) and run the AdamW vs Adam-mini demo. Extra args go to `blockopt demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh bench
exec "${BLOCKOPT_VENV:-.venv}/bin/blockopt" demo "$@"
