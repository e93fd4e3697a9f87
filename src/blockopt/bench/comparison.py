"""`blockopt compare`: train one model with several optimizers and seeds on the same data order.

    from blockopt.bench import compare
    result = compare(["adamw", "adam-mini", "lion:lr=3e-4"], seeds=(0, 1, 2), out_dir="compare-out")
    print(result.table())
    result.to_dict()          # what compare.json holds

Each seed fixes the initial weights and the batch order; every optimizer of a seed sees exactly
those, so runs of one seed differ only by the optimizer. Runs are interleaved (seed 0 of every
optimizer, then seed 1, ...) so that a machine slowing down mid-way slows every optimizer alike.
With ``out_dir`` every run checkpoints itself under ``out_dir/runs/``; ``resume=True`` skips the
finished runs and continues the interrupted one, to the same numbers bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import blockopt

from .compare_config import CompareConfig, config_from
from .corpus import TokenSplit, load_corpus, split_ids
from .modelspec import ModelSpec, as_model_spec
from .peers import OptimizerSpec
from .plots import plot_compare_curves, plot_state_memory, plot_throughput
from .tokenizer import tokenize_corpus
from .train import RunResult, count_params, load_checkpoint, steps_to_reach, train_run

SCHEMA = "blockopt.compare/1"
RESULT_FILE = "result.json"
OUTPUT_FILES = ("compare.json", "loss_curves.png", "memory.png", "throughput.png")
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
            fractions = [step / self.config.steps for step in reached if step is not None]
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
        return _json_ready({
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
        """One row per optimizer: final losses (mean ± std over seeds, the per-seed values),
        the difference to the baseline, state memory and speed."""
        summary, comparison = self.summary(), self.comparison()
        base = self.baseline
        header = (
            "optimizer", "seeds", "final val loss", f"vs {base}", "val loss per seed", f"steps to {base}'s",
            "final train loss", "state MiB", f"state vs {base}", "step ms", "tokens/s",
        )
        rows = [header]
        for label, stats in summary.items():
            val, train = stats["final_val_loss"], stats["final_train_loss"]
            cmp = comparison.get(label, {})
            paired = cmp.get("val_loss_rel_diff_per_seed")
            vs = "-" if label == base else f"{100 * cmp['val_loss_rel_diff']:+.2f}%"
            if label != base and paired and paired["n"] > 1:
                vs += f" (±{100 * paired['std']:.2f})"
            rows.append((
                label,
                str(val["n"]),
                f"{val['mean']:.4f} ± {val['std']:.4f}",
                vs,
                " / ".join(f"{v:.3f}" for v in val["values"]),
                _steps_fraction(cmp),
                f"{train['mean']:.4f} ± {train['std']:.4f}",
                f"{stats['state_bytes']['mean'] / 2**20:.2f}",
                f"{cmp.get('state_bytes_ratio', float('nan')):.2f}x",
                f"{stats['step_ms']['mean']:.2f}",
                f"{stats['tokens_per_s']['mean']:,.0f}",
            ))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            " | ".join(cell.ljust(w) if i in (0, 4) else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
            for row in rows
        ]
        lines.insert(1, "-+-".join("-" * w for w in widths))
        return "\n".join(lines)

    def verdicts(self) -> list[str]:
        """One line per optimizer on the val-loss criterion (mean over seeds within 1% of the baseline)."""
        lines = []
        for label, cmp in self.comparison().items():
            if label == self.baseline:
                continue
            paired = cmp["val_loss_rel_diff_per_seed"]
            spread = f", per seed {100 * paired['mean']:+.2f}% ± {100 * paired['std']:.2f}%" if paired else ""
            verdict = "within" if cmp["within_tolerance"] else "NOT within"
            per_seed = " / ".join("never" if s is None else str(s) for s in cmp["steps_to_baseline_loss"])
            speed = (
                f"never reaches {self.baseline}'s final val loss" if cmp["steps_to_baseline_loss_fraction"] is None
                else f"reaches {self.baseline}'s final val loss in {_steps_fraction(cmp)} of the steps "
                f"(per seed: {per_seed} of {self.config.steps})"
            )
            lines.append(
                f"{label}: final val loss {100 * cmp['val_loss_rel_diff']:+.2f}% vs {self.baseline} "
                f"(mean over {len(self.runs_of(label))} seeds{spread}): {verdict} +{100 * VAL_LOSS_TOLERANCE:g}%; "
                f"{speed}; state memory {cmp['state_bytes_ratio']:.2f}x"
            )
        return lines

    @classmethod
    def from_dict(cls, data: dict) -> CompareResult:
        """The inverse of `to_dict` (e.g. to re-plot or re-tabulate a saved ``compare.json``)."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} document (schema: {data.get('schema')!r})")
        settings = dict(data["settings"])
        settings["betas"] = tuple(settings["betas"])
        settings["seeds"] = tuple(settings["seeds"])
        settings["optimizers"] = tuple(settings["optimizers"])
        runs = []
        for run in data["runs"]:
            run = dict(run)
            label, seed, status = run.pop("optimizer"), run.pop("seed"), run.pop("status")
            run["optimizer"] = run.pop("optimizer_class")
            runs.append(RunRecord(label, seed, RunResult.from_dict(run), status))
        return cls(
            config=CompareConfig(**settings), model=data["model"], corpus=data["corpus"],
            optimizers=data["optimizers"], runs=runs, loop=data.get("loop", {}), timings_s=data.get("timings_s", {}),
            environment={"versions": data.get("versions", {}), "machine": data.get("machine", {})},
            command=data.get("command"),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> CompareResult:
        """Read a ``compare.json`` (or the folder holding it)."""
        path = Path(path)
        return cls.from_dict(json.loads((path / "compare.json" if path.is_dir() else path).read_text()))

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write compare.json, loss_curves.png, memory.png and throughput.png into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = self.to_dict()
        (out / "compare.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        summary = self.summary()
        n_params = self.model.get("n_params")
        title = f"{self.model['source']} ({n_params:,} params), {self.config.steps} steps" if n_params else ""
        paths = [out / "compare.json"]
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
        return paths


def _steps_fraction(cmp: dict) -> str:
    """``0.40x`` (mean over seeds), ``0.45x (2/3 seeds)`` when some never reach it, or ``never``."""
    fraction, reached = cmp.get("steps_to_baseline_loss_fraction"), cmp.get("steps_to_baseline_loss", [])
    if fraction is None:
        return "never"
    text = f"{fraction['mean']:.2f}x"
    return text if fraction["n"] == len(reached) else f"{text} ({fraction['n']}/{len(reached)} seeds)"


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _json_ready(value: Any) -> Any:
    """Tuples to lists and non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---- the environment ---------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def environment(device: str = "cpu", distributions: tuple[str, ...] = ()) -> dict:
    """Versions and machine facts for the JSON (load average included: these machines are shared);
    ``distributions`` adds the versions of more packages (``None`` where not installed)."""
    machine = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": device,
    }
    if hasattr(os, "getloadavg"):
        machine["load_average_start"] = list(os.getloadavg())  # 1, 5, 15 minutes
    try:
        import psutil

        machine["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if torch.device(device).type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(torch.device(device))
    versions = {"python": platform.python_version(), "torch": torch.__version__, "blockopt": blockopt.__version__}
    for distribution in ("tokenizers", "matplotlib", "tqdm", "transformers", *distributions):
        versions[distribution] = _version(distribution)
    return {"versions": versions, "machine": machine}


# ---- running -----------------------------------------------------------------------------
def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "run"


def run_dir(out_dir: str | os.PathLike, label: str, seed: int) -> Path:
    """Where one run keeps its checkpoint and, once finished, its ``result.json``."""
    return Path(out_dir) / "runs" / f"{_slug(label)}-seed{seed}"


def _data_digest(data: TokenSplit) -> str:
    digest = hashlib.sha256()
    for part in data:
        digest.update(part.to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:16]


def _prepare_data(config: CompareConfig, spec: ModelSpec, log: Callable[[str], None]) -> tuple[TokenSplit, dict, float]:
    started = time.perf_counter()
    text = load_corpus(config.corpus, max_bytes=config.max_bytes)
    tokenized = tokenize_corpus(text, spec.vocab_size)
    data = split_ids(tokenized.ids)
    n_bytes = len(text.encode("utf-8"))
    log(
        f"corpus: {config.corpus or 'Python standard library'} ({n_bytes:,} bytes, {len(tokenized.ids):,} tokens); "
        f"BPE tokenizer (vocab {spec.vocab_size}) {'loaded from cache' if tokenized.from_cache else 'trained'} "
        f"in {tokenized.seconds:.1f}s"
    )
    info = {
        "source": str(config.corpus) if config.corpus is not None else "stdlib",
        "bytes": n_bytes,
        "max_bytes": config.max_bytes,
        "tokens": len(tokenized.ids),
        "train_tokens": len(data.train),
        "val_tokens": len(data.val),
        "vocab_size": spec.vocab_size,
        "tokenizer_from_cache": tokenized.from_cache,
        "digest": _data_digest(data),
    }
    return data, info, time.perf_counter() - started


def compare(
    optimizers: Sequence[str | OptimizerSpec] | None = None,
    *,
    config: CompareConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    callback: Callable[[str, int, int, float], None] | None = None,
    command: Sequence[str] | None = None,
    **settings: Any,
) -> CompareResult:
    """Train one model with several optimizers and seeds; return (and with ``out_dir``, save) the results.

    Args:
        optimizers: peer names with optional overrides, e.g. ``["adamw", "adam-mini",
            "sgd-sai:lr=1e-2"]`` (see `blockopt.bench.peers`); default AdamW vs Adam-mini.
        config: a `CompareConfig`; keyword ``settings`` (any of its fields: ``model``, ``seeds``,
            ``steps``, ``lr``, ``schedule``, ...) override it.
        out_dir: where compare.json, the PNGs and the per-run checkpoints go (nothing is written
            without it).
        resume: reuse finished runs and continue interrupted ones found in ``out_dir`` (their
            settings must match; a mismatch is a ValueError).
        progress: tqdm bars while training (hidden when not on a terminal).
        log: receives one line per stage and run (e.g. ``print``); ``None`` is silent.
        callback: ``callback(label, seed, step, train_loss)`` after every training step.
        command: the command line, recorded in the JSON.

    Raises:
        PeerError: an unknown optimizer, a bad override, a missing package (named), or an
            optimizer that cannot be built with its hyperparameters (checked before training).
        ModelSpecError, FileNotFoundError, CorpusError, ValueError: bad model, corpus or settings.
    """
    if optimizers is not None:
        settings["optimizers"] = tuple(optimizers)
    config = config_from(config, settings)
    log = log or (lambda line: None)
    started, cpu_started = time.perf_counter(), time.process_time()
    env = environment(config.device)  # at the start: the load average before our own runs
    if resume and out_dir is None:
        raise ValueError("resume=True needs an out_dir")

    spec = as_model_spec(config.model, config.model_overrides)
    max_seq_len = spec.max_seq_len
    seq_len = config.seq_len or min(128, max_seq_len or 128)
    if max_seq_len is not None and seq_len > max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's maximum sequence length {max_seq_len}")
    shared = config.shared_hyperparameters

    # Fail fast: every peer must exist, be installed and build on the model before any training.
    hyperparameters = {s.label: s.resolve(shared) for s in config.specs}
    probe = spec.build(config.seeds[0])
    optimizer_info = {}
    for s in config.specs:
        optimizer = s.peer.build(probe, hyperparameters[s.label])
        optimizer_info[s.label] = {
            "name": s.name,
            "overrides": dict(s.overrides),
            "hyperparameters": hyperparameters[s.label],
            "description": s.peer.description,
            "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "packages": s.peer.versions(),
        }
        del optimizer
    n_params = count_params(probe)
    del probe
    model_info = {**spec.describe(), "n_params": n_params}
    log(f"model: {spec.source} ({n_params:,} parameters); optimizers: {', '.join(config.labels)}; seeds: {list(config.seeds)}")

    data, corpus_info, data_seconds = _prepare_data(config, spec, log)
    loop = {
        "steps": config.steps,
        "batch_size": config.batch_size,
        "seq_len": seq_len,
        "schedule": config.schedule,
        "warmup_steps": config.resolved_warmup_steps,
        "min_lr_ratio": config.min_lr_ratio,
        "decay_fraction": config.decay_fraction,
        "grad_clip": config.grad_clip,
        "eval_every": config.resolved_eval_every,
        "eval_batches": config.eval_batches,
        "device": config.device,
    }
    log(
        f"{config.steps} steps of {config.batch_size}x{seq_len} tokens per run, {config.schedule} schedule "
        f"(warm-up {loop['warmup_steps']}), eval every {loop['eval_every']} steps"
    )

    records: list[RunRecord] = []
    run_seconds: dict[str, float] = {}
    total = len(config.seeds) * len(config.specs)
    index = 0
    for seed in config.seeds:  # interleaved: every optimizer's seed 0, then seed 1, ...
        for s in config.specs:
            index += 1
            fingerprint = _json_ready({
                "label": s.label, "optimizer": s.name, "hyperparameters": hyperparameters[s.label], "seed": seed,
                "model": model_info, "data": corpus_info["digest"], "loop": loop,
            })
            record = _run_one(
                s, seed, spec, data, loop, hyperparameters[s.label], fingerprint, config,
                out_dir=out_dir, resume=resume, progress=progress, callback=callback,
            )
            records.append(record)
            r = record.result
            run_seconds[f"{s.label} seed {seed}"] = r.wall_s
            how = {
                "loaded": "finished earlier, loaded",
                "resumed": f"resumed at step {r.resumed_from[-1] if r.resumed_from else '?'}, {r.wall_s:.1f}s in all",
            }.get(record.status, f"{r.wall_s:.1f}s")
            log(
                f"[{index}/{total}] {s.label} seed {seed}: final val loss {r.final_val_loss:.4f}, "
                f"train {r.final_train_loss:.4f}, state {r.state_bytes / 2**20:.2f} MiB, {r.tokens_per_s:,.0f} tokens/s ({how})"
            )

    if hasattr(os, "getloadavg"):
        env["machine"]["load_average_end"] = list(os.getloadavg())
    result = CompareResult(
        config=config,
        model=model_info,
        corpus=corpus_info,
        optimizers=optimizer_info,
        runs=records,
        # process CPU time beside wall time: on a shared machine the two tell load from work
        timings_s={
            "data": data_seconds, "runs": run_seconds, "total": time.perf_counter() - started,
            "process_cpu": time.process_time() - cpu_started,
        },
        loop={**loop, "checkpoint_every": config.resolved_checkpoint_every if out_dir is not None else None},
        environment=env,
        command=list(command) if command is not None else None,
    )
    if out_dir is not None:
        paths = result.save(out_dir)
        log(f"wrote {', '.join(str(p) for p in paths)}")
    return result


def _run_one(
    s: OptimizerSpec, seed: int, spec: ModelSpec, data: TokenSplit, loop: dict, hyperparameters: dict,
    fingerprint: dict, config: CompareConfig, *, out_dir, resume: bool, progress: bool, callback,
) -> RunRecord:
    folder = run_dir(out_dir, s.label, seed) if out_dir is not None else None
    if folder is not None:
        finished = folder / RESULT_FILE
        if resume and finished.is_file():
            saved = json.loads(finished.read_text())
            if saved.get("fingerprint") != fingerprint:
                differing = sorted(k for k in set(saved.get("fingerprint", {})) | set(fingerprint)
                                   if saved.get("fingerprint", {}).get(k) != fingerprint.get(k))
                raise ValueError(
                    f"{finished} was written by a run with different settings (differ: {', '.join(differing)}); "
                    "resume with the same settings, or use another output folder"
                )
            return RunRecord(s.label, seed, RunResult.from_dict(saved["result"]), status="loaded")
        finished.unlink(missing_ok=True)
        if resume:
            load_checkpoint(folder, fingerprint)  # a mismatch fails here, before any work
    peer = s.peer
    step_callback = None if callback is None else (lambda step, loss: callback(s.label, seed, step, loss))
    result = train_run(
        spec,
        lambda model: peer.build(model, hyperparameters),
        data,
        steps=loop["steps"], batch_size=loop["batch_size"], seq_len=loop["seq_len"],
        warmup_steps=loop["warmup_steps"], min_lr_ratio=loop["min_lr_ratio"], schedule=loop["schedule"],
        decay_fraction=loop["decay_fraction"], grad_clip=loop["grad_clip"], eval_every=loop["eval_every"],
        eval_batches=loop["eval_batches"], seed=seed, device=loop["device"], progress=progress,
        desc=f"{s.label} seed {seed}", checkpoint_dir=folder, checkpoint_every=config.resolved_checkpoint_every,
        resume=resume, fingerprint=fingerprint, callback=step_callback,
    )
    if folder is not None:
        tmp = folder / (RESULT_FILE + ".tmp")
        tmp.write_text(json.dumps(_json_ready({"fingerprint": fingerprint, "result": result.to_dict()}), indent=1) + "\n")
        os.replace(tmp, folder / RESULT_FILE)
        # the result is the run's completion mark; its checkpoint is no longer needed
        (folder / "checkpoint.pt").unlink(missing_ok=True)
    resumed = bool(result.resumed_from) and resume
    return RunRecord(s.label, seed, result, status="resumed" if resumed else "trained")
