#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, as one short run (CI has none; everything else runs there):
#   1. the tests marked `gpu`: the Triton kernels compiled on the device against the reference
#      (plain and compressed first moments), which the CPU suite only runs through Triton's interpreter;
#   2. the CUDA step benchmark: fused AdamW against AdamMini's Triton step, m as the parameter and
#      as bf16 / int8 / int4 codes (benchmarks/speed/step_speed, results/cuda).
# Uses the python3 that has torch with CUDA (no set-up: nothing is installed). Logs and the
# benchmark's result go to $OUT (default /tmp/gpu_check). About 5-8 minutes on an H100.
#   bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

python3 - <<'EOF' 2>&1 | tee "$OUT/device.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none: this script needs a CUDA GPU")
EOF
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "gpu_check: no CUDA device" >&2; exit 1; }

timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels 2>&1 | tee "$OUT/gpu_tests.log" || status=1

timeout 300 python3 benchmarks/speed/step_speed/step_speed.py --device cuda --models llama-gqa gpt2-small-untied \
    --out "$OUT/step_speed" 2>&1 | tee "$OUT/step_speed.log" || status=1

exit $status
