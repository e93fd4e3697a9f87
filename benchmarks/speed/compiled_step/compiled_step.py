"""A compiled step against the eager fused one, on the CPU: AdamMini and AdamW, optimizer step
and whole training step.

    python benchmarks/speed/compiled_step/compiled_step.py                      # results/cpu
    python benchmarks/speed/compiled_step/compiled_step.py --models tiny --rounds 3 --out /tmp/cs

Peers, each on its own copy of the model:

- ``AdamMini eager (fused)``: ``blockopt.AdamMini(implementation="auto")``, the C++ kernel, eager;
- ``AdamMini compiled``: the same optimizer under ``torch.compile`` (the kernel is one custom op
  in the graph);
- ``AdamW eager (fused)``: ``torch.optim.AdamW(fused=True)``;
- ``AdamW compiled``: ``torch.optim.AdamW(fused=False)`` under ``torch.compile``, as torch
  recommends (inductor fuses its foreach step).

Two measurements per model. ``step``: the optimizer step alone on fixed random gradients (as
``benchmarks/speed/step_speed``), compiled as ``torch.compile(opt.step)``. ``train``: forward,
backward, step and ``zero_grad`` on one fixed batch, compiled as one function (``loss.backward()``
splits it in two graphs; the optimizer's part is one). Every peer runs its compiles and a
warm-up before the clock (a compiled step compiles twice: the first step creates the state);
compile time is reported apart. Then interleaved rounds, medians, ratios to the eager fused
AdamMini.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

import blockopt
from blockopt.bench import environment, write_result
from blockopt.kernels.adam_mini import cpu as fused_cpu

HERE = Path(__file__).resolve().parent
LR = 1e-6  # tiny: the parameters barely move over the rounds


# ---- models (the configurations of benchmarks/speed/step_speed) ----------------------------
def _llama(hidden, intermediate, layers, heads, kv_heads, vocab):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config), dict(n_heads=heads, n_kv_heads=kv_heads), vocab


def gpt2_small():
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(tie_word_embeddings=False))
    return model, dict(n_heads=12, n_kv_heads=12), 50257


MODELS = {
    "gpt2-small-untied": gpt2_small,
    "llama-gqa": lambda: _llama(768, 2048, 12, 12, 4, 32000),
    "tiny": lambda: _llama(64, 128, 2, 4, 2, 256),
}
DEFAULT_MODELS = ["llama-gqa", "gpt2-small-untied"]


# name -> (the optimizer for a model and its head counts, compiled?)
PEERS = {
    "AdamMini eager (fused)": (lambda model, heads: blockopt.AdamMini(model, lr=LR, **heads), False),
    "AdamMini compiled": (lambda model, heads: blockopt.AdamMini(model, lr=LR, **heads), True),
    "AdamW eager (fused)": (lambda model, heads: torch.optim.AdamW(model.parameters(), lr=LR, fused=True), False),
    "AdamW compiled": (lambda model, heads: torch.optim.AdamW(model.parameters(), lr=LR, fused=False), True),
}


# ---- measurements ----------------------------------------------------------------------------
def _fill_grads(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3


def _clocked(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench(name: str, what: str, rounds: int, batch: int, seq: int) -> dict:
    """``what``: "step" or "train"; every peer on its own copy of the model."""
    runs, setup_ms = {}, {}
    for peer, (build, compiled) in PEERS.items():
        torch.manual_seed(0)
        model, heads, vocab = MODELS[name]()
        opt = build(model, heads)
        if what == "step":
            _fill_grads(model)
            fn = opt.step
        else:
            idx = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

            def fn(model=model, opt=opt, idx=idx):
                loss = model(idx, labels=idx).loss
                loss.backward()
                opt.step()
                opt.zero_grad()
        fn = torch.compile(fn) if compiled else fn
        # one-time costs before the clock: compiles (the state-creating step and the one every
        # later step repeats) and the kernel load, then one more warm-up call
        setup_ms[peer] = [_clocked(fn) for _ in range(3)]
        runs[peer] = fn
    times = {peer: [] for peer in runs}
    order = list(runs)
    for r in range(rounds):
        for peer in order[r % len(order):] + order[: r % len(order)]:
            times[peer].append(_clocked(runs[peer]))
    base = statistics.median(times["AdamMini eager (fused)"])
    return {
        peer: {
            "median_ms": statistics.median(times[peer]), "ratio_to_eager_fused_adam_mini": statistics.median(times[peer]) / base,
            "times_ms": times[peer],
            "first_calls_ms": setup_ms[peer],  # compiles and warm-up, never in the median
            # the first two calls beyond two ordinary ones: compiling (twice) for a compiled peer,
            # state allocation (and the kernel load) for an eager one
            "one_time_s": (setup_ms[peer][0] + setup_ms[peer][1] - 2 * statistics.median(times[peer])) / 1e3,
        }
        for peer in runs
    }


def table(results: dict) -> str:
    lines = [f"{'model':18s} {'what':6s} {'peer':24s} {'ms':>9s} {'vs AdamMini eager':>18s} {'one-time s':>10s}"]
    for model, per_what in results.items():
        for what, per_peer in per_what.items():
            for peer, r in per_peer.items():
                lines.append(f"{model:18s} {what:6s} {peer:24s} {r['median_ms']:9.1f} "
                             f"{r['ratio_to_eager_fused_adam_mini']:17.2f}x {r['one_time_s']:10.1f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=DEFAULT_MODELS)
    parser.add_argument("--what", nargs="+", choices=["step", "train"], default=["step", "train"])
    parser.add_argument("--rounds", type=int, default=7, help="timed calls per peer (after compiles and warm-up)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    env = environment("cpu", ("transformers",))
    if not fused_cpu.available():
        parser.error("the fused CPU kernel can't be built here: nothing to compare")
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.models:
            results[name] = {}
            for what in args.what:
                print(f"{name} {what} ...", flush=True)
                results[name][what] = bench(name, what, args.rounds, args.batch, args.seq)
    print("\n" + table(results))
    settings = {"models": args.models, "what": args.what, "rounds": args.rounds, "batch": args.batch, "seq": args.seq,
                "threads": args.threads, "lr": LR}
    path = write_result(args.out, name="compiled_step", settings=settings, results=results, environment=env)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
