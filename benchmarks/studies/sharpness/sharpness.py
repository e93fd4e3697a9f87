"""Sharpness by block type of the 'demo' Llama (or a variant of it) during AdamW training.

    python benchmarks/studies/sharpness/sharpness.py                      # results/demo
    python benchmarks/studies/sharpness/sharpness.py --dim 512 --vocab 16384 --kv-heads 4 --init-std 0.0283 \
        --lr 1.4e-3 --steps 1000 --checkpoints 400,700,1000 --measures gauss_newton \
        --out benchmarks/studies/sharpness/results/width512-1000steps-lr1.4e-3
    python benchmarks/studies/sharpness/sharpness.py --summarize benchmarks/studies/sharpness/results/width512

Trains and measures with `blockopt.bench.analysis.sharpness_run.run` (what is measured, and when:
its docstring); ``--summarize`` prints a written report's orderings and the ratios of the paper's
adjacent pairs (`blockopt.bench.analysis.sharpness.summarize`). See README.md for the findings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from blockopt.bench import DEFAULT_LR, DEFAULT_MAX_BYTES, CorpusError, read_result
from blockopt.bench.analysis import sharpness, sharpness_run
from blockopt.bench.argtypes import positive_int

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=positive_int, default=100, help="length of the training schedule")
    parser.add_argument("--checkpoints", default="0,25,50,100", help="steps after which to measure")
    parser.add_argument("--batch", type=positive_int, default=16, help="validation windows in the measured batch")
    parser.add_argument("--iters", type=positive_int, default=20, help="power-iteration limit per type")
    parser.add_argument("--probes", type=positive_int, default=8, help="Hutchinson probes per type")
    parser.add_argument("--gn-samples", type=positive_int, default=32,
                        help="sampled label sets for the Gauss-Newton trace")
    sharpness_run.add_model_arguments(parser)
    parser.add_argument("--measures", nargs="+", default=list(sharpness.MEASURES), choices=sharpness.MEASURES)
    parser.add_argument("--corpus", metavar="PATH",
                        help="text file or folder to train and measure on (default: the built-in corpus)")
    parser.add_argument("--max-bytes", type=positive_int, default=DEFAULT_MAX_BYTES,
                        help=f"cap on the corpus size in bytes, as in `blockopt compare` "
                             f"(default: {DEFAULT_MAX_BYTES:,})")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help=f"AdamW's peak learning rate (default: the demo's {DEFAULT_LR:g})")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and batch order (default: the demo's 0)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--device", default="cpu", help="where to train and measure, e.g. cuda (default: cpu)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "demo", help="the run's folder")
    parser.add_argument("--summarize", type=Path, metavar="RESULT",
                        help="print a written report's orderings and pair ratios as a table, and exit")
    args = parser.parse_args()
    if args.summarize is not None:
        print(sharpness.summarize(read_result(args.summarize)))
        return
    try:
        settings = sharpness_run.SharpnessRun(
            model=sharpness_run.model_from_args(args), steps=args.steps,
            checkpoints=tuple(int(c) for c in args.checkpoints.split(",")), lr=args.lr, seed=args.seed,
            corpus=args.corpus, max_bytes=args.max_bytes, batch=args.batch, iters=args.iters, probes=args.probes,
            gn_samples=args.gn_samples, measures=tuple(args.measures), device=args.device,
        )
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    try:
        report = sharpness_run.run(settings, args.out, progress=sys.stderr.isatty())
    except (FileNotFoundError, CorpusError) as error:
        parser.error(f"--corpus: {error}")
    print(f"wrote {args.out} ({report['results']['wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
