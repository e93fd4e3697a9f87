"""Which code stores Adam-mini's first moment in 8 or 4 bits without costing loss?

Adam-mini on the default comparison (the `blockopt demo` setting: the built-in ``demo`` Llama,
built-in corpus, lr 2e-3, betas (0.9, 0.95), weight decay 0.1, 100 steps of 32 x 128), with its
momentum ``exp_avg`` passed through a codec of `blockopt.kernels.codecs` after every step: the
step updates in float32 and what it keeps for the next step is the decoded codes. That is the
arithmetic of a step that stores the codes (decode, update, encode), so the losses are the ones a
compressed-state optimizer gets. Every run shares init and batches; only the codec differs.

    python benchmarks/studies/momentum_codecs/momentum_codecs.py --out benchmarks/studies/momentum_codecs/results/seed0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import blockopt
from blockopt.bench import (CONFIGS, DEFAULT_MAX_BYTES, DEFAULT_STEPS, DEMO_CONFIG, TrainConfig, adamw, config_dict,
                            demo_data, plot_loss_curves, train_run, write_result)
from blockopt.kernels.codecs import BFloat16Rounding, ChunkQuantized, rounding_key

HERE = Path(__file__).resolve().parent
SETTINGS = {"lr": 2e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
LOOP = TrainConfig(steps=DEFAULT_STEPS)


class NearestBFloat16:
    """bf16 rounded to nearest: what a plain ``.bfloat16()`` momentum buffer does."""

    name = "bfloat16-nearest"

    def encode(self, x, key):
        return (x.to(torch.bfloat16),)

    def decode(self, stored, shape):
        return stored[0].to(torch.float32).reshape(shape)

    def bytes_per_element(self):
        return 2.0


CODECS = {
    "bf16 stochastic": BFloat16Rounding(),
    "bf16 nearest": NearestBFloat16(),
    "int8 linear": ChunkQuantized(bits=8, power=1),
    "int8 companded": ChunkQuantized(bits=8, power=2),
    "int8 companded nearest": ChunkQuantized(bits=8, power=2, stochastic=False),
    "int8 companded chunk 2048": ChunkQuantized(bits=8, power=2, chunk=2048),
    "int4 linear": ChunkQuantized(bits=4, power=1),
    "int4 companded": ChunkQuantized(bits=4, power=2),
    "int4 companded chunk 64": ChunkQuantized(bits=4, power=2, chunk=64),
}


def store_momentum_as(optimizer: torch.optim.Optimizer, codec, seed: int) -> dict:
    """After every step, replace each ``exp_avg`` by its decoded codes; returns the error log."""
    log = {"relative_error": []}
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def hook(opt, args, kwargs):
        errors = []
        for salt, p in enumerate(params):
            state = opt.state.get(p)
            if not state:
                continue
            m = state["exp_avg"]
            decoded = codec.decode(codec.encode(m, rounding_key(seed, int(state["step"]), salt)), tuple(m.shape))
            errors.append(float((decoded - m).norm() / m.norm().clamp_min(1e-30)))
            m.copy_(decoded)
        log["relative_error"].append(sum(errors) / len(errors))

    optimizer.register_step_post_hook(hook)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "default", help="the run's folder")
    parser.add_argument("--seed", type=int, default=0, help="model init, batch order and rounding bits")
    parser.add_argument("--only", nargs="*", default=None, help="codec names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # losses don't depend on it; small matmuls on shared cores do better

    started = time.perf_counter()
    config = CONFIGS[DEMO_CONFIG]
    tokenized, data = demo_data(config.vocab_size)
    codecs = {k: v for k, v in CODECS.items() if args.only is None or k in args.only}
    results, errors = {}, {}

    def run(name, make):
        results[name] = r = train_run(config, make, data, LOOP, seed=args.seed, progress=False, desc=name)
        print(f"{name:28s} val {r.final_val_loss:.4f}  train {r.final_train_loss:.4f}  ({r.wall_s:.0f} s)", flush=True)

    run("AdamW", lambda model: adamw(model, **SETTINGS))
    run("Adam-mini float32", lambda model: blockopt.AdamMini(model, **SETTINGS))
    for name, codec in codecs.items():
        def make(model, codec=codec, name=name):
            opt = blockopt.AdamMini(model, **SETTINGS)
            errors[name] = store_momentum_as(opt, codec, args.seed)
            return opt
        run(f"Adam-mini {name}", make)

    base = results["Adam-mini float32"].final_val_loss
    adamw_loss = results["AdamW"].final_val_loss
    summary = {
        name: {
            "final_val_loss": r.final_val_loss,
            "vs_adam_mini_float32": r.final_val_loss / base - 1.0,
            "vs_adamw": r.final_val_loss / adamw_loss - 1.0,
        }
        for name, r in results.items()
    }
    for name, codec in codecs.items():
        entry = summary[f"Adam-mini {name}"]
        entry["momentum_bytes_per_element"] = codec.bytes_per_element()
        log = errors[name]["relative_error"]
        entry["mean_relative_error_per_step"] = sum(log) / len(log)
    print(f"{'run':34s} {'val loss':>9s} {'vs fp32 m':>10s} {'vs AdamW':>9s} {'m bytes/elt':>11s} {'m rel err':>9s}")
    for name, entry in summary.items():
        print(f"{name:34s} {entry['final_val_loss']:9.4f} {100 * entry['vs_adam_mini_float32']:+9.2f}% "
              f"{100 * entry['vs_adamw']:+8.2f}% {entry.get('momentum_bytes_per_element', 4.0):11.3f} "
              f"{entry.get('mean_relative_error_per_step', 0.0):9.4f}")

    settings = {
        "model": {"name": DEMO_CONFIG, "n_params": results["AdamW"].n_params, **config_dict(config)},
        "corpus": {"source": "stdlib", "max_bytes": DEFAULT_MAX_BYTES, "tokens": len(tokenized.ids)},
        "hyperparameters": {**SETTINGS, **LOOP.resolved(config.max_seq_len).to_dict(), "seed": args.seed},
        "codecs": {name: repr(codec) for name, codec in codecs.items()},
    }
    total_s = time.perf_counter() - started
    path = write_result(args.out, name="momentum_codecs", settings=settings, results={
        "summary": summary, "runs": {name: r.to_dict() for name, r in results.items()}, "total_s": total_s,
    })
    shown = {k: results[k] for k in results if k in ("AdamW", "Adam-mini float32") or "nearest" in k
             or k in ("Adam-mini int8 companded", "Adam-mini int4 companded", "Adam-mini bf16 stochastic")}
    plot = plot_loss_curves(shown, args.out / "loss_curves.png", title="Adam-mini's momentum stored in fewer bits")
    print(f"wrote {path} and {plot} in {total_s:.0f} s")


if __name__ == "__main__":
    main()
