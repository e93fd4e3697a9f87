"""Blockwise LR (Wang et al. 2025) on the default comparison: does it reach AdamW's loss sooner?

    python benchmarks/studies/blockwise_lr/blockwise_lr.py      # results/default: result.json, val_loss.png

The 'demo' Llama on the built-in corpus (the Python standard library's source) with the settings
of `blockopt.bench.demo.run_demo` (betas (0.9, 0.95), weight decay 0.1 on tensors with >= 2 dims,
batch 32 x 128 tokens, 20% linear warm-up then cosine to 0.1x, gradient clipping at 1.0, seed 0)
trains six times over one full schedule (200 steps by default), with the same init and batches:

* AdamW at the demo's LR (2e-3): the reference,
* AdamW at 4e-3, a control: is a gain from blockwise LR more than a higher LR overall?
* AdamW + blockwise LR (`blockopt.blockwise_lr`, the paper's ratios: Emb 10x, QK 8x, FFN 6x,
  VO 4x, Norm and untied head 1x, base 2e-3),
* the same with the untied head at 4x (``--head-ratio``; chosen by a small sweep, see
  benchmarks/blockwise_lr.md),
* Adam-mini at 2e-3 and Adam-mini + blockwise LR (paper ratios, base 2e-3),
* AdamW and Adam-mini + blockwise LR with ratios from this model's own measured sharpness
  (`blockopt.sharpness_ratios` on the Gauss-Newton sharpness at the last checkpoint of
  ``--sharpness``, by default the sharpness study's ``demo`` run: ``(S_VO / S_type) ** 0.5``, the
  sharpest type, VO, at the base LR 2e-3),

validating every ``--eval-every`` steps. The figure of merit is the paper's: the number of steps a
run needs to first reach plain AdamW's final validation loss, as a fraction of the steps AdamW
itself needs (the paper: about 0.5 for GPT-2 small, 50k vs 100k steps). Adam-mini + blockwise LR
is also compared with plain Adam-mini's final loss. The blockwise runs' base LR is ``--bw-lr``
(and ``--bw-mini-lr``). `make_optimizer` and the demo's AdamW settings are shared with
blockwise_lr_sweep.py and blockwise_lr_probes.py beside this file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import blockopt
from blockopt.bench import (CONFIGS, RunResult, TrainConfig, adamw, config_dict, demo_data, read_result, steps_to_reach,
                            train_run, write_result)
from blockopt.bench.analysis.sharpness import gauss_newton_at
from blockopt.param_groups import DEFAULT_RATIOS, resolve_ratios

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
SHARPNESS = REPO / "benchmarks" / "studies" / "sharpness" / "results" / "demo"  # the demo model, 100 steps
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1  # the demo's


def measured_sharpness(path: Path, checkpoint: int | None = None) -> tuple[int, dict[str, float]]:
    """`gauss_newton_at` of the sharpness report in ``path`` (a run's folder or its result.json)."""
    return gauss_newton_at(read_result(path), checkpoint)


def measured_ratios(path: Path, power: float) -> dict[str, float] | None:
    """`blockopt.sharpness_ratios` of a sharpness report's last checkpoint (None if there is no report)."""
    return blockopt.sharpness_ratios(measured_sharpness(path)[1], power=power) if path.exists() else None


def make_optimizer(optimizer: str, lr: float, ratios: dict[str, float] | None):
    """``model -> optimizer``: plain AdamW at ``lr`` without ratios, else ``optimizer`` ("AdamW" or
    "AdamMini") on `blockopt.blockwise_lr` groups (``{}``: the paper's table) with base LR ``lr``."""
    if ratios is None:
        return lambda model: adamw(model, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    if optimizer == "AdamW":
        return lambda model: torch.optim.AdamW(
            blockopt.blockwise_lr(model, lr=lr, ratios=ratios, weight_decay=WEIGHT_DECAY), betas=BETAS, eps=EPS)

    def mini(model):
        plan = blockopt.partition(model)  # AdamMini keeps the structural plan (heads) with groups
        groups = blockopt.blockwise_lr(plan, lr=lr, ratios=ratios, params=model, weight_decay=WEIGHT_DECAY)
        return blockopt.AdamMini(groups, betas=BETAS, eps=EPS, plan=plan)
    return mini


def make_optimizers(lr: float, bw_lr: float, bw_mini_lr: float, head_ratio: float, control_lr: float,
                    measured: dict[str, float] | None = None) -> dict:
    """name -> ``model -> optimizer``; the order is the order of the runs (and of the legend)."""
    runs = {"AdamW": make_optimizer("AdamW", lr, None)}
    if control_lr:
        runs[f"AdamW (lr {control_lr:g}, control)"] = make_optimizer("AdamW", control_lr, None)
    runs["AdamW + blockwise LR"] = make_optimizer("AdamW", bw_lr, {})
    if head_ratio:
        runs[f"AdamW + blockwise LR, head {head_ratio:g}x"] = make_optimizer("AdamW", bw_lr, {"head": head_ratio})
    runs["Adam-mini"] = lambda model: blockopt.AdamMini(model, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    runs["Adam-mini + blockwise LR"] = make_optimizer("AdamMini", bw_mini_lr, {})
    if measured is not None:
        runs["AdamW + measured-sharpness LR"] = make_optimizer("AdamW", bw_lr, measured)
        runs["Adam-mini + measured-sharpness LR"] = make_optimizer("AdamMini", bw_mini_lr, measured)
    return runs


STYLES = {  # name prefix -> (color, line style); first match wins
    "AdamW (lr": ("grey", ":"),
    "AdamW + measured": ("C3", "-"),
    "Adam-mini + measured": ("C4", "-"),
    "AdamW + blockwise LR, head": ("C2", "-"),
    "AdamW + blockwise LR": ("C0", "-"),
    "AdamW": ("C0", "--"),
    "Adam-mini + blockwise LR": ("C1", "-"),
    "Adam-mini": ("C1", "--"),
}


def plot(results: dict[str, RunResult], targets: dict[str, float], path: Path, title: str) -> None:
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    full, zoom = fig.subplots(1, 2)
    for name, r in results.items():
        steps, losses = zip(*r.val_curve)
        color, style = next(v for k, v in STYLES.items() if name.startswith(k))
        for ax in (full, zoom):
            ax.plot(steps, losses, style, color=color, label=name, marker="o", markersize=2, linewidth=1.3)
    for ax in (full, zoom):
        ax.axhline(targets["AdamW"], color="grey", linewidth=0.8, linestyle=":", label="AdamW final val loss")
        ax.set(xlabel="step", ylabel="validation loss (nats/token)")
        ax.grid(alpha=0.3)
    last = min(r.val_curve[-1][1] for r in results.values())
    half = max(s for s, _ in next(iter(results.values())).val_curve) // 2
    zoom.set(xlim=(half, None), ylim=(last - 0.05, targets["AdamW"] + 0.4), title="second half")
    full.set(title="validation loss")
    full.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW and Adam-mini peak LR (the demo's)")
    parser.add_argument("--bw-lr", type=float, default=None, help="base (norm) LR of AdamW + blockwise LR (default: --lr)")
    parser.add_argument("--bw-mini-lr", type=float, default=None, help="base LR of Adam-mini + blockwise LR (default: --bw-lr)")
    parser.add_argument("--head-ratio", type=float, default=4.0,
                        help="also run AdamW + blockwise LR with this head multiplier (0: skip)")
    parser.add_argument("--control-lr", type=float, default=4e-3,
                        help="also run plain AdamW at this LR, to tell a better LR recipe from a higher LR (0: skip)")
    parser.add_argument("--sharpness", type=Path, default=SHARPNESS,
                        help="sharpness.py run (folder) whose last checkpoint sets the measured ratios (skipped if missing)")
    parser.add_argument("--power", type=float, default=0.5, help="power of the measured ratios (sharpness_ratios)")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--eval-batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "default", help="the run's folder")
    args = parser.parse_args()
    bw_lr = args.lr if args.bw_lr is None else args.bw_lr
    bw_mini_lr = bw_lr if args.bw_mini_lr is None else args.bw_mini_lr
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    config = CONFIGS["demo"]
    tokenized, data = demo_data(config.vocab_size)
    loop = TrainConfig(steps=args.steps, eval_every=args.eval_every, eval_batches=args.eval_batches)
    results: dict[str, RunResult] = {}
    measured = measured_ratios(args.sharpness, args.power)
    print("measured-sharpness ratios:", "none (no report)" if measured is None else
          {k: round(v, 2) for k, v in measured.items() if v != 1.0 or k == "vo"}, flush=True)
    runs = make_optimizers(args.lr, bw_lr, bw_mini_lr, args.head_ratio, args.control_lr, measured)
    for name, make in runs.items():
        t = time.perf_counter()
        results[name] = train_run(config, make, data, loop, progress=sys.stderr.isatty(), desc=name)
        r = results[name]
        print(f"{name:<34} final val {r.final_val_loss:.4f}  train {r.final_train_loss:.4f}  ({time.perf_counter() - t:.0f}s)", flush=True)

    targets = {"AdamW": results["AdamW"].final_val_loss, "Adam-mini": results["Adam-mini"].final_val_loss}
    reach = {}
    for reference, target in targets.items():
        ref_steps = steps_to_reach(results[reference].val_curve, target)
        for name, r in results.items():
            got = steps_to_reach(r.val_curve, target)
            reach.setdefault(reference, {})[name] = {
                "steps": got, "ratio": None if got is None else got / ref_steps,
            }
    adamw_ratio = reach["AdamW"]["AdamW + blockwise LR"]["ratio"]
    mini_ratio = reach["Adam-mini"]["Adam-mini + blockwise LR"]["ratio"]
    print(f"steps to AdamW's final val loss {targets['AdamW']:.4f}:")
    for name, entry in reach["AdamW"].items():
        ratio = "never" if entry["ratio"] is None else f"{entry['ratio']:.2f}x"
        print(f"  {name:<34} {entry['steps']}  ({ratio})")
    print(f"steps to Adam-mini's final val loss {targets['Adam-mini']:.4f}: "
          f"Adam-mini + blockwise LR {reach['Adam-mini']['Adam-mini + blockwise LR']['steps']}")

    n_params = results["AdamW"].n_params
    settings = {
        "model": {"name": "demo", "n_params": n_params, **config_dict(config)},
        "corpus": {"source": "stdlib", "tokens": len(tokenized.ids), "train_tokens": len(data.train), "val_tokens": len(data.val)},
        **loop.resolved(config.max_seq_len).to_dict(), "seed": 0,
        "lr": args.lr, "bw_lr": bw_lr, "bw_mini_lr": bw_mini_lr, "head_ratio_variant": args.head_ratio,
        "control_lr": args.control_lr, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY, "weight_decay_1d": 0.0,
        "ratios": resolve_ratios(), "measured_ratios": measured, "sharpness_report": os.path.relpath(args.sharpness, REPO),
        "power": args.power, "default_ratios": dict(DEFAULT_RATIOS),
    }
    path = write_result(args.out, name="blockwise_lr", settings=settings, results={
        "final_val_loss": {name: r.final_val_loss for name, r in results.items()},
        "final_train_loss": {name: r.final_train_loss for name, r in results.items()},
        "steps_to_reach": reach,
        "speedup": {
            "adamw_bw_steps_ratio": adamw_ratio,
            "adamw_bw_head_steps_ratio": reach["AdamW"].get(f"AdamW + blockwise LR, head {args.head_ratio:g}x", {}).get("ratio"),
            "adamw_control_steps_ratio": reach["AdamW"].get(f"AdamW (lr {args.control_lr:g}, control)", {}).get("ratio"),
            "adam_mini_bw_steps_ratio_vs_adam_mini": mini_ratio,
            "adamw_measured_steps_ratio": reach["AdamW"].get("AdamW + measured-sharpness LR", {}).get("ratio"),
            "adam_mini_measured_steps_ratio_vs_adamw": reach["AdamW"].get("Adam-mini + measured-sharpness LR", {}).get("ratio"),
            "target_ratio": 0.6,
            "met": any(r is not None and r <= 0.6 for name, entry in reach["AdamW"].items()
                       if "blockwise" in name or "measured" in name for r in [entry["ratio"]]),
        },
        "val_curves": {name: r.val_curve for name, r in results.items()},
        "train_curves": {name: r.train_curve for name, r in results.items()},
        "wall_s": time.perf_counter() - started,
    })
    plot(results, targets, args.out / "val_loss.png",
         f"demo Llama ({n_params:,} params), {args.steps} steps; blockwise base LR {bw_lr:g}")
    print(f"wrote {path} and val_loss.png ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
