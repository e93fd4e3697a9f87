"""The optimizer registry: a *peer* is a named factory ``factory(model, hyperparameters) ->
torch.optim.Optimizer`` plus the pip packages it needs and the hyperparameters it reads.

Hyperparameters resolve in this order, later wins: the comparison's shared settings (``lr``,
``betas``, ``eps``, ``weight_decay``; a peer takes only those it names in ``shared``), the
peer's ``defaults``, then the overrides of one run. An override of a key the peer does not take
is a `PeerError` that lists the keys it does take; one of the wrong kind (``lr=abc``) is a
`PeerError` in `blockopt.validation`'s words, where the peer's ``rules`` know the key: the shared
settings' types, those the defaults show (a float, a bool, a pair of floats), and any the peer
registered.

Besides registered names, a *family* resolves names with a prefix on demand (``po:<name>``, any
optimizer of the ``pytorch-optimizer`` package, is one: `register_family`).
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ...validation import Rule, boolean, check, pair, real


OptimizerFactory = Callable[[nn.Module, Mapping[str, Any]], torch.optim.Optimizer]

# The settings every comparison has; a peer reads the ones it names in ``shared``.
SHARED_KEYS = ("lr", "betas", "eps", "weight_decay")
# Their kinds, whatever the optimizer (its own ranges it checks itself).
SHARED_RULES = {"lr": real(), "betas": pair(real()), "eps": real(), "weight_decay": real()}


class PeerError(ValueError):
    """An unknown optimizer name, a bad hyperparameter override, or a peer that failed to build."""


class PeerUnavailableError(PeerError):
    """The peer needs a package that is not installed (the message names the pip package)."""


def _distribution(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    if not match:
        raise ValueError(f"not a pip requirement: {requirement!r}")
    return match.group(0)


@dataclass(frozen=True)
class Peer:
    """A registered optimizer. Build it with `Peer.build`; see the module docstring."""

    name: str
    factory: OptimizerFactory = field(repr=False)
    requires: tuple[str, ...] = ()  # pip requirements, e.g. ("adam-mini==1.1.1",)
    description: str = ""
    shared: tuple[str, ...] = SHARED_KEYS
    defaults: Mapping[str, Any] = field(default_factory=dict)
    extra_keys: tuple[str, ...] = ()  # more override keys, without a default (the factory's own)
    rules: Mapping[str, Rule] = field(default_factory=dict)  # what an override may be, by key (`check_values`)

    @property
    def accepted_keys(self) -> tuple[str, ...]:
        keys = [*self.shared, *self.defaults, *self.extra_keys]
        return tuple(dict.fromkeys(keys))

    def check_values(self, overrides: Mapping[str, Any], spec: str | None = None) -> None:
        """Raise `PeerError` for an override that breaks its rule (keys without one pass);
        ``spec``, the text the overrides came from, is named in the message."""
        for key, value in overrides.items():
            rule = self.rules.get(key) or (SHARED_RULES[key] if key in self.shared else None)
            if rule is None:
                continue
            try:
                check(key, value, rule)
            except (TypeError, ValueError) as error:
                raise PeerError(f"bad override in {spec or self.name!r}: {error}") from None

    def missing(self) -> list[str]:
        """The requirements whose package is not installed."""
        return [req for req in self.requires if installed_version(_distribution(req)) is None]

    @property
    def available(self) -> bool:
        return not self.missing()

    def versions(self) -> dict[str, str | None]:
        """Installed version of every required package (``None`` if missing)."""
        return {_distribution(req): installed_version(_distribution(req)) for req in self.requires}

    def check_available(self) -> None:
        missing = self.missing()
        if missing:
            install = " ".join(f"'{req}'" if any(c in req for c in "<>=!~") else req for req in missing)
            raise PeerUnavailableError(
                f"optimizer {self.name!r} needs the package {', '.join(map(_distribution, missing))}, "
                f"which is not installed; install it with: pip install {install}"
            )

    def resolve(self, shared: Mapping[str, Any] | None = None, overrides: Mapping[str, Any] | None = None) -> dict:
        """The hyperparameters this peer is built with: shared settings it reads < its defaults
        < ``overrides``. An override key it does not take is a `PeerError`."""
        overrides = dict(overrides or {})
        unknown = [key for key in overrides if key not in self.accepted_keys]
        if unknown:
            raise PeerError(
                f"optimizer {self.name!r} takes no hyperparameter {', '.join(map(repr, unknown))}; "
                f"it takes: {', '.join(self.accepted_keys) or 'none'}"
            )
        self.check_values(overrides)
        shared = dict(shared or {})
        resolved = {key: shared[key] for key in self.shared if key in shared}
        return {**resolved, **self.defaults, **overrides}

    def build(self, model: nn.Module, hyperparameters: Mapping[str, Any]) -> torch.optim.Optimizer:
        """The optimizer for ``model`` (errors from the factory are re-raised naming this peer)."""
        self.check_available()
        try:
            optimizer = self.factory(model, dict(hyperparameters))
        except PeerError:
            raise
        except (ValueError, TypeError, RuntimeError, KeyError) as error:
            raise PeerError(f"optimizer {self.name!r} could not be built with {dict(hyperparameters)}: {error}") from error
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise PeerError(f"the factory of {self.name!r} returned {type(optimizer).__name__}, not a torch optimizer")
        return optimizer


_REGISTRY: dict[str, Peer] = {}
_FAMILIES: dict[str, tuple[Callable[[str], Peer], str]] = {}  # name prefix -> (resolve, what it names)


def register_optimizer(
    name: str,
    factory: OptimizerFactory,
    *,
    requires: str | Iterable[str] | None = None,
    description: str = "",
    shared: Iterable[str] = SHARED_KEYS,
    defaults: Mapping[str, Any] | None = None,
    extra_keys: Iterable[str] = (),
    rules: Mapping[str, Rule] | None = None,
    replace: bool = False,
) -> Peer:
    """Make ``name`` available to `blockopt compare` (``--opt NAME``) and `blockopt.bench.compare`.

    Args:
        name: the peer's name (lowercase letters, digits, ``-``, ``_``, ``.``).
        factory: ``factory(model, hyperparameters) -> optimizer``; ``hyperparameters`` is a dict
            holding exactly the resolved keys (see `Peer.resolve`).
        requires: pip requirement(s) the factory imports, e.g. ``"adam-mini==1.1.1"``; while one
            is missing, building the peer raises `PeerUnavailableError` naming it.
        description: one line for ``blockopt compare --list-optimizers`` and the JSON.
        shared: the comparison-wide settings the factory reads (a subset of `SHARED_KEYS`).
        defaults: the peer's own hyperparameters with their defaults (they also override shared
            settings of the same name, e.g. a peer whose LR scale differs from Adam's).
        extra_keys: more keys an override may set that have no default (the factory must treat
            them as optional).
        rules: what an override of a key may be (`blockopt.validation` rules), checked when a
            spec is parsed; by default the kinds the ``defaults`` show (`rules_from_defaults`).
        replace: allow re-registering an existing name.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise ValueError(f"optimizer names are lowercase letters, digits, '-', '_' and '.', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"optimizer {name!r} is already registered (pass replace=True to replace it)")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    shared = tuple(shared)
    unknown_shared = [key for key in shared if key not in SHARED_KEYS]
    if unknown_shared:
        raise ValueError(f"shared keys must be among {SHARED_KEYS}, got {unknown_shared}")
    requires = (requires,) if isinstance(requires, str) else tuple(requires or ())
    for requirement in requires:
        _distribution(requirement)  # validates the spelling
    defaults = dict(defaults or {})
    peer = Peer(
        name=name, factory=factory, requires=requires, description=description, shared=shared,
        defaults=MappingProxyType(defaults), extra_keys=tuple(extra_keys),
        rules=MappingProxyType({**rules_from_defaults(defaults), **(rules or {})}),
    )
    _REGISTRY[name] = peer
    return peer


def rules_from_defaults(defaults: Mapping[str, Any]) -> dict[str, Rule]:
    """The kind of each default that shows one: a float is a number, a bool True or False, a
    pair of floats a pair of numbers (ints, strings and None say too little)."""
    rules = {}
    for key, value in defaults.items():
        if isinstance(value, bool):
            rules[key] = boolean()
        elif isinstance(value, float):
            rules[key] = real()
        elif isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, float) for v in value):
            rules[key] = pair(real())
    return rules


def unregister_optimizer(name: str) -> None:
    """Remove a registered peer (mainly for tests and plugins that replace one)."""
    _REGISTRY.pop(name, None)


def registered_optimizers() -> dict[str, Peer]:
    """Every registered peer by name (installed or not), in registration order."""
    return dict(_REGISTRY)


def register_family(prefix: str, resolve: Callable[[str], Peer], description: str) -> None:
    """Resolve every name that starts with ``prefix`` (e.g. ``"po:"``) with ``resolve(name)``,
    which returns its `Peer` or raises `PeerError`: for optimizers too many to register one by
    one. ``description`` completes "<prefix><name> for ..." in error messages."""
    _FAMILIES[prefix] = (resolve, description)


def get_peer(name: str) -> Peer:
    """The peer called ``name``: a registered one or one of a family (``po:<name>``)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    for prefix, (resolve, _) in _FAMILIES.items():
        if name.startswith(prefix):
            return resolve(name)
    families = "".join(f" (and {prefix}<name> for {what})" for prefix, (_, what) in _FAMILIES.items())
    raise PeerError(f"unknown optimizer {name!r}; registered: {', '.join(_REGISTRY)}{families}")


def installed_version(distribution: str) -> str | None:
    """The installed version of a pip distribution, ``None`` if it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
