"""Sharpness by block type during training: train a model with AdamW, measure it at checkpoints.

`run` trains a model (by default the 'demo' Llama) on a corpus with AdamW at the demo's settings
(`train_run` with the default `TrainConfig`: betas (0.9, 0.95), weight decay 0.1, batch 32 x 128, 20% warm-up
then cosine to 0.1x) and, at each checkpoint, measures every block type on one fixed batch of
validation windows with `blockopt.hessian.block_sharpness` (the Gauss-Newton trace, the exact
Hessian's trace, λ_max). Checkpoints are taken just before the optimizer step that follows them,
so checkpoint ``k`` is the weights after ``k`` steps. Each checkpoint also records every weight's
RMS: a norm's curvature grows with fan-out x the mean square of the matrices it feeds.

The report (`blockopt.bench.write_result`'s ``result.json``, read by
`blockopt.bench.analysis.sharpness`) and its figure are written after every checkpoint, so a run
stopped early keeps what it measured: ``results["complete"]`` is false, and the validation curve
null, until the run ends.

`model_variant` changes the demo model along the axes the study varies (architecture, vocabulary,
width, depth, key/value heads, init scale); `add_model_arguments` and `model_from_args` are the
command-line flags for it that ``sharpness.py`` and ``blockwise_lr_probes.py`` share.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ...hessian import block_sharpness
from ...validation import check, choice, integer, real
from .. import (CONFIGS, DEFAULT_LR, DEFAULT_MAX_BYTES, GPT2Config, ModelConfig, TrainConfig, adamw, config_dict,
                count_params, demo_data, read_result, train_run, windows, write_result)
from .sharpness import MEASURES, PAPER_ORDER, pairwise, plot, plot_title

NAME = "sharpness"
FIGURE = "sharpness.png"
SEQ_LEN = 128
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1  # the demo's AdamW, at the run's LR


def model_variant(arch: str = "llama", *, vocab: int | None = None, dim: int | None = None,
                  layers: int | None = None, kv_heads: int | None = None,
                  init_std: float | None = None) -> ModelConfig:
    """The 'demo' model with these changes (``None`` keeps the demo's value). ``arch="gpt2"`` is a
    GPT-2 of the demo's size: LayerNorm, learned positions, GELU MLP 4x wide, tied output head."""
    check("arch", arch, choice("llama", "gpt2"))
    demo = CONFIGS["demo"]
    asked = {"vocab_size": vocab, "n_layers": layers, "init_std": init_std}
    if arch == "gpt2":
        if kv_heads is not None:
            raise ValueError("kv_heads is for arch='llama' (GPT-2 attention is plain multi-head)")
        base = GPT2Config(vocab_size=demo.vocab_size, dim=demo.dim, n_layers=demo.n_layers, n_heads=demo.n_heads,
                          max_seq_len=demo.max_seq_len, init_std=demo.init_std)
    else:
        base, asked["n_kv_heads"] = demo, kv_heads
    changes = {k: v for k, v in asked.items() if v is not None}
    if dim is not None:
        # mlp_hidden=None makes the config derive the MLP width from the new width again
        changes.update(dim=dim, mlp_hidden=None)
    return replace(base, **changes)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags that change the 'demo' Llama (each defaults to the demo's own value): `model_variant`'s."""
    parser.add_argument("--arch", choices=("llama", "gpt2"), default="llama",
                        help="the demo's Llama, or a GPT-2 of the demo's size (LayerNorm, learned positions, "
                             "GELU MLP 4x wide, tied output head)")
    parser.add_argument("--vocab", type=int, default=None, help="BPE vocabulary size (default: the demo's 2048)")
    parser.add_argument("--dim", type=int, default=None, help="model width (default: the demo's 128; MLP 8/3 of it)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the demo's 4)")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key/value heads (default: the demo's 2 of 4, grouped-query; 4 is plain multi-head)")
    parser.add_argument("--init-std", type=float, default=None,
                        help="std of the weight matrices and embeddings at init (default: the demo's 0.02)")


def model_from_args(args: argparse.Namespace) -> ModelConfig:
    """`model_variant` from `add_model_arguments`' flags."""
    return model_variant(args.arch, vocab=args.vocab, dim=args.dim, layers=args.layers, kv_heads=args.kv_heads,
                         init_std=args.init_std)


@dataclass(frozen=True, kw_only=True)
class SharpnessRun:
    """What one run trains and measures; the defaults are the demo's 100-step run.

    Args:
        model: the model's config (`model_variant` for the study's variants).
        steps: length of AdamW's schedule. checkpoints: steps after which to measure, in [0, steps].
        lr: AdamW's peak learning rate. seed: the initial weights and the batch order.
        corpus: a text file or folder to train and measure on (``None``: the built-in corpus),
            capped at ``max_bytes``.
        batch: validation windows in the measured batch. iters: power-iteration limit per type.
        probes: Hutchinson probes per type. gn_samples: sampled label sets for the Gauss-Newton trace.
        measures: which of `MEASURES` to take. device: where to train and measure.
    """

    model: ModelConfig = field(default_factory=model_variant)
    steps: int = 100
    checkpoints: tuple[int, ...] = (0, 25, 50, 100)
    lr: float = DEFAULT_LR
    seed: int = 0
    corpus: str | None = None
    max_bytes: int = DEFAULT_MAX_BYTES
    batch: int = 16
    iters: int = 20
    probes: int = 8
    gn_samples: int = 32
    measures: tuple[str, ...] = MEASURES
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("steps", "max_bytes", "batch", "iters", "probes", "gn_samples"):
            check(name, getattr(self, name), integer(1))
        check("seed", self.seed, integer())
        check("lr", self.lr, real(0, low_open=True))
        for i, measure in enumerate(self.measures):
            check(f"measures[{i}]", measure, choice(*MEASURES))
        checkpoints = tuple(sorted(set(self.checkpoints)))
        if not checkpoints or checkpoints[0] < 0 or checkpoints[-1] > self.steps:
            raise ValueError(f"checkpoints must lie in [0, steps={self.steps}], got {list(self.checkpoints)}")
        object.__setattr__(self, "checkpoints", checkpoints)
        object.__setattr__(self, "measures", tuple(self.measures))
        if self.corpus is not None:
            object.__setattr__(self, "corpus", str(self.corpus))


def run(settings: SharpnessRun, out_dir: str | Path, *, argv: Sequence[str] | None = None,
        progress: bool = False) -> dict:
    """Train and measure as ``settings`` say; write ``out_dir/result.json`` and ``sharpness.png``
    after every checkpoint and return the final report (the document `read_result` reads).

    Raises:
        FileNotFoundError, CorpusError: the corpus does not exist or holds no text.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    config, s = settings.model, settings
    _, data = demo_data(config.vocab_size, s.corpus, max_bytes=s.max_bytes)
    val_windows = windows(data.val, SEQ_LEN)
    batch = val_windows[torch.linspace(0, len(val_windows) - 1, s.batch).long()].to(s.device)  # fixed, evenly spaced
    hyper = {"lr": s.lr, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY}
    measured: dict[int, dict] = {}
    holder = {}

    def write(val_curve) -> dict:
        """The report of the checkpoints measured so far; ``complete`` once ``val_curve`` is known."""
        n_params = count_params(holder["model"])
        model = {"name": "demo", "n_params": n_params, **config_dict(config)}
        last = measured[max(measured)]
        path = write_result(out_dir, name=NAME, argv=argv, device=s.device, settings={
            "model": model,
            "training": {"optimizer": "AdamW", **hyper, "steps": s.steps, "seed": s.seed, "batch_size": 32,
                         "seq_len": SEQ_LEN, "corpus": s.corpus, "max_bytes": s.max_bytes},
            "measurement": {"batch": s.batch, "seq_len": SEQ_LEN, "iters": s.iters, "probes": s.probes,
                            "gn_samples": s.gn_samples, "seed": 0, "measures": s.measures,
                            "checkpoints": s.checkpoints},
            "paper_order": PAPER_ORDER,
        }, results={
            "complete": val_curve is not None,
            "train_tokens": len(data.train),
            "val_curve": val_curve,
            "checkpoints": {str(k): v for k, v in sorted(measured.items())},
            "final_ordering": last["ordering"],
            "final_paper_pairs": last["paper_pairs"],
            "wall_s": time.perf_counter() - started,
        })
        plot(measured, out_dir / FIGURE, plot_title(model, n_params, s.batch), s.measures)
        return read_result(path)

    def measure(done: int) -> bool:
        """Measure the weights after ``done`` steps if that is a checkpoint; True if it was."""
        if done not in s.checkpoints or done in measured:
            return False
        model = holder["model"]
        t = time.perf_counter()
        report = block_sharpness(
            model, lambda: model(batch[:, :-1], batch[:, 1:])[1], iters=s.iters, probes=s.probes, seed=0,
            measures=s.measures, logits_fn=lambda: model(batch[:, :-1])[0], gn_samples=s.gn_samples,
        )
        entry = report.to_dict()
        entry["ordering"] = {m: report.ordering(m) for m in s.measures}
        entry["paper_pairs"] = {m: pairwise(report.values_of(m)) for m in s.measures}
        entry["weight_rms"] = {name: p.detach().float().square().mean().sqrt().item()
                               for name, p in model.named_parameters()}
        entry["seconds"] = time.perf_counter() - t
        measured[done] = entry
        print(f"--- after {done} steps ({entry['seconds']:.0f}s)\n{report}", flush=True)
        for m in s.measures:
            print(f"    flattest -> sharpest ({m}):".ljust(38), " < ".join(entry["ordering"][m]), flush=True)
        return True

    def make(model):
        holder["model"] = model
        optimizer = adamw(model, **hyper)
        steps_done = itertools.count()

        def before_step(*_):
            if measure(next(steps_done)):
                write(val_curve=None)  # a run stopped later still leaves what it measured

        optimizer.register_step_pre_hook(before_step)
        return optimizer

    trained = train_run(config, make, data, TrainConfig(steps=s.steps), seed=s.seed, device=s.device,
                        progress=progress, desc="AdamW")
    measure(s.steps)  # after the last step
    return write(val_curve=trained.val_curve)

