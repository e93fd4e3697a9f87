"""Where the fused int8 step's time goes: the step with parts of its encode taken out.

Question: could any int8 code reach issue #31's 0.75x of fused AdamW's step on this CPU? The
fused int8 step decodes m, updates p and m, then encodes m (the chunk's absolute maximum, the
level search, the random bits of the stochastic rounding, the store). Each variant below patches
one line of the C++ kernel (a copy of ``src/`` in a temporary folder; the package is untouched),
builds it, and times it with step_speed.py against fused AdamW side by side in one process; the
variants take turns, ``--repeats`` times, and each figure is the median of its repeats:

  as built      the kernel as it is
  no hash       the rounding's uniforms replaced by 0.5 (no murmur3 per element)
  no sqrt       the level search's square root left out (k = floor(a))
  float level   the level search of an 8-bit *float* code instead (sign, exponent, 3 mantissa
                bits: random bits added below the kept bits and truncated, as bf16 rounding
                does; AVX2 only): what a float-like int8 code's encode would cost
  no encode     m decoded and updated, never encoded back (codes and scales left as they were)

The variants compute wrong codes on purpose: they are timings, not optimizers. ``no encode`` is
the floor of any int8 code with this decode: what a free encode would leave.

    python benchmarks/speed/step_speed/int8_ablation.py                      # -> results/cpu-int8-ablation
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from blockopt.bench import environment, write_result

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
KERNEL = Path("blockopt/kernels/adam_mini/csrc/adam_mini_cpu.cpp")
INT8 = "blockopt AdamMini[fused, int8 m]"

# variant -> (lines of the kernel, their replacement); each must occur exactly once
PATCHES = {
    "as built": None,
    "no hash": ("const Vec level = k + ((uniforms.next() * (k + k + one) < a - low) & one);",
                "const Vec level = k + ((Vec(0.5f) * (k + k + one) < a - low) & one);"),
    "no sqrt": ("const Vec k = a.sqrt().floor(), low = k * k;",
                "const Vec k = a.floor(), low = k * k;"),
    "float level": ("const Vec k = a.sqrt().floor(), low = k * k;\n"
                    "        // up to level k + 1 with probability (a - k^2) / (2k + 1)\n"
                    "        const Vec level = k + ((uniforms.next() * (k + k + one) < a - low) & one);",
                    "const __m256i noise = _mm256_srli_epi32(_mm256_castps_si256(uniforms.next()), 12);\n"
                    "        const Vec level = _mm256_cvtepi32_ps(_mm256_srli_epi32(\n"
                    "            _mm256_add_epi32(_mm256_castps_si256(a), noise), 20));"),
    "no encode": ("    stored.encode(r, c, n, m);\n",
                  "    if (n < 0) stored.encode(r, c, n, m);  // never: the ablation's floor\n"),
}


def patched_source(variant: str, folder: Path) -> Path:
    """A copy of src/ with ``variant``'s patch applied; returns the folder to put on PYTHONPATH."""
    src = folder / "src"
    shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
    patch = PATCHES[variant]
    if patch is not None:
        kernel = src / KERNEL
        text = kernel.read_text()
        if text.count(patch[0]) != 1:
            raise SystemExit(f"int8_ablation: the lines to patch for {variant!r} are not in the kernel once; update PATCHES")
        kernel.write_text(text.replace(patch[0], patch[1]))
    return src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["llama-gqa"])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="runs of every variant, round-robin (the median is reported)")
    parser.add_argument("--out", default=str(HERE / "results" / "cpu-int8-ablation"))
    args = parser.parse_args()
    env = environment("cpu")  # now: its load average is the one before the work
    runs = {variant: [] for variant in PATCHES}  # one entry per repeat
    with tempfile.TemporaryDirectory() as tmp:
        sources = {variant: patched_source(variant, Path(tmp) / f"v{i}") for i, variant in enumerate(PATCHES)}
        for repeat in range(args.repeats):  # round-robin: a slow spell of the machine hits every variant
            for i, (variant, src) in enumerate(sources.items()):
                out = Path(tmp) / f"out{i}-{repeat}"
                command = [sys.executable, str(HERE / "step_speed.py"), "--models", *args.models, "--rounds",
                           str(args.rounds), "--peers", "AdamMini[fused]", INT8, "--out", str(out)]
                if args.threads:
                    command += ["--threads", str(args.threads)]
                print(f"== {variant} (repeat {repeat + 1} of {args.repeats})", flush=True)
                subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(src)}, stdout=subprocess.DEVNULL)
                result = json.loads((out / "result.json").read_text())["results"]["models"]
                runs[variant].append({model: {peer: {k: r[k] for k in ("median_ms", "ratio_to_fused_adamw")}
                                              for peer, r in result[model]["peers"].items()} for model in result})
    summary = {variant: {model: {peer: statistics.median(rep[model][peer]["ratio_to_fused_adamw"] for rep in reps)
                                 for peer in reps[0][model]} for model in args.models}
               for variant, reps in runs.items()}
    print(f"\nmedians of {args.repeats} repeats (the int8 ratio's range after them)")
    print(f"{'variant':<11} " + " ".join(f"{m + ': int8 / AdamW (plain fused / AdamW)':>44}" for m in args.models))
    for variant, models in summary.items():
        cells = [f"{p[INT8]:.2f}x ({p['blockopt AdamMini[fused]']:.2f}x)" for p in models.values()]
        spread = [f"{min(r[m][INT8]['ratio_to_fused_adamw'] for r in runs[variant]):.2f}-"
                  f"{max(r[m][INT8]['ratio_to_fused_adamw'] for r in runs[variant]):.2f}" for m in args.models]
        print(f"{variant:<11} " + " ".join(f"{c:>44}" for c in cells) + f"   {', '.join(spread)}")
    path = write_result(args.out, name="step_speed_int8_ablation", environment=env,
                        settings={"models": args.models, "rounds": args.rounds, "threads": args.threads,
                                  "repeats": args.repeats,
                                  "patches": {k: v and {"line": v[0], "replacement": v[1]} for k, v in PATCHES.items()}},
                        results={"median_ratio_to_fused_adamw": summary, "repeats": runs})
    plot(summary, Path(args.out) / "int8_ablation.png")
    print(f"wrote {path}")


def plot(runs: dict, path: Path) -> None:
    """One bar per variant and model: the int8 step's time over fused AdamW's, with 0.75x marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(next(iter(runs.values())))
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.5 * len(runs) * len(models)))
    labels, values = [], []
    for variant, by_model in runs.items():
        for model in models:
            labels.append(f"{variant} ({model})" if len(models) > 1 else variant)
            values.append(by_model[model][INT8])
    ax.barh(labels[::-1], values[::-1], color="tab:blue")
    ax.axvline(0.75, color="tab:red", linestyle="--", label="issue #31's target (0.75x)")
    ax.axvline(1.0, color="gray", linewidth=0.8)
    ax.set_xlabel("int8 step time / fused AdamW's (same process, same gradients)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
