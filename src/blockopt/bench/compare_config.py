"""The settings of a comparison, with their defaults (light: importing this needs no bench extras).

The defaults are the default ``blockopt compare`` run: the ``"demo"`` Llama trained with AdamW and
with Adam-mini, three seeds, 100 steps of 32 x 128 tokens, at the hyperparameters of
``blockopt demo``: six runs of about 50 s each on an idle 2-core CPU (benchmarks/compare.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .corpus import DEFAULT_MAX_BYTES
from .peers import OptimizerSpec, as_spec
from .schedules import SCHEDULES

DEFAULT_OPTIMIZERS = ("adamw", "adam-mini")
DEFAULT_MODEL = "demo"
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_STEPS = 100
DEFAULT_SEQ_LEN = 128  # capped at the model's max_seq_len


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Everything that decides a comparison's numbers (see `blockopt.bench.compare`).

    ``None`` means "derived": ``seq_len`` = min(128, the model's max_seq_len), ``warmup_steps`` =
    20% of ``steps``, ``eval_every`` = a tenth of the run, ``baseline`` = the first optimizer,
    ``checkpoint_every`` = ``eval_every``.
    """

    optimizers: tuple[str | OptimizerSpec, ...] = DEFAULT_OPTIMIZERS
    model: str = DEFAULT_MODEL
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    corpus: str | None = None
    max_bytes: int | None = DEFAULT_MAX_BYTES
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    steps: int = DEFAULT_STEPS
    batch_size: int = 32
    seq_len: int | None = None
    lr: float = 2e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    schedule: str = "cosine"
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    grad_clip: float | None = 1.0
    eval_every: int | None = None
    eval_batches: int = 4
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
        set_("optimizers", tuple(self.optimizers))
        set_("_specs", specs)
        set_("model_overrides", MappingProxyType(dict(self.model_overrides)))
        if isinstance(self.seeds, int):
            set_("seeds", (self.seeds,))
        set_("seeds", tuple(int(seed) for seed in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and at least one, got {list(self.seeds)}")
        for name in ("steps", "batch_size", "eval_batches"):
            _check_positive_int(name, getattr(self, name))
        for name in ("seq_len", "eval_every", "checkpoint_every", "max_bytes"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise ValueError(f"warmup_steps must be a non-negative int, got {self.warmup_steps!r}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        set_("betas", tuple(float(b) for b in self.betas))
        if self.eps < 0 or self.weight_decay < 0:
            raise ValueError(f"eps and weight_decay must be >= 0, got {self.eps}, {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0.0 <= self.min_lr_ratio <= 1.0 or not 0.0 <= self.decay_fraction <= 1.0:
            raise ValueError(
                f"min_lr_ratio and decay_fraction must be in [0, 1], got {self.min_lr_ratio}, {self.decay_fraction}"
            )
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 or None: off), got {self.grad_clip}")
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

    @property
    def resolved_warmup_steps(self) -> int:
        return max(1, self.steps // 5) if self.warmup_steps is None else self.warmup_steps

    @property
    def resolved_eval_every(self) -> int:
        return max(1, self.steps // 10) if self.eval_every is None else self.eval_every

    @property
    def resolved_checkpoint_every(self) -> int:
        return self.checkpoint_every or self.resolved_eval_every

    def to_dict(self) -> dict:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["optimizers"] = list(self.labels)
        data["model_overrides"] = dict(self.model_overrides)
        data["seeds"] = list(self.seeds)
        data["betas"] = list(self.betas)
        return data

    def replace(self, **changes) -> CompareConfig:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        return CompareConfig(**{**values, **changes})


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def config_from(config: CompareConfig | None, overrides: Mapping[str, Any]) -> CompareConfig:
    """``config`` (default settings if ``None``) with keyword overrides applied."""
    config = config or CompareConfig()
    unknown = sorted(set(overrides) - set(CompareConfig.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown compare setting {', '.join(map(repr, unknown))}")
    return config.replace(**overrides) if overrides else config


def seeds_from(count: int, first: int = 0) -> Sequence[int]:
    """``count`` consecutive seeds from ``first``."""
    _check_positive_int("the number of seeds", count)
    return tuple(range(first, first + count))
