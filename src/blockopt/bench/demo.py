"""`blockopt demo`: train one small Llama twice, with AdamW and with Adam-mini, and compare.

Both runs share the model init, the batches, the LR schedule and every hyperparameter; only the
optimizer differs. The demo prints a table, writes the loss curves (``loss_curves.png``) and every
number it measured (``demo.json``) into ``out_dir``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn

import blockopt

from .comparison import environment
from .corpus import DEFAULT_MAX_BYTES, load_corpus, split_ids
from .models import CONFIGS, config_dict
from .plots import plot_loss_curves
from .tokenizer import tokenize_corpus
from .train import RunResult, train_run

DEMO_CONFIG = "demo"
# About 400k tokens per run: both runs fit in ~2 minutes on 2 CPU cores.
DEFAULT_STEPS = 100
DEFAULT_LR = 2e-3  # the demo's peak learning rate, for both optimizers


def demo_loop(steps: int = DEFAULT_STEPS, **overrides) -> dict:
    """`train_run`'s loop settings of the demo, for ``steps`` steps: batches of 32x128 tokens, 20%
    linear warm-up then cosine to 0.1x, clipping at 1, validation every ``steps // 10`` steps on
    4 batches, seed 0. ``overrides`` replace any of them. The benchmarks start from these."""
    settings = dict(steps=steps, batch_size=32, seq_len=128, warmup_steps=max(1, steps // 5), min_lr_ratio=0.1,
                    grad_clip=1.0, eval_every=max(1, steps // 10), eval_batches=4, seed=0)
    settings.update(overrides)
    return settings


def demo_data(vocab_size: int, corpus: str | os.PathLike | None = None, *, max_bytes: int | None = DEFAULT_MAX_BYTES):
    """``(tokenized, splits)`` of a corpus (default: the built-in one) with a BPE vocabulary of
    ``vocab_size`` (trained once, then cached): what every demo-style run trains on."""
    tokenized = tokenize_corpus(load_corpus(corpus, max_bytes=max_bytes), vocab_size)
    return tokenized, split_ids(tokenized.ids)


def _adamw(model: nn.Module, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
    """AdamW matching Adam-mini's defaults: decay matrices and embeddings, not 1-D norm weights or biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def _table(results: dict[str, RunResult]) -> str:
    header = ("optimizer", "final train loss", "final val loss", "optimizer state MB", "step ms", "tokens/s")
    rows = [header] + [
        (
            name,
            f"{r.final_train_loss:.4f}",
            f"{r.final_val_loss:.4f}",
            f"{r.state_bytes / 2**20:.2f}",
            f"{r.step_ms:.2f}",
            f"{r.tokens_per_s:,.0f}",
        )
        for name, r in results.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        " | ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(
    corpus: str | os.PathLike | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    out_dir: str | os.PathLike = "demo-out",
    seed: int = 0,
    lr: float = DEFAULT_LR,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    batch_size: int = 32,
    seq_len: int = 128,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    grad_clip: float = 1.0,
    eval_every: int | None = None,
    eval_batches: int = 4,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
    progress: bool = True,
) -> dict:
    """Train the ``"demo"`` Llama with AdamW and with Adam-mini at the same settings; report and save.

    Args:
        corpus: a text file or folder; ``None`` uses the Python standard library's source.
        steps: optimizer steps per run. ``warmup_steps`` defaults to 20% of them, ``eval_every``
            to a tenth of the run.
        out_dir: where ``loss_curves.png`` and ``demo.json`` go (created if missing).
        seed: model init and batch order (the same for both runs).
        lr, betas, eps, weight_decay: shared by both optimizers; weight decay skips 1-D tensors.
            Note: at this tiny scale Adam-mini tolerates a high LR less well than AdamW (at
            lr=3e-3 with batch 16 it trails by 2-5%); lr=2e-3, batch 32 and a 20% warm-up suit both.
        max_bytes: cap on the corpus size.

    Returns:
        The content of ``demo.json``.
    """
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = CONFIGS[DEMO_CONFIG]
    warmup_steps = max(1, steps // 5) if warmup_steps is None else warmup_steps
    eval_every = max(1, steps // 10) if eval_every is None else eval_every

    text = load_corpus(corpus, max_bytes=max_bytes)
    tokenized = tokenize_corpus(text, config.vocab_size)
    data = split_ids(tokenized.ids)
    n_bytes = len(text.encode("utf-8"))
    print(
        f"corpus: {corpus or 'Python standard library'} ({n_bytes:,} bytes, {len(tokenized.ids):,} tokens); "
        f"tokenizer {'loaded from cache' if tokenized.from_cache else 'trained'} in {tokenized.seconds:.1f}s"
    )

    optimizer_settings = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
    make_optimizer = {
        "AdamW": lambda model: _adamw(model, **optimizer_settings),
        "Adam-mini": lambda model: blockopt.AdamMini(model, **optimizer_settings),
    }
    loop_settings = {
        "steps": steps,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "warmup_steps": warmup_steps,
        "min_lr_ratio": min_lr_ratio,
        "grad_clip": grad_clip,
        "eval_every": eval_every,
        "eval_batches": eval_batches,
        "seed": seed,
    }
    print(
        f"model: {DEMO_CONFIG} Llama ({config.n_layers} layers, dim {config.dim}, {config.n_heads} heads / "
        f"{config.n_kv_heads} kv heads); {steps} steps of {batch_size}x{seq_len} tokens per optimizer"
    )
    results = {
        name: train_run(config, make, data, **loop_settings, progress=progress, desc=name)
        for name, make in make_optimizer.items()
    }

    adamw, mini = results["AdamW"], results["Adam-mini"]
    memory_ratio = mini.state_bytes / adamw.state_bytes
    val_diff = mini.final_val_loss / adamw.final_val_loss - 1.0
    print(_table(results))
    print(f"Adam-mini / AdamW state memory: {memory_ratio:.2f}")
    print(f"val loss difference: {100 * val_diff:+.2f}%")

    plot = plot_loss_curves(results, out / "loss_curves.png", title=f"{DEMO_CONFIG} Llama ({adamw.n_params:,} params)")
    report = {
        "model": {"name": DEMO_CONFIG, "n_params": adamw.n_params, **config_dict(config)},
        "corpus": {
            "source": str(corpus) if corpus is not None else "stdlib",
            "bytes": n_bytes,
            "max_bytes": max_bytes,
            "tokens": len(tokenized.ids),
            "train_tokens": len(data.train),
            "val_tokens": len(data.val),
            "vocab_size": config.vocab_size,
            "tokenizer_from_cache": tokenized.from_cache,
        },
        "hyperparameters": {**optimizer_settings, **loop_settings, "weight_decay_1d": 0.0},
        "runs": {name: result.to_dict() for name, result in results.items()},
        "comparison": {"state_memory_ratio": memory_ratio, "val_loss_difference": val_diff},
        "timings_s": {
            "tokenizer": tokenized.seconds,
            **{f"run_{name}": result.wall_s for name, result in results.items()},
            "total": time.perf_counter() - started,
        },
        **environment(),
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {plot} and {out / 'demo.json'}")
    return report
