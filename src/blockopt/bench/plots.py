"""Figures for benchmark results (matplotlib's object API with the Agg canvas: no GUI, no global state)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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


# A label longer than this (an optimizer spec with overrides, e.g. a blockwise-LR ratio table) is
# wrapped, and numbered where the panel is too narrow for it.
SHORT_LABEL = 16


def _wrap(label: str, width: int) -> str:
    """``label`` on several lines of at most ``width`` characters where it can be, broken after a
    ``,`` or ``:`` (the separators of an optimizer spec)."""
    lines, line = [], ""
    for piece in re.split(r"(?<=[,:])", label):
        if line and len(line) + len(piece) > width:
            lines.append(line)
            line = ""
        line += piece
    return "\n".join([*lines, line])


def _label_ticks(ax, labels: Sequence[str], *, numbered: bool = False, slant_above: int = 3) -> None:
    """One x tick per label: as they are when short (slanted when more than ``slant_above``),
    else wrapped flat in a small font, or their 1-based numbers with ``numbered`` (the legend
    then names them)."""
    if all(len(label) <= SHORT_LABEL for label in labels):
        many = len(labels) > slant_above
        ax.set_xticks(range(len(labels)), labels, rotation=20 if many else 0, ha="right" if many else "center")
    elif numbered:
        ax.set_xticks(range(len(labels)), [str(i + 1) for i in range(len(labels))])
    else:
        ax.set_xticks(range(len(labels)), [_wrap(label, 22) for label in labels], fontsize=7)


def _mean_band(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float], list[float]]:
    """Pointwise mean, min and max of equally long curves (one per seed)."""
    columns = list(zip(*curves))
    return [sum(c) / len(c) for c in columns], [min(c) for c in columns], [max(c) for c in columns]


def plot_compare_curves(runs: Mapping[str, Sequence[RunResult]], path: str | Path, *, title: str = "") -> Path:
    """Train (smoothed) and validation loss per optimizer over seeds: the mean as a line, the
    min-max range over seeds as a band. Runs of one optimizer must share their steps."""
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    train_ax, val_ax, final_ax = fig.subplots(1, 3, width_ratios=(1, 1, 0.6))
    val_ax.sharey(train_ax)
    n_seeds = set()
    numbered = any(len(label) > SHORT_LABEL for label in runs)  # the final panel is narrow
    for index, (label, results) in enumerate(runs.items()):
        color = f"C{index}"
        label = f"{index + 1}: {_wrap(label, 48)}" if numbered else label
        n_seeds.add(len(results))
        steps = [step for step, _ in results[0].train_curve]
        window = max(1, len(steps) // 20)
        smoothed = [_smooth([loss for _, loss in r.train_curve], window) for r in results]
        mean, low, high = _mean_band(smoothed)
        train_ax.plot(steps, mean, color=color, label=f"{label} (n={len(results)})", linewidth=1.2)
        train_ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
        val_steps = [step for step, _ in results[0].val_curve]
        mean, low, high = _mean_band([[loss for _, loss in r.val_curve] for r in results])
        val_ax.plot(val_steps, mean, color=color, label=label, marker="o", markersize=3)
        val_ax.fill_between(val_steps, low, high, color=color, alpha=0.2, linewidth=0)
        # The end of the run, where optimizers differ by ~1%, is invisible at the curves' scale.
        finals = [r.final_val_loss for r in results]
        final_ax.scatter([index] * len(finals), finals, color=color, s=18, zorder=3)
        final_ax.hlines(sum(finals) / len(finals), index - 0.3, index + 0.3, color=color, linewidth=2)
    band = "min-max over seeds" if max(n_seeds, default=1) > 1 else "one seed"
    train_ax.set(title=f"train loss (moving average; band: {band})", xlabel="step", ylabel="cross-entropy (nats/token)")
    val_ax.set(title=f"validation loss (band: {band})", xlabel="step")
    for ax in (train_ax, val_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7 if numbered else None)
    _label_ticks(final_ax, list(runs), numbered=numbered, slant_above=2)
    final_ax.set(title="final validation loss\n(dots: seeds; bar: mean)", xlim=(-0.6, len(runs) - 0.4))
    final_ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def _bar_labels(ax, bars, texts: Sequence[str], *, inside: bool = False) -> None:
    """Value labels above each bar, or inside near its base (where error bars would cross them)."""
    for bar, text in zip(bars, texts):
        x = bar.get_x() + bar.get_width() / 2
        if inside:
            ax.annotate(text, (x, 0), ha="center", va="bottom", xytext=(0, 4), textcoords="offset points",
                        fontsize=8, bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
        else:
            ax.annotate(text, (x, bar.get_height()), ha="center", va="bottom", xytext=(0, 2),
                        textcoords="offset points", fontsize=8)


def plot_state_memory(
    state_bytes: Mapping[str, float], path: str | Path, *, baseline: str | None = None,
    param_bytes: float | None = None, title: str = "",
) -> Path:
    """Optimizer state per optimizer (MiB bars, with the ratio to ``baseline``); a dashed line
    marks the parameters' own size for scale."""
    fig = Figure(figsize=(max(5.0, 1.3 * len(state_bytes) + 2), 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = list(state_bytes)
    mib = [state_bytes[label] / 2**20 for label in labels]
    bars = ax.bar(range(len(labels)), mib, color=[f"C{i}" for i in range(len(labels))])
    base = state_bytes.get(baseline) if baseline else None
    texts = [f"{m:.2f} MiB" + (f"\n{state_bytes[label] / base:.2f}x" if base else "") for label, m in zip(labels, mib)]
    _bar_labels(ax, bars, texts)
    if param_bytes:
        ax.axhline(param_bytes / 2**20, color="gray", linestyle="--", linewidth=1, label="the parameters themselves")
        ax.legend(loc="best")
    _label_ticks(ax, labels)
    ax.set(ylabel="optimizer state (MiB)", title=title or "optimizer state memory")
    ax.margins(y=0.2)
    ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_throughput(
    tokens_per_s: Mapping[str, Sequence[float]], step_ms: Mapping[str, Sequence[float]], path: str | Path, *, title: str = ""
) -> Path:
    """Training tokens/s and optimizer-step time per optimizer: bars at the mean over seeds,
    error bars spanning min to max."""
    fig = Figure(figsize=(max(8.0, 2.2 * len(tokens_per_s) + 3), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    labels = list(tokens_per_s)
    for ax, values, ylabel, fmt in (
        (axes[0], tokens_per_s, "training tokens/s (forward + backward + step)", "{:,.0f}"),
        (axes[1], step_ms, "optimizer.step() time (ms, median per run)", "{:.2f}"),
    ):
        means = [sum(values[label]) / len(values[label]) for label in labels]
        low = [m - min(values[label]) for m, label in zip(means, labels)]
        high = [max(values[label]) - m for m, label in zip(means, labels)]
        bars = ax.bar(range(len(labels)), means, yerr=[low, high], capsize=4,
                      color=[f"C{i}" for i in range(len(labels))])
        _bar_labels(ax, bars, [fmt.format(m) for m in means], inside=True)
        _label_ticks(ax, labels)
        ax.set(ylabel=ylabel)
        ax.margins(y=0.2)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "speed (bars: mean over seeds; whiskers: min-max)")
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_memory_pareto(
    state_bytes: Mapping[str, float], val_losses: Mapping[str, Sequence[float]], path: str | Path, *, title: str = ""
) -> Path:
    """Memory against quality: one point per optimizer at its optimizer-state bytes (x, log scale)
    and mean final validation loss (y), whiskers spanning the seeds' min to max. The staircase
    joins the optimizers no other beats on both axes (the Pareto front: lower-left is better)."""
    fig = Figure(figsize=(9.5, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    labels = list(state_bytes)
    points = []
    for i, label in enumerate(labels):
        losses = val_losses[label]
        x, y = state_bytes[label] / 2**20, sum(losses) / len(losses)
        # past ten optimizers the colours repeat, so the marker changes with each round of them
        ax.errorbar([x], [y], yerr=[[y - min(losses)], [max(losses) - y]], fmt="osD^v"[i // 10 % 5], capsize=3,
                    color=f"C{i % 10}", label=_wrap(label, 48))
        points.append((x, y))
    front = pareto_front(points)
    if len(front) > 1:
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="gray", linestyle=":", linewidth=1,
                label="Pareto front")
    ax.set_xscale("log")
    ax.set(xlabel="optimizer state (MiB, log scale)", ylabel="final validation loss")
    # (the figure's title, not the axes': the layout then keeps it whole beside a wide legend)
    fig.suptitle(title or "memory against quality (lower left is better)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # (beside the points, never on them)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point is at or below on both coordinates (lower is better on both),
    sorted by the first coordinate."""
    return sorted({p for p in points if not any(q != p and q[0] <= p[0] and q[1] <= p[1] for q in points)})
