"""The optimizers `blockopt compare` can run, by name, and how each is built from hyperparameters.

A *peer* is a registered factory ``factory(model, hyperparameters) -> torch.optim.Optimizer`` plus
what it needs (pip packages) and which hyperparameters it reads::

    from blockopt.bench.peers import register_optimizer

    register_optimizer(
        "my-sgd",
        lambda model, hp: torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"]),
        shared=("lr",),                 # read from the comparison's common settings
        defaults={"momentum": 0.9},     # its own, overridable per run: --opt my-sgd:momentum=0.8
        description="torch.optim.SGD with momentum",
    )

Hyperparameters resolve in this order, later wins: the comparison's shared settings (``lr``,
``betas``, ``eps``, ``weight_decay``; a peer takes only those it names in ``shared``), the
peer's ``defaults``, then the overrides of one run (``"sgd-sai:lr=1e-2,momentum=0.8"``). An
override of a key the peer does not take is a `PeerError` that lists the keys it does take.

Besides the registered names, ``po:<name>`` is any optimizer of the ``pytorch-optimizer``
package (``po:adan``, ``po:soap``, ...), built with the shared settings its constructor accepts.

Note [weight decay groups]: AdamW decays every tensor by default, norm scales and biases
included; Adam-mini (and the official package) skip 1-D tensors. So that "same weight decay"
means the same thing for every peer, torch-style peers get two param groups: tensors with 2 or
more dims decay, 1-D ones do not (`decay_groups`).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import inspect
import io
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

import blockopt

OptimizerFactory = Callable[[nn.Module, Mapping[str, Any]], torch.optim.Optimizer]

# The settings every comparison has; a peer reads the ones it names in ``shared``.
SHARED_KEYS = ("lr", "betas", "eps", "weight_decay")
PYTORCH_OPTIMIZER_PREFIX = "po:"


class PeerError(ValueError):
    """An unknown optimizer name, a bad hyperparameter override, or a peer that failed to build."""


class PeerUnavailableError(PeerError):
    """The peer needs a package that is not installed (the message names the pip package)."""


def _distribution(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    if not match:
        raise ValueError(f"not a pip requirement: {requirement!r}")
    return match.group(0)


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


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

    @property
    def accepted_keys(self) -> tuple[str, ...]:
        keys = [*self.shared, *self.defaults, *self.extra_keys]
        return tuple(dict.fromkeys(keys))

    def missing(self) -> list[str]:
        """The requirements whose package is not installed."""
        return [req for req in self.requires if _installed_version(_distribution(req)) is None]

    @property
    def available(self) -> bool:
        return not self.missing()

    def versions(self) -> dict[str, str | None]:
        """Installed version of every required package (``None`` if missing)."""
        return {_distribution(req): _installed_version(_distribution(req)) for req in self.requires}

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


def register_optimizer(
    name: str,
    factory: OptimizerFactory,
    *,
    requires: str | Iterable[str] | None = None,
    description: str = "",
    shared: Iterable[str] = SHARED_KEYS,
    defaults: Mapping[str, Any] | None = None,
    extra_keys: Iterable[str] = (),
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
    peer = Peer(
        name=name, factory=factory, requires=requires, description=description, shared=shared,
        defaults=MappingProxyType(dict(defaults or {})), extra_keys=tuple(extra_keys),
    )
    _REGISTRY[name] = peer
    return peer


def unregister_optimizer(name: str) -> None:
    """Remove a registered peer (mainly for tests and plugins that replace one)."""
    _REGISTRY.pop(name, None)


def registered_optimizers() -> dict[str, Peer]:
    """Every registered peer by name (installed or not), in registration order."""
    return dict(_REGISTRY)


def get_peer(name: str) -> Peer:
    """The peer called ``name``: a registered one or ``po:<name>`` (pytorch-optimizer)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith(PYTORCH_OPTIMIZER_PREFIX):
        return _pytorch_optimizer_peer(name)
    raise PeerError(
        f"unknown optimizer {name!r}; registered: {', '.join(_REGISTRY)} "
        f"(and {PYTORCH_OPTIMIZER_PREFIX}<name> for any pytorch-optimizer optimizer)"
    )


# ---- run specs: "name:key=value,key=value" -------------------------------------------------
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


def _parse_value(text: str) -> Any:
    """A Python literal (``1e-3``, ``0.9,0.99``, ``(0.9, 0.99)``, ``True``, ``None``), else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        return text.strip()


def format_spec(name: str, overrides: Mapping[str, Any]) -> str:
    if not overrides:
        return name
    return name + ":" + ",".join(f"{key}={_format_value(value)}" for key, value in overrides.items())


def _format_value(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value)) if len(value) > 1 else f"({value[0]},)"
    return str(value)


def parse_optimizer_spec(text: str) -> OptimizerSpec:
    """Parse ``"NAME"`` or ``"NAME:key=value,key=value"`` (values are Python literals; a value with
    commas, ``betas=0.9,0.99``, is a tuple). The name must be known; keys are checked when the
    spec is resolved against the peer.

    Examples: ``"adamw"``, ``"sgd-sai:lr=1e-2,momentum=0.8"``, ``"lion:betas=0.9,0.99"``,
    ``"po:adan:lr=1e-3"``.
    """
    text = text.strip()
    name, overrides_text = text, ""
    if "=" in text:
        head = text[: text.index("=")]
        if ":" not in head:
            raise PeerError(f"bad optimizer spec {text!r}: write NAME:key=value[,key=value...]")
        cut = head.rindex(":")
        name, overrides_text = text[:cut], text[cut + 1 :]
    if not name:
        raise PeerError(f"bad optimizer spec {text!r}: the optimizer name is missing")
    overrides: dict[str, Any] = {}
    if overrides_text:
        # split at commas that start a new "key=" (a comma inside a value, as in betas=0.9,0.99, stays)
        for item in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", overrides_text):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key) or not value.strip():
                raise PeerError(f"bad override {item!r} in {text!r}: write key=value")
            if key in overrides:
                raise PeerError(f"{key!r} is given twice in {text!r}")
            overrides[key] = _parse_value(value)
    get_peer(name)  # an unknown name fails here, before any training
    return OptimizerSpec(name=name, overrides=overrides, label=text if overrides else name)


def as_spec(item: str | OptimizerSpec) -> OptimizerSpec:
    return item if isinstance(item, OptimizerSpec) else parse_optimizer_spec(item)


def build_optimizer(
    item: str | OptimizerSpec, model: nn.Module, shared: Mapping[str, Any] | None = None
) -> torch.optim.Optimizer:
    """Build the optimizer a spec names (``"adamw"``, ``"lion:lr=1e-4"``) for ``model``."""
    spec = as_spec(item)
    return spec.peer.build(model, spec.resolve(shared))


# ---- helpers for factories -----------------------------------------------------------------
def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two param groups: tensors with >= 2 dims decay, 1-D ones (norm scales, biases) do not
    (Note [weight decay groups])."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def attention_geometry(model: nn.Module) -> dict[str, int]:
    """``dim``, ``n_heads``, ``n_kv_heads`` of a bench model or a wrapped Hugging Face model (what
    the official Adam-mini needs to split query/key heads)."""
    config = getattr(model, "hf_config", None) or getattr(model, "config", None)
    if config is not None:
        dim = _first_attr(config, "dim", "hidden_size", "n_embd", "d_model")
        n_heads = _first_attr(config, "n_heads", "num_attention_heads", "n_head")
        n_kv_heads = _first_attr(config, "n_kv_heads", "num_key_value_heads") or n_heads
        if dim and n_heads:
            return {"dim": int(dim), "n_heads": int(n_heads), "n_kv_heads": int(n_kv_heads)}
    raise PeerError(
        f"cannot tell the attention geometry of {type(model).__name__}; "
        "pass it as overrides: dim=..., n_heads=..., n_kv_heads=..."
    )


def _first_attr(obj: object, *names: str):
    for name in names:
        value = getattr(obj, name, None)
        if value is not None:
            return value
    return None


def _betas(value) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise PeerError(f"betas must be a pair, e.g. betas=0.9,0.95; got {value!r}")
    return float(value[0]), float(value[1])


def _optional(hp: Mapping, *keys: str) -> dict:
    """The given keys of ``hp`` whose value is not None (so the constructor's default applies)."""
    return {key: hp[key] for key in keys if hp.get(key) is not None}


def _signature_keys(cls: type) -> list[str]:
    """Constructor keywords a run may override (not the parameters, not objects like a Plan)."""
    return [
        name
        for name, parameter in inspect.signature(cls.__init__).parameters.items()
        if name not in ("self", "params", "named_parameters", "model", "plan", "maximize")
        and parameter.kind in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
    ]


# ---- the built-in peers --------------------------------------------------------------------
def _adamw(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        decay_groups(model, hp["weight_decay"]), lr=hp["lr"], betas=_betas(hp["betas"]), eps=hp["eps"],
        **_optional(hp, "foreach", "fused"),
    )


def _adam_mini(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
    return blockopt.AdamMini(
        model, lr=hp["lr"], betas=_betas(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"],
        **_optional(hp, "implementation", "value", "decay_1d"),
    )


def _adam_mini_official(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
    from adam_mini import Adam_mini

    geometry = {key: hp[key] for key in ("dim", "n_heads", "n_kv_heads") if hp.get(key) is not None}
    if len(geometry) < 3:
        geometry = {**attention_geometry(model), **geometry}
    # Note [official adam-mini names]: the package picks a tensor's rule by substrings of its
    # name and assumes a matrix for names with "mlp", "embed", ... A 1-D norm scale named like
    # "layers.0.mlp_norm.weight" (the bench Llama) then crashes its step. Such tensors are meant
    # for its catch-all "norm" branch (one block), so they are passed under a name that reaches it.
    named = [
        (f"norm_{index}.weight" if p.ndim < 2 and "bias" not in name.lower() else name, p)
        for index, (name, p) in enumerate(model.named_parameters())
    ]
    return Adam_mini(
        named, lr=hp["lr"], betas=_betas(hp["betas"]), eps=hp["eps"],
        weight_decay=hp["weight_decay"], verbose=False, **geometry,
    )


def _adafactor(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(
        decay_groups(model, hp["weight_decay"]), lr=hp["lr"], **_optional(hp, "beta2_decay", "d", "eps"),
    )


def _sgd_sai(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
    from sgd_sai import SGD_sai

    optimizer = SGD_sai(
        decay_groups(model, hp["weight_decay"]), lr=hp["lr"], momentum=hp["momentum"], eps=hp["eps"],
    )

    # Note [sgd-sai resume]: the package computes each tensor's step size (gsnr) at its first step
    # unless a plain attribute `has_warmup` is set, which state_dict does not carry. A resumed run
    # would recompute gsnr from the next gradient; the restored state already holds it.
    def restore_warmup_flag(opt: torch.optim.Optimizer) -> None:
        opt.has_warmup = any("gsnr" in state for state in opt.state.values())

    optimizer.register_load_state_dict_post_hook(restore_warmup_flag)
    # Its first step prints a banner to stdout; keep the comparison's output clean.
    warmup_step = optimizer.warmup_step

    def quiet_warmup_step(closure=None):
        with contextlib.redirect_stdout(io.StringIO()):
            return warmup_step(closure)

    optimizer.warmup_step = quiet_warmup_step
    return optimizer


def _lion(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
    from pytorch_optimizer import Lion

    return Lion(decay_groups(model, hp["weight_decay"]), lr=hp["lr"], betas=_betas(hp["betas"]))


def _pytorch_optimizer_peer(name: str) -> Peer:
    """``po:<name>``: any optimizer of pytorch-optimizer, built with the shared settings it takes."""
    short = name[len(PYTORCH_OPTIMIZER_PREFIX) :]
    if _installed_version("pytorch-optimizer") is None:
        # Unknown until installed: a peer whose build says what to install.
        return Peer(name=name, factory=lambda m, hp: None, requires=("pytorch-optimizer",),
                    description=f"pytorch-optimizer's {short}", shared=SHARED_KEYS)
    import pytorch_optimizer

    try:
        cls = pytorch_optimizer.load_optimizer(short)
    except (NotImplementedError, ValueError, KeyError) as error:
        raise PeerError(
            f"pytorch-optimizer has no optimizer {short!r}; see pytorch_optimizer.get_supported_optimizers()"
        ) from error
    keys = _signature_keys(cls)
    parameters = inspect.signature(cls.__init__).parameters
    # Shared betas only where the optimizer takes a pair (Adan, e.g., takes three: override them).
    betas_default = parameters["betas"].default if "betas" in parameters else None
    takes_pair = isinstance(betas_default, (tuple, list)) and len(betas_default) == 2
    shared = tuple(key for key in SHARED_KEYS if key in keys and (key != "betas" or takes_pair))

    def factory(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
        params = decay_groups(model, hp["weight_decay"]) if "weight_decay" in keys else model.parameters()
        kwargs = {key: value for key, value in hp.items() if key != "weight_decay"}
        if "betas" in kwargs and isinstance(kwargs["betas"], list):
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(params, **kwargs)

    return Peer(
        name=name, factory=factory, requires=("pytorch-optimizer",), description=f"pytorch-optimizer's {cls.__name__}",
        shared=shared, extra_keys=tuple(key for key in keys if key not in shared),
    )


# Note [peer LR defaults]: Adafactor, SGD-SaI and Lion run on other LR scales than Adam's, so they
# keep their own default LR (it overrides the shared one). Each is the best of a short sweep on the
# demo Llama (40 steps of 8x128 tokens, seed 0, cosine, other settings as `blockopt compare`):
# adafactor 5e-2 of {1e-2, 5e-2}; sgd-sai 1e-2 of {1e-3, 1e-2, 3e-2}; lion 1e-3 of {1e-4, 4e-4,
# 1e-3, 2e-3}. sgd-sai-blockopt (blocks="plan"): 3e-1, from the full 100 steps of the default
# comparison (benchmarks/sgd_sai_sweep: 3e-2 6.38, 1e-1 6.37, 3e-1 6.15, 1 6.11, 3 7.45; one step
# below the best, which sits next to the blow-up). Sweep them for your own setting:
# "--opt lion:lr=3e-4 --opt lion:lr=1e-3".
register_optimizer(
    "adamw", _adamw,
    description="torch.optim.AdamW; weight decay on tensors with >= 2 dims only",
    defaults={"foreach": None, "fused": None},
)
register_optimizer(
    "adam-mini", _adam_mini,
    description="blockopt.AdamMini: one second moment per block of the detected partition",
    defaults={"implementation": "auto"}, extra_keys=("value", "decay_1d"),
)
register_optimizer(
    "adam-mini-official", _adam_mini_official, requires="adam-mini==1.1.1",
    description="the authors' Adam-mini 1.1.1 (blocks from parameter names; dim/n_heads from the model)",
    extra_keys=("dim", "n_heads", "n_kv_heads"),
)
register_optimizer(
    "adafactor", _adafactor,
    description="torch.optim.Adafactor (factored second moment; its lr scales the relative step)",
    shared=("lr", "weight_decay"), defaults={"lr": 5e-2}, extra_keys=("beta2_decay", "d", "eps"),
)
register_optimizer(
    "sgd-sai", _sgd_sai, requires="sgd-sai",
    description="SGD-SaI package (authors' code): momentum SGD, per-tensor step size fixed by the first gradient's SNR",
    shared=("lr", "eps", "weight_decay"), defaults={"lr": 1e-2, "momentum": 0.9},
)
register_optimizer(
    "lion", _lion, requires="pytorch-optimizer",
    description="Lion (pytorch-optimizer): sign of interpolated momentum; takes a smaller LR than AdamW",
    shared=("lr", "weight_decay"), defaults={"lr": 1e-3, "betas": (0.9, 0.99)},
)


# ---- blockopt's other optimizers (registered only once they exist) -------------------------
def _class_peer_factory(cls: type) -> OptimizerFactory:
    def factory(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
        kwargs = {key: value for key, value in hp.items() if value is not None}
        if "betas" in kwargs:
            kwargs["betas"] = _betas(kwargs["betas"])
        return cls(model, **kwargs)

    return factory


def _register_blockopt_extras() -> None:
    sgd_sai_cls = getattr(blockopt, "SGDSaI", None)
    if sgd_sai_cls is not None and "sgd-sai-blockopt" not in _REGISTRY:
        keys = _signature_keys(sgd_sai_cls)
        register_optimizer(
            "sgd-sai-blockopt", _class_peer_factory(sgd_sai_cls),
            description="blockopt.SGDSaI: SGD-SaI with blocks from the partition",
            shared=tuple(k for k in ("lr", "eps", "weight_decay") if k in keys),
            # blocks from the Plan (its point over the package); 1-D tensors not decayed, as for
            # every peer (Note [weight decay groups])
            defaults={k: v for k, v in (("lr", 3e-1), ("blocks", "plan"), ("decay_1d", False)) if k in keys},
            extra_keys=tuple(k for k in keys if k not in ("lr", "eps", "weight_decay")),
        )
    adapm_cls = getattr(blockopt, "AdaPM", None)
    if adapm_cls is not None and "adapm" not in _REGISTRY:
        keys = _signature_keys(adapm_cls)
        register_optimizer(
            "adapm", _class_peer_factory(adapm_cls),
            description="blockopt.AdaPM: partial (low-rank / none / full) momentum + blockwise second moment",
            shared=tuple(k for k in SHARED_KEYS if k in keys),
            extra_keys=tuple(k for k in keys if k not in SHARED_KEYS),
        )
    blockwise_lr = getattr(blockopt, "blockwise_lr", None)
    if blockwise_lr is not None and "adamw-blockwise-lr" not in _REGISTRY:

        def adamw_blockwise(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
            groups = blockwise_lr(model, lr=hp["lr"], ratios=hp.get("ratios"), weight_decay=hp["weight_decay"])
            return torch.optim.AdamW(groups, lr=hp["lr"], betas=_betas(hp["betas"]), eps=hp["eps"])

        def adam_mini_blockwise(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
            # The plan of the whole model, so heads are detected from structure (param groups
            # alone carry names, not the attention geometry).
            plan = blockopt.partition(model)
            groups = blockwise_lr(plan, lr=hp["lr"], ratios=hp.get("ratios"), params=model)
            return blockopt.AdamMini(
                groups, lr=hp["lr"], betas=_betas(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"], plan=plan,
            )

        register_optimizer(
            "adamw-blockwise-lr", adamw_blockwise,
            description="AdamW with blockopt.blockwise_lr groups (per block type LR: Emb 10x, QK 8x, FFN 6x, VO 4x)",
            defaults={"ratios": None},
        )
        register_optimizer(
            "adam-mini-blockwise-lr", adam_mini_blockwise,
            description="Adam-mini with blockopt.blockwise_lr groups (per block type LR)",
            defaults={"ratios": None},
        )


_register_blockopt_extras()
