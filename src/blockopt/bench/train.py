"""A small, reproducible language-model training loop that measures what optimizers differ in.

Every run with the same seed sees the same initial weights and the same batches in the same order,
whatever the optimizer, so two runs differ only by the optimizer. Besides loss curves it records the
optimizer's state size and the time of ``optimizer.step()`` alone.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

import blockopt

from .corpus import TokenSplit
from .models import ModelConfig, build_model

# Losses of the last this-many steps are averaged into the final train loss (one step is noisy).
FINAL_TRAIN_WINDOW = 10


@dataclass
class RunResult:
    """What one training run measured. Curves are lists of ``(step, loss)``; steps count from 1."""

    optimizer: str
    train_curve: list[tuple[int, float]]
    val_curve: list[tuple[int, float]]
    final_train_loss: float  # mean of the last FINAL_TRAIN_WINDOW steps
    final_val_loss: float  # after the last step
    step_ms: float  # median optimizer.step() time, warm-up steps excluded
    tokens_per_s: float  # training tokens per second of the loop (forward, backward, step; eval excluded)
    state_bytes: int  # optimizer state, from `blockopt.state_bytes`
    n_params: int
    wall_s: float  # the whole run, evaluation included

    def to_dict(self) -> dict:
        return asdict(self)


def lr_factor(step: int, *, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR at ``step`` (0-based): linear warm-up, then cosine to a floor."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Every ``seq_len + 1`` window of ``ids`` as a ``(n, seq_len + 1)`` view (inputs + shifted targets)."""
    if len(ids) <= seq_len:
        raise ValueError(f"need more than seq_len={seq_len} tokens, got {len(ids)}")
    return ids.unfold(0, seq_len + 1, 1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean loss of ``model`` over fixed ``(batch, seq_len + 1)`` windows."""
    model.eval()
    losses = [model(window[:, :-1], window[:, 1:])[1].item() for window in batches]
    model.train()
    return sum(losses) / len(losses)


def train_run(
    model_config: ModelConfig | str,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    data: TokenSplit,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    warmup_steps: int | None = None,
    min_lr_ratio: float = 0.1,
    grad_clip: float | None = 1.0,
    eval_every: int = 50,
    eval_batches: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str | None = None,
) -> RunResult:
    """Train a fresh model and measure the optimizer.

    Args:
        model_config: a model config or the name of a built-in one.
        make_optimizer: builds the optimizer for the model; its LR is the peak of the schedule.
        data: train and validation token ids (`blockopt.bench.corpus.split_ids`).
        steps, batch_size, seq_len: length of the run and shape of each batch.
        warmup_steps: linear LR warm-up length (default: 10% of ``steps``); then cosine decay to
            ``min_lr_ratio`` times the peak.
        grad_clip: max global gradient norm; ``None`` or 0 disables clipping.
        eval_every: validate every this many steps (and always after the last one) on
            ``eval_batches`` fixed batches spread evenly over the validation ids.
        seed: fixes the initial weights and the batch order; the optimizer does not change either.
        device: where the model and batches live; timings synchronize CUDA.
        progress: show a tqdm bar on a terminal (``desc`` labels it).
    """
    if min(steps, batch_size, seq_len, eval_every, eval_batches) <= 0:
        raise ValueError("steps, batch_size, seq_len, eval_every and eval_batches must be positive")
    warmup_steps = max(1, steps // 10) if warmup_steps is None else warmup_steps
    device = torch.device(device)
    start = time.perf_counter()

    model = build_model(model_config, seed=seed).to(device)
    optimizer = make_optimizer(model)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, steps=steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
    )

    train_windows = _windows(data.train, seq_len)
    val_windows = _windows(data.val, seq_len)
    # Evenly spaced validation windows: the same for every evaluation and every run.
    val_starts = torch.linspace(0, len(val_windows) - 1, eval_batches * batch_size).long()
    val_batches = [w.to(device) for w in val_windows[val_starts].split(batch_size)]
    # Batches come from their own generator, so the optimizer or model code cannot shift them.
    batch_generator = torch.Generator().manual_seed(seed)

    train_curve: list[tuple[int, float]] = []
    val_curve: list[tuple[int, float]] = []
    step_times: list[float] = []
    train_seconds = 0.0
    timing_warmup = min(5, steps // 5)  # first steps allocate state and warm caches
    # disable=None: tqdm also hides itself when stderr is not a terminal (logs, CI).
    bar = tqdm(range(1, steps + 1), desc=desc, disable=None if progress else True, leave=False, dynamic_ncols=True)
    for step in bar:
        loop_start = time.perf_counter()
        starts = torch.randint(len(train_windows), (batch_size,), generator=batch_generator)
        window = train_windows[starts].to(device)
        _, loss = model(window[:, :-1], window[:, 1:])
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        _sync(device)
        step_start = time.perf_counter()
        optimizer.step()
        _sync(device)
        if step > timing_warmup:
            step_times.append(time.perf_counter() - step_start)
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        train_curve.append((step, loss.item()))
        train_seconds += time.perf_counter() - loop_start

        if step % eval_every == 0 or step == steps:
            val_curve.append((step, evaluate(model, val_batches)))
            bar.set_postfix(train=f"{train_curve[-1][1]:.3f}", val=f"{val_curve[-1][1]:.3f}", refresh=False)

    last = [loss for _, loss in train_curve[-FINAL_TRAIN_WINDOW:]]
    return RunResult(
        optimizer=type(optimizer).__name__,
        train_curve=train_curve,
        val_curve=val_curve,
        final_train_loss=sum(last) / len(last),
        final_val_loss=val_curve[-1][1],
        step_ms=1e3 * statistics.median(step_times),
        tokens_per_s=steps * batch_size * seq_len / train_seconds,
        state_bytes=blockopt.state_bytes(optimizer),
        n_params=model.num_params(),
        wall_s=time.perf_counter() - start,
    )
