"""The one result format: every benchmark and study writes ``<out_dir>/result.json`` with it.

    path = write_result("benchmarks/step_speed/results/h100", name="step_speed",
                        settings=vars(args), results={"adamw": {"step_ms": 1.9}})
    read_result(path)["results"]

A result holds the schema, the study's name, the command that reproduces it, when it ran, the
machine and versions (`environment`), the settings, and the numbers. JSON has no NaN: non-finite
floats are written as ``null``; a reader that knows a field is a float turns it back into NaN
(`RunResult.from_dict` does for run results).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._io import atomic_write
from .environment import environment as capture_environment
from .environment import record_load_end

SCHEMA = "blockopt.result/1"
RESULT_FILE = "result.json"


def json_ready(value: Any) -> Any:
    """Tuples to lists, keys to strings, non-finite floats to None (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def command_line(argv: Sequence[str] | None = None) -> str:
    """``argv`` (default: this process's ``sys.argv``) as one shell line; a script path is made
    relative to the working directory where it lies below it, so the line reads the same on every
    checkout."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        try:
            argv[0] = str(Path(argv[0]).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:  # outside the working directory (or not a path): keep it as given
            pass
    return shlex.join(argv)


def write_result(
    out_dir: str | os.PathLike,
    *,
    name: str,
    settings: Mapping,
    results: Mapping,
    argv: Sequence[str] | None = None,
    device: str = "cpu",
    distributions: Sequence[str] = (),
    environment: Mapping | None = None,
) -> Path:
    """Write ``out_dir/result.json`` (folders created) and return its path.

    Args:
        name: the study or benchmark, e.g. ``"step_speed"``.
        settings: everything that decides the numbers (JSON-able; tuples become lists).
        results: the measurements.
        argv: the command line to record (default: ``sys.argv``).
        device, distributions: passed to `environment` when it is captured here (the device's
            name, extra package versions).
        environment: one captured earlier (`blockopt.bench.environment`), e.g. at the start of
            the measurement so that its load average is the one before the work; the load now
            is added as ``load_average_end``. Default: captured now.
    """
    if environment is None:
        environment = capture_environment(device, distributions)
    else:
        environment = record_load_end(copy.deepcopy(dict(environment)))
    document = {
        "schema": SCHEMA,
        "name": name,
        "command": command_line(argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment,
        "settings": settings,
        "results": results,
    }
    path = Path(out_dir) / RESULT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_ready(document), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path


def read_result(path: str | os.PathLike) -> dict:
    """The document of a ``result.json`` (or of the folder holding one).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not JSON or not a ``blockopt.result/1`` document (it is named).
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULT_FILE
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from error
    schema = document.get("schema") if isinstance(document, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"{path} is not a {SCHEMA} document (schema: {schema!r})")
    return document
