"""AdaPM against AdamW and Adam-mini on the default comparison (the `blockopt demo` setting).

The built-in ``demo`` Llama, the built-in corpus (Python standard library source), and the settings
of `blockopt.bench.demo.run_demo`: lr 2e-3, betas (0.9, 0.95), weight decay 0.1 (not on 1-D
tensors), batch 32 x 128 tokens, 100 steps, 20% warm-up then cosine to 10%, grad clip 1.0, seed 0.
Every run shares the init and the batches; only the optimizer differs.

It measures, per optimizer: final train and validation loss, optimizer state bytes
(`blockopt.state_bytes`) and the bytes of the first moment alone (``exp_avg``, and AdaPM's factors
``exp_avg_l``/``exp_avg_r``), and writes ``result.json`` and ``loss_curves.png`` into ``--out``.
Step times are recorded but not compared: this runs on shared, busy CPUs.

    python benchmarks/studies/adapm/adapm.py                 # AdamW, Adam-mini, AdaPM (~4-6 min on 2 busy cores)
    python benchmarks/studies/adapm/adapm.py --ablations --out benchmarks/studies/adapm/results/ablations-seed0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import blockopt
from blockopt.bench import (CONFIGS, DEFAULT_MAX_BYTES, DEFAULT_STEPS, DEMO_CONFIG, TrainConfig, adamw, config_dict,
                            demo_data, plot_loss_curves, train_run, write_result)
from blockopt.optim.state import EXP_AVG, EXP_AVG_L, EXP_AVG_R

HERE = Path(__file__).resolve().parent
SETTINGS = {"lr": 2e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
LOOP = TrainConfig(steps=DEFAULT_STEPS)
# AdaPM as shipped (defaults) on the main comparison; variants only with --ablations.
ADAPM_DEFAULT: dict = {}
ABLATIONS: dict[str, dict] = {
    "AdaPM 1 fit iter": {"fit_iters": 1},
    "AdaPM 3 fit iters": {"fit_iters": 3},
    "AdaPM r=4": {"rank": 4},
    "AdaPM r=16": {"rank": 16},
    "AdaPM fit_lr=0.5": {"fit_lr": 0.5},
    "AdaPM no correction": {"residual_clip": 0.0},
    "AdaPM unclipped correction": {"residual_clip": None},
    "AdaPM head lowrank": {"momentum": {"head": "lowrank"}},
    "AdaPM attn_out lowrank": {"momentum": {"attn_out": "lowrank"}},
    "AdaPM adam v": {"second_moment": "adam"},
}


def momentum_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of first-moment state: full momenta and low-rank factors."""
    return sum(
        t.numel() * t.element_size()
        for state in optimizer.state.values()
        for key, t in state.items()
        if key in (EXP_AVG, EXP_AVG_L, EXP_AVG_R)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablations", action="store_true", help="also run AdaPM variants")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "default", help="the run's folder")
    parser.add_argument("--seed", type=int, default=0, help="model init and batch order (the same for every run)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on shared, oversubscribed cores a second OpenMP thread "
                             "makes this model's small matmuls many times slower; losses do not depend on it)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    config = CONFIGS[DEMO_CONFIG]
    tokenized, data = demo_data(config.vocab_size)

    variants = {"AdaPM": ADAPM_DEFAULT, **(ABLATIONS if args.ablations else {})}
    makers = {
        "AdamW": lambda model: adamw(model, **SETTINGS),
        "Adam-mini": lambda model: blockopt.AdamMini(model, **SETTINGS),
        **{name: (lambda kw: lambda model: blockopt.AdaPM(model, **SETTINGS, **kw))(kw) for name, kw in variants.items()},
    }
    results, memory, policies = {}, {}, {}
    for name, make in makers.items():
        built = []

        def keep(model, make=make, built=built):
            built.append(make(model))
            return built[-1]

        results[name] = train_run(config, keep, data, LOOP, seed=args.seed, progress=False, desc=name)
        opt = built[-1]
        memory[name] = {"state_bytes": blockopt.state_bytes(opt), "momentum_bytes": momentum_bytes(opt)}
        if isinstance(opt, blockopt.AdaPM):
            counts: dict[str, int] = {}
            for policy in opt.policies.values():
                counts[policy] = counts.get(policy, 0) + 1
            group = opt.param_groups[0]
            policies[name] = {
                "changed_from_defaults": variants[name],
                "rank": group["rank"], "fit_iters": group["fit_iters"], "fit_lr": group["fit_lr"],
                "residual_clip": group["residual_clip"], "second_moment": opt.second_moment,
                "momentum_per_role": opt.momentum, "tensors_per_policy": counts,
            }
        r = results[name]
        print(f"{name:28s} train {r.final_train_loss:.4f}  val {r.final_val_loss:.4f}  "
              f"state {memory[name]['state_bytes'] / 2**20:6.3f} MB  momentum {memory[name]['momentum_bytes'] / 2**20:6.3f} MB  "
              f"({r.wall_s:.0f} s)", flush=True)

    reference = results["AdamW"]
    comparison = {
        name: {
            "momentum_ratio_vs_adamw": memory[name]["momentum_bytes"] / memory["AdamW"]["momentum_bytes"],
            "state_ratio_vs_adamw": memory[name]["state_bytes"] / memory["AdamW"]["state_bytes"],
            "val_loss_difference_vs_adamw": r.final_val_loss / reference.final_val_loss - 1.0,
        }
        for name, r in results.items()
    }
    targets = {"momentum_ratio_max": 0.10, "state_ratio_max": 0.10, "val_loss_difference_max": 0.02}
    main_adapm = comparison["AdaPM"]
    met = {
        "momentum": main_adapm["momentum_ratio_vs_adamw"] <= targets["momentum_ratio_max"],
        "state": main_adapm["state_ratio_vs_adamw"] <= targets["state_ratio_max"],
        "val_loss": abs(main_adapm["val_loss_difference_vs_adamw"]) <= targets["val_loss_difference_max"]
        or main_adapm["val_loss_difference_vs_adamw"] < 0,
    }
    for name, c in comparison.items():
        print(f"{name:28s} momentum {c['momentum_ratio_vs_adamw']:.3f}  state {c['state_ratio_vs_adamw']:.3f}  "
              f"val loss {100 * c['val_loss_difference_vs_adamw']:+.2f}% vs AdamW")
    print("targets met:", met)

    main_runs = {k: results[k] for k in ("AdamW", "Adam-mini", "AdaPM")}
    settings = {
        "model": {"name": DEMO_CONFIG, "n_params": reference.n_params, **config_dict(config)},
        "corpus": {"source": "stdlib", "max_bytes": DEFAULT_MAX_BYTES, "tokens": len(tokenized.ids)},
        "hyperparameters": {**SETTINGS, **LOOP.resolved(config.max_seq_len).to_dict(), "seed": args.seed,
                            "weight_decay_1d": 0.0},
        "adapm": policies,
        "targets": targets,
    }
    total_s = time.perf_counter() - started
    path = write_result(args.out, name="adapm", settings=settings, results={
        "memory": memory, "comparison": comparison, "targets_met": met,
        "runs": {name: r.to_dict() for name, r in results.items()}, "total_s": total_s,
    })
    plot = plot_loss_curves(main_runs, args.out / "loss_curves.png",
                            title=f"{DEMO_CONFIG} Llama ({reference.n_params:,} params): AdamW, Adam-mini, AdaPM")
    print(f"wrote {path} and {plot} in {total_s:.0f} s")


if __name__ == "__main__":
    main()
