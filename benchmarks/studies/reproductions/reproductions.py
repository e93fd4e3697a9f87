"""CPU-scale reproductions of the Adam-mini paper's training claims, one subcommand each.

    python benchmarks/studies/reproductions/reproductions.py gpt2         # Adam-mini vs AdamW, GPT-2-style, 3 seeds (Fig. 9/10)
    python benchmarks/studies/reproductions/reproductions.py partition    # Principle 1 vs coarser partitions (Fig. 8, 9a)
    python benchmarks/studies/reproductions/reproductions.py trajectory   # distance to AdamW's weights (Fig. 10c)
    python benchmarks/studies/reproductions/reproductions.py sensitivity  # lr x beta2 grid (Fig. 12b)
    python benchmarks/studies/reproductions/reproductions.py scaling      # final val loss over model sizes (Fig. 12a)

Each writes ``results/<name>/result.json`` (every curve point, settings, versions) and a figure
beside it. All runs share the built-in corpus, its BPE tokenizer, the warm-up + cosine
schedule and, within a comparison, the model init and batch order (seed), so runs differ only by
what is compared. The Llama-style comparison over 3 seeds is `blockopt compare`'s default run
(benchmarks/studies/compare). Write-up: README.md beside this script.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import blockopt
from blockopt.bench import (CONFIGS, GPT2Config, LlamaConfig, TrainConfig, build_optimizer, config_dict, demo_data,
                            read_result, train_run, write_result)

OUT = Path(__file__).resolve().parent / "results"
SHARED = dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # `blockopt demo`'s settings
VOCAB = 2048
GPT2_DEMO = GPT2Config(vocab_size=VOCAB, dim=128, n_layers=4, n_heads=4, max_seq_len=128)

_data_cache: dict[int, object] = {}


def data(vocab: int = VOCAB):
    if vocab not in _data_cache:
        _data_cache[vocab] = demo_data(vocab)[1]
    return _data_cache[vocab]



def peer(spec: str, **shared):
    return lambda model: build_optimizer(spec, model, {**SHARED, **shared})


def loop_record(steps: int = 100) -> dict:
    """The training loop every run uses (`TrainConfig`'s defaults, the demo's), as recorded."""
    return {**TrainConfig(steps=steps).resolved().to_dict(), "seed": 0}


def run(label: str, config, make, seed: int = 0, **settings):
    start = time.perf_counter()
    result = train_run(config, make, data(config.vocab_size), TrainConfig(**settings), seed=seed, progress=False,
                       desc=label)
    print(f"  {label:<44} seed {seed}: val {result.final_val_loss:.4f}  train {result.final_train_loss:.4f}  "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return result


def save(name: str, settings: dict, results: dict, figure, figure_name: str) -> None:
    """Write ``results/<name>/result.json`` and the figure beside it."""
    path = write_result(OUT / name, name="reproductions", settings={"experiment": name, **settings}, results=results)
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    figure.savefig(OUT / name / figure_name, dpi=120)
    print(f"wrote {path} and {figure_name}")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ---- Fig. 9/10: Adam-mini ~ AdamW on a GPT-2-style model -------------------------------------
def gpt2(seeds=(0, 1, 2)) -> None:
    runs = {name: [run(name, GPT2_DEMO, peer(name), seed=s) for s in seeds] for name in ("adamw", "adam-mini")}
    finals = {name: [r.final_val_loss for r in rs] for name, rs in runs.items()}
    means = {name: sum(v) / len(v) for name, v in finals.items()}
    diffs = [m / a - 1 for m, a in zip(finals["adam-mini"], finals["adamw"])]
    print(f"mean val: AdamW {means['adamw']:.4f}, Adam-mini {means['adam-mini']:.4f} "
          f"({100 * (means['adam-mini'] / means['adamw'] - 1):+.2f}%; per seed {', '.join(f'{100 * d:+.2f}%' for d in diffs)})")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rs in runs.items():
        steps = [s for s, _ in rs[0].val_curve]
        values = torch.tensor([[v for _, v in r.val_curve] for r in rs])
        line, = ax.plot(steps, values.mean(0), label=f"{name} (mean of {len(rs)} seeds)")
        ax.fill_between(steps, values.min(0).values, values.max(0).values, color=line.get_color(), alpha=0.2)
    ax.set(xlabel="step", ylabel="validation loss", title=f"GPT-2-style ({runs['adamw'][0].n_params:,} params), min-max band")
    ax.legend()
    save("gpt2", {"model": config_dict(GPT2_DEMO), "shared": SHARED, "loop": loop_record(), "seeds": list(seeds)}, {
        "final_val": finals, "mean_final_val": means, "val_difference_per_seed": diffs,
        "val_difference_of_means": means["adam-mini"] / means["adamw"] - 1,
        "runs": {name: [r.to_dict() for r in rs] for name, rs in runs.items()},
    }, fig, "val_loss.png")


# ---- Fig. 8 / 9a: the partition matters -------------------------------------------------------
def embedding_rules(model) -> dict[str, str]:
    """One block for each of the token embedding and the output head (and their tied name)."""
    plan = blockopt.partition(model)
    return {name: "whole" for name, spec in plan.items() if spec.role in ("embedding", "head")}


PARTITIONS = {
    "Principle 1 (default)": lambda model, lr: blockopt.AdamMini(model, **{**SHARED, "lr": lr}),
    "one block per tensor (PyTorch default)": lambda model, lr: blockopt.AdamMini(model, **{**SHARED, "lr": lr}, rules={"*": "whole"}),
    "embedding + head as one block": lambda model, lr: blockopt.AdamMini(model, **{**SHARED, "lr": lr}, rules=embedding_rules(model)),
    "AdamW": lambda model, lr: build_optimizer("adamw", model, {**SHARED, "lr": lr}),
}


def partition(lrs=(2e-3, 6e-3)) -> None:
    config = CONFIGS["demo"]
    results = {}
    for lr in lrs:
        for name, make in PARTITIONS.items():
            results[f"{name} @ lr={lr:g}"] = run(f"{name} @ lr={lr:g}", config, lambda m, make=make, lr=lr: make(m, lr))
    plt = pyplot()
    fig, axes = plt.subplots(1, len(lrs), figsize=(6 * len(lrs), 4), sharey=True)
    for ax, lr in zip(axes, lrs):
        for name in PARTITIONS:
            r = results[f"{name} @ lr={lr:g}"]
            ax.plot(*zip(*r.train_curve), label=f"{name}: val {r.final_val_loss:.3f}", lw=1)
        ax.set(xlabel="step", ylabel="train loss", title=f"demo Llama, peak lr {lr:g}", ylim=(4, 9))
        ax.legend(fontsize=8)
    save("partition", {"model": config_dict(config), "shared": SHARED, "loop": loop_record(), "lrs": list(lrs)}, {
        "final_val": {k: r.final_val_loss for k, r in results.items()},
        "max_train_loss_after_warmup": {k: max(v for s, v in r.train_curve if s > TrainConfig().resolved().warmup_steps) for k, r in results.items()},
        "runs": {k: r.to_dict() for k, r in results.items()},
    }, fig, "train_loss.png")


# ---- Fig. 10c: how far each optimizer's weights drift from AdamW's -----------------------------
def trajectory(every: int = 10) -> None:
    config = CONFIGS["demo"]
    peers = {"adamw": "adamw", "adam-mini": "adam-mini", "adafactor": "adafactor", "sgd-sai": "sgd-sai"}
    snapshots: dict[str, dict[int, torch.Tensor]] = {}
    results = {}
    for label, spec in peers.items():
        holder = {}

        def make(model, spec=spec, holder=holder):
            holder["model"] = model
            holder[0] = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
            return peer(spec)(model)

        def snapshot(step, _loss, holder=holder):
            if step % every == 0:
                holder[step] = torch.cat([p.detach().flatten() for p in holder["model"].parameters()]).clone()

        results[label] = train_run(config, make, data(), TrainConfig(), progress=False, callback=snapshot)
        snapshots[label] = {k: v for k, v in holder.items() if isinstance(k, int)}
        print(f"  {label:<12} val {results[label].final_val_loss:.4f}", flush=True)
    reference = snapshots["adamw"]
    start = reference[0]
    distances = {
        label: [(s, ((snap[s] - reference[s]).norm() / (reference[s] - start).norm()).item()) for s in sorted(reference) if s > 0]
        for label, snap in snapshots.items() if label != "adamw"
    }
    for label, d in distances.items():
        print(f"  {label:<12} relative distance to AdamW at the end: {d[-1][1]:.3f}")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, d in distances.items():
        ax.plot(*zip(*d), marker="o", ms=3, label=label)
    ax.set(xlabel="step", ylabel="||w - w_AdamW|| / ||w_AdamW - w_0||", title="Distance to AdamW's trajectory (demo Llama)")
    ax.legend()
    save("trajectory", {"model": config_dict(config), "shared": SHARED, "loop": loop_record(), "every": every}, {
        "relative_distance_to_adamw": distances, "final_val": {k: r.final_val_loss for k, r in results.items()},
        "runs": {k: r.to_dict() for k, r in results.items()},
    }, fig, "distance.png")


# ---- Fig. 12b: sensitivity to lr and beta2 -----------------------------------------------------
def sensitivity(lrs=(1e-3, 2e-3, 4e-3, 8e-3), beta2s=(0.95, 0.99, 0.999), steps: int = 100) -> None:
    config = CONFIGS["demo"]
    grid: dict[str, list[list[float]]] = {}
    for name in ("adamw", "adam-mini"):
        grid[name] = [[run(f"{name} lr={lr:g} beta2={b2}", config, peer(name, lr=lr, betas=(0.9, b2)), steps=steps).final_val_loss
                       for b2 in beta2s] for lr in lrs]
    settings = {"model": config_dict(config), "shared": SHARED, "loop": loop_record(steps), "lrs": list(lrs),
                "beta2s": list(beta2s)}
    save("sensitivity", settings, {"final_val": grid}, sensitivity_figure(lrs, beta2s, grid), "grid.png")


def sensitivity_figure(lrs, beta2s, grid: dict):
    """The lr x beta2 heat maps of a sensitivity grid ``{optimizer: [[val loss per beta2] per lr]}``,
    on one colour scale."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    low = min(min(min(row) for row in g) for g in grid.values())
    high = max(max(max(row) for row in g) for g in grid.values())
    for ax, (name, g) in zip(axes, grid.items()):
        image = ax.imshow(g, vmin=low, vmax=high, cmap="viridis_r")
        for i, row in enumerate(g):
            for j, value in enumerate(row):
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=8, color="w")
        ax.set_xticks(range(len(beta2s)), [str(b) for b in beta2s])
        ax.set_yticks(range(len(lrs)), [f"{lr:g}" for lr in lrs])
        ax.set(xlabel="beta2", ylabel="peak lr", title=f"{name}: final val loss")
    fig.colorbar(image, ax=list(axes), shrink=0.9)
    return fig


# ---- Fig. 12a: a small scaling sweep --------------------------------------------------------
SIZES = {
    "xs": LlamaConfig(vocab_size=VOCAB, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=128),
    "s": LlamaConfig(vocab_size=VOCAB, dim=96, n_layers=3, n_heads=3, n_kv_heads=1, max_seq_len=128),
    "m": CONFIGS["demo"],
    "l": LlamaConfig(vocab_size=VOCAB, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=128),
}


def scaling() -> None:
    table = {}
    for size, config in SIZES.items():
        rs = {name: run(f"{size} {name}", config, peer(name)) for name in ("adamw", "adam-mini")}
        table[size] = {"n_params": rs["adamw"].n_params, **{name: r.final_val_loss for name, r in rs.items()}}
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    n = [row["n_params"] for row in table.values()]
    for name in ("adamw", "adam-mini"):
        ax.plot(n, [row[name] for row in table.values()], marker="o", label=name)
    ax.set(xscale="log", xlabel="parameters", ylabel="final validation loss", title="Scaling (100 steps of 32x128 tokens)")
    ax.legend()
    save("scaling", {"sizes": {k: config_dict(c) for k, c in SIZES.items()}, "shared": SHARED, "loop": loop_record()},
         {"final_val": table}, fig, "val_loss.png")


def main() -> None:
    commands = {"gpt2": gpt2, "partition": partition, "trajectory": trajectory, "sensitivity": sensitivity, "scaling": scaling}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="+", choices=list(commands))
    parser.add_argument("--replot", action="store_true", help="redraw results/sensitivity/grid.png from its JSON (no training)")
    args = parser.parse_args()
    if args.replot:
        if args.what != ["sensitivity"]:
            parser.error("--replot redraws the sensitivity figure only")
        report = read_result(OUT / "sensitivity")
        figure = sensitivity_figure(report["settings"]["lrs"], report["settings"]["beta2s"], report["results"]["final_val"])
        figure.savefig(OUT / "sensitivity" / "grid.png", dpi=120)
        return
    for name in args.what:
        print(f"== {name}", flush=True)
        commands[name]()


if __name__ == "__main__":
    main()
