"""Optimizer step time on the CPU: blockopt AdamMini (each implementation, and the fused step with
each compressed ``momentum_dtype``) against its peers.

    python benchmarks/speed/step_speed/step_speed.py                  # CPU: results/cpu
    python benchmarks/speed/step_speed/step_speed.py --device cuda    # GPU: results/cuda
    python benchmarks/speed/step_speed/step_speed.py --models llama-gqa --peers fused --out /tmp/x   # a quick look

Every peer steps the same model with the same fixed random gradients (no backward pass), in one
process, after a warm-up step, in interleaved rounds (the order rotates each round); medians and
ratios to ``torch.optim.AdamW(fused=True)`` are reported. Models: GPT-2 small with an untied
head (163M), a Llama-shaped model with grouped-query attention (125M), 2000 small Linear layers
(launch overhead) and, on CUDA, a 1.1B Llama (TinyLlama's shape). Also reported: the first
step's extra time (state allocation, kernel building or loading: on CUDA that includes Triton's
compilation), the peak extra memory of a step, and the fused CPU kernel's first build and load
times. On CUDA every timed step is synchronised and the GPU's name is recorded.

Peak extra memory on the CPU: the process's resident set size is sampled every 0.2 ms during one
step, after returning freed heap pages to the OS (``malloc_trim``) so temporaries show up as new
pages; the figure is the peak minus the RSS just before the step. It counts torch's and the C++
kernel's scratch alike, with a resolution of a few hundred KB. On CUDA it is the allocator's
peak during the step above what was allocated before it.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import psutil
import torch
import torch.nn as nn

import blockopt
from blockopt.bench import environment, read_result, write_result
from blockopt.kernels.adam_mini import cpu as fused_cpu

HERE = Path(__file__).resolve().parent
LR = 1e-6  # tiny: the parameters barely move while every peer steps them in turn


# ---- models -------------------------------------------------------------------------------
def gpt2_small():
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(tie_word_embeddings=False))
    return model, dict(dim=768, n_heads=12, n_kv_heads=12)


def llama_gqa():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config), dict(dim=768, n_heads=12, n_kv_heads=4)


def many_linears():
    return nn.Sequential(*(nn.Linear(64, 64) for _ in range(2000))), dict(dim=64, n_heads=1, n_kv_heads=1)


def llama_1b():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
        num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config), dict(dim=2048, n_heads=32, n_kv_heads=4)


MODELS = {"gpt2-small-untied": gpt2_small, "llama-gqa": llama_gqa, "2000-linears": many_linears, "llama-1b": llama_1b}
DEFAULT_MODELS = {"cpu": ["gpt2-small-untied", "llama-gqa", "2000-linears"], "cuda": list(MODELS)}


# ---- peers --------------------------------------------------------------------------------
MOMENTUM_DTYPES = ("bfloat16", "int8", "int4")


def peers(model: nn.Module, heads: dict) -> dict:
    """name -> a function building the optimizer (built lazily: each holds its own state)."""
    out = {
        "AdamW(fused)": lambda: torch.optim.AdamW(model.parameters(), lr=LR, fused=True),
        "AdamW(foreach)": lambda: torch.optim.AdamW(model.parameters(), lr=LR, foreach=True),
    }
    for impl in ("fused", "batched", "reference"):
        out[f"blockopt AdamMini[{impl}]"] = lambda impl=impl: blockopt.AdamMini(
            model, lr=LR, n_heads=heads["n_heads"], n_kv_heads=heads["n_kv_heads"], implementation=impl
        )
    for momentum_dtype in MOMENTUM_DTYPES:  # compressed first moments, stepped by the fused kernels
        out[f"blockopt AdamMini[fused, {momentum_dtype} m]"] = lambda momentum_dtype=momentum_dtype: blockopt.AdamMini(
            model, lr=LR, n_heads=heads["n_heads"], n_kv_heads=heads["n_kv_heads"], implementation="fused",
            momentum_dtype=momentum_dtype,
        )
    try:
        import adam_mini

        out["adam-mini 1.1.1"] = lambda: adam_mini.Adam_mini(
            model.named_parameters(), lr=LR, dim=heads["dim"], n_heads=heads["n_heads"], n_kv_heads=heads["n_kv_heads"],
            verbose=False,
        )
    except ImportError:
        pass
    try:
        import pytorch_optimizer

        out["pytorch-optimizer AdamMini"] = lambda: pytorch_optimizer.AdamMini(
            model, lr=LR, num_embeds=heads["dim"], num_heads=heads["n_heads"], num_query_groups=heads["n_kv_heads"],
        )
    except ImportError:
        pass
    return out


# ---- measurements -------------------------------------------------------------------------
def fill_grads(model: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(p.device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


_libc = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def peak_extra_rss_mb(step) -> float:
    """Peak resident memory during ``step()`` above the resident memory just before it."""
    if _libc is not None:
        _libc.malloc_trim(0)
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, done = base, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        step()
    finally:
        done.set()
        sampler.join()
    return max(0, peak - base) / 2**20


def peak_extra_cuda_mb(step, device: torch.device) -> float:
    """The caching allocator's peak during ``step()`` above what was allocated before it."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - base) / 2**20


def kernel_build_seconds() -> dict:
    """First build (empty extensions dir) and load from the cache, each in a fresh process (this
    process loaded its kernel before any timing: ``fused_cpu.available()`` in `main`)."""
    code = "from blockopt.kernels.adam_mini import cpu; b = cpu.build(); print(b.seconds, b.built)"
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCH_EXTENSIONS_DIR=cache)

        def run(built: bool) -> float:
            out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True).stdout
            seconds, was_built = out.split()
            assert was_built == str(built), f"expected built={built}, got {out!r}"
            return float(seconds)

        return {"first_build_s": run(True), "cached_load_s": run(False)}


def bench_model(name: str, rounds: int, device: torch.device, only: list[str] | None = None) -> dict:
    torch.manual_seed(0)
    model, heads = MODELS[name]()
    model.to(device)
    fill_grads(model)
    n_params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    print(f"\n{name}: {n_params / 1e6:.1f}M parameters in {len(list(model.parameters()))} tensors", flush=True)
    opts, first = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for peer, build in peers(model, heads).items():
            if only and peer != "AdamW(fused)" and not any(part in peer for part in only):
                continue
            opts[peer] = build()
            first[peer] = timed(opts[peer].step, device)
    times = {peer: [] for peer in opts}
    order = list(opts)
    for r in range(rounds):
        for peer in order[r % len(order):] + order[: r % len(order)]:
            times[peer].append(timed(opts[peer].step, device))
    if device.type == "cuda":
        memory = {peer: peak_extra_cuda_mb(opt.step, device) for peer, opt in opts.items()}
    else:
        memory = {peer: peak_extra_rss_mb(opt.step) for peer, opt in opts.items()}
    base = statistics.median(times["AdamW(fused)"])
    results = {}
    for peer in opts:
        med = statistics.median(times[peer])
        results[peer] = {
            "median_ms": med, "ratio_to_fused_adamw": med / base, "times_ms": times[peer],
            "first_step_extra_ms": first[peer] - med, "peak_extra_mb": memory[peer],
            "state_mb": blockopt.state_bytes(opts[peer]) / 2**20,
        }
    return {"n_params": n_params, "n_tensors": len(list(model.parameters())), "largest_param_mb": largest / 2**20,
            "rounds": rounds, "peers": results}


def table(models: dict) -> str:
    lines = [f"{'model':18s} {'optimizer':38s} {'ms/step':>9s} {'vs AdamW(fused)':>16s} {'first step +ms':>15s} {'peak extra MB':>14s}"]
    for model, result in models.items():
        for peer, r in result["peers"].items():
            lines.append(
                f"{model:18s} {peer:38s} {r['median_ms']:9.1f} {r['ratio_to_fused_adamw']:15.2f}x "
                f"{r['first_step_extra_ms']:15.0f} {r['peak_extra_mb']:14.1f}"
            )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """One panel per model: each peer's step time over fused AdamW's (``report``: a result document)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(report["results"]["models"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        peers_ = report["results"]["models"][model]["peers"]
        names = list(peers_)
        ratios = [peers_[n]["ratio_to_fused_adamw"] for n in names]
        colors = ["tab:green" if n.startswith("blockopt") else "tab:gray" for n in names]
        ax.barh(names, ratios, color=colors)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_xscale("log")
        ticks = [t for t in (0.25, 0.5, 1, 2, 4, 8, 16, 32) if min(ratios) / 1.5 <= t <= max(ratios) * 1.5]
        ax.set_xticks(ticks, [f"{t:g}x" for t in ticks])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("step time / AdamW(fused)  (log; lower is faster)")
        ax.set_title(f"{model} ({report['results']['models'][model]['n_params'] / 1e6:.0f}M params)")
        ax.invert_yaxis()
        for y, ratio in enumerate(ratios):
            ax.text(ratio, y, f" {ratio:.2f}x", va="center", fontsize=8)
    machine, versions = report["environment"]["machine"], report["environment"]["versions"]
    where = machine.get("gpu") or f"{machine['torch_threads']} threads, {machine['cpu']}"
    fig.suptitle(f"Optimizer step, {where}, torch {versions['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="default: all but llama-1b on the CPU, all on CUDA")
    parser.add_argument("--rounds", type=int, default=7, help="timed steps per peer (after one warm-up step)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", nargs="+", metavar="PART",
                        help="only the peers whose name contains one of these (AdamW(fused) always runs)")
    parser.add_argument("--out", type=Path, help="the run's folder (default: results/cpu, results/cuda on CUDA)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    out = args.out or HERE / "results" / args.device
    names = args.models or DEFAULT_MODELS[args.device]

    distributions = ("adam-mini", "pytorch-optimizer", "triton")
    env = environment(args.device, distributions)  # now: its load average is the one before the work
    results = {}
    if device.type == "cpu":
        results["fused_kernel"] = kernel_build_seconds() if fused_cpu.available() else {"available": False}
        print("fused kernel:", results["fused_kernel"], flush=True)
    results["models"] = {name: bench_model(name, args.rounds, device, args.peers) for name in names}
    print("\n" + table(results["models"]))
    settings = {"device": args.device, "models": names, "rounds": args.rounds, "lr": LR, "peers": args.peers}
    path = write_result(out, name="step_speed", settings=settings, results=results, environment=env)
    plot(read_result(path), out / "step_speed.png")
    print(f"\nwrote {path} and step_speed.png")


if __name__ == "__main__":
    main()
