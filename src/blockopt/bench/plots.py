"""Figures for benchmark results (matplotlib's object API with the Agg canvas: no GUI, no global state)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .train import RunResult


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (per-step train loss is too noisy to compare by eye)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(results: Mapping[str, RunResult], path: str | Path, *, title: str = "") -> Path:
    """Train (smoothed) and validation loss against step, one line per run; saved as an image."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    train_ax, val_ax = fig.subplots(1, 2, sharey=True)
    for index, (label, result) in enumerate(results.items()):
        color = f"C{index}"  # one color per run in both panels
        steps, losses = zip(*result.train_curve)
        window = max(1, len(losses) // 20)
        train_ax.plot(steps, _smooth(list(losses), window), color=color, label=label, linewidth=1.2)
        val_steps, val_losses = zip(*result.val_curve)
        val_ax.plot(val_steps, val_losses, color=color, label=label, marker="o", markersize=3)
    train_ax.set(title="train loss (moving average)", xlabel="step", ylabel="cross-entropy (nats/token)")
    val_ax.set(title="validation loss", xlabel="step")
    for ax in (train_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
