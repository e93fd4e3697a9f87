"""One validator for user input: rules as data, one error style.

A rule says what a value may be (`real`, `integer`, `boolean`, `choice`, `pair`); `check` raises
``TypeError`` for a value of the wrong kind and ``ValueError`` for one out of range, always as
``"{name} must be {description}, got {value!r}"``. An optimizer lists its hyperparameters once, as
a table ``{name: rule}``, and `validate` checks a constructor's arguments or a new param group
against it, so every entry point refuses the same values with the same words::

    HYPERPARAMETERS = {"lr": real(0), "betas": pair(real(0, 1, high_open=True)), "eps": real(0)}
    validate(HYPERPARAMETERS, {"lr": lr, "betas": betas})
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import torch


@dataclass(frozen=True)
class Rule:
    """What a value may be. Build rules with `real`, `integer`, `boolean`, `choice` and `pair`."""

    kind: str  # "real", "int", "bool", "choice" or "pair"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    optional: bool = False  # None is allowed
    options: tuple = ()  # for "choice"
    aliases: tuple = ()  # for "choice": (alias, option) pairs, accepted and replaced by the option
    item: Rule | None = None  # for "pair"
    hint: str = ""  # what to do instead, appended to the message
    tensor: bool = False  # a 1-element tensor is accepted too (a learning rate, as torch.optim takes it)

    @property
    def description(self) -> str:
        if self.kind == "bool":
            text = "True or False"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(o) for o in self.options)
            if self.aliases:
                text += " (or " + ", ".join(f"{_name(a)} for {o!r}" for a, o in self.aliases) + ")"
        elif self.kind == "pair":
            text = f"a pair, each {self.item.description}"
        else:
            text = ("an int" if self.kind == "int" else "a number") + self._bounds()
        return text + (" or None" if self.optional else "")

    def _bounds(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f" in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {_fmt(self.low)}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {_fmt(self.high)}"
        return ""


def real(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
         optional: bool = False, hint: str = "", tensor: bool = False) -> Rule:
    """A finite real number within the bounds; with ``tensor``, a 1-element tensor too (only where
    every use of the value takes one: the steps read a tensor lr at each step, nothing else)."""
    return Rule("real", low, high, low_open, high_open, optional, hint=hint, tensor=tensor)


def integer(low: int | None = None, high: int | None = None, *, optional: bool = False, hint: str = "") -> Rule:
    """An int (not a bool) within the closed bounds."""
    return Rule("int", low, high, optional=optional, hint=hint)


def boolean() -> Rule:
    return Rule("bool")


def choice(*options, hint: str = "", aliases: Mapping[Any, Any] | None = None) -> Rule:
    """One of ``options`` (equal and of the same type); an ``aliases`` key stands for its value
    (``torch.bfloat16`` for ``"bfloat16"``), which `validate` puts in its place."""
    return Rule("choice", options=tuple(options), hint=hint, aliases=tuple((aliases or {}).items()))


def pair(item: Rule) -> Rule:
    """A tuple or list of two values, each checked against ``item`` (named ``name[0]``, ``name[1]``)."""
    return Rule("pair", item=item)


def check(name: str, value: Any, rule: Rule) -> float | None:
    """Raise ``TypeError``/``ValueError`` naming ``name`` unless ``value`` satisfies ``rule``.
    Returns the number a `real` or `integer` rule read (a 1-element tensor's value, read once)."""
    if value is None and rule.optional:
        return None
    kind = rule.kind
    if kind == "pair":
        if not isinstance(value, (tuple, list)):
            raise _error(TypeError, name, value, rule)
        if len(value) != 2:
            raise _error(ValueError, name, value, rule)
        for i, item in enumerate(value):
            check(f"{name}[{i}]", item, rule.item)
        return None
    if kind == "choice":
        if _same_as_any(value, rule.options) is None and _same_as_any(value, [a for a, _ in rule.aliases]) is None:
            raise _error(ValueError, name, value, rule)
        return None
    if kind == "bool":
        if not isinstance(value, bool):
            raise _error(TypeError, name, value, rule)
        return None
    number = _as_number(name, value, rule)
    if not math.isfinite(number) or not _within(number, rule):
        raise _error(ValueError, name, value, rule)
    return number


def validate(table: Mapping[str, Rule], values: Mapping[str, Any]) -> dict[str, Any]:
    """Check every entry of ``values`` that ``table`` has a rule for; returns ``values`` with every
    alias replaced by the option it stands for, and every number as a Python ``float`` (``real``)
    or ``int`` (``integer``): a numpy ``uint8`` lr negated in a step wraps around, a ``Fraction``
    fails inside the kernels (a tensor lr stays a tensor)."""
    out = dict(values)
    for name, value in values.items():
        rule = table.get(name)
        if rule is not None:
            check(name, value, rule)
            out[name] = _plain(value, rule)
            if rule.kind == "choice" and (i := _same_as_any(value, [a for a, _ in rule.aliases])) is not None:
                out[name] = rule.aliases[i][1]
    return out


def _plain(value: Any, rule: Rule) -> Any:
    """A checked value as the Python number its rule describes."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if rule.kind == "real":
        return float(value)
    if rule.kind == "int":
        return int(value)
    if rule.kind == "pair":
        return type(value)(_plain(item, rule.item) for item in value)
    return value


def _same_as_any(value: Any, candidates) -> int | None:
    """The index of the first candidate equal to ``value`` and of its type."""
    return next((i for i, c in enumerate(candidates) if type(value) is type(c) and value == c), None)


def _name(value: Any) -> str:
    return str(value) if isinstance(value, torch.dtype) else repr(value)


def _error(kind: type[Exception], name: str, value: Any, rule: Rule, got: str | None = None) -> Exception:
    got = repr(value) if got is None else got
    return kind(f"{name} must be {rule.description}, got {got}" + (f": {rule.hint}" if rule.hint else ""))


def _as_number(name: str, value: Any, rule: Rule) -> float:
    if isinstance(value, torch.Tensor) and rule.kind == "real" and rule.tensor:
        if value.numel() != 1:
            raise _error(ValueError, name, value, rule, got=f"a tensor of shape {tuple(value.shape)} (a 1-element tensor is accepted)")
        value = value.item()
    if isinstance(value, torch.Tensor):  # (torch's Adam takes tensor betas; here only the lr is read as one)
        raise _error(TypeError, name, value, rule, got=f"a tensor ({value!r}): pass a Python number; of the "
                     "settings only lr may be a tensor")
    wanted = Integral if rule.kind == "int" else Real
    if isinstance(value, bool) or not isinstance(value, wanted):
        raise _error(TypeError, name, value, rule, got=f"{value!r} ({type(value).__name__})")
    return float(value)


def _within(x: float, rule: Rule) -> bool:
    if rule.low is not None and (x <= rule.low if rule.low_open else x < rule.low):
        return False
    if rule.high is not None and (x >= rule.high if rule.high_open else x > rule.high):
        return False
    return True


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


_LIBRARIES = (os.path.dirname(__file__) + os.sep, os.path.dirname(torch.__file__) + os.sep)  # blockopt's, torch's


def caller_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function that points
    at the user's line: the first frame outside blockopt and torch, however many wrappers (torch's
    ``no_grad``, optimizer hooks, a subclass's ``step``) lie between."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    return level
