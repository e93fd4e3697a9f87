"""Blockwise LR probes: which block types take a higher LR, and what else moves the figure of merit.

    python benchmarks/studies/blockwise_lr/blockwise_lr_probes.py        # results/probes (about 25 min)

Same model, corpus, schedule and figure of merit as blockwise_lr.py: the demo Llama,
batches of 32 x 128 tokens, 20% warm-up then cosine to 0.1x, and the steps a run needs to first
reach plain AdamW's final validation loss after ``--steps`` (200), as a fraction of those steps.
Every run starts from the same init and sees the same batches. Groups of runs:

* ``probe-<type>``: AdamW with one block type at 3x the base LR (2e-3), every other type at 1x.
  Which types gain from a faster LR, and which lose?
* ``floor-*``: the shared LR floor of the Blockwise LR authors (every group decays to the same
  absolute LR, ``train_run(shared_floor=True)``) instead of each group's own 0.1x.
* ``init-*``: ratios from the sharpness at initialisation (checkpoint 0 of ``--sharpness``), which
  needs no pilot training run.
* ``short-*``: whole schedules (warm-up and decay) of ``--short`` times the steps. A run counts as
  a speed-up of that size if its *final* loss reaches AdamW's: the other way to read "steps to
  reach AdamW's loss over a full schedule".
* ``combo-*``: ratio tables guided by the probes. ``combo-a`` (and ``combo-mini-a``) from
  AdamW's probes at 200 steps; ``combo-b`` (and ``combo-mini-b``) from Adam-mini's own probes and
  a few ``--table`` runs at 100 steps, seed 0 (only with ``--only``).
* ``mini-probe-<type>``, ``mini-plain`` (only with ``--only``): the probes with Adam-mini, and
  Adam-mini with every ratio 1.
* ``control-4e-3`` (only with ``--only``): plain AdamW at twice the base LR, over the full
  schedule: is a table better than one higher LR?
* ``--table NAME=OPTIMIZER:TYPE=RATIO,...``: any other table, run beside the chosen variants.
* ``paper``, ``mini-paper`` (only with ``--only``): the paper's table with AdamW and Adam-mini,
  for a model changed by ``--vocab``, ``--kv-heads``, ``--init-std`` or ``--dim`` (the flags of
  sharpness.py); pass that model's own ``--sharpness`` report too.

Ratios named "measured" are `blockopt.sharpness_ratios` (power 0.5) of the Gauss-Newton sharpness
at the last checkpoint of ``--sharpness`` (the sharpness study's ``demo`` run), as in blockwise_lr.py.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import blockopt
from blockopt.bench import TrainConfig, config_dict, demo_data, steps_to_reach, train_run, write_result
from blockopt.bench.analysis.sharpness import attention_heads, describe
from blockopt.bench.analysis.sharpness_run import add_model_arguments, model_from_args

# the script beside this one (a script's folder is first on sys.path)
from blockwise_lr import BETAS, EPS, REPO, SHARPNESS, WEIGHT_DECAY, make_optimizer, measured_sharpness

HERE = Path(__file__).resolve().parent

BASE_LR = 2e-3
PROBE_RATIO = 3.0
PROBED = ("embedding", "head", "qk", "vo", "ffn", "norm")
# run only when named in --only: the paper's table (with the authors' floor, and plain), and the
# Adam-mini probes, combo-b and the control added at 100 steps (so the default run stays as committed)
ONLY_ON_REQUEST = ("floor-paper", "floor-paper-head-4x", "paper", "mini-paper", "mini-plain",
                   *(f"mini-probe-{t}" for t in PROBED), "combo-b", "combo-mini-b", "control-4e-3",
                   "short-b", "short-mini-b")


def table(**ratios: float) -> dict[str, float]:
    """A ratio table over the probed types: the given ones, 1 for the rest."""
    return {t: float(ratios.get(t, 1.0)) for t in PROBED}


COMBO_A = table(head=3, embedding=3, norm=3, qk=3)  # from AdamW's probes at 200 steps
COMBO_B = table(embedding=10, head=4, qk=2, ffn=1.5)  # from Adam-mini's probes at 100 steps


def run_spec(optimizer="AdamW", ratios=None, lr=BASE_LR, shared_floor=False, group="") -> dict:
    """A run: optimizer, ratios (None: plain AdamW), base LR, shared floor, group."""
    return dict(optimizer=optimizer, ratios=ratios, lr=lr, shared_floor=shared_floor, group=group)


def parse_table(text: str) -> tuple[str, dict]:
    """``NAME=OPTIMIZER:TYPE=RATIO,...`` (a ``--table`` flag) -> (name, run spec)."""
    name, _, rest = text.partition("=")
    optimizer, _, pairs = rest.partition(":")
    if not name or optimizer not in ("AdamW", "AdamMini") or not pairs:
        raise ValueError(f"--table {text!r}: write NAME=AdamW:TYPE=RATIO,... or NAME=AdamMini:TYPE=RATIO,...")
    ratios = {}
    for pair in pairs.split(","):
        block_type, _, ratio = pair.partition("=")
        if block_type not in PROBED:
            raise ValueError(f"--table {text!r}: unknown block type {block_type!r}; choose from {PROBED}")
        try:
            ratios[block_type] = float(ratio)
        except ValueError:
            raise ValueError(f"--table {text!r}: the ratio of {block_type!r} must be a number, got {ratio!r}") from None
    return name, run_spec(optimizer, table(**ratios), group="table")


def variants(measured: dict[str, float], at_init: dict[str, float]) -> dict[str, dict]:
    """name -> `run_spec`."""
    run = run_spec
    specs = {f"probe-{t}": run(ratios=table(**{t: PROBE_RATIO}), group="probe") for t in PROBED}
    specs.update({f"mini-probe-{t}": run("AdamMini", table(**{t: PROBE_RATIO}), group="mini-probe") for t in PROBED})
    specs.update({
        "floor-measured": run(ratios=measured, shared_floor=True, group="floor"),
        "floor-mini-measured": run("AdamMini", measured, shared_floor=True, group="floor"),
        "floor-paper": run(ratios={}, shared_floor=True, group="floor"),
        "floor-paper-head-4x": run(ratios={"head": 4.0}, shared_floor=True, group="floor"),
        "paper": run(ratios={}, group="paper"),
        "mini-paper": run("AdamMini", {}, group="paper"),
        "mini-plain": run("AdamMini", table(), group="plain"),
        "init-measured": run(ratios=at_init, group="init"),
        "init-mini-measured": run("AdamMini", at_init, group="init"),
        "short-adamw": run(group="short"),
        "short-control-4e-3": run(lr=4e-3, group="short"),
        "short-measured": run(ratios=measured, group="short"),
        "short-mini-measured": run("AdamMini", measured, group="short"),
        "combo-a": run(ratios=COMBO_A, group="combo"),
        "combo-c": run(ratios={**measured, "ffn": 1.0, "head": 4.0}, group="combo"),
        "combo-mini-a": run("AdamMini", COMBO_A, group="combo"),
        # combo-b: chosen at 100 steps, seed 0 (results/mini-probes-100steps)
        "combo-b": run(ratios=COMBO_B, group="combo"),
        "combo-mini-b": run("AdamMini", COMBO_B, group="combo"),
        "control-4e-3": run(lr=4e-3, group="control"),
        "short-b": run(ratios=COMBO_B, group="short"),
        "short-mini-b": run("AdamMini", COMBO_B, group="short"),
    })
    return specs


def plot(target_curve, results: dict, path: Path, title: str) -> None:
    """Left: validation curves of the runs that are not probes. Right: each probe's
    final loss against its optimizer's plain run (AdamW's; Adam-mini's is ``mini-plain``)."""
    target = target_curve[-1][1]
    mini_plain = results.get("mini-plain", {}).get("final_val_loss", target)
    # AdamW's probes by type alone, Adam-mini's as "mini-<type>": (final loss, its plain run's)
    probes = {n.removeprefix("probe-"): (r["final_val_loss"], target)
              for n, r in results.items() if r["group"] == "probe"}
    probes.update({n.replace("-probe", ""): (r["final_val_loss"], mini_plain)
                   for n, r in results.items() if r["group"] == "mini-probe"})
    fig = Figure(figsize=(12 if probes else 6.5, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    curves, *bars = fig.subplots(1, 2 if probes else 1, squeeze=False)[0]
    curves.plot(*zip(*target_curve), "--", color="black", label="AdamW", linewidth=1.3)
    shown = ((n, r) for n, r in results.items() if r["group"] not in ("probe", "mini-probe"))
    for i, (name, r) in enumerate(shown):
        short = r["group"] == "short"  # a complete schedule of fewer steps: dashed, its length named
        curves.plot(*zip(*r["val_curve"]), color=colormaps["tab20"](i % 20), linewidth=1.2,
                    linestyle="--" if short else "-", label=f"{name} ({r['steps']} steps)" if short else name)
    curves.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    last = min([target] + [r["final_val_loss"] for r in results.values()])
    curves.set(xlabel="step", ylabel="validation loss (nats/token)", ylim=(last - 0.05, target + 0.8),
               title="runs (dashed: shorter complete schedules; dotted: AdamW's final loss)")
    curves.grid(alpha=0.3)
    curves.legend(fontsize=8, ncols=2 if len(curves.get_lines()) > 8 else 1)
    if probes:
        bars = bars[0]
        gains = [loss - plain for loss, plain in probes.values()]
        bars.bar(list(probes), gains, color=["C2" if gain < 0 else "C3" for gain in gains])
        bars.axhline(0, color="black", linewidth=0.8)
        bars.tick_params(axis="x", labelrotation=30)
        bars.set(ylabel="final val loss minus the plain run's",
                 title=f"one block type at {PROBE_RATIO:g}x the base LR (vs the same optimizer at 1x)")
        bars.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--short", type=float, default=0.6,
                        help="length of the short-* schedules, as a share of --steps")
    parser.add_argument("--sharpness", type=Path, default=SHARPNESS, help="sharpness.py run (folder) to take ratios from")
    parser.add_argument("--seed", type=int, default=0, help="init and batch order of every run")
    parser.add_argument("--only", nargs="+", default=None, help="run only these variants (AdamW always runs)")
    parser.add_argument("--table", action="append", default=[], metavar="NAME=OPTIMIZER:TYPE=RATIO,...",
                        help="also run this ratio table (types not named stay at 1x), e.g. "
                        "mini-e6=AdamMini:embedding=6,head=3; repeatable")
    parser.add_argument("--threads", type=int, default=2)
    add_model_arguments(parser)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "probes", help="the run's folder")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    measured = blockopt.sharpness_ratios(measured_sharpness(args.sharpness)[1])
    at_init = blockopt.sharpness_ratios(measured_sharpness(args.sharpness, checkpoint=0)[1])
    specs = variants(measured, at_init)
    if args.only:
        unknown = sorted(set(args.only) - set(specs))
        if unknown:
            parser.error(f"unknown variants {unknown}; choose from {sorted(specs)}")
        if any(name.startswith("mini-probe-") for name in args.only) and "mini-plain" not in args.only:
            args.only.insert(0, "mini-plain")  # what Adam-mini's probes are measured against
        specs = {name: specs[name] for name in args.only}
    else:
        specs = {name: spec for name, spec in specs.items() if name not in ONLY_ON_REQUEST}
    for text in args.table:
        try:
            name, spec = parse_table(text)
        except ValueError as error:
            parser.error(str(error))
        specs[name] = spec

    try:
        config = model_from_args(args)
    except ValueError as error:
        parser.error(str(error))
    _, data = demo_data(config.vocab_size)
    reference = train_run(config, make_optimizer("AdamW", BASE_LR, None), data,
                          TrainConfig(steps=args.steps, eval_every=5), seed=args.seed, progress=False)
    target = reference.final_val_loss
    print(f"AdamW ({args.steps} steps): final val {target:.4f}", flush=True)
    results = {}
    for name, spec in specs.items():
        t = time.perf_counter()
        steps = round(args.short * args.steps) if spec["group"] == "short" else args.steps
        loop = TrainConfig(steps=steps, eval_every=5, shared_floor=spec["shared_floor"])
        run = train_run(config, make_optimizer(spec["optimizer"], spec["lr"], spec["ratios"]), data, loop,
                        seed=args.seed, progress=False, desc=name)
        reached = steps_to_reach(run.val_curve, target)
        results[name] = {
            **spec, "steps": steps,
            "ratios": None if spec["ratios"] is None else {k: round(v, 4) for k, v in spec["ratios"].items()},
            "final_val_loss": run.final_val_loss,
            "steps_to_adamw_final": reached,
            "steps_ratio": None if reached is None else reached / args.steps,
            "val_curve": run.val_curve,
        }
        shown = "never" if reached is None else f"{reached} ({reached / args.steps:.3f}x)"
        print(f"{name:<22} {steps} steps  final val {run.final_val_loss:.4f}  steps to AdamW's final: {shown}"
              f"  ({time.perf_counter() - t:.0f}s)", flush=True)
    spec = config_dict(config)
    loop = TrainConfig(steps=args.steps, eval_every=5).resolved(config.max_seq_len)
    settings = {"model": spec, **loop.to_dict(), "seed": args.seed, "base_lr": BASE_LR,
                "probe_ratio": PROBE_RATIO, "short": args.short, "betas": BETAS, "eps": EPS,
                "weight_decay": WEIGHT_DECAY, "sharpness_report": os.path.relpath(args.sharpness, REPO)}
    path = write_result(args.out, name="blockwise_lr_probes", settings=settings, results={
        "target": {"what": f"AdamW's final validation loss after {args.steps} steps", "val_loss": target,
                   "val_curve": reference.val_curve},
        "runs": results,
        "wall_s": time.perf_counter() - started,
    })
    model = f"vocabulary {config.vocab_size}, {attention_heads(spec)}, init std {config.init_std:g}"
    title = f"{describe(spec)} ({model}),\n{args.steps} steps, seed {args.seed}: blockwise LR probes"
    plot(reference.val_curve, results, args.out / "probes.png", title)
    print(f"wrote {path} and probes.png ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
