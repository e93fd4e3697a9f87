"""A training run's checkpoint file: written atomically, refused when from another format or from
a run with other settings (Note [exact resume] in `train` says what it holds)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ._io import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"
# Bump when the checkpoint layout changes; older files are then refused with a clear message.
CHECKPOINT_FORMAT = 1


def fingerprint_mismatch(saved: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """The settings that differ between two fingerprints, sorted: nested ones by their dotted
    names with both values (``loop.eval_every: 10 saved, 40 now``)."""
    differ = []
    for key in sorted(set(saved) | set(current), key=str):
        old, new = saved.get(key), current.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differ += fingerprint_mismatch(old, new, f"{prefix}{key}.")
        elif old != new:
            differ.append(f"{prefix}{key}: {old!r} saved, {new!r} now")
    return differ


def save_checkpoint(checkpoint_dir: Path, state: dict) -> None:
    """``torch.save`` ``state`` (tagged with the format) as the checkpoint of ``checkpoint_dir``;
    a run killed mid-write leaves the previous checkpoint intact."""
    atomic_write(checkpoint_dir / CHECKPOINT_FILE, lambda tmp: torch.save({"format": CHECKPOINT_FORMAT, **state}, tmp))


def load_checkpoint(checkpoint_dir: str | os.PathLike, fingerprint: Mapping | None = None) -> dict | None:
    """The checkpoint in ``checkpoint_dir`` (``None`` if there is none).

    Raises:
        ValueError: the file is from another checkpoint format, or was written by a run whose
            ``fingerprint`` (settings) differs from the one given.
    """
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} has checkpoint format {checkpoint.get('format')!r}, this version reads {CHECKPOINT_FORMAT}; "
            "start a fresh run (delete the file or choose another folder)"
        )
    if fingerprint is not None:
        differing = fingerprint_mismatch(checkpoint["fingerprint"], dict(fingerprint))
        if differing:
            raise ValueError(
                f"{path} was written by a run with different settings (differ: {', '.join(differing)}); "
                "resume with the same settings, or start a fresh run in another folder"
            )
    return checkpoint
