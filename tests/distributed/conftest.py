"""Running several ranks on localhost (gloo) from a test, and the one-process references."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from . import _worker

if not dist.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)


def run_world(world: int, out: Path, plan: list[tuple[str, dict]], entry=_worker.main) -> None:
    """Spawn ``world`` processes that run the scenarios of ``plan`` (see `_worker.main`; another
    worker module's ``main`` as ``entry``)."""
    for attempt in (1, 2):
        store = out / f"store_w{world}_{len(list(out.iterdir()))}"
        try:
            torch.multiprocessing.start_processes(
                entry, args=(world, str(store), str(out), plan), nprocs=world, join=True, start_method="spawn"
            )
            return
        except torch.multiprocessing.ProcessExitedException as error:
            # Known flake: once in a full CI run a rank of the 3-rank DCP world died with SIGABRT
            # ("terminate called without an active exception", gloo teardown), never alone in 6
            # reruns. A rank that raises exits with code 1, not a signal, and is never retried;
            # every result is still checked by the tests after the rerun.
            if attempt == 2 or error.signal_name != "SIGABRT":
                raise
            warnings.warn(f"a rank died with SIGABRT; rerunning the {world}-rank world once", RuntimeWarning)


def load(out: Path, name: str, rank: int = 0) -> dict:
    return torch.load(out / f"{name}.rank{rank}.pt", weights_only=False)


def single_process(model_name: str, steps: slice = slice(None), optimizer: str = "adam-mini") -> dict[str, torch.Tensor]:
    """The reference: one process, the whole global batch, no distribution."""
    model = _worker.MODELS[model_name]()
    opt = _worker.OPTIMIZERS[optimizer](model)
    _worker.train(model, opt, _worker.batches()[steps], rank=0, world=1)
    return _worker.full_params(model)
