"""The settings of a comparison, with their defaults (light: importing this needs no bench extras).

The defaults are the default ``blockopt compare`` run: the ``"demo"`` Llama trained with AdamW and
with Adam-mini, three seeds, and the training loop and hyperparameters of ``blockopt demo``
(`TrainConfig`'s defaults, LR 2e-3): six runs of about 50 s each on an idle 2-core CPU
(benchmarks/studies/compare).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from ..validation import check, integer, pair, real, validate
from .corpus import DEFAULT_MAX_BYTES
from .loop import TrainConfig
from .peers import OptimizerSpec, as_spec

DEMO_CONFIG = "demo"  # the built-in model of `blockopt demo` and of the default comparison
DEFAULT_LR = 2e-3  # the demo's peak learning rate, shared by every optimizer
DEFAULT_OPTIMIZERS = ("adamw", "adam-mini")
DEFAULT_SEEDS = (0, 1, 2)
LOOP_FIELDS = tuple(f.name for f in fields(TrainConfig))


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Everything that decides a comparison's numbers (see `blockopt.bench.compare`).

    ``loop`` is the training loop every run shares (`TrainConfig`); ``lr``, ``betas``, ``eps``
    and ``weight_decay`` are the hyperparameters shared by every optimizer that reads them.
    ``baseline`` (``None``: the first optimizer) is the one the others are compared with;
    ``checkpoint_every`` (``None``: the loop's eval interval) how often runs checkpoint.
    `replace` and `compare` also take the loop's fields directly (``steps=10``).
    """

    optimizers: tuple[str | OptimizerSpec, ...] = DEFAULT_OPTIMIZERS
    model: str = DEMO_CONFIG
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    corpus: str | None = None
    max_bytes: int | None = DEFAULT_MAX_BYTES
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    loop: TrainConfig = field(default_factory=TrainConfig)
    lr: float = DEFAULT_LR
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    baseline: str | None = None
    device: str = "cpu"
    checkpoint_every: int | None = None

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        if isinstance(self.optimizers, (str, OptimizerSpec)):
            set_("optimizers", (self.optimizers,))
        specs = tuple(as_spec(item) for item in self.optimizers)
        if not specs:
            raise ValueError("optimizers must name at least one optimizer")
        labels = [spec.label for spec in specs]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"optimizer {', '.join(duplicates)} is listed twice; give each run different overrides")
        seen: dict = {}
        for spec in specs:  # (one run under two spellings: 'adamw:lr=1e-3' and 'adamw:lr=0.001')
            key = (spec.name, tuple(sorted((k, repr(v)) for k, v in spec.overrides.items())))
            if key in seen:
                raise ValueError(f"optimizers {seen[key]!r} and {spec.label!r} are the same run (same name and "
                                 "overrides); list it once")
            seen[key] = spec.label
        set_("optimizers", tuple(self.optimizers))
        set_("_specs", specs)
        set_("model_overrides", MappingProxyType(dict(self.model_overrides)))
        if isinstance(self.seeds, int):
            set_("seeds", (self.seeds,))
        set_("seeds", tuple(int(seed) for seed in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        bad = [seed for seed in self.seeds if not 0 <= seed < 2**32]
        if bad:  # a run's seed is also its optimizers' own (their `seed` option: 32 bits), checked before any run
            raise ValueError(f"seeds must be in [0, 2**32), got {bad}")
        if not isinstance(self.loop, TrainConfig):
            raise TypeError(f"loop must be a TrainConfig, got {type(self.loop).__name__}")
        validate(_RULES, {name: getattr(self, name) for name in _RULES})
        set_("betas", tuple(float(b) for b in self.betas))
        if self.baseline is not None and self.baseline not in labels:
            raise ValueError(f"baseline {self.baseline!r} is not one of the optimizers: {', '.join(labels)}")

    @property
    def specs(self) -> tuple[OptimizerSpec, ...]:
        return self._specs

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(spec.label for spec in self._specs)

    @property
    def baseline_label(self) -> str:
        return self.baseline or self.labels[0]

    @property
    def shared_hyperparameters(self) -> dict[str, Any]:
        return {"lr": self.lr, "betas": self.betas, "eps": self.eps, "weight_decay": self.weight_decay}

    def to_dict(self) -> dict:
        """The settings as given, flat: the loop's fields beside the others (what `replace` takes)."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "loop"}
        data["optimizers"] = list(self.labels)
        data["model_overrides"] = dict(self.model_overrides)
        data["seeds"] = list(self.seeds)
        data["betas"] = list(self.betas)
        return {**data, **self.loop.to_dict()}

    def replace(self, **changes) -> CompareConfig:
        """A copy with ``changes``: any field, or any field of the loop (``steps=10``)."""
        unknown = sorted(set(changes) - set(self.__dataclass_fields__) - set(LOOP_FIELDS))
        if unknown:
            raise TypeError(f"unknown compare setting {', '.join(map(repr, unknown))}")
        loop_changes = {name: changes.pop(name) for name in LOOP_FIELDS if name in changes}
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(changes)
        if loop_changes:
            values["loop"] = values["loop"].replace(**loop_changes)
        return CompareConfig(**values)


_RULES = {
    "max_bytes": integer(1, optional=True),
    "lr": real(0, low_open=True),
    "betas": pair(real(0, 1, high_open=True)),
    "eps": real(0),
    "weight_decay": real(0),
    "checkpoint_every": integer(1, optional=True),
}


def config_from(config: CompareConfig | None, overrides: Mapping[str, Any]) -> CompareConfig:
    """``config`` (default settings if ``None``) with keyword overrides applied."""
    config = config or CompareConfig()
    return config.replace(**overrides) if overrides else config


def seeds_from(count: int, first: int = 0) -> Sequence[int]:
    """``count`` consecutive seeds from ``first``."""
    check("the number of seeds", count, integer(1))
    return tuple(range(first, first + count))
