"""`blockopt.bench.plots`: labels that stay readable when optimizer specs are long."""

import re

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from blockopt.bench.plots import (SHORT_LABEL, _label_ticks, _wrap, pareto_front, plot_compare_curves, plot_memory_pareto,
                                  plot_state_memory)
from blockopt.bench.train import RunResult

LONG = "adam-mini-blockwise-lr:ratios={'embedding':10,'head':4,'qk':2,'ffn':1.5,'vo':1,'norm':1}"


def _ticks(labels, **kwargs):
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    _label_ticks(ax, labels, **kwargs)
    return [tick.get_text() for tick in ax.get_xticklabels()]


def test_wrap_breaks_after_separators_and_loses_nothing():
    wrapped = _wrap(LONG, 22)
    lines = wrapped.split("\n")
    assert len(lines) > 1 and "".join(lines) == LONG
    assert all(line.endswith((",", ":")) for line in lines[:-1])  # broken only after a separator
    # a line is over the width only when it is one piece with no separator to break at
    assert all(len(line) <= 22 or not re.search(r"[,:].", line) for line in lines)
    assert max(len(line) for line in lines) <= len("adam-mini-blockwise-lr:")
    assert _wrap("adamw", 22) == "adamw"


def test_ticks_keep_short_labels_and_wrap_or_number_long_ones():
    assert _ticks(["adamw", "adam-mini"]) == ["adamw", "adam-mini"]
    assert _ticks(["adamw", LONG], numbered=True) == ["1", "2"]
    assert _ticks(["adamw", LONG]) == ["adamw", _wrap(LONG, 22)]
    assert len(LONG) > SHORT_LABEL >= len("adam-mini")


def _run(loss):
    curve = [(step, loss + 1.0 / step) for step in range(1, 11)]
    return RunResult(optimizer="x", train_curve=curve, val_curve=curve[4::5], final_train_loss=loss,
                     final_val_loss=curve[-1][1], step_ms=1.0, tokens_per_s=1.0, state_bytes=8, n_params=1, wall_s=1.0)


def test_plots_with_long_labels_are_written(tmp_path):
    runs = {"adamw": [_run(4.0), _run(4.1)], LONG: [_run(3.5), _run(3.6)]}
    for path in (plot_compare_curves(runs, tmp_path / "curves.png"),
                 plot_state_memory({"adamw": 8.0, LONG: 4.0}, tmp_path / "memory.png", baseline="adamw")):
        assert path.read_bytes().startswith(b"\x89PNG")


def test_pareto_front_keeps_what_nothing_beats_on_both_axes(tmp_path):
    points = [(8.0, 4.0), (4.0, 4.1), (4.5, 4.05), (2.0, 4.3), (3.0, 4.4), (4.0, 4.2), (8.0, 4.0)]
    # (3.0, 4.4) is beaten by (2.0, 4.3); (4.0, 4.2) by (4.0, 4.1); a repeated point stays once
    assert pareto_front(points) == [(2.0, 4.3), (4.0, 4.1), (4.5, 4.05), (8.0, 4.0)]
    path = plot_memory_pareto({"adamw": 8e6, "adam-mini": 4e6, LONG: 1e6},
                              {"adamw": [4.0, 4.1], "adam-mini": [4.05], LONG: [4.3, 4.2]}, tmp_path / "pareto.png")
    assert path.read_bytes().startswith(b"\x89PNG")


def test_the_pareto_legend_wraps_long_specs_and_the_title_fits(tmp_path, monkeypatch):
    """A spec with a ratio table is wrapped in the legend; the title is the figure's, which the
    layout keeps inside the image (an axes title beside a wide legend was cut off)."""
    from matplotlib.figure import Figure

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    plot_memory_pareto({"adamw": 8e6, LONG: 1e6}, {"adamw": [4.0], LONG: [4.3]}, tmp_path / "pareto.png", title="T" * 60)
    fig = saved[0]
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert max(len(line) for text in texts for line in text.split("\n")) <= 48 and any("\n" in t for t in texts)
    fig.canvas.draw()
    box = fig._suptitle.get_window_extent()
    assert fig._suptitle.get_text() == "T" * 60 and box.x0 >= 0 and box.x1 <= fig.bbox.width
