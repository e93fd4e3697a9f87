"""SGD-SaI against AdamW on the built-in "demo" Llama (the settings of ``blockopt demo``).

    python benchmarks/sgd_sai_vs_adamw.py            # writes benchmarks/sgd_sai.json and sgd_sai.png

(Not named sgd_sai.py: a script's folder comes first on sys.path, and that name would hide the
`sgd-sai` package from every script run here.)

Both optimizers train the same model (same init, same batches, same warm-up + cosine schedule,
gradient clipping at 1) on the Python standard library's source, tokenized with the built-in BPE:
100 steps of 32 x 128 tokens. AdamW runs at the demo's settings (lr 2e-3, betas (0.9, 0.95),
weight decay 0.1 on matrices and embeddings). SGD-SaI's lr is on another scale (its step is
``lr * gsnr * m`` and the gsnr grows like the square root of a tensor's size), so it gets its own
sweep, every point of which is reported; its other settings are the package's defaults
(momentum 0.9, weight decay 1e-2 on every tensor, one block per tensor, no normalisation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

import blockopt
from blockopt.bench.comparison import environment
from blockopt.bench.corpus import load_corpus, split_ids
from blockopt.bench.demo import demo_loop
from blockopt.bench.models import CONFIGS, config_dict
from blockopt.bench.plots import plot_loss_curves
from blockopt.bench.tokenizer import tokenize_corpus
from blockopt.bench.train import RunResult, train_run

HERE = Path(__file__).resolve().parent
ADAMW = dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
SAI = dict(momentum=0.9, eps=1e-8, weight_decay=1e-2)
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    """The demo's AdamW: decay matrices and embeddings, not 1-D norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": ADAMW["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="SGD-SaI peak learning rates")
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--reuse", action="store_true",
                        help="keep the runs already in OUT/sgd_sai.json (same settings) and train only the missing ones")
    args = parser.parse_args()

    started = time.perf_counter()
    config = CONFIGS["demo"]
    text = load_corpus(None)
    tokenized = tokenize_corpus(text, config.vocab_size)
    data = split_ids(tokenized.ids)
    loop = demo_loop(args.steps)
    makers = {f"AdamW lr={ADAMW['lr']:g}": adamw}
    for lr in args.lrs:
        makers[f"SGD-SaI lr={lr:g}"] = lambda model, lr=lr: blockopt.SGDSaI(model, lr=lr, **SAI)

    settings = {"loop": loop, "adamw": {**ADAMW, "weight_decay_1d": 0.0}, "sgd_sai": {**SAI, "blocks": "tensor", "normalize": False}}
    previous = _previous_runs(args.out / "sgd_sai.json", settings) if args.reuse else {}
    results = {}
    for name, make in makers.items():
        if name in previous:
            results[name] = result = previous[name]
            print(f"{name:<18} (reused from {args.out / 'sgd_sai.json'})")
            continue
        results[name] = result = train_run(config, make, data, **loop, progress=False, desc=name)
        print(f"{name:<18} final val loss {result.final_val_loss:.4f}  train {result.final_train_loss:.4f}  "
              f"state {result.state_bytes / 2**20:.2f} MB  step {result.step_ms:.2f} ms  ({result.wall_s:.0f} s)", flush=True)

    adamw_name = next(iter(results))
    sai = {name: r for name, r in results.items() if name.startswith("SGD-SaI")}
    best = min(sai, key=lambda name: sai[name].final_val_loss)
    a, b = results[adamw_name], sai[best]
    print(f"best SGD-SaI: {best}: val {b.final_val_loss:.4f} vs AdamW {a.final_val_loss:.4f} "
          f"({100 * (b.final_val_loss / a.final_val_loss - 1):+.2f}%), state memory {b.state_bytes / a.state_bytes:.2f}x AdamW's")

    args.out.mkdir(parents=True, exist_ok=True)
    title = f"demo Llama ({a.n_params:,} params): AdamW vs SGD-SaI lr sweep"
    plot = plot_loss_curves(results, args.out / "sgd_sai.png", title=title)
    report = {
        "command": "python benchmarks/sgd_sai_vs_adamw.py" + ("" if args.steps == 100 else f" --steps {args.steps}")
                   + ("" if tuple(args.lrs) == DEFAULT_LRS else " --lrs " + " ".join(f"{lr:g}" for lr in args.lrs)),
        "model": {"name": "demo", "n_params": a.n_params, **config_dict(config)},
        "corpus": {"source": "stdlib", "bytes": len(text.encode("utf-8")), "tokens": len(tokenized.ids)},
        **settings,
        "sgd_sai_lrs": list(args.lrs),
        "reused_runs": sorted(set(previous) & set(results)),
        "final_val_loss": {name: r.final_val_loss for name, r in results.items()},
        "best_sgd_sai": {"run": best, "val_loss_vs_adamw": b.final_val_loss / a.final_val_loss - 1,
                         "state_memory_vs_adamw": b.state_bytes / a.state_bytes},
        "runs": {name: r.to_dict() for name, r in results.items()},
        **environment(distributions=("sgd-sai",)),  # the load average: other jobs slow the runs, not the losses
        "total_s": time.perf_counter() - started,
        "runs_s": sum(r.wall_s for r in results.values()),  # reused runs included
    }
    (args.out / "sgd_sai.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {plot} and {args.out / 'sgd_sai.json'} in {report['total_s']:.0f} s")


def _previous_runs(path: Path, settings: dict) -> dict[str, RunResult]:
    """Runs stored in an earlier report made with the same settings (none if they differ)."""
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    stored = {key: old.get(key) for key in settings}
    if isinstance(stored["sgd_sai"], dict):
        stored["sgd_sai"] = {k: v for k, v in stored["sgd_sai"].items() if k != "lrs"}  # a sweep's lrs may differ
    if stored != json.loads(json.dumps(settings)):
        print(f"not reusing {path}: its settings differ")
        return {}
    runs = {}
    for name, run in old["runs"].items():
        curves = {k: [tuple(point) for point in run[k]] for k in ("train_curve", "val_curve")}
        runs[name] = RunResult(**{**run, **curves})
    return runs


if __name__ == "__main__":
    main()
