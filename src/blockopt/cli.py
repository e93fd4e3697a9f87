"""The ``blockopt`` command line. Each subcommand is a ``_add_<name>`` parser plus a ``_run_<name>``."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence

BENCH_EXTRAS = ("tokenizers", "matplotlib", "tqdm")


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1 (no traceback)."""


def _require_bench_extras(command: str) -> None:
    missing = [name for name in BENCH_EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        raise CommandError(
            f"`blockopt {command}` needs the bench extras (missing: {', '.join(missing)}); "
            "install them with: pip install blockopt[bench]"
        )


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="train a small Llama with AdamW and with Adam-mini, compare loss, memory and speed",
        description="Train the 'demo' Llama twice (AdamW, then Adam-mini) at the same hyperparameters "
        "and seed on a local corpus, print a comparison, and write loss_curves.png and demo.json.",
    )
    parser.add_argument(
        "--corpus",
        metavar="PATH",
        help="text file or folder to train on (default: the Python standard library's source)",
    )
    # No default here: building the parser must not import the bench extras (run_demo owns it).
    parser.add_argument("--steps", type=_positive_int, help="optimizer steps per run (default: 100)")
    parser.add_argument("--out", metavar="DIR", default="demo-out", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="model init and batch order (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    _require_bench_extras("demo")
    from .bench.demo import run_demo

    from .bench.corpus import CorpusError

    options = {"steps": args.steps} if args.steps is not None else {}
    try:
        run_demo(args.corpus, out_dir=args.out, seed=args.seed, progress=args.progress, **options)
    except (FileNotFoundError, CorpusError) as error:
        raise CommandError(str(error)) from error


def _add_plan(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="print the Adam-mini partition of a Hugging Face model and its optimizer-state memory",
        description="Build a model on the meta device (no memory) from a config.json or a named shape, "
        "print its partition (every tensor: rule, blocks, why), the summary, and the state memory of "
        "AdamW vs Adam-mini in float32 and bfloat16.",
    )
    parser.add_argument("config", help="path to an HF config.json (or its folder), or a named shape: "
                        "gpt2, gpt2-medium, gpt2-large, gpt2-xl, llama-2-7b, llama-2-13b, llama-3-8b, llama-3-70b, mixtral-8x7b")
    parser.add_argument("--value", choices=("rows", "whole"), default="rows", help="attention value blocks (default: %(default)s)")
    parser.add_argument("--max-rows", type=_positive_int, default=None, help="show at most this many tensors in the table")
    parser.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise CommandError("`blockopt plan` needs transformers; install it with: pip install 'blockopt[hf]'")
    import blockopt
    from blockopt.partition.memory import memory_table

    try:
        model = blockopt.hf.meta_model(args.config)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(str(error)) from error
    plan = blockopt.partition(model, value=args.value)
    print(f"{args.config}: {type(model).__name__} on the meta device\n")
    print(plan.table(max_rows=args.max_rows))
    print()
    print(plan.summary())
    print("\noptimizer state (step counters left out):")
    print(memory_table(plan))
    for warning in plan.warnings:
        print(f"warning: {warning}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blockopt", description="Memory-efficient blockwise optimizers for PyTorch.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(subparsers)
    _add_plan(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except CommandError as error:
        print(f"blockopt {args.command}: error: {error}", file=sys.stderr)
        return 1
    return 0
