"""Sharpness-by-block-type reports: read them, compare them with the paper's chain, draw them.

A report is the ``result.json`` that `blockopt.bench.analysis.sharpness_run.run` writes (a
``blockopt.result/1`` document): ``settings["model"]`` is the measured model's `config_dict`, and
``results["checkpoints"]`` maps a step to ``{"types": {block type: entry}}``, where an entry holds
the `blockopt.hessian.block_sharpness` values of that type (``gauss_newton_per_param``,
``trace_per_param``, ``lambda_max``) and, in reports from the paper-proportion runs on, each
tensor's Gauss-Newton value (``tensor_gauss_newton``: ``{name: [value, stderr]}``).

Wang et al. (2025) order the block types ``Emb << QK < FFN < VO << Norm`` (`PAPER_ORDER`);
`summarize` prints how far a report's order is from it, over all layers and without the first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .. import GPT2Config, LlamaConfig, build_model

PAPER_ORDER = ("embedding", "qk", "ffn", "vo", "norm")  # flattest to sharpest
MEASURES = ("gauss_newton", "trace", "lambda_max")
LABELS = {"embedding": "Emb", "qk": "QK", "ffn": "FFN", "vo": "VO", "norm": "Norm", "head": "Head",
          "pos_embedding": "Pos"}
# measure -> (the entry's key, the axis label of its panel)
PANELS = {
    "gauss_newton": ("gauss_newton_per_param", "Tr(G_bb) / m_b (Gauss-Newton average sharpness)"),
    "trace": ("trace_per_param", "Tr(H_bb) / m_b (exact Hessian)"),
    "lambda_max": ("lambda_max", "λ_max(H_bb)"),
}
FIRST_LAYER = "layers.0."


def describe(model: Mapping) -> str:
    """'demo Llama' or 'demo-size GPT-2', from a `config_dict`."""
    return "demo Llama" if model["arch"] == "llama" else "demo-size GPT-2"


def attention_heads(model: Mapping) -> str:
    """How the attention's key/value heads are shared, from a `config_dict`."""
    return f"{model['n_kv_heads']} kv heads" if "n_kv_heads" in model else f"{model['n_heads']} heads"


def plot_title(model: Mapping, n_params: int, batch: int) -> str:
    """A report figure's title, from the model's `config_dict`."""
    return (f"{describe(model)} ({n_params:,} params, {model['n_layers']} layers, width {model['dim']}, "
            f"vocabulary {model['vocab_size']},\n"
            f"{attention_heads(model)}, init std {model['init_std']:g}): "
            f"sharpness by block type, batch {batch}x128")


def pairwise(values: Mapping[str, float]) -> dict[str, bool]:
    """For each adjacent pair of the paper's chain, whether it holds here."""
    pairs = zip(PAPER_ORDER, PAPER_ORDER[1:])
    return {f"{a} < {b}": values[a] < values[b] for a, b in pairs if a in values and b in values}


def gauss_newton_at(report: Mapping, checkpoint: int | None = None) -> tuple[int, dict[str, float]]:
    """A checkpoint of a report (default: the last) and its Gauss-Newton sharpness per parameter,
    ``{block type: Tr(G)/m}``: what `blockopt.sharpness_ratios` turns into learning-rate ratios."""
    checkpoints = report["results"]["checkpoints"]
    key = max(checkpoints, key=int) if checkpoint is None else str(checkpoint)
    return int(key), {t: entry["gauss_newton_per_param"] for t, entry in checkpoints[key]["types"].items()}


def tensor_sizes(model: Mapping) -> dict[str, int]:
    """Each parameter's element count for a report's `config_dict`, from a model built on the meta device."""
    fields = {k: v for k, v in model.items() if k not in ("name", "n_params", "arch")}
    config = (GPT2Config if model["arch"] == "gpt2" else LlamaConfig)(**fields)
    with torch.device("meta"):
        return {name: p.numel() for name, p in build_model(config).named_parameters()}


def gauss_newton_without(types: Mapping, sizes: Mapping[str, int], prefix: str) -> dict[str, float]:
    """Each type's Gauss-Newton value per parameter, leaving out the tensors whose names start with
    ``prefix``: the size-weighted mean of its other tensors' values (the report's per-type value is
    that mean over all of them)."""
    values = {}
    for block_type, entry in types.items():
        per_tensor = entry.get("tensor_gauss_newton") or {}  # absent from reports older than the field
        kept = {n: v for n, (v, _) in per_tensor.items() if not n.startswith(prefix)}
        if kept:
            values[block_type] = sum(sizes[n] * v for n, v in kept.items()) / sum(sizes[n] for n in kept)
    return values


def _pair_ratios(values: Mapping[str, float]) -> str:
    """``QK/Emb / FFN/QK / VO/FFN / Norm/VO``: above 1 where the paper's link holds."""
    return " / ".join(f"{values[b] / values[a]:.2f}" if a in values and b in values else "-"
                      for a, b in zip(PAPER_ORDER, PAPER_ORDER[1:]))


def summarize(report: Mapping, without: str = FIRST_LAYER) -> str:
    """A markdown table of a report's Gauss-Newton orderings and the ratios of the paper's adjacent
    pairs, over all layers and without the tensors named ``without*`` (by default the first layer)."""
    results = report["results"]
    sizes = tensor_sizes(report["settings"]["model"])
    pairs = ", ".join(f"{LABELS[b]}/{LABELS[a]}" for a, b in zip(PAPER_ORDER, PAPER_ORDER[1:]))
    rows = [f"| after steps | flattest → sharpest | {pairs} | the same without `{without}*` |", "|---|---|---|---|"]
    for step, entry in results["checkpoints"].items():
        values = {t: e["gauss_newton_per_param"] for t, e in entry["types"].items()}
        order = " < ".join(LABELS.get(t, t) for t in sorted(values, key=values.__getitem__))
        rows.append(f"| {step} | {order} | {_pair_ratios(values)} | "
                    f"{_pair_ratios(gauss_newton_without(entry['types'], sizes, without))} |")
    if results.get("complete") is False:
        rows.append(f"\nStopped early: measured through step {max(map(int, results['checkpoints']))} "
                    f"of the {report['settings']['training']['steps']}-step schedule.")
    return "\n".join(rows)


def plot(checkpoints: Mapping[int, Mapping], path: str | Path, title: str, measures: Sequence[str] = MEASURES) -> None:
    """One panel per measure: each type's value at each checkpoint, on a log axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    measures = [m for m in MEASURES if m in measures]
    fig = Figure(figsize=(17 * len(measures) / len(MEASURES) + 1, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    steps = sorted(checkpoints)
    types = list(PAPER_ORDER) + [t for t in checkpoints[steps[-1]]["types"] if t not in PAPER_ORDER]
    width = 0.8 / len(steps)
    for ax, measure in zip(axes, measures):
        key, label = PANELS[measure]
        for j, step in enumerate(steps):
            entries = checkpoints[step]["types"]
            xs, ys, bad = [], [], []
            for i, t in enumerate(types):
                value = entries[t][key] if t in entries else None
                x = i + (j - (len(steps) - 1) / 2) * width
                if value is not None and value > 0:
                    xs.append(x)
                    ys.append(value)
                elif value is not None:
                    bad.append(x)
            ax.bar(xs, ys, width=width, color=f"C{j}", label=f"after {step} steps")
            for x in bad:  # a non-positive estimate has no place on a log axis: mark it
                ax.annotate("≤0", (x, 0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7)
        ax.set_yscale("log")
        ax.set_xticks(range(len(types)), [LABELS.get(t, t) for t in types])
        ax.set(title=label, ylabel=measure)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
