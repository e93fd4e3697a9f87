"""`blockopt demo`: a `compare` of AdamW and Adam-mini on the ``"demo"`` Llama, one seed.

Both runs share the model init, the batches, the LR schedule and every hyperparameter; only the
optimizer differs. The demo prints a table, writes the loss curves (``loss_curves.png``) and every
number it measured (``demo.json``) into ``out_dir``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from ._io import output_folder
from .compare_config import DEFAULT_LR, DEMO_CONFIG, config_from
from .comparison import format_table
from .loop import DEFAULT_STEPS
from .peers import OptimizerSpec
from .plots import plot_loss_curves
from .results import json_ready
from .runner import compare
from .tokenizer import demo_data
from .train import RunResult

__all__ = ["DEFAULT_LR", "DEFAULT_STEPS", "DEMO_CONFIG", "DEMO_OPTIMIZERS", "demo_data", "run_demo"]

# Labelled as the demo's table and demo.json name them.
DEMO_OPTIMIZERS = (OptimizerSpec("adamw", label="AdamW"), OptimizerSpec("adam-mini", label="Adam-mini"))


def _table(results: dict[str, RunResult]) -> str:
    header = ("optimizer", "final train loss", "final val loss", "optimizer state MiB", "step ms", "tokens/s")
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
    return format_table(rows)


def run_demo(
    corpus: str | os.PathLike | None = None,
    *,
    out_dir: str | os.PathLike = "demo-out",
    seed: int = 0,
    progress: bool = True,
    **settings: Any,
) -> dict:
    """Train the ``"demo"`` Llama with AdamW and with Adam-mini at the same settings; report and save.

    Args:
        corpus: a text file or folder; ``None`` uses the Python standard library's source.
        out_dir: where ``loss_curves.png`` and ``demo.json`` go (created if missing).
        seed: model init and batch order (the same for both runs).
        settings: any setting of `compare` (``steps``, ``lr``, ``batch_size``, ``max_bytes``,
            ...); the defaults are `CompareConfig`'s and `TrainConfig`'s. Note: at this tiny
            scale Adam-mini tolerates a high LR less well than AdamW (at lr=3e-3 with batch 16 it
            trails by 2-5%); lr=2e-3, batch 32 and a 20% warm-up suit both.

    Returns:
        The content of ``demo.json``.
    """
    started = time.perf_counter()
    out = output_folder(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config_from(None, {
        "optimizers": DEMO_OPTIMIZERS, "seeds": (seed,), "corpus": None if corpus is None else str(corpus), **settings,
    })
    result = compare(config=config, progress=progress, log=print)

    results = {label: result.runs_of(label)[0] for label in result.labels}
    adamw, mini = results["AdamW"], results["Adam-mini"]
    memory_ratio = mini.state_bytes / adamw.state_bytes
    val_diff = mini.final_val_loss / adamw.final_val_loss - 1.0
    print(_table(results))
    print(f"Adam-mini / AdamW state memory: {memory_ratio:.2f}")
    print(f"val loss difference: {100 * val_diff:+.2f}%")

    plot = plot_loss_curves(results, out / "loss_curves.png", title=f"{config.model} Llama ({adamw.n_params:,} params)")
    loop = {key: value for key, value in result.loop.items() if key not in ("device", "checkpoint_every")}
    report = json_ready({
        "model": {"name": config.model, "n_params": adamw.n_params, **result.model["config"]},
        "corpus": result.corpus,
        "hyperparameters": {**config.shared_hyperparameters, **loop, "seed": seed, "weight_decay_1d": 0.0},
        "runs": {name: r.to_dict() for name, r in results.items()},
        "comparison": {"state_memory_ratio": memory_ratio, "val_loss_difference": val_diff},
        "timings_s": {  # one-time costs (first_step, kernel_build) are in no run's figures
            "tokenizer": result.timings_s["tokenizer"],
            "first_step": result.timings_s["first_step"],
            "kernel_build": result.timings_s["kernel_build"],
            **{f"run_{name}": r.wall_s for name, r in results.items()},
            "total": time.perf_counter() - started,
        },
        **result.environment,
    })
    (out / "demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {plot} and {out / 'demo.json'}")
    return report
