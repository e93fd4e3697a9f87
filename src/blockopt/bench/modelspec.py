"""Which model a comparison trains: a built-in config or a Hugging Face config, plus overrides.

    ModelSpec.parse("demo")                                   # the in-house Llama of `blockopt demo`
    ModelSpec.parse("gpt2-tiny", {"n_layers": 3})             # built-in config, one field changed
    ModelSpec.parse("hf:gpt2", {"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 2048})
    ModelSpec.parse("hf:llama", {...})                        # any transformers model_type
    ModelSpec.parse("path/to/config.json")                    # an HF config file (or its folder)

Hugging Face models are built with ``AutoModelForCausalLM.from_config`` (nothing is downloaded)
and wrapped in `CausalLM`, which gives them the bench interface ``(idx, targets) -> (logits,
loss)``. Every model is initialized from the run's seed alone.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .models import CONFIGS, ModelConfig, build_model, config_dict

HF_PREFIX = "hf:"
# Token ids a config may carry that must lie inside the (possibly shrunk) vocabulary.
_TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class ModelSpecError(ValueError):
    """An unknown model name, a bad override, or a missing config file."""


class CausalLM(nn.Module):
    """A Hugging Face causal LM with the bench interface: ``forward(idx, targets) -> (logits, loss)``.

    ``targets`` are already shifted (``targets[:, t]`` follows ``idx[:, t]``), so the loss is a
    plain cross-entropy, computed in float32 like the in-house models'. The HF model stays a
    submodule (``self.model``), so the partition engine sees its structure.
    """

    NAME_PREFIX = "model."  # what the wrapper adds to the HF model's parameter names

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def hf_config(self):
        return self.model.config

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.model(input_ids=idx, use_cache=False).logits
        if targets is None:
            return logits, None
        loss_dtype = torch.promote_types(logits.dtype, torch.float32)
        return logits, F.cross_entropy(logits.flatten(0, 1).to(loss_dtype), targets.flatten())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def parse_overrides(items: str | Iterable[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``"n_layer=2,n_embd=64"`` (or several such strings, or a dict) as a dict of Python values."""
    from .peers.spec import parse_assignments  # one value syntax for the whole command line

    if items is None:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    if isinstance(items, str):
        items = [items]
    overrides: dict[str, Any] = {}
    for text in items:
        for key, value in parse_assignments(text, lambda item, fix: ModelSpecError(f"bad model override {item!r}: {fix}")):
            if key in overrides:
                raise ModelSpecError(f"model override {key!r} is given twice ({key}={overrides[key]!r}, {key}={value!r})")
            overrides[key] = value
    return overrides


@dataclass(frozen=True)
class ModelSpec:
    """A model to build per seed: ``spec(seed)`` (or ``spec.build(seed)``) returns a fresh model."""

    source: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    family: str = "bench"  # "bench" (in-house) or "hf"
    config: Any = field(default=None, compare=False, repr=False)  # ModelConfig or transformers config

    @classmethod
    def parse(cls, source: str, overrides: Mapping[str, Any] | None = None) -> ModelSpec:
        overrides = dict(overrides or {})
        if source in CONFIGS:
            base = CONFIGS[source]
            fields = {f.name for f in dataclasses.fields(base)}
            unknown = sorted(set(overrides) - fields)
            if unknown:
                raise ModelSpecError(
                    f"model {source!r} has no field {', '.join(map(repr, unknown))}; its fields: {', '.join(sorted(fields))}"
                )
            config = _replace_config(base, overrides) if overrides else base
            return cls(source=source, overrides=MappingProxyType(overrides), family="bench", config=config)
        name = source[len(HF_PREFIX) :] if source.startswith(HF_PREFIX) else None
        path = Path(name if name is not None else source).expanduser()
        if name is not None or path.suffix == ".json" or (path.is_dir() and (path / "config.json").is_file()):
            config = _hf_config(source, name if name is not None else source, overrides)
            return cls(source=source, overrides=MappingProxyType(overrides), family="hf", config=config)
        raise ModelSpecError(
            f"unknown model {source!r}; built-in: {', '.join(CONFIGS)}; or hf:<name> "
            "(hf:gpt2, hf:llama, any transformers model_type) or a Hugging Face config.json path"
        )

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def max_seq_len(self) -> int | None:
        if self.family == "bench":
            return self.config.max_seq_len
        for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
            value = getattr(self.config, key, None)
            if isinstance(value, int):
                return value
        return None

    def build(self, seed: int = 0, *, device: str | torch.device | None = None) -> nn.Module:
        """A freshly initialized model; the weights depend on ``seed`` alone."""
        if self.family == "bench":
            if device is not None and torch.device(device).type == "meta":
                with torch.device("meta"):
                    return build_model(self.config, seed=seed)
            return build_model(self.config, seed=seed)
        from ..hf import model_from_config

        # HF initializes from the global RNG: fork it, so the caller's stream is left alone.
        with torch.random.fork_rng(devices=[]), torch.device(device) if device is not None else nullcontext():
            torch.manual_seed(seed)
            return CausalLM(model_from_config(self.config, source=self.source, require_lm_head=True))

    __call__ = build

    def n_params(self) -> int:
        """Parameter count, from a model on the meta device (no memory, no init)."""
        model = self.build(0, device="meta")
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def describe(self) -> dict:
        """JSON-ready: where the model came from, the overrides, and the config (HF: its
        non-default fields)."""
        if self.family == "bench":
            config = config_dict(self.config)
        else:
            config = {"model_type": self.config.model_type, **self.config.to_diff_dict()}
        return json.loads(json.dumps(
            {"source": self.source, "family": self.family, "overrides": dict(self.overrides), "config": config},
            default=str,
        ))


def _replace_config(base: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """``base`` with ``overrides``; fields ``base`` derived from others (``mlp_hidden`` from
    ``dim``, ``n_kv_heads`` from ``n_heads``) are derived again unless overridden."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    for derived in ("mlp_hidden", "n_kv_heads"):
        if derived in values and derived not in overrides:
            if getattr(type(base)(**{**values, derived: None}), derived) == values[derived]:
                values[derived] = None
    for key, value in overrides.items():  # (a str where a number belongs fails deep inside the config)
        now = values.get(key)
        if isinstance(now, (int, float)) and not isinstance(now, bool) and isinstance(value, (str, bool)):
            raise ModelSpecError(f"bad model override {key}={value!r}: {key} is a number (now {now})")
    try:
        return type(base)(**{**values, **overrides})
    except (TypeError, ValueError) as error:
        raise ModelSpecError(f"bad model override: {error}") from error


def _hf_config(source: str, name_or_path: str, overrides: Mapping[str, Any]):
    """A transformers config (`blockopt.hf.config_fields`: a named shape, a model_type's defaults
    or a config.json), then the overrides; every failure a `ModelSpecError` naming ``source``."""
    from .. import hf

    try:
        fields = hf.config_fields(name_or_path, model_types=True)
        defaults = hf.config_from_fields(fields, source=source)
    except (ImportError, FileNotFoundError, ValueError) as error:
        raise ModelSpecError(str(error)) from error
    unknown = sorted(key for key in overrides if not hasattr(defaults, key))
    if unknown:
        raise ModelSpecError(f"the {defaults.model_type} config has no field {', '.join(map(repr, unknown))}")
    fields.update(overrides)
    # A shrunk vocabulary would leave the config's special token ids (e.g. GPT-2's 50256) outside
    # it; they only matter for generation, so drop them rather than carry invalid ids.
    vocab_size = fields.get("vocab_size", defaults.vocab_size)
    for key in _TOKEN_ID_KEYS:
        value = fields.get(key, getattr(defaults, key, None))
        if isinstance(value, int) and value >= vocab_size:
            fields[key] = None
    try:
        overridden = f" (overriding {', '.join(overrides)})" if overrides else ""
        return hf.config_from_fields(fields, source=source + overridden)
    except ValueError as error:
        raise ModelSpecError(str(error)) from error


def as_model_spec(model: str | ModelSpec | ModelConfig, overrides: Mapping[str, Any] | None = None) -> ModelSpec:
    """A `ModelSpec` from a name/path (+ overrides), a spec, or an in-house config object."""
    if isinstance(model, ModelSpec):
        if overrides:
            return ModelSpec.parse(model.source, {**model.overrides, **overrides})
        return model
    if isinstance(model, str):
        return ModelSpec.parse(model, overrides)
    if dataclasses.is_dataclass(model):
        config = _replace_config(model, overrides) if overrides else model
        return ModelSpec(source=type(model).__name__, overrides=MappingProxyType(dict(overrides or {})), family="bench", config=config)
    raise TypeError(f"model must be a name, a config.json path, a ModelSpec or a bench config, got {type(model).__name__}")
