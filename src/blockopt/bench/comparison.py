"""What a comparison measured (`CompareResult`) and how it is reported: statistics over seeds,
each optimizer against the baseline, a table, one verdict line per optimizer, ``compare.json``
and the plots. `blockopt.bench.runner.compare` produces it; `CompareResult.load` reads it back.

    result = CompareResult.load("compare-out")
    print(result.table())
    result.to_dict()          # what compare.json holds
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .compare_config import CompareConfig
from .plots import plot_compare_curves, plot_memory_pareto, plot_state_memory, plot_throughput
from .results import json_ready
from .schedules import lr_factor
from .train import RunResult, steps_to_reach

SCHEMA = "blockopt.compare/1"
REPORT_FILE = "compare.json"
STEPS_FILE = "steps.csv"  # per run and step: STEP_COLUMNS
STEP_COLUMNS = ("label", "seed", "step", "train_loss", "val_loss", "lr")
TENSORBOARD_DIR = "tensorboard"  # event files, when tensorboard is installed
OUTPUT_FILES = (REPORT_FILE, STEPS_FILE, "loss_curves.png", "memory.png", "throughput.png")
# The criterion the default run measures: Adam-mini within this of AdamW's final val loss.
VAL_LOSS_TOLERANCE = 0.01


@dataclass
class RunRecord:
    """One (optimizer, seed) run. ``status``: ``"trained"`` here from scratch, ``"resumed"`` from
    a checkpoint, or ``"loaded"`` finished from an earlier invocation's ``result.json``."""

    label: str
    seed: int
    result: RunResult
    status: str = "trained"

    def to_dict(self) -> dict:
        result = self.result.to_dict()
        result["optimizer_class"] = result.pop("optimizer")
        return {"optimizer": self.label, "seed": self.seed, "status": self.status, **result}


def _stats(values: Sequence[float]) -> dict:
    """mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


@dataclass
class CompareResult:
    """Everything a comparison measured. `to_dict` is the content of ``compare.json``."""

    config: CompareConfig
    model: dict
    corpus: dict
    optimizers: dict[str, dict]  # label -> peer name, description, hyperparameters, packages
    runs: list[RunRecord]
    loop: dict = field(default_factory=dict)  # the training settings as run (derived values resolved)
    timings_s: dict[str, float] = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    command: list[str] | None = None

    @property
    def labels(self) -> list[str]:
        return list(self.optimizers)

    @property
    def baseline(self) -> str:
        return self.config.baseline_label

    def runs_of(self, label: str) -> list[RunResult]:
        """The runs of one optimizer, in seed order."""
        return [record.result for record in sorted(self.runs, key=lambda r: r.seed) if record.label == label]

    def summary(self) -> dict[str, dict]:
        """Per optimizer: statistics over seeds of the final losses, state bytes and speed."""
        out = {}
        for label in self.labels:
            results = self.runs_of(label)
            if not results:
                continue
            out[label] = {
                "seeds": [r.seed for r in sorted(self.runs, key=lambda r: r.seed) if r.label == label],
                **{
                    key: _stats([getattr(r, key) for r in results])
                    for key in ("final_val_loss", "final_train_loss", "state_bytes", "tokens_per_s", "step_ms", "wall_s")
                },
            }
        return out

    def comparison(self) -> dict[str, dict]:
        """Each optimizer against the baseline. ``val_loss_rel_diff``: mean final val loss over
        seeds relative to the baseline's (+0.01 = 1% worse); ``val_loss_rel_diff_per_seed``: the
        same per seed (same init and batches) with its spread; ratios of state bytes and speed.

        ``steps_to_baseline_loss``: per seed, the first evaluated step whose val loss is at most
        the baseline's final val loss of that seed (``None``: never), and
        ``steps_to_baseline_loss_fraction``: those steps over the run's steps, over the seeds that
        reach it (``None`` if none does). Read to ``eval_every`` steps."""
        summary = self.summary()
        base = summary.get(self.baseline)
        if base is None:
            return {}
        base_by_seed = {r.seed: r.result.final_val_loss for r in self.runs if r.label == self.baseline}
        out = {}
        for label, stats in summary.items():
            records = [r for r in sorted(self.runs, key=lambda r: r.seed)
                       if r.label == label and r.seed in base_by_seed]
            paired = [r.result.final_val_loss / base_by_seed[r.seed] - 1.0 for r in records]
            reached = [steps_to_reach(r.result.val_curve, base_by_seed[r.seed]) for r in records]
            fractions = [step / self.config.loop.steps for step in reached if step is not None]
            rel = stats["final_val_loss"]["mean"] / base["final_val_loss"]["mean"] - 1.0
            out[label] = {
                "val_loss_rel_diff": rel,
                "val_loss_rel_diff_per_seed": _stats(paired) if paired else None,
                "steps_to_baseline_loss": reached,
                "steps_to_baseline_loss_fraction": _stats(fractions) if fractions else None,
                "within_tolerance": rel <= VAL_LOSS_TOLERANCE,
                "state_bytes_ratio": _ratio(stats["state_bytes"]["mean"], base["state_bytes"]["mean"]),
                "tokens_per_s_ratio": _ratio(stats["tokens_per_s"]["mean"], base["tokens_per_s"]["mean"]),
                "step_ms_ratio": _ratio(stats["step_ms"]["mean"], base["step_ms"]["mean"]),
            }
        return out

    def to_dict(self) -> dict:
        return json_ready({
            "schema": SCHEMA,
            "command": self.command,
            "settings": self.config.to_dict(),
            "loop": self.loop,
            "model": self.model,
            "corpus": self.corpus,
            "optimizers": self.optimizers,
            "baseline": self.baseline,
            "val_loss_tolerance": VAL_LOSS_TOLERANCE,
            "summary": self.summary(),
            "comparison": self.comparison(),
            "runs": [record.to_dict() for record in sorted(self.runs, key=lambda r: (r.seed, self.labels.index(r.label)))],
            "timings_s": self.timings_s,
            **self.environment,
        })

    def table(self) -> str:
        """One row per optimizer, to fit 100 columns: final val loss (mean ± std over seeds; the
        plain value for one seed), the difference to the baseline, state memory and speed. The
        rest (train loss, per-seed values, steps to the baseline's loss) is in the JSON and the
        verdicts."""
        summary, comparison = self.summary(), self.comparison()
        base = self.baseline
        header = ("optimizer", "final val loss", f"vs {base}", "state MiB", "step ms", "tokens/s")
        rows = [header]
        for label, stats in summary.items():
            cmp = comparison.get(label, {})
            paired = cmp.get("val_loss_rel_diff_per_seed")
            vs = "-" if label == base else f"{100 * cmp['val_loss_rel_diff']:+.2f}%"
            if label != base and paired and paired["n"] > 1:
                vs += f" (±{100 * paired['std']:.2f})"
            rows.append((
                label,
                _spread(stats["final_val_loss"]),
                vs,
                f"{stats['state_bytes']['mean'] / 2**20:.2f}",
                f"{stats['step_ms']['mean']:.2f}",
                f"{stats['tokens_per_s']['mean']:,.0f}",
            ))
        return format_table(rows)

    def verdicts(self) -> list[str]:
        """One line per optimizer on the val-loss criterion (mean over seeds within 1% of the baseline)."""
        lines = []
        for label, cmp in self.comparison().items():
            if label == self.baseline:
                continue
            paired = cmp["val_loss_rel_diff_per_seed"]
            seeds = [record.seed for record in self.runs if record.label == label]
            if len(seeds) == 1:
                over = f"seed {seeds[0]}"
            else:
                spread = f", per seed {100 * paired['mean']:+.2f}% ± {100 * paired['std']:.2f}%" if paired else ""
                over = f"mean over {len(seeds)} seeds{spread}"
            verdict = "within" if cmp["within_tolerance"] else "NOT within"
            per_seed = " / ".join("never" if s is None else str(s) for s in cmp["steps_to_baseline_loss"])
            speed = (
                f"never reaches {self.baseline}'s final val loss" if cmp["steps_to_baseline_loss_fraction"] is None
                else f"reaches {self.baseline}'s final val loss in {_steps_fraction(cmp)} of the steps "
                f"({'' if len(seeds) == 1 else 'per seed: '}{per_seed} of {self.config.loop.steps})"
            )
            lines.append(
                f"{label}: final val loss {100 * cmp['val_loss_rel_diff']:+.2f}% vs {self.baseline} "
                f"({over}): {verdict} +{100 * VAL_LOSS_TOLERANCE:g}%; "
                f"{speed}; state memory {cmp['state_bytes_ratio']:.2f}x"
            )
        return lines

    def step_rows(self) -> list[dict]:
        """Per run and step: ``label, seed, step, train_loss, val_loss`` (``None`` where not
        measured) and ``lr``, the schedule's LR at that step (the peak times the schedule's
        factor, as the loop's `LambdaLR` sets it; ``None`` for an optimizer without ``lr``)."""
        loop = self.config.loop.resolved(self.loop.get("seq_len"))
        rows = []
        for record in sorted(self.runs, key=lambda r: (r.seed, self.labels.index(r.label))):
            peak = self.optimizers.get(record.label, {}).get("hyperparameters", {}).get("lr")
            val = dict(record.result.val_curve)
            for step, train_loss in record.result.train_curve:
                lr = None if peak is None else peak * lr_factor(
                    step - 1, steps=loop.steps, warmup_steps=loop.warmup_steps, min_lr_ratio=loop.min_lr_ratio,
                    schedule=loop.schedule, decay_fraction=loop.decay_fraction,
                )
                rows.append({"label": record.label, "seed": record.seed, "step": step, "train_loss": train_loss,
                             "val_loss": val.get(step), "lr": lr})
        return rows

    @classmethod
    def from_dict(cls, data: dict) -> CompareResult:
        """The inverse of `to_dict` (e.g. to re-plot or re-tabulate a saved ``compare.json``)."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document (schema: {data.get('schema')!r})")
        runs = []
        for run in data["runs"]:
            run = dict(run)
            label, seed, status = run.pop("optimizer"), run.pop("seed"), run.pop("status")
            run["optimizer"] = run.pop("optimizer_class")
            runs.append(RunRecord(label, seed, RunResult.from_dict(run), status))
        return cls(
            config=CompareConfig().replace(**data["settings"]), model=data["model"], corpus=data["corpus"],
            optimizers=data["optimizers"], runs=runs, loop=data.get("loop", {}), timings_s=data.get("timings_s", {}),
            environment={"versions": data.get("versions", {}), "machine": data.get("machine", {})},
            command=data.get("command"),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> CompareResult:
        """Read a ``compare.json`` (or the folder holding it)."""
        path = Path(path)
        return cls.from_dict(json.loads((path / REPORT_FILE if path.is_dir() else path).read_text()))

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write compare.json, steps.csv, loss_curves.png, memory.png, throughput.png and pareto.png into
        ``out_dir``, and TensorBoard event files under ``tensorboard/`` when it is installed."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = self.to_dict()
        (out / REPORT_FILE).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        summary = self.summary()
        n_params = self.model.get("n_params")
        title = f"{self.model['source']} ({n_params:,} params), {self.config.loop.steps} steps" if n_params else ""
        paths = [out / REPORT_FILE]
        rows = self.step_rows()
        paths.append(write_steps_csv(rows, out / STEPS_FILE))
        if importlib.util.find_spec("tensorboard") is not None:
            paths.append(write_tensorboard(rows, out / TENSORBOARD_DIR))
        paths.append(plot_compare_curves({label: self.runs_of(label) for label in summary}, out / "loss_curves.png", title=title))
        paths.append(plot_state_memory(
            {label: stats["state_bytes"]["mean"] for label, stats in summary.items()}, out / "memory.png",
            baseline=self.baseline, param_bytes=4 * n_params if n_params else None,
            title=f"optimizer state ({title})" if title else "",
        ))
        paths.append(plot_throughput(
            {label: stats["tokens_per_s"]["values"] for label, stats in summary.items()},
            {label: stats["step_ms"]["values"] for label, stats in summary.items()},
            out / "throughput.png",
        ))
        paths.append(plot_memory_pareto(
            {label: stats["state_bytes"]["mean"] for label, stats in summary.items()},
            {label: stats["final_val_loss"]["values"] for label, stats in summary.items()},
            out / "pareto.png", title=f"memory against quality ({title})" if title else "",
        ))
        return paths


def format_table(rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> str:
    """``rows`` (the header first) as aligned text columns: numbers right-aligned, the ``left``
    columns left-aligned, a rule under the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        " | ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def write_steps_csv(rows: Sequence[dict], path: Path) -> Path:
    """The per-step metrics (`CompareResult.step_rows`) as CSV; an unmeasured value is empty."""
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=STEP_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: "" if row[key] is None else row[key] for key in STEP_COLUMNS} for row in rows)
    return path


def write_tensorboard(rows: Sequence[dict], folder: Path) -> Path:
    """The per-step metrics as TensorBoard event files, one run folder per optimizer and seed
    (``tensorboard --logdir compare-out/tensorboard``). Needs the ``tensorboard`` package."""
    from torch.utils.tensorboard import SummaryWriter

    writers: dict[tuple[str, int], SummaryWriter] = {}
    try:
        for row in rows:
            key = (row["label"], row["seed"])
            if key not in writers:
                writers[key] = SummaryWriter(str(folder / f"{row['label']}-seed{row['seed']}"))
            for name in ("train_loss", "val_loss", "lr"):
                if row[name] is not None:
                    writers[key].add_scalar(name, row[name], row["step"])
    finally:
        for writer in writers.values():
            writer.close()
    return folder


def _spread(stats: dict) -> str:
    """``mean ± std`` over seeds, or the plain value of one seed."""
    return f"{stats['mean']:.4f}" if stats["n"] == 1 else f"{stats['mean']:.4f} ± {stats['std']:.4f}"


def _steps_fraction(cmp: dict) -> str:
    """``0.40x`` (mean over seeds), ``0.45x (2/3 seeds)`` when some never reach it, or ``never``."""
    fraction, reached = cmp.get("steps_to_baseline_loss_fraction"), cmp.get("steps_to_baseline_loss", [])
    if fraction is None:
        return "never"
    text = f"{fraction['mean']:.2f}x"
    return text if fraction["n"] == len(reached) else f"{text} ({fraction['n']}/{len(reached)} seeds)"


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")
