"""The machine and the package versions a measurement ran on, for every result JSON.

Load averages are recorded because the machines are shared: a slow run on a busy machine reads as
load, not as a slow optimizer.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

import blockopt

# Packages whose version every result records; ``distributions`` adds more.
RECORDED_DISTRIBUTIONS = ("tokenizers", "matplotlib", "tqdm", "transformers")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def environment(device: str = "cpu", distributions: Sequence[str] = ()) -> dict:
    """``{"versions": ..., "machine": ...}``: versions of Python, torch, blockopt and the bench
    packages (``None`` where not installed; ``distributions`` adds more), and the machine: CPU,
    threads, GPU for a CUDA ``device``, memory, and the load average now."""
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
    for distribution in (*RECORDED_DISTRIBUTIONS, *distributions):
        versions[distribution] = _version(distribution)
    return {"versions": versions, "machine": machine}


def record_load_end(env: dict) -> dict:
    """Add the load average at the end of a measurement to ``env`` (from `environment`); returns it."""
    if hasattr(os, "getloadavg"):
        env["machine"]["load_average_end"] = list(os.getloadavg())
    return env
