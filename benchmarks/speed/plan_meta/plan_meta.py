"""Planning on the meta device: time `blockopt.partition` on large model shapes (no memory used).

    python benchmarks/speed/plan_meta/plan_meta.py        # results/default/result.json

Building the meta model (transformers' own __init__) is timed apart from planning.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

import blockopt
from blockopt.bench import write_result
from blockopt.hf import meta_model
from blockopt.partition.memory import state_memory

HERE = Path(__file__).resolve().parent
SHAPES = ["gpt2", "llama-2-7b", "llama-2-13b", "llama-3-70b", "mixtral-8x7b"]
REPEATS = 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="named shapes or HF config paths")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "default", help="the run's folder")
    args = parser.parse_args()
    results = []
    print(f"{'model':<14}{'params':>17}{'blocks':>12}{'build s':>9}{'plan s':>8}{'AdamW GB':>10}{'mini GB':>9}")
    for name in args.shapes:
        t0 = time.perf_counter()
        model = meta_model(name)
        build_s = time.perf_counter() - t0
        times = []
        for _ in range(REPEATS):
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
    settings = {"shapes": list(args.shapes), "repeats": REPEATS, "state_dtype": "float32"}
    path = write_result(args.out, name="plan_meta", settings=settings, results={"models": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
