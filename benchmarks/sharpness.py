"""Sharpness by block type of the 'demo' Llama during training (the sharpness-disparity check).

    python benchmarks/sharpness.py            # writes benchmarks/sharpness.json and .png
    python benchmarks/sharpness.py --vocab 16384 --kv-heads 4 --init-std 0.0566 --steps 600 \
        --checkpoints 0,100,300,600 --measures gauss_newton --out benchmarks/sharpness_paper_proportions

Wang et al. (2025) find the average sharpness of a Transformer's block types ordered
``Emb << QK < FFN < VO << Norm``, early in training and throughout. This trains the 'demo' Llama
on the built-in corpus with AdamW at the demo's settings (`blockopt.bench.demo.run_demo`: LR 2e-3,
betas (0.9, 0.95), weight decay 0.1, batch 32 x 128, 20% warm-up then cosine to 0.1x) through
`blockopt.bench.train.train_run`, and at each checkpoint measures, per block type, on one fixed
batch of validation windows (`blockopt.hessian.block_sharpness`):

* ``gauss_newton``: Tr(G_bb) / m_b for the Gauss-Newton part G of the Hessian (labels sampled
  from the model's softmax; the kind of Hessian approximation the paper's "average sharpness"
  uses),
* ``trace``: Tr(H_bb) / m_b of the exact Hessian (Hutchinson, Rademacher probes), and
* ``lambda_max``: the top eigenvalue of H_bb (power iteration),

where H_bb is the Hessian of the loss restricted to the type's parameters. Checkpoints are taken
just before the optimizer step that follows them (the weights after that many steps).
``--arch``, ``--vocab``, ``--dim``, ``--layers``, ``--kv-heads`` and ``--init-std`` change the
model; the second command above gives it the paper's proportions of vocabulary to width, fan-in
x σ² and multi-head attention (benchmarks/blockwise_lr.md). ``--lr`` changes AdamW's peak learning
rate and ``--seed`` the initial weights and batch order. ``--device cuda`` trains and measures
on a GPU; ``--corpus`` and ``--max-bytes`` change the text it trains on. Each checkpoint also
records every weight's RMS (``weight_rms``). The JSON and PNG are written after every checkpoint,
so a run stopped early keeps what it measured (``"complete": false`` until the run ends, with no
validation curve).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from blockopt.bench.comparison import environment
from blockopt.bench.corpus import DEFAULT_MAX_BYTES, CorpusError
from blockopt.bench.demo import DEFAULT_LR, _adamw, demo_data, demo_loop
from blockopt.bench.models import CONFIGS, GPT2Config, LlamaConfig, ModelConfig, build_model, config_dict
from blockopt.bench.train import _windows, count_params, train_run
from blockopt.cli import _positive_int
from blockopt.hessian import block_sharpness

HERE = Path(__file__).resolve().parent
PAPER_ORDER = ["embedding", "qk", "ffn", "vo", "norm"]  # flattest to sharpest
MEASURES = ("gauss_newton", "trace", "lambda_max")
LABELS = {"embedding": "Emb", "qk": "QK", "ffn": "FFN", "vo": "VO", "norm": "Norm", "head": "Head",
          "pos_embedding": "Pos"}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that change the 'demo' Llama (each defaults to the demo's own value)."""
    parser.add_argument("--arch", choices=("llama", "gpt2"), default="llama",
                        help="the demo's Llama, or a GPT-2 of the demo's size (LayerNorm, learned positions, "
                             "GELU MLP 4x wide, tied output head)")
    parser.add_argument("--vocab", type=int, default=None, help="BPE vocabulary size (default: the demo's 2048)")
    parser.add_argument("--dim", type=int, default=None, help="model width (default: the demo's 128; MLP 8/3 of it)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the demo's 4)")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key/value heads (default: the demo's 2 of 4, grouped-query; 4 is plain multi-head)")
    parser.add_argument("--init-std", type=float, default=None,
                        help="std of the weight matrices and embeddings at init (default: the demo's 0.02)")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The 'demo' model with the changes asked for by `add_model_arguments`' flags."""
    demo = CONFIGS["demo"]
    asked = {"vocab_size": args.vocab, "n_layers": args.layers, "init_std": args.init_std}
    if args.arch == "gpt2":
        if args.kv_heads is not None:
            raise SystemExit("error: --kv-heads is for --arch llama (GPT-2 attention is plain multi-head)")
        base = GPT2Config(vocab_size=demo.vocab_size, dim=demo.dim, n_layers=demo.n_layers, n_heads=demo.n_heads,
                          max_seq_len=demo.max_seq_len, init_std=demo.init_std)
    else:
        base, asked["n_kv_heads"] = demo, args.kv_heads
    changes = {k: v for k, v in asked.items() if v is not None}
    if args.dim is not None:
        # mlp_hidden=None makes the config derive the MLP width from the new width again
        changes.update(dim=args.dim, mlp_hidden=None)
    return replace(base, **changes)


def describe(model: dict) -> str:
    """'demo Llama' or 'demo-size GPT-2', from a `config_dict`."""
    return "demo Llama" if model["arch"] == "llama" else "demo-size GPT-2"


def attention_heads(model: dict) -> str:
    """How the attention's key/value heads are shared, from a `config_dict`."""
    return f"{model['n_kv_heads']} kv heads" if "n_kv_heads" in model else f"{model['n_heads']} heads"


def plot_title(model: dict, n_params: int, batch: int) -> str:
    """The figure's title, from the model's `config_dict`."""
    return (f"{describe(model)} ({n_params:,} params, {model['n_layers']} layers, width {model['dim']}, "
            f"vocabulary {model['vocab_size']},\n"
            f"{attention_heads(model)}, init std {model['init_std']:g}): "
            f"sharpness by block type, batch {batch}x128")


def pairwise(values: dict[str, float]) -> dict[str, bool]:
    """For each adjacent pair of the paper's chain, whether it holds here."""
    pairs = zip(PAPER_ORDER, PAPER_ORDER[1:])
    return {f"{a} < {b}": values[a] < values[b] for a, b in pairs if a in values and b in values}


def tensor_sizes(model: dict) -> dict[str, int]:
    """Each parameter's element count for a report's `config_dict`, from a model built on the meta device."""
    fields = {k: v for k, v in model.items() if k not in ("name", "n_params", "arch")}
    config = (GPT2Config if model["arch"] == "gpt2" else LlamaConfig)(**fields)
    with torch.device("meta"):
        return {name: p.numel() for name, p in build_model(config).named_parameters()}


def gauss_newton_without(types: dict, sizes: dict[str, int], prefix: str) -> dict[str, float]:
    """Each type's Gauss-Newton value per parameter, leaving out the tensors whose names start with
    ``prefix``: the size-weighted mean of its other tensors' values (the report's per-type value is
    that mean over all of them)."""
    values = {}
    for block_type, entry in types.items():
        per_tensor = entry.get("tensor_gauss_newton") or {}  # absent from reports older than the field
        kept = {n: v for n, (v, _) in per_tensor.items() if not n.startswith(prefix)}
        if kept:
            values[block_type] = sum(sizes[n] * v for n, v in kept.items()) / sum(sizes[n] for n in kept)
    return values


def summarize(report: dict, without: str = "layers.0.") -> str:
    """A markdown table of a report's Gauss-Newton orderings and the ratios of the paper's adjacent
    pairs (above 1 where the paper's link holds), over all layers and without the tensors named
    ``without*`` (by default the first layer)."""

    def ratios(values: dict[str, float]) -> str:
        return " / ".join(f"{values[b] / values[a]:.2f}" if a in values and b in values else "-"
                          for a, b in zip(PAPER_ORDER, PAPER_ORDER[1:]))

    sizes = tensor_sizes(report["model"])
    pairs = ", ".join(f"{LABELS[b]}/{LABELS[a]}" for a, b in zip(PAPER_ORDER, PAPER_ORDER[1:]))
    rows = [f"| after steps | flattest → sharpest | {pairs} | the same without `{without}*` |", "|---|---|---|---|"]
    for step, entry in report["checkpoints"].items():
        values = {t: e["gauss_newton_per_param"] for t, e in entry["types"].items()}
        order = " < ".join(LABELS.get(t, t) for t in sorted(values, key=values.__getitem__))
        rows.append(f"| {step} | {order} | {ratios(values)} | "
                    f"{ratios(gauss_newton_without(entry['types'], sizes, without))} |")
    if report.get("complete") is False:  # reports from before the flag are all complete
        rows.append(f"\nStopped early: measured through step {max(map(int, report['checkpoints']))} "
                    f"of the {report['training']['steps']}-step schedule.")
    return "\n".join(rows)


def plot(checkpoints: dict[int, dict], path: Path, title: str, measures=MEASURES) -> None:
    fig = Figure(figsize=(17 * len(measures) / len(MEASURES) + 1, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    steps = sorted(checkpoints)
    types = PAPER_ORDER + [t for t in checkpoints[steps[-1]]["types"] if t not in PAPER_ORDER]
    width = 0.8 / len(steps)
    panels = [
        ("gauss_newton", "gauss_newton_per_param", "Tr(G_bb) / m_b (Gauss-Newton average sharpness)"),
        ("trace", "trace_per_param", "Tr(H_bb) / m_b (exact Hessian)"),
        ("lambda_max", "lambda_max", "λ_max(H_bb)"),
    ]
    for ax, (measure, key, label) in zip(axes, [panel for panel in panels if panel[0] in measures]):
        for j, step in enumerate(steps):
            entries = checkpoints[step]["types"]
            xs, ys, bad = [], [], []
            for i, t in enumerate(types):
                value = entries[t][key] if t in entries else None
                x = i + (j - (len(steps) - 1) / 2) * width
                if value is not None and value > 0:
                    xs.append(x)
                    ys.append(value)
                elif value is not None:
                    bad.append(x)
            ax.bar(xs, ys, width=width, color=f"C{j}", label=f"after {step} steps")
            for x in bad:  # a non-positive estimate has no place on a log axis: mark it
                ax.annotate("≤0", (x, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(types)), [LABELS.get(t, t) for t in types])
        ax.set(title=label, ylabel=measure)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="length of the training schedule")
    parser.add_argument("--checkpoints", default="0,25,50,100", help="steps after which to measure")
    parser.add_argument("--batch", type=int, default=16, help="validation windows in the measured batch")
    parser.add_argument("--iters", type=int, default=20, help="power-iteration limit per type")
    parser.add_argument("--probes", type=int, default=8, help="Hutchinson probes per type")
    parser.add_argument("--gn-samples", type=int, default=32, help="sampled label sets for the Gauss-Newton trace")
    add_model_arguments(parser)
    parser.add_argument("--measures", nargs="+", default=list(MEASURES), choices=list(MEASURES))
    parser.add_argument("--corpus", metavar="PATH",
                        help="text file or folder to train and measure on (default: the built-in corpus)")
    parser.add_argument("--max-bytes", type=_positive_int, default=DEFAULT_MAX_BYTES,
                        help=f"cap on the corpus size in bytes, as in `blockopt compare` (default: {DEFAULT_MAX_BYTES:,})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help=f"AdamW's peak learning rate (default: the demo's {DEFAULT_LR:g})")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights and batch order (default: the demo's 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="where to train and measure, e.g. cuda (default: cpu)")
    parser.add_argument("--out", type=Path, default=HERE / "sharpness")
    parser.add_argument("--summarize", type=Path, metavar="JSON",
                        help="print a written report's orderings and pair ratios as a table, and exit")
    args = parser.parse_args(argv)
    if args.summarize is not None:
        report = json.loads(args.summarize.read_text())
        print(summarize(report))
        return report
    if not args.lr > 0:  # also refuses nan
        parser.error(f"--lr must be a positive number, got {args.lr}")
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",")})
    if checkpoints[0] < 0 or checkpoints[-1] > args.steps:
        parser.error(f"checkpoints must lie in [0, --steps={args.steps}]")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    config = model_config(args)
    try:
        _, data = demo_data(config.vocab_size, args.corpus, max_bytes=args.max_bytes)
    except (FileNotFoundError, CorpusError) as error:
        parser.error(f"--corpus: {error}")
    windows = _windows(data.val, 128)
    batch = windows[torch.linspace(0, len(windows) - 1, args.batch).long()].to(args.device)  # fixed, evenly spaced

    results: dict[int, dict] = {}
    holder = {}
    adamw = {"lr": args.lr, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}  # the demo's, at --lr

    def write(val_curve) -> dict:
        """Write the JSON and PNG of the checkpoints measured so far; ``complete`` is false (and
        ``val_curve`` null) until the run has finished."""
        last = results[max(results)]
        n_params = count_params(holder["model"])
        plot(results, args.out.with_suffix(".png"), plot_title(config_dict(config), n_params, args.batch),
             args.measures)
        report = {
            "command": "python benchmarks/sharpness.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "complete": val_curve is not None,
            "paper_order": PAPER_ORDER,
            "model": {"name": "demo", "n_params": n_params, **config_dict(config)},
            "training": {"optimizer": "AdamW", **adamw, "betas": list(adamw["betas"]), "steps": args.steps,
                         "seed": args.seed, "batch_size": 32, "seq_len": 128, "corpus": args.corpus,
                         "max_bytes": args.max_bytes,
                         "train_tokens": len(data.train), "val_curve": val_curve},
            "measurement": {"batch": args.batch, "seq_len": 128, "iters": args.iters, "probes": args.probes,
                            "gn_samples": args.gn_samples, "seed": 0},
            "checkpoints": {str(k): v for k, v in sorted(results.items())},
            "final_ordering": last["ordering"],
            "final_paper_pairs": last["paper_pairs"],
            "wall_s": time.perf_counter() - started,
            "environment": environment(args.device),  # versions, CPU or GPU, torch threads, load average
        }
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
        return report

    def measure(done: int) -> bool:
        """Measure the weights after ``done`` steps if that is a checkpoint; True if it was."""
        if done not in checkpoints or done in results:
            return False
        model = holder["model"]
        t = time.perf_counter()
        report = block_sharpness(
            model, lambda: model(batch[:, :-1], batch[:, 1:])[1], iters=args.iters, probes=args.probes, seed=0,
            measures=args.measures, logits_fn=lambda: model(batch[:, :-1])[0], gn_samples=args.gn_samples,
        )
        entry = report.to_dict()
        entry["ordering"] = {m: report.ordering(m) for m in args.measures}
        entry["paper_pairs"] = {m: pairwise(report.values_of(m)) for m in args.measures}
        # the weights' scale: a norm's curvature grows with fan-out x mean square of the matrices it feeds
        entry["weight_rms"] = {name: p.detach().float().square().mean().sqrt().item()
                               for name, p in model.named_parameters()}
        entry["seconds"] = time.perf_counter() - t
        results[done] = entry
        print(f"--- after {done} steps ({entry['seconds']:.0f}s)\n{report}", flush=True)
        for m in args.measures:
            print(f"    flattest -> sharpest ({m}):".ljust(38), " < ".join(entry["ordering"][m]), flush=True)
        return True

    def make(model):
        holder["model"] = model
        optimizer = _adamw(model, **adamw)
        steps_done = itertools.count()

        def before_step(*_):
            # the weights after that many steps; a run stopped later still leaves what it measured
            if measure(next(steps_done)):
                write(val_curve=None)

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    run = train_run(
        config, make, data, **demo_loop(args.steps, seed=args.seed), device=args.device,
        progress=sys.stderr.isatty(), desc="AdamW",
    )
    measure(args.steps)  # after the last step

    report = write(val_curve=run.val_curve)
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')} ({report['wall_s']:.0f}s)")
    return report


if __name__ == "__main__":
    main()
