"""The spec grammar of one optimizer run: ``"NAME"`` or ``"NAME:key=value,key=value"``.

Values are Python literals (``1e-3``, ``(0.9, 0.99)``, ``True``, ``None``, else the text); a value
with commas, ``betas=0.9,0.99``, is a tuple. The same ``key=value`` syntax serves model overrides
(`blockopt.bench.modelspec.parse_overrides`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from .registry import Peer, PeerError, get_peer

# Split at commas that start a new "key=" (a comma inside a value, as in betas=0.9,0.99, stays).
_ITEM_SPLIT = re.compile(r",(?=\s*[A-Za-z_]\w*\s*=)")
_KEY = re.compile(r"[A-Za-z_]\w*")


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer of a comparison: a peer name, overrides, and the label it is reported by."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        if not self.label:
            object.__setattr__(self, "label", format_spec(self.name, self.overrides))

    @property
    def peer(self) -> Peer:
        return get_peer(self.name)

    def resolve(self, shared: Mapping[str, Any] | None = None) -> dict:
        return self.peer.resolve(shared, self.overrides)


def parse_value(text: str) -> Any:
    """A Python literal (``1e-3``, ``0.9,0.99``, ``(0.9, 0.99)``, ``True``/``true``, ``None``), else
    the text.

    Raises:
        ValueError: for ``none`` written otherwise than ``None``. Where ``"none"`` is also a value
        (AdaPM's momentum policy, a ``nonfinite`` mode), reading it as Python's ``None`` (which
        there means the defaults) would silently run something else: write ``None`` or ``'none'``.
    """
    stripped = text.strip()
    lowered = stripped.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none" and stripped != "None":
        raise ValueError(f"{stripped!r} is ambiguous: write None for no value, or 'none' (quoted) for the text")
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError):
        return stripped


def parse_assignments(text: str, bad_item: Callable[[str, str], Exception]) -> list[tuple[str, Any]]:
    """``"key=value,key=value"`` as ``(key, value)`` pairs in order; an item that is not
    ``key=value``, or whose value is ambiguous, raises ``bad_item(item, what to write)``."""
    pairs = []
    for item in _ITEM_SPLIT.split(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not _KEY.fullmatch(key) or not value.strip():
            raise bad_item(item, "write key=value")
        if value.rstrip().endswith(",") and not value.strip().startswith(("(", "[")):
            raise bad_item(item, "a stray comma after the value: remove it (a one-element tuple is written (x,))")
        try:
            pairs.append((key, parse_value(value)))
        except ValueError as error:
            raise bad_item(item, str(error)) from None
    return pairs


def format_spec(name: str, overrides: Mapping[str, Any]) -> str:
    """The spec text of a name and overrides (what `parse_optimizer_spec` reads back)."""
    if not overrides:
        return name
    return name + ":" + ",".join(f"{key}={_format_value(value)}" for key, value in overrides.items())


def _format_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if len(value) > 1 else f"({value[0]},)"
    if isinstance(value, str) and not _reads_back(value):  # "none", "1e-3", "true": quoted
        return repr(value)
    return str(value)


def _reads_back(text: str) -> bool:
    """Whether `parse_value` reads ``text`` back as that very text."""
    try:
        return parse_value(text) == text
    except ValueError:
        return False


def parse_optimizer_spec(text: str) -> OptimizerSpec:
    """Parse ``"NAME"`` or ``"NAME:key=value,key=value"``. The name must be known, and a value
    of the wrong kind for its key (`Peer.check_values`) fails here; unknown keys are refused
    when the spec is resolved against the peer.

    Examples: ``"adamw"``, ``"sgd-sai:lr=1e-2,momentum=0.8"``, ``"lion:betas=0.9,0.99"``,
    ``"po:adan:lr=1e-3"``.
    """
    text = text.strip()
    bad = lambda item, fix="write key=value": PeerError(f"bad override {item!r} in {text!r}: {fix}")  # noqa: E731
    name, overrides_text = text, ""
    if "=" in text:
        head = text[: text.index("=")]
        if ":" not in head:
            raise PeerError(f"bad optimizer spec {text!r}: write NAME:key=value[,key=value...]")
        cut = head.rindex(":")
        name, overrides_text = text[:cut], text[cut + 1 :]
    elif _names_a_peer(text.rpartition(":")[0]):  # "adamw:lr": an override without its value
        if not text.rpartition(":")[2].strip():
            raise PeerError(f"bad optimizer spec {text!r}: nothing follows ':'; write NAME or NAME:key=value[,...]")
        raise bad(text.rpartition(":")[2])
    if not name:
        raise PeerError(f"bad optimizer spec {text!r}: the optimizer name is missing")
    overrides: dict[str, Any] = {}
    if overrides_text:
        for key, value in parse_assignments(overrides_text, bad):
            if key in overrides:
                raise PeerError(f"{key!r} is given twice in {text!r}")
            overrides[key] = value
    get_peer(name).check_values(overrides, text)  # an unknown name or a bad value fails here, before any training
    return OptimizerSpec(name=name, overrides=overrides, label=text if overrides else name)


def _names_a_peer(text: str) -> bool:
    try:
        get_peer(text)
    except PeerError:
        return False
    return True


def as_spec(item: str | OptimizerSpec) -> OptimizerSpec:
    return item if isinstance(item, OptimizerSpec) else parse_optimizer_spec(item)


def build_optimizer(
    item: str | OptimizerSpec, model: nn.Module, shared: Mapping[str, Any] | None = None
) -> torch.optim.Optimizer:
    """Build the optimizer a spec names (``"adamw"``, ``"lion:lr=1e-4"``) for ``model``."""
    spec = as_spec(item)
    return spec.peer.build(model, spec.resolve(shared))
