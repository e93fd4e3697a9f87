"""Optimizer-state memory: AdamW vs Adam-mini, side by side.

Measured: both optimizers stepped once on a real GPT-2-small-shaped model (HF GPT2LMHeadModel,
124M parameters, tied head) and their state counted with `blockopt.state_bytes`.
Planned: larger shapes built on the meta device (no memory) and counted from the Plan
(AdamW keeps m and v per parameter; Adam-mini keeps m per parameter and v per block).

    python benchmarks/speed/state_memory/state_memory.py     # results/default: result.json, state_memory.png
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import blockopt
from blockopt.bench import write_result
from blockopt.hf import load_config

HERE = Path(__file__).resolve().parent
PLANNED = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "llama-2-7b", "llama-2-13b")  # the paper's Table 1 shapes


def measured_gpt2_small() -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config())  # 124M: vocab 50257, 12 x 768, 12 heads, tied head
    n_params = sum(p.numel() for p in model.parameters())
    rows = {}
    for name, make in (
        ("adamw", lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4)),
        ("adam-mini", lambda m: blockopt.AdamMini(m, lr=1e-4)),
    ):
        opt = make(model)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()  # materialises the state
        rows[name] = blockopt.state_bytes(opt)
        del opt
    return {
        "model": "gpt2-small (HF GPT2LMHeadModel default config)",
        "n_params": n_params,
        "adamw_bytes": rows["adamw"],
        "adam_mini_bytes": rows["adam-mini"],
        "ratio": rows["adam-mini"] / rows["adamw"],
        "how": "measured: one step each, blockopt.state_bytes",
    }


def planned(name: str, config) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    t0 = time.perf_counter()
    summary = blockopt.partition(model).summary()
    plan_s = time.perf_counter() - t0
    p, b = summary.n_params, summary.n_blocks
    adamw, mini = 2 * 4 * p, 4 * p + 4 * b  # float32 m and v
    return {
        "model": name, "n_params": p, "n_blocks": b, "adamw_bytes": adamw, "adam_mini_bytes": mini,
        "ratio": mini / adamw, "plan_seconds": round(plan_s, 3), "how": "planned on the meta device (float32 state)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "default", help="the run's folder")
    args = parser.parse_args()

    results = [measured_gpt2_small()]
    for name in PLANNED:  # planned on the meta device
        results.append(planned(f"{name} shape", load_config(name)))

    print(f"{'model':<48}{'params':>15}{'AdamW GB':>10}{'Adam-mini GB':>14}{'ratio':>8}")
    for r in results:
        print(f"{r['model']:<48}{r['n_params']:>15,}{r['adamw_bytes'] / 1e9:>10.2f}{r['adam_mini_bytes'] / 1e9:>14.2f}{r['ratio']:>8.4f}")
    settings = {"measured": results[0]["model"], "planned": list(PLANNED), "state_dtype": "float32"}
    path = write_result(args.out, name="state_memory", settings=settings, results={"models": results})
    plot(results, args.out / "state_memory.png")
    print(f"wrote {path} and state_memory.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    planned_rows = [r for r in results if r["how"].startswith("planned")]
    names = [r["model"].removesuffix(" shape") for r in planned_rows]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.bar([i - 0.2 for i in x], [r["adamw_bytes"] / 1e9 for r in planned_rows], 0.4, label="AdamW (m, v)")
    ax.bar([i + 0.2 for i in x], [r["adam_mini_bytes"] / 1e9 for r in planned_rows], 0.4, label="Adam-mini (m, v per block)")
    for i, r in zip(x, planned_rows):
        ax.text(i + 0.2, r["adam_mini_bytes"] / 1e9, f"{r['ratio']:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("optimizer state, GB (float32)")
    ax.set_title("Optimizer state from meta-device plans (numbers: Adam-mini / AdamW)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
