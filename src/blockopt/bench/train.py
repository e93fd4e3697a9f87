"""A small, reproducible language-model training loop that measures what optimizers differ in.

Every run with the same seed sees the same initial weights and the same batches in the same order,
whatever the optimizer, so two runs differ only by the optimizer. Besides loss curves it records the
optimizer's state size and the time of ``optimizer.step()`` alone.

A run can checkpoint itself (model, optimizer, LR schedule, RNG and batch position, curves so far)
into a folder every few steps; a run resumed from there continues to the same result, bit for bit,
as one that was never interrupted (Note [exact resume]).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import blockopt

from ..validation import check, integer, real
from .checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from .corpus import TokenSplit
from .loop import TrainConfig
from .models import CONFIGS, ModelConfig, build_model
from .schedules import lr_factor

__all__ = ["CHECKPOINT_FILE", "RunResult", "TrainConfig", "count_params", "evaluate", "load_checkpoint", "lr_factor",
           "steps_to_reach", "train_run", "windows"]

# Losses of the last this-many steps are averaged into the final train loss (one step is noisy).
FINAL_TRAIN_WINDOW = 10

# What builds the model: a config, the name of a built-in config, or a function of the seed.
ModelSource = ModelConfig | str | Callable[[int], nn.Module]


@dataclass
class RunResult:
    """What one training run measured. Curves are lists of ``(step, loss)``; steps count from 1."""

    optimizer: str
    train_curve: list[tuple[int, float]]
    val_curve: list[tuple[int, float]]
    final_train_loss: float  # mean of the last FINAL_TRAIN_WINDOW steps
    final_val_loss: float  # after the last step
    step_ms: float  # median optimizer.step() time, warm-up steps excluded
    tokens_per_s: float  # training tokens per second at the median loop step (forward, backward, step)
    state_bytes: int  # optimizer state, from `blockopt.state_bytes`
    n_params: int
    wall_s: float  # the whole run, evaluation included (summed over sessions when resumed)
    resumed_from: list[int] = field(default_factory=list)  # steps this run was resumed at, if any

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> RunResult:
        """The inverse of `to_dict` (JSON turns the curves' tuples into lists; this turns them back)."""
        data = dict(data)
        for key in ("train_curve", "val_curve"):
            data[key] = [(int(step), _float(loss)) for step, loss in data[key]]
        for key in ("final_train_loss", "final_val_loss", "step_ms", "tokens_per_s", "wall_s"):
            data[key] = _float(data.get(key))
        return cls(**data)


def _float(value: float | str | None) -> float:
    """A float read back from JSON, which has no NaN: None stands for a non-finite value (a
    diverged run's losses, a step time that was not measured) and comes back as NaN."""
    return float("nan") if value is None else float(value)


def steps_to_reach(curve: Sequence[tuple[int, float]], target: float) -> int | None:
    """The first step of ``curve`` (``(step, loss)`` pairs, as `RunResult.val_curve`) whose loss
    is <= ``target``; ``None`` if none is. How the blockwise-LR speed-ups are read: the steps a
    run needs to reach a baseline's final validation loss."""
    return next((step for step, loss in curve if loss <= target), None)


def windows(ids: torch.Tensor, seq_len: int) -> torch.Tensor:
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


def _build(model_config: ModelSource, seed: int) -> nn.Module:
    if callable(model_config) and not isinstance(model_config, str):
        return model_config(seed)
    return build_model(model_config, seed=seed)


def count_params(model: nn.Module) -> int:
    """Trainable parameters (a tied weight counts once; ``model.parameters()`` yields it once)."""
    if hasattr(model, "num_params"):
        return model.num_params()
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_run(
    model_config: ModelSource,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    data: TokenSplit,
    loop: TrainConfig | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    fingerprint: Mapping | None = None,
    callback: Callable[[int, float], None] | None = None,
    **loop_fields,
) -> RunResult:
    """Train a fresh model as ``loop`` says and measure the optimizer.

    Deprecated: the loop given as keywords (``steps=``, ``batch_size=``, ``seq_len=``, ...), as
    before `TrainConfig` existed, still works, with that signature's defaults (10% warm-up,
    validation every 50 steps), and warns.

    Args:
        model_config: a model config, the name of a built-in one, a `ModelSpec`, or a function
            ``seed -> model`` whose model maps ``(idx, targets)`` to ``(logits, loss)``.
        make_optimizer: builds the optimizer for the model; its LR is the peak of the schedule.
        data: train and validation token ids (`blockopt.bench.corpus.split_ids`).
        loop: the steps, batch shape, LR schedule, clipping and evaluation (`TrainConfig`; its
            derived values are resolved against the model's maximum sequence length).
        seed: fixes the initial weights, the batch order and the global RNG (dropout, if the
            model has any); the optimizer changes none of them. The caller's global RNG state is
            left as it was.
        device: where the model and batches live; timings synchronize CUDA.
        progress: show a tqdm bar on a terminal (``desc`` labels it).
        checkpoint_dir: folder for ``checkpoint.pt``, written every ``checkpoint_every`` steps
            (default: ``loop.eval_every``) and after the last step.
        resume: continue from the checkpoint in ``checkpoint_dir`` if there is one (else start
            fresh); without it an existing checkpoint is overwritten.
        fingerprint: JSON-like settings stored in the checkpoint; resuming with different ones is
            a ValueError (the optimizer and data cannot be checked from the file alone).
        callback: called as ``callback(step, train_loss)`` after every step and its checkpoint.
    """
    loop = _legacy_loop(loop, loop_fields)
    if not isinstance(loop, TrainConfig):
        raise TypeError(f"loop must be a TrainConfig, got {type(loop).__name__}")
    check("checkpoint_every", checkpoint_every, integer(1, optional=True))
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs a checkpoint_dir")
    loop = loop.resolved(_max_seq_len(model_config))
    # JSON-normalized (tuples become lists), so a fingerprint compares equal to its saved copy.
    fingerprint = json.loads(json.dumps(dict(fingerprint or {})))
    device = torch.device(device)
    # The global RNG is forked, so the run neither depends on nor changes the caller's.
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        return _train(
            model_config, make_optimizer, data, loop, seed=seed, device=device, progress=progress, desc=desc,
            checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir),
            checkpoint_every=checkpoint_every or loop.eval_every, resume=resume, fingerprint=fingerprint,
            callback=callback,
        )


def _max_seq_len(model_config: ModelSource) -> int | None:
    """The model's maximum sequence length where the source tells it (not for a function)."""
    if isinstance(model_config, str):
        model_config = CONFIGS.get(model_config)
    return getattr(model_config, "max_seq_len", None)


def _group_floors(optimizer: torch.optim.Optimizer, min_lr_ratio: float) -> list[float]:
    """Each group's floor as a fraction of its own peak, so that all end at ``min_lr_ratio`` times
    the base: a group of LR ratio r decays to ``min_lr_ratio / r`` (at most 1: a group whose peak is
    already below the shared floor stays at its peak)."""
    floors = []
    for index, group in enumerate(optimizer.param_groups):
        ratio = group.get("lr_ratio", 1.0)
        check(f"param group {index}'s lr_ratio", ratio, real(0, low_open=True, hint="shared_floor divides by it"))
        floors.append(min(1.0, min_lr_ratio / ratio))
    return floors


def _train(
    model_config, make_optimizer, data, loop: TrainConfig, *, seed, device, progress, desc, checkpoint_dir,
    checkpoint_every, resume, fingerprint, callback,
) -> RunResult:
    start = time.perf_counter()
    steps, batch_size, seq_len, eval_every = loop.steps, loop.batch_size, loop.seq_len, loop.eval_every
    model = _build(model_config, seed).to(device)
    optimizer = make_optimizer(model)
    floors = (
        _group_floors(optimizer, loop.min_lr_ratio) if loop.shared_floor
        else [loop.min_lr_ratio] * len(optimizer.param_groups)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        [
            lambda step, floor=floor: lr_factor(
                step, steps=steps, warmup_steps=loop.warmup_steps, min_lr_ratio=floor,
                schedule=loop.schedule, decay_fraction=loop.decay_fraction,
            )
            for floor in floors
        ],
    )

    train_windows = windows(data.train, seq_len)
    val_windows = windows(data.val, seq_len)
    # Evenly spaced validation windows: the same for every evaluation and every run.
    val_starts = torch.linspace(0, len(val_windows) - 1, loop.eval_batches * batch_size).long()
    val_batches = [w.to(device) for w in val_windows[val_starts].split(batch_size)]
    # Batches come from their own generator, so the optimizer or model code cannot shift them.
    batch_generator = torch.Generator().manual_seed(seed)

    train_curve: list[tuple[int, float]] = []
    val_curve: list[tuple[int, float]] = []
    step_times: list[float] = []  # optimizer.step() alone
    loop_times: list[float] = []  # the whole training step: batch, forward, backward, optimizer step
    previous_wall = 0.0
    resumed_from: list[int] = []
    first_step = 1

    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            checkpoint = load_checkpoint(checkpoint_dir, fingerprint)
        else:
            (checkpoint_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    if checkpoint is not None:
        # Note [exact resume]: everything the next step reads is restored: weights, optimizer
        # state and param groups (the LR), the scheduler's position, the batch generator and the
        # global RNG. Steps never carry anything else over (grads are set to None after each).
        # The optimizer's state_dict is loaded after the scheduler's construction has set the
        # groups' LR, so the saved LR wins.
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        batch_generator.set_state(checkpoint["batch_rng"])
        torch.set_rng_state(checkpoint["torch_rng"])
        if device.type == "cuda" and checkpoint.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(checkpoint["cuda_rng"], device)
        train_curve = [(int(s), float(v)) for s, v in checkpoint["train_curve"]]
        val_curve = [(int(s), float(v)) for s, v in checkpoint["val_curve"]]
        step_times = list(checkpoint["step_times"])
        loop_times = list(checkpoint.get("loop_times", ()))
        previous_wall = float(checkpoint["wall_s"])
        resumed_from = [*checkpoint["resumed_from"], int(checkpoint["step"])]
        first_step = int(checkpoint["step"]) + 1

    def save(step: int) -> None:
        save_checkpoint(
            checkpoint_dir,
            {
                "fingerprint": fingerprint,
                "step": step,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "batch_rng": batch_generator.get_state(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "train_curve": train_curve,
                "val_curve": val_curve,
                "step_times": step_times,
                "loop_times": loop_times,
                "wall_s": previous_wall + time.perf_counter() - start,
                "resumed_from": resumed_from,
            },
        )

    timing_warmup = min(5, steps // 5)  # first steps (of each session) allocate state and warm caches
    # disable=None: tqdm also hides itself when stderr is not a terminal (logs, CI).
    bar = tqdm(
        range(first_step, steps + 1), desc=desc, initial=first_step - 1, total=steps,
        disable=None if progress else True, leave=False, dynamic_ncols=True,
    )
    for step in bar:
        loop_start = time.perf_counter()
        starts = torch.randint(len(train_windows), (batch_size,), generator=batch_generator)
        window = train_windows[starts].to(device)
        _, loss = model(window[:, :-1], window[:, 1:])
        loss.backward()
        if loop.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip)
        _sync(device)
        step_start = time.perf_counter()
        optimizer.step()
        _sync(device)
        timed = step - first_step >= timing_warmup
        if timed:
            step_times.append(time.perf_counter() - step_start)
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        train_curve.append((step, loss.item()))
        if timed:
            loop_times.append(time.perf_counter() - loop_start)

        if step % eval_every == 0 or step == steps:
            val_curve.append((step, evaluate(model, val_batches)))
            bar.set_postfix(train=f"{train_curve[-1][1]:.3f}", val=f"{val_curve[-1][1]:.3f}", refresh=False)
        if checkpoint_dir is not None and (step % checkpoint_every == 0 or step == steps):
            save(step)
        if callback is not None:
            callback(step, train_curve[-1][1])
    bar.close()

    last = [loss for _, loss in train_curve[-FINAL_TRAIN_WINDOW:]]
    # A run resumed after its last timed step has no timings of its own; keep the saved ones.
    return RunResult(
        optimizer=type(optimizer).__name__,
        train_curve=train_curve,
        val_curve=val_curve,
        final_train_loss=sum(last) / len(last),
        final_val_loss=val_curve[-1][1],
        step_ms=1e3 * statistics.median(step_times) if step_times else float("nan"),
        # Note [tokens/s at the median step]: the median, not the total, so that a few slow steps
        # (a page fault, another process) don't decide which optimizer looks faster; warm-up steps
        # are left out, as for step_ms.
        tokens_per_s=batch_size * seq_len / statistics.median(loop_times) if loop_times else float("nan"),
        state_bytes=blockopt.state_bytes(optimizer),
        n_params=count_params(model),
        wall_s=previous_wall + time.perf_counter() - start,
        resumed_from=resumed_from,
    )


def _legacy_loop(loop: TrainConfig | None, fields: dict) -> TrainConfig:
    """The loop of a call from before `TrainConfig` (keywords, that signature's defaults)."""
    if not fields:
        if loop is None:
            raise TypeError("train_run needs loop=TrainConfig(...)")
        return loop
    if loop is not None:
        raise TypeError(f"train_run got loop= and the loop keywords {sorted(fields)}: pass one of them")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise TypeError(f"train_run got unexpected keyword arguments {unknown}")
    warnings.warn("train_run(..., steps=..., ...) is deprecated: pass loop=TrainConfig(...)", DeprecationWarning, stacklevel=3)
    steps = fields.get("steps")
    old = {"warmup_steps": max(1, steps // 10) if isinstance(steps, int) and steps > 0 else None, "eval_every": 50}
    return TrainConfig(**{**old, **{k: v for k, v in fields.items() if v is not None or k not in old}})
