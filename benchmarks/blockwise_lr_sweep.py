"""Blockwise LR with ratios from measured sharpness: a sweep of the rule's power, cap and base LR.

    python benchmarks/blockwise_lr_sweep.py                 # blockwise_lr_sweep.json (about 17 min)
    python benchmarks/blockwise_lr_sweep.py --steps 400 --variants sqrt mini-sqrt \\
        --out benchmarks/blockwise_lr_sweep_400steps.json  # about 9 min

Same model, corpus, schedule and figure of merit as benchmarks/blockwise_lr.py (steps to first
reach plain AdamW's final validation loss, as a fraction of AdamW's steps). Every variant takes
its ratios from `blockopt.sharpness_ratios` on the Gauss-Newton sharpness of the last checkpoint
of benchmarks/sharpness.json, ``(S_sharpest / S_type) ** power`` capped at ``max_ratio``; the
sharpest type (VO) trains at the base LR. Variants (name: optimizer, power, cap, base LR):
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import blockopt
from blockopt.bench.comparison import environment
from blockopt.bench.demo import _adamw, demo_data, demo_loop
from blockopt.bench.models import CONFIGS
from blockopt.bench.train import steps_to_reach, train_run

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from blockwise_lr import BETAS, EPS, WEIGHT_DECAY, final_sharpness  # noqa: E402

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


def make_optimizer(optimizer: str, lr: float, ratios: dict[str, float] | None):
    """``model -> optimizer``: plain AdamW at ``lr`` without ratios, else ``optimizer`` on
    `blockopt.blockwise_lr` groups."""
    if ratios is None:
        return lambda model: _adamw(model, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    if optimizer == "AdamW":
        return lambda model: torch.optim.AdamW(
            blockopt.blockwise_lr(model, lr=lr, ratios=ratios, weight_decay=WEIGHT_DECAY), betas=BETAS, eps=EPS)

    def mini(model):
        plan = blockopt.partition(model)
        groups = blockopt.blockwise_lr(plan, lr=lr, ratios=ratios, params=model, weight_decay=WEIGHT_DECAY)
        return blockopt.AdamMini(groups, betas=BETAS, eps=EPS, plan=plan)
    return mini


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--sharpness", type=Path, default=HERE / "sharpness.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "blockwise_lr_sweep.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    last, sharpness = final_sharpness(args.sharpness)

    config = CONFIGS["demo"]
    _, data = demo_data(config.vocab_size)
    loop = demo_loop(args.steps, eval_every=5)
    runs = {"AdamW": ("AdamW", None, None, 2e-3), **{name: VARIANTS[name] for name in args.variants}}
    results = {}
    for name, (optimizer, power, max_ratio, lr) in runs.items():
        t = time.perf_counter()
        ratios = None if power is None else blockopt.sharpness_ratios(sharpness, power=power, max_ratio=max_ratio)
        run = train_run(config, make_optimizer(optimizer, lr, ratios), data, **loop, progress=False, desc=name)
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
    report = {
        "command": "python benchmarks/blockwise_lr_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "sharpness": {"report": "benchmarks/" + args.sharpness.name, "checkpoint": last, "measure": "gauss_newton",
                      "values": sharpness},
        "settings": {**loop, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY},
        "runs": results,
        "wall_s": time.perf_counter() - started,
        "environment": environment("cpu"),
    }
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
