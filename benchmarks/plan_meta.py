"""Planning on the meta device: time `blockopt.partition` on large model shapes (no memory used).

    python benchmarks/plan_meta.py        # writes benchmarks/plan_meta.json

Building the meta model (transformers' own __init__) is timed apart from planning.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import torch

import blockopt
from blockopt.hf import meta_model
from blockopt.partition.memory import state_memory

SHAPES = ["gpt2", "llama-2-7b", "llama-2-13b", "llama-3-70b", "mixtral-8x7b"]


def main() -> None:
    results = []
    print(f"{'model':<14}{'params':>17}{'blocks':>12}{'build s':>9}{'plan s':>8}{'AdamW GB':>10}{'mini GB':>9}")
    for name in SHAPES:
        t0 = time.perf_counter()
        model = meta_model(name)
        build_s = time.perf_counter() - t0
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            plan = blockopt.partition(model)
            times.append(time.perf_counter() - t0)
        s = plan.summary()
        mem = state_memory(plan, torch.float32)
        row = {
            "model": name, "n_params": s.n_params, "n_blocks": s.n_blocks, "build_seconds": round(build_s, 3),
            "plan_seconds_median": round(statistics.median(times), 4), "plan_seconds_all": [round(t, 4) for t in times],
            "adamw_fp32_bytes": mem.adamw_bytes, "adam_mini_fp32_bytes": mem.adam_mini_bytes,
            "warnings": list(plan.warnings),
        }
        results.append(row)
        print(f"{name:<14}{s.n_params:>17,}{s.n_blocks:>12,}{build_s:>9.2f}{row['plan_seconds_median']:>8.3f}"
              f"{mem.adamw_bytes / 1e9:>10.2f}{mem.adam_mini_bytes / 1e9:>9.2f}")
    meta = {"torch": torch.__version__, "blockopt": blockopt.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": __import__("os").cpu_count(), "command": "python benchmarks/plan_meta.py"}
    out = Path(__file__).with_name("plan_meta.json")
    out.write_text(json.dumps({"results": results, "meta": meta}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
