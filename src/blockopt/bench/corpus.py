"""The training text for benchmarks: the Python standard library's own source, or any text you pass.

Nothing is downloaded: every machine with Python already holds a few megabytes of well-formed,
varied text in its standard library. Files are read in sorted order, so the corpus (and every token
id derived from it) is the same on every run with the same Python.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import NamedTuple

import torch

from ..validation import check, integer, real

DEFAULT_MAX_BYTES = 4_000_000
DEFAULT_VAL_FRACTION = 0.05  # the held-out tail `split_ids` cuts off for validation

# Folders of the standard library that are not representative source code: third-party packages,
# test suites (huge and repetitive), IDLE, generated codec tables and pydoc's topic dump.
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "encodings", "pydoc_data", "__pycache__"}
)
_FILE_SEPARATOR = "\n\n"
_BINARY_SNIFF_BYTES = 8192


class CorpusError(ValueError):
    """The corpus path holds no usable text, or too little for one sequence."""


class TokenSplit(NamedTuple):
    """Token ids cut into a training part and a held-out validation tail."""

    train: torch.Tensor
    val: torch.Tensor


def stdlib_dir() -> Path:
    """The directory holding this interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files worth training on, sorted by relative path."""
    root = stdlib_dir() if root is None else Path(root)
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending into skipped folders at all.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS and not d.startswith("config-")]
        files += [
            Path(dirpath, name)
            for name in filenames
            if name.endswith(".py") and not name.startswith("_sysconfigdata")  # machine-specific dump
        ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _text_files(folder: Path) -> list[Path]:
    """Every non-hidden file under ``folder``, sorted by relative path (text-ness is checked on read)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath, name) for name in filenames if not name.startswith(".")]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _read_text(path: Path) -> str | None:
    """The file's text if it is UTF-8 text, else ``None`` (binary files are skipped, not fatal)."""
    data = path.read_bytes()
    if b"\x00" in data[:_BINARY_SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_corpus(path: str | os.PathLike | None = None, *, max_bytes: int | None = DEFAULT_MAX_BYTES) -> str:
    """Read the benchmark corpus as one string.

    Args:
        path: a text file, a folder (all its UTF-8 text files, sorted by relative path), or ``None``
            for the built-in corpus: the standard library's source files.
        max_bytes: cap on the UTF-8 size of the result; files are concatenated in order until it is
            reached and the last one is cut. ``None`` reads everything.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorpusError: nothing readable as text was found.
        ValueError, TypeError: ``max_bytes`` is not an int >= 1 or None.
    """
    check("max_bytes", max_bytes, integer(1, optional=True))
    if path is None:
        source, files = f"Python standard library ({stdlib_dir()})", stdlib_files()
    else:
        source = Path(path).expanduser()
        if not source.exists():
            raise FileNotFoundError(f"corpus path {str(source)!r} does not exist; pass a text file or a folder")
        files = _text_files(source) if source.is_dir() else [source]

    pieces: list[str] = []
    n_bytes = 0
    for file in files:
        text = _read_text(file)
        if not text:
            continue
        pieces.append(text)
        n_bytes += len(text.encode("utf-8")) + len(_FILE_SEPARATOR)
        if max_bytes is not None and n_bytes >= max_bytes:
            break
    corpus = _FILE_SEPARATOR.join(pieces)
    if max_bytes is not None:
        # Cutting bytes can split a multi-byte character; drop the partial one.
        corpus = corpus.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    if not corpus.strip():
        raise CorpusError(f"no text found in {str(source)!r} (binary and non-UTF-8 files are skipped)")
    return corpus


def split_ids(ids: torch.Tensor, val_fraction: float = DEFAULT_VAL_FRACTION) -> TokenSplit:
    """Split a 1-D token sequence into train (head) and validation (the last ``val_fraction``)."""
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    check("val_fraction", val_fraction, real(0, 1, low_open=True, high_open=True))
    n_val = max(1, int(len(ids) * val_fraction))
    if n_val >= len(ids):
        raise ValueError(f"{len(ids)} tokens are too few to split off a validation set")
    return TokenSplit(train=ids[:-n_val], val=ids[-n_val:])


def check_long_enough(data: TokenSplit, seq_len: int, *, source: str, capped: bool = False) -> None:
    """Raise `CorpusError` unless the training and the validation part each hold one window of
    ``seq_len + 1`` tokens. ``source`` names the corpus (``"corpus 'notes.txt'"``); ``capped``:
    ``max_bytes`` cut it short."""
    if min(len(data.train), len(data.val)) > seq_len:
        return
    n_tokens = len(data.train) + len(data.val)
    needed = (seq_len + 1) * round(1 / DEFAULT_VAL_FRACTION)  # a window in the validation tail
    fixes = "a longer corpus, a larger max_bytes (--max-bytes)," if capped else "a longer corpus"
    raise CorpusError(
        f"{source} is too short for seq_len={seq_len}: of its {n_tokens:,} tokens the validation part holds "
        f"{len(data.val):,}, and each part needs more than {seq_len} (about {needed:,} tokens in all); pass {fixes} "
        "or a smaller seq_len (--seq-len)"
    )
