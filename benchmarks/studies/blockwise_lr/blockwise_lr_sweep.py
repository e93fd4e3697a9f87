"""Blockwise LR with ratios from measured sharpness: a sweep of the rule's power, cap and base LR.

    python benchmarks/studies/blockwise_lr/blockwise_lr_sweep.py     # results/sweep (about 17 min)
    python benchmarks/studies/blockwise_lr/blockwise_lr_sweep.py --steps 400 --variants sqrt mini-sqrt \\
        --out benchmarks/studies/blockwise_lr/results/sweep-400steps   # about 9 min

Same model, corpus, schedule and figure of merit as blockwise_lr.py (steps to first reach plain
AdamW's final validation loss, as a fraction of AdamW's steps). Every variant takes its ratios
from `blockopt.sharpness_ratios` on the Gauss-Newton sharpness of the last checkpoint of the
sharpness study's ``demo`` run, ``(S_sharpest / S_type) ** power`` capped at ``max_ratio``; the
sharpest type (VO) trains at the base LR. Variants (name: optimizer, power, cap, base LR):
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import blockopt
from blockopt.bench import CONFIGS, TrainConfig, demo_data, steps_to_reach, train_run, write_result

# the script beside this one (a script's folder is first on sys.path)
from blockwise_lr import BETAS, EPS, REPO, SHARPNESS, WEIGHT_DECAY, make_optimizer, measured_sharpness

HERE = Path(__file__).resolve().parent

# name -> (optimizer, power, max_ratio, base lr); power None: plain optimizer at that lr
VARIANTS = {
    "sqrt": ("AdamW", 0.5, 10.0, 2e-3),
    "power-0.35": ("AdamW", 0.35, 10.0, 2e-3),
    "power-0.75": ("AdamW", 0.75, 10.0, 2e-3),
    "linear": ("AdamW", 1.0, 10.0, 2e-3),
    "sqrt-cap-4": ("AdamW", 0.5, 4.0, 2e-3),
    "sqrt-base-1.5e-3": ("AdamW", 0.5, 10.0, 1.5e-3),
    "sqrt-base-3e-3": ("AdamW", 0.5, 10.0, 3e-3),
    "sqrt-base-4e-3": ("AdamW", 0.5, 10.0, 4e-3),
    "mini-sqrt": ("AdamMini", 0.5, 10.0, 2e-3),
    "uniform-6e-3": ("AdamW", None, None, 6e-3),
}
__doc__ += "".join(f"\n    {name}: {spec}" for name, spec in VARIANTS.items()) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--sharpness", type=Path, default=SHARPNESS, help="sharpness.py run (folder) to take ratios from")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "sweep", help="the run's folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    last, sharpness = measured_sharpness(args.sharpness)

    config = CONFIGS["demo"]
    _, data = demo_data(config.vocab_size)
    loop = TrainConfig(steps=args.steps, eval_every=5)
    runs = {"AdamW": ("AdamW", None, None, 2e-3), **{name: VARIANTS[name] for name in args.variants}}
    results = {}
    for name, (optimizer, power, max_ratio, lr) in runs.items():
        t = time.perf_counter()
        ratios = None if power is None else blockopt.sharpness_ratios(sharpness, power=power, max_ratio=max_ratio)
        run = train_run(config, make_optimizer(optimizer, lr, ratios), data, loop, progress=False, desc=name)
        target = results["AdamW"]["final_val_loss"] if results else run.final_val_loss
        reached = steps_to_reach(run.val_curve, target)
        results[name] = {
            "optimizer": optimizer, "power": power, "max_ratio": max_ratio, "base_lr": lr,
            "ratios": None if ratios is None else {k: ratios[k] for k in sharpness},
            "final_val_loss": run.final_val_loss, "steps_to_adamw_final": reached,
            "steps_ratio": None if reached is None else reached / args.steps, "val_curve": run.val_curve,
        }
        shown = "never" if reached is None else f"{reached} ({reached / args.steps:.3f}x)"
        print(f"{name:<18} final val {run.final_val_loss:.4f}  steps to AdamW's final: {shown}  ({time.perf_counter() - t:.0f}s)",
              flush=True)
    settings = {**loop.resolved(config.max_seq_len).to_dict(), "seed": 0,
                "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY,
                "sharpness": {"report": os.path.relpath(args.sharpness, REPO), "checkpoint": last,
                              "measure": "gauss_newton", "values": sharpness}}
    path = write_result(args.out, name="blockwise_lr_sweep", settings=settings,
                        results={"runs": results, "wall_s": time.perf_counter() - started})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
