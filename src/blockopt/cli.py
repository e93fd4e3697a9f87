"""The ``blockopt`` command line: ``demo``, ``compare``, ``plan``, ``build``, ``audit`` and
``zero-to-state``, each a ``_add_<name>`` parser plus a ``_run_<name>``. (Longer than 400 lines
because it is the whole command line: every option's help text lives here, beside the parser that
shows it.)

Every failure is one line on stderr, ``blockopt: error: ...``, never a traceback: exit status 2
when argparse refuses the command line (`_Parser`), 1 when running it fails (`main`, the one
place that turns errors into that line; ``--traceback`` or ``BLOCKOPT_TRACEBACK=1`` shows the
traceback instead). An error of a kind not in `_KNOWN_ERRORS` is a bug, reported as unexpected.
What a ``plan`` MODEL names, and every error of reading it, is `blockopt.hf`'s (`find_config`).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence

from . import __version__
# Light modules (no bench extras): the parsers show their defaults without importing those.
from .bench.argtypes import betas, folder, new_file, nonnegative_int, positive_int
from .bench.loop import DEFAULT_SEQ_LEN, DEFAULT_STEPS
from .bench.schedules import SCHEDULES

BENCH_EXTRAS = ("tokenizers", "matplotlib", "tqdm")
MAX_MESSAGE = 300  # characters of an error line before its listings are clipped


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1 (no traceback)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its refusals as one line (not usage + message), still exit status 2."""

    def error(self, message: str):
        self.exit(2, f"blockopt: error: {message} (see: {self.prog} --help)\n")


def _require_bench_extras(command: str) -> None:
    missing = [name for name in BENCH_EXTRAS if importlib.util.find_spec(name) is None]
    if missing:
        raise CommandError(
            f"`blockopt {command}` needs the bench extras (missing: {', '.join(missing)}); "
            "install them with: pip install blockopt[bench]"
        )


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
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="optimizer steps per run (default: %(default)s)")
    parser.add_argument("--out", type=folder, metavar="DIR", default="demo-out", help="output folder (default: %(default)s)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="model init and batch order (default: %(default)s)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    _require_bench_extras("demo")
    from .bench.demo import run_demo

    run_demo(args.corpus, steps=args.steps, out_dir=args.out, seed=args.seed, progress=args.progress)


def _torch_device(text: str) -> str:
    """A device this torch can use (checked before any training starts)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError(f"{text!r} holds no data to train on: pass cpu, cuda, ... (meta is for planning: blockopt plan)")
    backend = {"cuda": torch.cuda, "mps": torch.backends.mps}.get(device.type)
    if backend is not None and not backend.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: this torch {torch.__version__} has no usable {device.type} device")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return text


def _add_compare(subparsers: argparse._SubParsersAction) -> None:
    # compare_config needs no bench extras (only torch), so the defaults can be shown in --help.
    from .bench.compare_config import CompareConfig

    d = CompareConfig()
    d_loop = d.loop
    parser = subparsers.add_parser(
        "compare",
        help="train one model with several optimizers and seeds; table, JSON and plots",
        description="Train one model config with several optimizers and seeds on the same data order "
        "(same init and batches per seed), print a table and write compare.json, steps.csv, loss_curves.png, "
        "memory.png, throughput.png and pareto.png. Runs checkpoint themselves; --resume continues an interrupted "
        "comparison to the same numbers. See docs/compare.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  blockopt compare                                   # demo Llama, adamw vs adam-mini, 3 seeds\n"
        "  blockopt compare --opt adamw --opt lion --opt sgd-sai:lr=1e-2,momentum=0.8\n"
        "  blockopt compare --model hf:gpt2 --model-override n_layer=2,n_embd=128,n_head=4,vocab_size=2048\n"
        "  blockopt compare --list-optimizers",
    )
    parser.add_argument("--config", metavar="FILE.toml", help="settings from a TOML file, its keys the options' "
                        "names (steps = 200, batch-size = 16, opt = [\"adamw\", \"adam-mini\"]); options given "
                        "on the command line override it (see docs/compare.md)")
    what = parser.add_argument_group("what to compare")
    what.add_argument("--opt", action="append", metavar="NAME[:KEY=VALUE,...]",
                      help="an optimizer, with optional hyperparameter overrides; repeat for each "
                      f"(default: {' '.join(d.optimizers)}; see --list-optimizers)")
    what.add_argument("--list-optimizers", action="store_true", help="list the optimizers by name and exit")
    what.add_argument("--baseline", metavar="LABEL", help="the optimizer the others are compared with (default: the first)")
    what.add_argument("--model", metavar="NAME", help=f"a built-in config (demo, llama-tiny, gpt2-tiny, ...), "
                      f"hf:<name> (hf:gpt2, hf:llama, ...) or an HF config.json (default: {d.model})")
    what.add_argument("--model-override", action="append", metavar="KEY=VALUE[,...]",
                      help="change model config fields, e.g. n_layer=2,n_embd=128 (repeatable)")
    what.add_argument("--corpus", metavar="PATH", help="text file or folder (default: the Python standard library's source)")
    what.add_argument("--max-bytes", type=positive_int, help=f"cap on the corpus size (default: {d.max_bytes:,})")
    what.add_argument("--seeds", type=positive_int, help=f"number of seeds (default: {len(d.seeds)})")
    what.add_argument("--first-seed", type=int, help="seeds are first-seed, first-seed+1, ... (default: 0)")

    loop = parser.add_argument_group("training (shared by every optimizer)")
    loop.add_argument("--steps", type=positive_int, help=f"optimizer steps per run (default: {d_loop.steps})")
    loop.add_argument("--batch-size", type=positive_int, help=f"sequences per step (default: {d_loop.batch_size})")
    loop.add_argument("--seq-len", type=positive_int, help=f"tokens per sequence (default: {DEFAULT_SEQ_LEN}, at most the model's)")
    loop.add_argument("--lr", type=float, help=f"peak learning rate (default: {d.lr:g})")
    loop.add_argument("--betas", type=betas, metavar="B1,B2", help=f"(default: {d.betas[0]:g},{d.betas[1]:g})")
    loop.add_argument("--eps", type=float, help=f"(default: {d.eps:g})")
    loop.add_argument("--weight-decay", type=float, help=f"decoupled, on tensors with >= 2 dims (default: {d.weight_decay:g})")
    loop.add_argument("--schedule", choices=SCHEDULES, help=f"LR schedule after warm-up (default: {d_loop.schedule})")
    loop.add_argument("--warmup-steps", type=nonnegative_int, help="linear warm-up (default: 20%% of the steps)")
    loop.add_argument("--min-lr-ratio", type=float, help=f"LR floor as a fraction of the peak (default: {d_loop.min_lr_ratio:g})")
    loop.add_argument("--decay-fraction", type=float, help=f"WSD: share of the run spent decaying (default: {d_loop.decay_fraction:g})")
    loop.add_argument("--grad-clip", type=float, help=f"max global grad norm, 0 = off (default: {d_loop.grad_clip:g})")
    loop.add_argument("--eval-every", type=positive_int, help="validate every N steps (default: a tenth of the run)")
    loop.add_argument("--eval-batches", type=positive_int, help=f"validation batches (default: {d_loop.eval_batches})")
    loop.add_argument("--device", type=_torch_device, help=f"torch device (default: {d.device})")

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=folder, metavar="DIR", default="compare-out", help="output folder (default: %(default)s)")
    output.add_argument("--checkpoint-every", type=positive_int, help="checkpoint each run every N steps (default: --eval-every)")
    output.add_argument("--resume", action="store_true", help="reuse finished runs in --out and continue interrupted ones")
    output.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    parser.set_defaults(run=_run_compare)


# argparse dest -> CompareConfig field, for the options passed through unchanged
_COMPARE_SETTINGS = (
    "baseline", "model", "corpus", "max_bytes", "steps", "batch_size", "seq_len", "lr", "betas", "eps", "weight_decay",
    "schedule", "warmup_steps", "min_lr_ratio", "decay_fraction", "grad_clip", "eval_every", "eval_batches", "device",
    "checkpoint_every",
)


def _compare_command(args: argparse.Namespace) -> list[str]:
    """The command line that reproduces this comparison (given options only), for the JSON."""
    command = ["blockopt", "compare"]
    for opt in args.opt or []:
        command += ["--opt", opt]
    for override in args.model_override or []:
        command += ["--model-override", override]
    for dest in (*_COMPARE_SETTINGS, "seeds", "first_seed"):
        value = getattr(args, dest)
        if value is not None:
            text = ",".join(f"{v:g}" for v in value) if dest == "betas" else str(value)
            command += ["--" + dest.replace("_", "-"), text]
    command += ["--out", args.out]
    if args.resume:
        command.append("--resume")
    return command


def _list_optimizers() -> None:
    from .bench.peers import registered_optimizers

    peers = registered_optimizers()
    width = max(map(len, peers))
    for name, peer in peers.items():
        missing = peer.missing()
        status = "" if not missing else f"  [not installed: pip install {' '.join(missing)}]"
        print(f"{name.ljust(width)}  {peer.description}{status}")
        print(f"{''.ljust(width)}  hyperparameters: {', '.join(peer.accepted_keys) or '-'}")
    print(f"{'po:<name>'.ljust(width)}  any optimizer of pytorch-optimizer, e.g. po:adan, po:soap")


def _run_compare(args: argparse.Namespace) -> None:
    if args.list_optimizers:
        _list_optimizers()
        return
    _require_bench_extras("compare")
    from .bench.compare_config import seeds_from
    from .bench.modelspec import parse_overrides
    from .bench.runner import compare

    settings = {dest: getattr(args, dest) for dest in _COMPARE_SETTINGS if getattr(args, dest) is not None}
    if args.seeds is not None or args.first_seed is not None:
        settings["seeds"] = seeds_from(args.seeds or 3, args.first_seed or 0)
    if settings.get("grad_clip") == 0:
        settings["grad_clip"] = None
    if args.opt:
        settings["optimizers"] = tuple(args.opt)
    settings["model_overrides"] = parse_overrides(args.model_override)
    try:
        result = compare(
            out_dir=args.out, resume=args.resume, progress=args.progress, log=print,
            command=_compare_command(args), **settings,
        )
    except KeyboardInterrupt:
        raise CommandError(
            f"interrupted; finished runs and checkpoints are in {args.out}: run the same command with --resume to continue"
        ) from None
    print()
    print(result.table())
    for line in result.verdicts():
        print(line)


def _add_plan(subparsers: argparse._SubParsersAction) -> None:
    from .hf import NAMED_CONFIGS

    parser = subparsers.add_parser(
        "plan",
        help="print the Adam-mini partition of a Hugging Face model and its optimizer-state memory",
        description="Build a model on the meta device (no memory, no weights) and print its partition (rule, "
        "blocks per tensor, why; identical layers share one row with a count), the summary, and the state "
        "memory of AdamW vs Adam-mini in float32 and bfloat16.",
    )
    parser.add_argument("model", metavar="MODEL", help=f"a named shape ({', '.join(NAMED_CONFIGS)}), an HF "
                        "config.json or a model folder holding one, hf:<any of those or a transformers "
                        "model_type> as compare takes it, or a Hugging Face model id such as "
                        "Qwen/Qwen2.5-7B (reads its config.json from the Hub or the local cache)")
    parser.add_argument("--value", choices=("rows", "whole"), default="rows", help="attention value blocks (default: %(default)s)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table",
                        help="table for people; json (rows, summary, state bytes, warnings) or csv (rows) for tools "
                        "(default: %(default)s)")
    parser.add_argument("--expand", action="store_true", help="one row per tensor: do not collapse identical layers")
    parser.add_argument("--max-rows", type=positive_int, default=None, help="show at most this many rows in the table")
    parser.set_defaults(run=_run_plan)


def _run_plan(args: argparse.Namespace) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise CommandError("`blockopt plan` needs transformers; install it with: pip install 'blockopt[hf]'")
    from .hf import find_config, meta_model
    from .partition import PartitionWarning, partition
    from .partition.memory import memory_table
    from .partition.report import plan_dict, plan_rows, rows_csv, rows_table

    with _quiet_transformers():
        model = meta_model(find_config(args.model), source=args.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartitionWarning)  # plan.warnings: printed below, or in the JSON
        try:
            plan = partition(model, value=args.value)
        except ValueError as error:
            raise CommandError(f"{args.model}: blockopt cannot partition {type(model).__name__}: {_message(error)}") from error
    rows = plan_rows(plan, collapse=not args.expand)
    if args.format == "json":
        print(json.dumps({"model": args.model, "model_class": type(model).__name__, **plan_dict(plan, rows)}, indent=2))
        return
    if args.format == "csv":
        sys.stdout.write(rows_csv(rows))
        for warning in plan.warnings:
            print(f"blockopt: warning: {warning}", file=sys.stderr)
        return
    print(f"{args.model}: {type(model).__name__} on the meta device\n")
    print(rows_table(rows, max_rows=args.max_rows))
    if len(rows) < len(plan):
        print(f"({len(plan)} tensors in {len(rows)} rows: identical layers share a row, blocks are per tensor; "
              "--expand lists every tensor)")
    print()
    print(plan.summary())
    print("\noptimizer state (step counters left out):")
    print(memory_table(plan))
    for warning in plan.warnings:
        print(f"warning: {warning}")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' and the Hub's logging (config remarks, download retries) while the
    model is found and built: the plan, or one error line, says what matters."""
    import huggingface_hub.utils.logging as hub_logging
    import transformers

    levels = transformers.logging.get_verbosity(), hub_logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(levels[0])
        hub_logging.set_verbosity(levels[1])


def _add_build(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build",
        help="build the fused CPU Adam-mini kernel now (set-up runs this), or check that it loads",
        description="Compile the fused CPU Adam-mini kernel into the torch extensions cache (TORCH_EXTENSIONS_DIR), "
        "or load it from there, and say where and how long it took. Set-up runs this, so no training run "
        "pays the one-time build. Exit status 1, with one line saying why, when it cannot be built here.",
    )
    parser.set_defaults(run=_run_build)


def _run_build(args: argparse.Namespace) -> None:
    from .kernels.adam_mini import cpu

    try:
        build = cpu.build()
    except cpu.KernelBuildError as error:
        raise CommandError(
            f"cannot build the fused CPU Adam-mini kernel ({error}); install a C++ compiler and `ninja` "
            "(steps still run, with the slower batched implementation)"
        ) from None
    how = "built" if build.built else "loaded from the cache"
    print(f"fused CPU Adam-mini kernel {how} in {build.seconds:.1f} s: {build.directory}")


def _add_zero_to_state(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "zero-to-state",
        help="convert a DeepSpeed ZeRO checkpoint's blockopt optimizer state to a one-process state dict",
        description="Read every rank's optimizer file of a DeepSpeed ZeRO checkpoint (any stage, any world size) "
        "saved with a blockopt optimizer, and write the state dict the same optimizer loads in one process "
        "(opt.load_state_dict) or in an engine at another world size (blockopt.deepspeed.load_state). "
        "The weights: DeepSpeed's zero_to_fp32.py in the same folder. See docs/deepspeed.md.",
    )
    parser.add_argument("checkpoint_dir", help="the folder engine.save_checkpoint wrote (holds 'latest')")
    parser.add_argument("output", type=new_file, help="where to torch.save the state dict (.pt)")
    parser.add_argument("--tag", default=None, help="the step folder to read (default: the one named in 'latest')")
    parser.set_defaults(run=_run_zero_to_state)


def _run_zero_to_state(args: argparse.Namespace) -> None:
    import torch

    from .deepspeed import zero_to_state

    state = zero_to_state(args.checkpoint_dir, args.tag)
    torch.save(state, args.output)
    print(f"optimizer state of {len(state['state'])} parameters written to {args.output}")


def _add_audit(subparsers: argparse._SubParsersAction) -> None:
    from .hessian.audit import DEFAULT_KEEP, DEFAULT_SAMPLES

    parser = subparsers.add_parser(
        "audit",
        help="measure each tensor's Hessian block structure on a small model and check the partition against it",
        description="Build a small model (a built-in config or a scaled-down Hugging Face config), measure on one "
        "batch of random token ids how much of each tensor's Hessian lies inside the plan's blocks and inside the "
        "alternatives (rows, cols, heads of every size, whole, coordinate), and print the table, the tensors "
        "whose plan is measurably worse, and the partition(rules=...) override that follows the measurement. "
        "See docs/audit.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  blockopt audit llama-tiny\n"
        "  blockopt audit hf:gpt_neox --model-override hidden_size=64,num_attention_heads=4,num_hidden_layers=1,"
        "intermediate_size=128,vocab_size=256",
    )
    parser.add_argument("model", metavar="MODEL", help="a built-in config (demo, llama-tiny, gpt2-tiny, ...), "
                        "hf:<model_type> (hf:gpt2, hf:llama, ...) or an HF config.json, scaled down with --model-override")
    parser.add_argument("--model-override", action="append", metavar="KEY=VALUE[,...]",
                        help="change model config fields, e.g. n_layer=1,n_embd=64 (repeatable)")
    parser.add_argument("--value", choices=("rows", "whole"), default="rows", help="the plan's attention value blocks "
                        "(default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=2, help="sequences in the batch (default: %(default)s)")
    parser.add_argument("--seq-len", type=positive_int, default=32, help="tokens per sequence, at most the model's "
                        "(default: %(default)s)")
    parser.add_argument("--samples", type=positive_int, default=DEFAULT_SAMPLES, help="Hessian columns per tensor; "
                        "smaller tensors are measured exactly (default: %(default)s)")
    parser.add_argument("--keep", type=float, default=DEFAULT_KEEP, help="share of a tensor's Hessian mass the measured "
                        "rule's blocks must hold (default: %(default)s)")
    parser.add_argument("--only", metavar="GLOB", action="append", help="audit only tensors matching this glob (repeatable)")
    parser.add_argument("--seed", type=nonnegative_int, default=0, help="model init, batch and sampled columns (default: %(default)s)")
    parser.add_argument("--max-params", type=positive_int, default=5_000_000, help="refuse bigger models: audit a "
                        "scaled-down instance (default: %(default)s)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="(default: %(default)s)")
    parser.add_argument("--progress", action="store_true", help="a line per tensor on stderr as it is measured")
    parser.set_defaults(run=_run_audit)


def _run_audit(args: argparse.Namespace) -> None:
    import fnmatch

    import torch

    from .bench.modelspec import ModelSpec, parse_overrides
    from .hessian.audit import audit
    from .partition import PartitionWarning, partition

    spec = ModelSpec.parse(args.model, parse_overrides(args.model_override))
    with _quiet_transformers() if spec.family == "hf" else contextlib.nullcontext():
        n_params = spec.n_params()
        if n_params > args.max_params:
            raise CommandError(f"{args.model} has {n_params:,} parameters, more than --max-params {args.max_params:,}: "
                               "audit a scaled-down instance (--model-override with fewer layers, a smaller width and "
                               "vocabulary: the block structure, not the size, is measured)")
        model = spec.build(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PartitionWarning)  # plan.warnings: printed below
        plan = partition(model, value=args.value)
    # names as the user's own model spells them (an HF model without the bench's wrapper), in
    # --only, the table and the rules= override alike
    prefix = getattr(model, "NAME_PREFIX", "")
    names = list(plan)
    if args.only:
        names = [n for n in names if any(fnmatch.fnmatchcase(n.removeprefix(prefix), g) for g in args.only)]
        if not names:
            shown = ", ".join(n.removeprefix(prefix) for n in list(plan)[:5])
            raise CommandError(f"--only {' '.join(args.only)} matches no tensor; tensors: {shown}, ...")
    seq_len = min(args.seq_len, spec.max_seq_len or args.seq_len)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, spec.vocab_size, (args.batch_size, seq_len + 1), generator=generator)
    log = (lambda line: print(line, file=sys.stderr)) if args.progress else None
    report = audit(model, (ids[:, :-1], ids[:, 1:]), plan, samples=args.samples, keep=args.keep, names=names,
                   seed=args.seed, log=log).without_prefix(prefix)
    if args.format == "json":
        print(json.dumps({"model": spec.describe(), "n_params": n_params, "batch": [args.batch_size, seq_len],
                          **report.to_dict(), "plan_warnings": list(plan.warnings)}, indent=2, default=str))
        return
    print(f"{args.model}: {type(model).__name__}, {n_params:,} parameters; Hessian of the loss on {args.batch_size} x "
          f"{seq_len} random token ids, in {report.settings['seconds']:.0f} s\n")
    print(report)
    for warning in plan.warnings:
        print(f"plan warning: {warning}")


# compare options a TOML file cannot set: they are about this invocation, not the comparison
_NOT_IN_CONFIG = {"config", "list_optimizers", "traceback", "help"}


def _config_argv(path: str, parser: argparse.ArgumentParser, given: argparse.Namespace) -> list[str]:
    """The options a ``--config`` TOML file sets, as command-line words (parsed as the options
    are, so they are checked alike); options given on the command line (``given``) are left out,
    so they win. Keys are the options' names, with ``-`` or ``_``."""
    import tomllib

    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise CommandError(f"--config {path}: not valid TOML: {error}") from None
    except OSError as error:
        raise CommandError(f"--config {path}: cannot read it ({error.strerror})") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in _NOT_IN_CONFIG}
    unknown = sorted(key for key in table if key.replace("-", "_") not in actions)
    if unknown:
        keys = sorted(dest.replace("_", "-") for dest in actions)

        def said(key: str) -> str:
            close = difflib.get_close_matches(key.replace("_", "-"), keys, n=1)
            return f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key)

        raise CommandError(f"--config {path}: unknown key {', '.join(map(said, unknown))}; keys are the options of "
                           "`blockopt compare --help`, without the dashes")
    words = []
    for key, value in table.items():
        action = actions[key.replace("-", "_")]
        if getattr(given, action.dest) != parser.get_default(action.dest):
            continue  # given on the command line
        option = action.option_strings[-1]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise CommandError(f"--config {path}: {key} must be true or false, got {value!r}")
            words += [option] if value == isinstance(action, argparse._StoreTrueAction) else []
        elif isinstance(action, argparse._AppendAction):
            items = [",".join(f"{k}={v}" for k, v in value.items())] if isinstance(value, dict) else value
            for item in items if isinstance(items, list) else [items]:
                words += [option, str(item)]
        else:
            word = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            if isinstance(value, bool) or isinstance(value, dict):  # (TOML true, a table: no option reads them)
                raise CommandError(f"--config {path}: {key} = {value!r} is not a value {option} takes")
            try:
                (action.type or str)(word)  # (checked here, so that the error names the file)
            except (argparse.ArgumentTypeError, TypeError, ValueError) as error:
                raise CommandError(f"--config {path}: {key} = {value!r}: {error}") from None
            if action.choices is not None and word not in action.choices:
                raise CommandError(f"--config {path}: {key} = {value!r}: choose from {', '.join(map(str, action.choices))}")
            words += [option, word]
    return words


def _with_config(parser: argparse.ArgumentParser, argv: list[str], args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the settings of ``args.config`` filled in where the command line gave none."""
    subparser = parser._subparsers._group_actions[0].choices[args.command]
    words = _config_argv(args.config, subparser, args)
    at = argv.index(args.command) + 1
    return parser.parse_args([*argv[:at], *words, *argv[at:]])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blockopt", description="Memory-efficient blockwise optimizers for PyTorch.")
    parser.add_argument("--version", action="version", version=f"blockopt {__version__}")
    parser.add_argument("--traceback", action="store_true", help="on an error, show the traceback (also: BLOCKOPT_TRACEBACK=1)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(subparsers)
    _add_compare(subparsers)
    _add_plan(subparsers)
    _add_build(subparsers)
    _add_audit(subparsers)
    _add_zero_to_state(subparsers)
    for subparser in subparsers.choices.values():  # accepted after the command too; SUPPRESS keeps the top one's
        subparser.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS, help="on an error, show the traceback")
    return parser


# What a failure may be, as opposed to a bug: a CommandError, or an error of these kinds from the
# code a command runs (blockopt.hf's ConfigError and the bench's CorpusError, PeerError and
# ModelSpecError are ValueErrors; a missing file or package is an OSError or ImportError).
_KNOWN_ERRORS = (CommandError, ValueError, TypeError, OSError, ImportError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (argparse exits 2 itself on a bad command line)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        if getattr(args, "config", None):
            args = _with_config(parser, argv, args)
        args.run(args)
    except BrokenPipeError:  # the reader stopped (`blockopt plan ... | head`): nothing to report
        with contextlib.suppress(OSError, ValueError):  # no real stdout under a test's capture
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail
        return 1
    except (Exception, KeyboardInterrupt) as error:
        if args.traceback or os.environ.get("BLOCKOPT_TRACEBACK", "0") not in ("", "0"):
            raise
        if isinstance(error, KeyboardInterrupt):
            message = "interrupted"
        elif isinstance(error, _KNOWN_ERRORS):
            message = _message(error)
        else:
            message = f"unexpected {type(error).__name__}: {_message(error)} (a bug? rerun with --traceback and report it)"
        print(f"blockopt: error: {message}", file=sys.stderr)
        return 1
    return 0


_LISTING = re.compile(r"(?:[^\s,()]+, ){9,}[^\s,()]+")  # ten or more comma-separated words


def _message(error: BaseException) -> str:
    """``error``'s message on one line, long listings clipped (huggingface_hub's validation
    errors, a header above their cause, are said by their cause in `blockopt.hf`)."""
    text = " ".join(str(error).split()) or type(error).__name__
    if len(text) > MAX_MESSAGE:
        text = _LISTING.sub(lambda m: ", ".join(m[0].split(", ")[:5]) + f", ... ({m[0].count(', ') - 4} more)", text)
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE} more characters)"
    return text
