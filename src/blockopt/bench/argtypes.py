"""argparse ``type=`` converters shared by `blockopt` subcommands and the benchmark scripts.

Each turns the text of one option into a value or raises ``argparse.ArgumentTypeError``, which
argparse prints as a one-line usage error.
"""

from __future__ import annotations

import argparse
import os


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def betas(text: str) -> tuple[float, float]:
    """Two numbers separated by a comma, e.g. ``0.9,0.95``."""
    parts = [p for p in text.replace(" ", "").split(",") if p]
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"write two numbers like 0.9,0.95; got {text!r}")
    try:
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(f"write two numbers like 0.9,0.95; got {text!r}") from None


def new_file(text: str) -> str:
    """A file to write: not a folder, in a folder that exists (checked before any work)."""
    if not text.strip() or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: name the file to write (e.g. state.pt)")
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r}: its folder {parent!r} does not exist")
    return text


def folder(text: str) -> str:
    """A folder to write into: one that exists, or a path where none does yet (it is created)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path: name the folder (for the current one, '.')")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    parent = os.path.abspath(text)
    while not os.path.exists(parent):  # the folder that exists, under which it is created
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text!r} can't be created: {parent!r} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r} can't be written: {parent!r} is not writable")
    return text
