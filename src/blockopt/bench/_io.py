"""Writing files so that a reader (or a run killed mid-write) never sees half of one, into
folders checked before any work starts."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def output_folder(path: str | os.PathLike, name: str = "out_dir") -> Path:
    """``path`` as a folder to write into (created later, where missing); a file there is refused
    now, before any work, naming it as the caller's argument ``name``."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{name} {str(folder)!r} is a file, not a folder")
    return folder
