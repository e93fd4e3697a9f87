"""The built-in peers: AdamW, Adam-mini (blockopt's and the authors'), Adafactor, SGD-SaI, Lion,
low-bit AdamW (torchao's 8-bit, 4-bit and fp8, bitsandbytes' 8-bit), blockopt's other optimizers, and ``po:<name>`` for any optimizer of ``pytorch-optimizer``.

Note [weight decay groups]: AdamW decays every tensor by default, norm scales and biases
included; Adam-mini (and the official package) skip 1-D tensors. So that "same weight decay"
means the same thing for every peer, torch-style peers get two param groups: tensors with 2 or
more dims decay, 1-D ones do not (`decay_groups`; `adamw` is AdamW built that way).
"""

from __future__ import annotations

import contextlib
import inspect
import io
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import blockopt
from blockopt.param_groups import blockwise_lr
from blockopt.validation import check, pair, real

from .registry import (
    SHARED_KEYS, OptimizerFactory, Peer, PeerError, installed_version, register_family, register_optimizer,
    rules_from_defaults,
)

PYTORCH_OPTIMIZER_PREFIX = "po:"


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


def param_groups(model: nn.Module, hp: Mapping) -> list[dict]:
    """A torch-style peer's param groups: `decay_groups`, or, when the run sets ``ratios`` (a
    blockwise-LR table: ``{block type: multiplier}``, `blockopt.param_groups.DEFAULT_RATIOS` for
    the types it leaves out), one group per block type with ``lr * ratio`` (`blockwise_lr`),
    split the same way for weight decay. So any peer can run with the same per-block LRs."""
    if hp.get("ratios") is None:
        return decay_groups(model, hp["weight_decay"])
    return blockwise_lr(model, lr=hp["lr"], ratios=hp["ratios"], weight_decay=hp["weight_decay"])


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
    check("betas", value, pair(real()))
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
def adamw(
    model: nn.Module, *, lr: float, betas: tuple[float, float], eps: float, weight_decay: float, **options: Any
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with weight decay on tensors with >= 2 dims only, as Adam-mini
    decays (Note [weight decay groups]); ``options`` (``foreach``, ``fused``) go to AdamW."""
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, **options)


def _adamw(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, hp), lr=hp["lr"], betas=_betas(hp["betas"]), eps=hp["eps"], **_optional(hp, "foreach", "fused"),
    )


def _adam_mini(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
    return blockopt.AdamMini(
        model, lr=hp["lr"], betas=_betas(hp["betas"]), eps=hp["eps"], weight_decay=hp["weight_decay"],
        **_optional(hp, "implementation", "value", "decay_1d", "momentum_dtype", "seed"),
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
        param_groups(model, hp), lr=hp["lr"], **_optional(hp, "beta2_decay", "d", "eps"),
    )


def _sgd_sai(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
    from sgd_sai import SGD_sai

    optimizer = SGD_sai(
        param_groups(model, hp), lr=hp["lr"], momentum=hp["momentum"], eps=hp["eps"],
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

    return Lion(param_groups(model, hp), lr=hp["lr"], betas=_betas(hp["betas"]))


def _torchao(class_name: str) -> OptimizerFactory:
    """torchao's low-bit AdamW (state kept as tensor subclasses holding codes and scales; torchao
    compiles its per-tensor step with torch.compile on first use, a one-time cost)."""

    def factory(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
        import torchao.optim

        cls = getattr(torchao.optim, class_name)
        return cls(param_groups(model, hp), lr=hp["lr"], betas=_betas(hp["betas"]), eps=hp["eps"],
                   **_optional(hp, "block_size"))

    return factory


def _adamw_8bit_bnb(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
    import bitsandbytes

    return bitsandbytes.optim.AdamW8bit(
        param_groups(model, hp), lr=hp["lr"], betas=_betas(hp["betas"]), eps=hp["eps"],
        **_optional(hp, "min_8bit_size", "block_wise"),
    )


def pytorch_optimizer_peer(name: str) -> Peer:
    """``po:<name>``: any optimizer of pytorch-optimizer, built with the shared settings it takes."""
    short = name[len(PYTORCH_OPTIMIZER_PREFIX) :]
    if installed_version("pytorch-optimizer") is None:
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
        rules=rules_from_defaults({key: parameters[key].default for key in keys}),
    )


# Note [peer LR defaults]: Adafactor, SGD-SaI and Lion run on other LR scales than Adam's, so they
# keep their own default LR (it overrides the shared one). Each is the best of a short sweep on the
# demo Llama (40 steps of 8x128 tokens, seed 0, cosine, other settings as `blockopt compare`):
# adafactor 5e-2 of {1e-2, 5e-2}; sgd-sai 1e-2 of {1e-3, 1e-2, 3e-2}; lion 1e-3 of {1e-4, 4e-4,
# 1e-3, 2e-3}. sgd-sai-blockopt (blocks="plan"): 3e-1, from the full 100 steps of the default
# comparison (benchmarks/studies/sgd_sai/results/options: 3e-2 6.38, 1e-1 6.37, 3e-1 6.15, 1 6.11, 3 7.45; one step
# below the best, which sits next to the blow-up). Sweep them for your own setting:
# "--opt lion:lr=3e-4 --opt lion:lr=1e-3".
register_optimizer(
    "adamw", _adamw,
    description="torch.optim.AdamW; weight decay on tensors with >= 2 dims only",
    defaults={"foreach": None, "fused": None}, extra_keys=("ratios",),
)
register_optimizer(
    "adam-mini", _adam_mini,
    description="blockopt.AdamMini: one second moment per block of the detected partition",
    defaults={"implementation": "auto"}, extra_keys=("value", "decay_1d", "momentum_dtype", "seed"),
    rules=blockopt.AdamMini.HYPERPARAMETERS,
)
register_optimizer(
    "adam-mini-official", _adam_mini_official, requires="adam-mini==1.1.1",
    description="the authors' Adam-mini 1.1.1 (blocks from parameter names; dim/n_heads from the model)",
    extra_keys=("dim", "n_heads", "n_kv_heads"),
)
register_optimizer(
    "adafactor", _adafactor,
    description="torch.optim.Adafactor (factored second moment; its lr scales the relative step)",
    shared=("lr", "weight_decay"), defaults={"lr": 5e-2}, extra_keys=("beta2_decay", "d", "eps", "ratios"),
)
register_optimizer(
    "sgd-sai", _sgd_sai, requires="sgd-sai",
    description="SGD-SaI package (authors' code): momentum SGD, per-tensor step size fixed by the first gradient's SNR",
    shared=("lr", "eps", "weight_decay"), defaults={"lr": 1e-2, "momentum": 0.9}, extra_keys=("ratios",),
)
register_optimizer(
    "lion", _lion, requires="pytorch-optimizer",
    description="Lion (pytorch-optimizer): sign of interpolated momentum; takes a smaller LR than AdamW",
    shared=("lr", "weight_decay"), defaults={"lr": 1e-3, "betas": (0.9, 0.99)}, extra_keys=("ratios",),
)

# Low-bit state (issue #31's peers). torchao keeps tensors under 4096 elements in float32 and
# quantizes the rest in blocks (256 elements for 8 bit / fp8, 128 for 4 bit); bitsandbytes keeps
# tensors under `min_8bit_size` (4096) in float32. Both run on the CPU.
for _name, _class, _bits in (("adamw-8bit-torchao", "AdamW8bit", "8-bit"), ("adamw-4bit-torchao", "AdamW4bit", "4-bit"),
                             ("adamw-fp8-torchao", "AdamWFp8", "float8")):
    register_optimizer(
        _name, _torchao(_class), requires="torchao",
        description=f"torchao's {_class}: AdamW with both moments in {_bits} blocks (a torch.compile'd step)",
        extra_keys=("block_size", "ratios"),
    )
register_optimizer(
    "adamw-8bit-bnb", _adamw_8bit_bnb, requires="bitsandbytes",
    description="bitsandbytes' AdamW8bit: both moments in blockwise dynamic 8-bit codes",
    extra_keys=("min_8bit_size", "block_wise", "ratios"),
)


# ---- blockopt's other optimizers --------------------------------------------------------------
def _class_peer_factory(cls: type) -> OptimizerFactory:
    def factory(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
        kwargs = {key: value for key, value in hp.items() if value is not None}
        if "betas" in kwargs:
            kwargs["betas"] = _betas(kwargs["betas"])
        return cls(model, **kwargs)

    return factory


def _adamw_blockwise(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
    return _adamw(model, {**hp, "ratios": hp.get("ratios") or {}})  # (no ratios: the default table)


_PARTITION_KEYS = ("n_heads", "n_kv_heads", "head_dim", "dim", "rules", "value", "conv")


def _blockwise_peer_factory(cls: type) -> OptimizerFactory:
    """``cls`` (a blockopt optimizer) on `blockwise_lr` groups: one LR per block type, every other
    option the class's own. The plan is of the whole model, so heads are detected from structure
    (param groups alone carry names, not the attention geometry); partition options build it."""

    def factory(model: nn.Module, hp: Mapping) -> torch.optim.Optimizer:
        kwargs = {key: value for key, value in hp.items() if value is not None}
        ratios = kwargs.pop("ratios", None)
        if "betas" in kwargs:
            kwargs["betas"] = _betas(kwargs["betas"])
        plan = blockopt.partition(model, **{key: kwargs.pop(key) for key in _PARTITION_KEYS if key in kwargs})
        groups = blockwise_lr(plan, lr=kwargs["lr"], ratios=ratios, params=model)
        return cls(groups, plan=plan, **kwargs)

    return factory


_sgd_sai_keys = _signature_keys(blockopt.SGDSaI)
register_optimizer(
    "sgd-sai-blockopt", _class_peer_factory(blockopt.SGDSaI),
    description="blockopt.SGDSaI: SGD-SaI with blocks from the partition",
    shared=tuple(k for k in ("lr", "eps", "weight_decay") if k in _sgd_sai_keys),
    # blocks from the Plan (its point over the package); 1-D tensors not decayed, as for every
    # peer (Note [weight decay groups])
    defaults={k: v for k, v in (("lr", 3e-1), ("blocks", "plan"), ("decay_1d", False)) if k in _sgd_sai_keys},
    extra_keys=tuple(k for k in _sgd_sai_keys if k not in ("lr", "eps", "weight_decay")),
    rules=blockopt.SGDSaI.HYPERPARAMETERS,
)
_adapm_keys = _signature_keys(blockopt.AdaPM)
register_optimizer(
    "adapm", _class_peer_factory(blockopt.AdaPM),
    description="blockopt.AdaPM: partial (low-rank / none / full) momentum + blockwise second moment",
    shared=tuple(k for k in SHARED_KEYS if k in _adapm_keys),
    extra_keys=tuple(k for k in _adapm_keys if k not in SHARED_KEYS), rules=blockopt.AdaPM.HYPERPARAMETERS,
)
register_optimizer(
    "adamw-blockwise-lr", _adamw_blockwise,
    description="AdamW with blockopt.blockwise_lr groups (per block type LR: Emb 10x, QK 8x, FFN 6x, VO 4x)",
    defaults={"ratios": None},
)
for _name, _cls in (("adam-mini-blockwise-lr", blockopt.AdamMini), ("adapm-blockwise-lr", blockopt.AdaPM)):
    _keys = _signature_keys(_cls)
    register_optimizer(
        _name, _blockwise_peer_factory(_cls),
        description=f"{_cls.__name__} with blockopt.blockwise_lr groups (per block type LR; "
                    f"its other options as {_name.removesuffix('-blockwise-lr')}'s)",
        shared=tuple(k for k in SHARED_KEYS if k in _keys),
        defaults={"ratios": None},
        extra_keys=tuple(k for k in _keys if k not in SHARED_KEYS and k not in ("verbose", "model_sharding")),
        rules=_cls.HYPERPARAMETERS,
    )
register_family(PYTORCH_OPTIMIZER_PREFIX, pytorch_optimizer_peer, "any pytorch-optimizer optimizer")
