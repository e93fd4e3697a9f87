"""SGD-SaI against AdamW on the built-in "demo" Llama (the settings of ``blockopt demo``).

    python benchmarks/studies/sgd_sai/sgd_sai_vs_adamw.py     # results/lr-sweep: result.json, loss_curves.png

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

import blockopt
from blockopt.bench import (CONFIGS, RunResult, TrainConfig, adamw, config_dict, load_corpus, plot_loss_curves,
                            read_result, split_ids, tokenize_corpus, train_run, write_result)

HERE = Path(__file__).resolve().parent
ADAMW = dict(lr=2e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)  # the demo's: no decay on 1-D tensors
SAI = dict(momentum=0.9, eps=1e-8, weight_decay=1e-2)
DEFAULT_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lrs", type=float, nargs="+", default=list(DEFAULT_LRS), help="SGD-SaI peak learning rates")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "lr-sweep", help="the run's folder")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the runs already in OUT/result.json (same settings) and train only the missing ones")
    args = parser.parse_args()

    started = time.perf_counter()
    config = CONFIGS["demo"]
    text = load_corpus(None)
    tokenized = tokenize_corpus(text, config.vocab_size)
    data = split_ids(tokenized.ids)
    loop = TrainConfig(steps=args.steps)
    makers = {f"AdamW lr={ADAMW['lr']:g}": lambda model: adamw(model, **ADAMW)}
    for lr in args.lrs:
        makers[f"SGD-SaI lr={lr:g}"] = lambda model, lr=lr: blockopt.SGDSaI(model, lr=lr, **SAI)

    # what a stored run must have been trained with to be reused
    training = {
        "loop": {**loop.resolved(config.max_seq_len).to_dict(), "seed": 0},
        "adamw": {**ADAMW, "weight_decay_1d": 0.0},
        "sgd_sai": {**SAI, "blocks": "tensor", "normalize": False},
    }
    previous = _previous_runs(args.out, training) if args.reuse else {}
    results = {}
    for name, make in makers.items():
        if name in previous:
            results[name] = result = previous[name]
            print(f"{name:<18} (reused from {args.out})")
            continue
        results[name] = result = train_run(config, make, data, loop, progress=False, desc=name)
        print(f"{name:<18} final val loss {result.final_val_loss:.4f}  train {result.final_train_loss:.4f}  "
              f"state {result.state_bytes / 2**20:.2f} MB  step {result.step_ms:.2f} ms  ({result.wall_s:.0f} s)", flush=True)

    adamw_name = next(iter(results))
    sai = {name: r for name, r in results.items() if name.startswith("SGD-SaI")}
    best = min(sai, key=lambda name: sai[name].final_val_loss)
    a, b = results[adamw_name], sai[best]
    print(f"best SGD-SaI: {best}: val {b.final_val_loss:.4f} vs AdamW {a.final_val_loss:.4f} "
          f"({100 * (b.final_val_loss / a.final_val_loss - 1):+.2f}%), state memory {b.state_bytes / a.state_bytes:.2f}x AdamW's")

    settings = {
        "model": {"name": "demo", "n_params": a.n_params, **config_dict(config)},
        "corpus": {"source": "stdlib", "bytes": len(text.encode("utf-8")), "tokens": len(tokenized.ids)},
        **training,
        "sgd_sai_lrs": list(args.lrs),
    }
    path = write_result(args.out, name="sgd_sai", settings=settings, distributions=("sgd-sai",), results={
        "reused_runs": sorted(set(previous) & set(results)),
        "final_val_loss": {name: r.final_val_loss for name, r in results.items()},
        "best_sgd_sai": {"run": best, "val_loss_vs_adamw": b.final_val_loss / a.final_val_loss - 1,
                         "state_memory_vs_adamw": b.state_bytes / a.state_bytes},
        "runs": {name: r.to_dict() for name, r in results.items()},
        "total_s": time.perf_counter() - started,
        "runs_s": sum(r.wall_s for r in results.values()),  # reused runs included
    })
    title = f"demo Llama ({a.n_params:,} params): AdamW vs SGD-SaI lr sweep"
    plot = plot_loss_curves(results, args.out / "loss_curves.png", title=title)
    print(f"wrote {path} and {plot} in {time.perf_counter() - started:.0f} s")


def _previous_runs(out: Path, training: dict) -> dict[str, RunResult]:
    """Runs stored in an earlier result trained the same way (none if they were not)."""
    if not (out / "result.json").exists():
        return {}
    old = read_result(out)
    for key, value in json.loads(json.dumps(training)).items():  # as JSON holds them: tuples are lists
        stored = old["settings"].get(key)
        if isinstance(stored, dict):
            stored = {k: v for k, v in stored.items() if k != "lrs"}  # a sweep's lrs may differ
            value = {k: value.get(k) for k in stored}  # an older result records fewer loop settings
        if stored != value:
            print(f"not reusing {out}: its {key} settings differ")
            return {}
    return {name: RunResult.from_dict(run) for name, run in old["results"]["runs"].items()}


if __name__ == "__main__":
    main()
