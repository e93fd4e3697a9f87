"""`blockopt compare`: train one model with several optimizers and seeds on the same data order.

    from blockopt.bench import compare
    result = compare(["adamw", "adam-mini", "lion:lr=3e-4"], seeds=(0, 1, 2), out_dir="compare-out")
    print(result.table())

Each seed fixes the initial weights and the batch order; every optimizer of a seed sees exactly
those, so runs of one seed differ only by the optimizer. Runs are interleaved (seed 0 of every
optimizer, then seed 1, ...) so that a machine slowing down mid-way slows every optimizer alike.
With ``out_dir`` every run checkpoints itself under ``out_dir/runs/``; ``resume=True`` skips the
finished runs and continues the interrupted one, to the same numbers bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write, output_folder
from .checkpoint import fingerprint_mismatch, load_checkpoint
from .compare_config import CompareConfig, config_from
from .comparison import CompareResult, RunRecord
from .corpus import TokenSplit, check_long_enough, load_corpus, split_ids
from .environment import environment, record_load_end
from .loop import TrainConfig
from .modelspec import ModelSpec, as_model_spec
from .peers import OptimizerSpec, Peer
from .results import json_ready
from .tokenizer import tokenize_corpus
from .train import RunResult, count_params, train_run

RESULT_FILE = "result.json"  # a finished run's result, in its run folder


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


def _prepare_data(
    config: CompareConfig, spec: ModelSpec, seq_len: int, log: Callable[[str], None]
) -> tuple[TokenSplit, dict, dict]:
    """The token splits (each holding a sequence of ``seq_len``), what the JSON says of the
    corpus, and the seconds spent on it."""
    started = time.perf_counter()
    text = load_corpus(config.corpus, max_bytes=config.max_bytes)
    tokenized = tokenize_corpus(text, spec.vocab_size)
    data = split_ids(tokenized.ids)
    n_bytes = len(text.encode("utf-8"))
    capped = config.max_bytes is not None and n_bytes > config.max_bytes - 4  # a cut character drops <= 3 bytes
    source = f"corpus {str(config.corpus)!r}" if config.corpus is not None else "the built-in corpus (the standard library)"
    check_long_enough(data, seq_len, source=source, capped=capped)
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
    return data, info, {"data": time.perf_counter() - started, "tokenizer": tokenized.seconds}


def _describe_optimizers(
    config: CompareConfig, spec: ModelSpec, hyperparameters: dict[str, dict]
) -> tuple[dict, int, dict[str, float]]:
    """Build every optimizer once on a probe model, so that an unknown, uninstalled or unbuildable
    one fails before any training, and step it once (`_first_step`); returns what the JSON says
    of each, the parameter count and the seconds of each first step."""
    probe = spec.build(config.seeds[0]).to(config.device)
    info, first_steps = {}, {}
    for s in config.specs:
        optimizer = s.peer.build(probe, hyperparameters[s.label])
        first_steps[s.label] = _first_step(probe, optimizer)
        info[s.label] = {
            "name": s.name,
            "overrides": dict(s.overrides),
            "hyperparameters": hyperparameters[s.label],
            "description": s.peer.description,
            "class": f"{type(optimizer).__module__}.{type(optimizer).__qualname__}",
            "packages": s.peer.versions(),
        }
    return info, count_params(probe), first_steps


def _first_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> float:
    """One step on made-up gradients, timed. Note [one-time costs]: a process's first step of an
    optimizer may build or load a kernel (Adam-mini's C++ kernel: ~15 s when it is not cached),
    compile Triton code or import modules; paid here, before any run, those costs stay out of
    every run's timings (the JSON reports them apart, as ``timings_s.first_step``). The probe's
    weights are the only thing it changes; runs build their own models and seed their own RNG."""
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = (1e-3 * torch.randn(p.shape, generator=generator)).to(p)
    started = time.perf_counter()
    optimizer.step()
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.synchronize()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


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
        config: a `CompareConfig`; keyword ``settings`` (any of its fields or of its loop's:
            ``model``, ``seeds``, ``lr``, ``steps``, ``schedule``, ...) override it.
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
    if out_dir is not None:
        output_folder(out_dir)

    spec = as_model_spec(config.model, config.model_overrides)
    loop = config.loop.resolved(spec.max_seq_len)
    shared = config.shared_hyperparameters
    hyperparameters = {s.label: s.resolve(shared) for s in config.specs}
    optimizer_info, n_params, first_steps = _describe_optimizers(config, spec, hyperparameters)
    model_info = {**spec.describe(), "n_params": n_params}
    log(f"model: {spec.source} ({n_params:,} parameters); optimizers: {', '.join(config.labels)}; seeds: {list(config.seeds)}")
    log("first step of each optimizer, before any timing (kernel builds, allocation; in no figure): "
        + ", ".join(f"{label} {seconds:.1f}s" for label, seconds in first_steps.items()))

    data, corpus_info, timings = _prepare_data(config, spec, loop.seq_len, log)
    timings["first_step"] = first_steps
    timings["kernel_build"] = _kernel_build_seconds()
    # The loop as run (derived values resolved), and where: part of every run's fingerprint.
    loop_info = {**loop.to_dict(), "device": config.device}
    log(
        f"{loop.steps} steps of {loop.batch_size}x{loop.seq_len} tokens per run, {loop.schedule} schedule "
        f"(warm-up {loop.warmup_steps}), eval every {loop.eval_every} steps"
    )

    records: list[RunRecord] = []
    run_seconds: dict[str, float] = {}
    eta = _Eta(len(config.seeds) * len(config.specs))
    for seed in config.seeds:  # interleaved: every optimizer's seed 0, then seed 1, ...
        for s in config.specs:
            log(eta.start(f"{s.label} seed {seed}"))
            fingerprint = json_ready({
                "label": s.label, "optimizer": s.name, "hyperparameters": hyperparameters[s.label], "seed": seed,
                "model": model_info, "data": corpus_info["digest"], "loop": loop_info,
            })
            record = _run_one(
                s, seed, spec, data, loop, hyperparameters[s.label], fingerprint, device=config.device,
                folder=None if out_dir is None else run_dir(out_dir, s.label, seed),
                checkpoint_every=config.checkpoint_every, resume=resume, progress=progress, callback=callback,
            )
            records.append(record)
            run_seconds[f"{s.label} seed {seed}"] = record.result.wall_s
            eta.finish(trained=record.status != "loaded")
            log(f"      {_run_line(record)}")

    record_load_end(env)
    timings.update({"runs": run_seconds, "total": time.perf_counter() - started})
    # process CPU time beside wall time: on a shared machine the two tell load from work
    timings["process_cpu"] = time.process_time() - cpu_started
    result = CompareResult(
        config=config,
        model=model_info,
        corpus=corpus_info,
        optimizers=optimizer_info,
        runs=records,
        timings_s=timings,
        loop={**loop_info, "checkpoint_every": (config.checkpoint_every or loop.eval_every) if out_dir is not None else None},
        environment=env,
        command=list(command) if command is not None else None,
    )
    if out_dir is not None:
        paths = result.save(out_dir)
        log(f"wrote {', '.join(str(p) for p in paths)}")
    return result


def _kernel_build_seconds() -> float | None:
    """Seconds this process spent building or loading Adam-mini's CPU kernel (``None``: it did not)."""
    from ..kernels.adam_mini import cpu

    return None if cpu.last_build is None else cpu.last_build.seconds


class _Eta:
    """The overall progress line: ``[3/8] adam-mini seed 1 ... ETA 2m10s``, the time left
    estimated from the runs trained so far in this invocation (runs loaded from an earlier one
    take no time and count for nothing)."""

    def __init__(self, total: int):
        self.total, self.done, self.trained, self.seconds = total, 0, 0, 0.0
        self.started = time.perf_counter()

    def start(self, what: str) -> str:
        self.started = time.perf_counter()
        line = f"[{self.done + 1}/{self.total}] {what} ..."
        if self.trained:
            line += f" ETA {_duration(self.seconds / self.trained * (self.total - self.done))}"
        return line

    def finish(self, *, trained: bool) -> None:
        self.done += 1
        if trained:
            self.trained += 1
            self.seconds += time.perf_counter() - self.started


def _duration(seconds: float) -> str:
    """``2m10s``, ``1h05m`` or ``42s``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _run_line(record: RunRecord) -> str:
    r = record.result
    how = {
        "loaded": "finished earlier, loaded",
        "resumed": f"resumed at step {r.resumed_from[-1] if r.resumed_from else '?'}, {r.wall_s:.1f}s in all",
    }.get(record.status, f"{r.wall_s:.1f}s")
    return (
        f"{record.label} seed {record.seed}: final val loss {r.final_val_loss:.4f}, train {r.final_train_loss:.4f}, "
        f"state {r.state_bytes / 2**20:.2f} MiB, {r.tokens_per_s:,.0f} tokens/s ({how})"
    )


def seeded(peer: Peer, hyperparameters: dict, seed: int) -> dict:
    """The run's hyperparameters, with ``seed`` (an optimizer's own randomness: blockopt's rounding
    bits, AdaPM's initial factors) set to the run's seed where the peer takes one and the spec
    left it unset: otherwise every seed of a comparison would draw that randomness alike, and
    the spread over seeds would leave it out."""
    if "seed" in peer.accepted_keys and hyperparameters.get("seed") is None:
        return {**hyperparameters, "seed": seed}
    return hyperparameters


def _run_one(
    s: OptimizerSpec, seed: int, spec: ModelSpec, data: TokenSplit, loop: TrainConfig, hyperparameters: dict,
    fingerprint: dict, *, device: str, folder: Path | None, checkpoint_every: int | None, resume: bool,
    progress: bool, callback,
) -> RunRecord:
    """One run: loaded from ``folder`` when finished there earlier, resumed, or trained."""
    if folder is not None:
        finished = folder / RESULT_FILE
        if resume and finished.is_file():
            saved = json.loads(finished.read_text())
            differing = fingerprint_mismatch(saved.get("fingerprint", {}), fingerprint)
            if differing:
                raise ValueError(
                    f"{finished} was written by a run with different settings (differ: {', '.join(differing)}); "
                    "resume with the same settings, or use another output folder"
                )
            return RunRecord(s.label, seed, RunResult.from_dict(saved["result"]), status="loaded")
        finished.unlink(missing_ok=True)
        if resume:
            load_checkpoint(folder, fingerprint)  # a mismatch fails here, before any work
    peer = s.peer
    hyperparameters = seeded(peer, hyperparameters, seed)
    step_callback = None if callback is None else (lambda step, loss: callback(s.label, seed, step, loss))
    result = train_run(
        spec, lambda model: peer.build(model, hyperparameters), data, loop, seed=seed, device=device,
        progress=progress, desc=f"{s.label} seed {seed}", checkpoint_dir=folder, checkpoint_every=checkpoint_every,
        resume=resume, fingerprint=fingerprint, callback=step_callback,
    )
    if folder is not None:
        document = json_ready({"fingerprint": fingerprint, "result": result.to_dict()})
        atomic_write(folder / RESULT_FILE, lambda tmp: tmp.write_text(json.dumps(document, indent=1) + "\n"))
        # the result is the run's completion mark; its checkpoint is no longer needed
        (folder / "checkpoint.pt").unlink(missing_ok=True)
    resumed = bool(result.resumed_from) and resume
    return RunRecord(s.label, seed, result, status="resumed" if resumed else "trained")
