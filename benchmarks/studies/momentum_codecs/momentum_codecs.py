"""Which code stores Adam-mini's first moment in 8 or 4 bits without costing loss?

Adam-mini on the default comparison (the `blockopt demo` setting: the built-in ``demo`` Llama,
built-in corpus, lr 2e-3, betas (0.9, 0.95), weight decay 0.1, 100 steps of 32 x 128), with its
momentum ``exp_avg`` passed through a codec of `blockopt.kernels.codecs` after every step: the
step updates in float32 and what it keeps for the next step is the decoded codes. That is the
arithmetic of a step that stores the codes (decode, update, encode), so the losses are the ones a
compressed-state optimizer gets. Every run shares init and batches; only the codec differs.

    python benchmarks/studies/momentum_codecs/momentum_codecs.py --out benchmarks/studies/momentum_codecs/results/seed0

With ``--seeds N`` it runs seeds ``--seed`` .. ``--seed + N - 1`` (``--workers`` processes at a
time, one thread each) and reports every difference paired by seed, with its standard error.
"""

from __future__ import annotations

import argparse
import functools
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

import blockopt
from blockopt.bench import (CONFIGS, DEFAULT_MAX_BYTES, DEFAULT_STEPS, DEMO_CONFIG, RunResult, TrainConfig, adamw,
                            config_dict, demo_data, plot_loss_curves, train_run, write_result)
from blockopt.kernels.codecs import BFloat16Rounding, ChunkQuantized, rounding_key, rows_of, uniforms

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


class ScaledFloat8:
    """fp8 e4m3 codes (sign, 4 exponent bits, 3 mantissa bits), one float32 scale per 256 elements
    of a row, the chunk's largest magnitude stored as e4m3's largest value (448). Stochastic
    rounding adds random bits below the 3 kept mantissa bits and truncates them, as the
    ``"float level"`` variant of ``benchmarks/speed/step_speed/int8_ablation.py`` does: what the
    faster float-like int8 code would cost in quality. Not offered by the optimizer."""

    name = "float8-e4m3"
    chunks = ChunkQuantized(bits=8)

    def __init__(self, stochastic: bool = True):
        self.stochastic = stochastic

    def __repr__(self) -> str:
        return f"ScaledFloat8(stochastic={self.stochastic})"

    def encode(self, x, key):
        shape = tuple(x.shape)
        rows, width = rows_of(shape)
        chunks = self.chunks._chunks(x.to(torch.float32), shape)
        scales = chunks.abs().amax(dim=2, keepdim=True)
        y = chunks / torch.where(scales > 0, scales, torch.ones_like(scales)) * 448.0
        if self.stochastic:
            u = self.chunks._chunks(uniforms(key, rows * width, x.device), shape)
            dropped = 1 << 20  # float32's 23 mantissa bits, of which e4m3 keeps 3
            normal = ((y.view(torch.int32) + (u * dropped).to(torch.int32)) & -dropped).view(torch.float32)
            subnormal = torch.floor(y.abs() * 512 + u) / 512 * y.sign()  # below 2^-6: steps of 2^-9
            y = torch.where(y.abs() >= 2.0**-6, normal, subnormal)
        return y.to(torch.float8_e4m3fn), scales

    def decode(self, stored, shape):
        codes, scales = stored
        rows, width = rows_of(tuple(shape))
        return (codes.to(torch.float32) / 448.0 * scales).reshape(rows, -1)[:, :width].reshape(shape)

    def bytes_per_element(self):
        return 1 + 4 / 256


CODECS = {
    "bf16 stochastic": BFloat16Rounding(),
    "bf16 nearest": NearestBFloat16(),
    "int8 linear": ChunkQuantized(bits=8, power=1),
    "int8 companded": ChunkQuantized(bits=8, power=2),
    "int8 companded nearest": ChunkQuantized(bits=8, power=2, stochastic=False),
    "int8 companded chunk 2048": ChunkQuantized(bits=8, power=2, chunk=2048),
    "int8 companded chunk 64": ChunkQuantized(bits=8, power=2, chunk=64),
    "int8 float8 e4m3": ScaledFloat8(),
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


@functools.cache
def _demo():
    config = CONFIGS[DEMO_CONFIG]
    tokenized, data = demo_data(config.vocab_size)
    return config, tokenized, data


def run_one(job: tuple[str, str | None, int]) -> tuple[str, int, dict, list[float]]:
    """One training run (in a worker process): ``(name, codec name or None, seed)`` -> its result
    and the per-step relative error of ``m`` (empty without a codec)."""
    name, codec_name, seed = job
    torch.set_num_threads(1)  # losses don't depend on it; small matmuls on shared cores do better
    config, _, data = _demo()
    log = {"relative_error": []}

    def make(model):
        if name == "AdamW":
            return adamw(model, **SETTINGS)
        opt = blockopt.AdamMini(model, **SETTINGS)
        if codec_name is not None:
            log.update(store_momentum_as(opt, CODECS[codec_name], seed))
        return opt

    r = train_run(config, make, data, LOOP, seed=seed, progress=False, desc=name)
    print(f"seed {seed}  {name:34s} val {r.final_val_loss:.4f}  ({r.wall_s:.0f} s)", flush=True)
    return name, seed, r.to_dict(), log["relative_error"]


def paired(losses: dict[int, float], base: dict[int, float]) -> dict:
    """Relative differences to ``base``, paired by seed: their mean and standard error."""
    diffs = [losses[s] / base[s] - 1.0 for s in sorted(losses)]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return {"mean": statistics.fmean(diffs), "standard_error": se, "per_seed": diffs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "default", help="the run's folder")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (model init, batch order and rounding bits)")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds, from --seed on")
    parser.add_argument("--workers", type=int, default=1, help="runs at a time (processes, one thread each)")
    parser.add_argument("--only", nargs="*", default=None, help="codec names to run (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.only or ()) - set(CODECS))
    if unknown:
        parser.error(f"unknown codec(s) {unknown}; choose from {sorted(CODECS)}")

    started = time.perf_counter()
    config, tokenized, _ = _demo()
    codecs = {k: v for k, v in CODECS.items() if args.only is None or k in args.only}
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs = [("AdamW", None), ("Adam-mini float32", None), *((f"Adam-mini {c}", c) for c in codecs)]
    jobs = [(name, codec_name, seed) for seed in seeds for name, codec_name in runs]
    results: dict[str, dict[int, dict]] = {name: {} for name, _ in runs}
    errors: dict[str, list[float]] = {}
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for name, seed, run, error_log in pool.map(run_one, jobs):
            results[name][seed] = run
            errors.setdefault(name, []).extend(error_log)

    losses = {name: {seed: run["final_val_loss"] for seed, run in by_seed.items()} for name, by_seed in results.items()}
    summary = {}
    for name, by_seed in losses.items():
        entry = summary[name] = {"final_val_loss": statistics.fmean(by_seed.values()), "per_seed": by_seed}
        if name != "AdamW":
            entry["vs_adamw"] = paired(by_seed, losses["AdamW"])
        if name.startswith("Adam-mini ") and name != "Adam-mini float32":
            codec = codecs[name.removeprefix("Adam-mini ")]
            entry["vs_adam_mini_float32"] = paired(by_seed, losses["Adam-mini float32"])
            entry["momentum_bytes_per_element"] = codec.bytes_per_element()
            entry["mean_relative_error_per_step"] = statistics.fmean(errors[name])

    def shown(d):
        if d is None:
            return ""
        se = f" +- {100 * d['standard_error']:.2f}" if d["standard_error"] is not None else ""
        return f"{100 * d['mean']:+.2f}%{se}"

    print(f"\n{len(seeds)} seed(s) {seeds[0]}-{seeds[-1]}; differences paired by seed (+- standard error)")
    print(f"{'run':34s} {'val loss':>9s} {'vs fp32 m':>16s} {'vs AdamW':>16s} {'m bytes/elt':>11s} {'m rel err':>9s}")
    for name, entry in summary.items():
        print(f"{name:34s} {entry['final_val_loss']:9.4f} {shown(entry.get('vs_adam_mini_float32')):>16s} "
              f"{shown(entry.get('vs_adamw')):>16s} {entry.get('momentum_bytes_per_element', 4.0):11.3f} "
              f"{entry.get('mean_relative_error_per_step', 0.0):9.4f}")

    settings = {
        "model": {"name": DEMO_CONFIG, "n_params": results["AdamW"][seeds[0]]["n_params"], **config_dict(config)},
        "corpus": {"source": "stdlib", "max_bytes": DEFAULT_MAX_BYTES, "tokens": len(tokenized.ids)},
        "hyperparameters": {**SETTINGS, **LOOP.resolved(config.max_seq_len).to_dict(), "seeds": seeds},
        "codecs": {name: repr(codec) for name, codec in codecs.items()},
    }
    total_s = time.perf_counter() - started
    path = write_result(args.out, name="momentum_codecs", settings=settings, results={
        "summary": summary, "runs": results, "total_s": total_s, "workers": args.workers,
    })
    first = {name: RunResult.from_dict(by_seed[seeds[0]]) for name, by_seed in results.items()
             if name in ("AdamW", "Adam-mini float32") or "nearest" in name
             or name in ("Adam-mini int8 companded", "Adam-mini int4 companded", "Adam-mini bf16 stochastic")}
    plot = plot_loss_curves(first, args.out / "loss_curves.png",
                            title=f"Adam-mini's momentum stored in fewer bits (seed {seeds[0]})")
    print(f"wrote {path} and {plot} in {total_s:.0f} s")


if __name__ == "__main__":
    main()
