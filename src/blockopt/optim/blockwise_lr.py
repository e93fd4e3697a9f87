r"""Blockwise learning rates (Wang et al. 2025, "The Sharpness Disparity Principle in Transformers").

The sharpness of a Transformer's blocks, averaged by block type, is ordered
``Emb << QK < FFN < VO << Norm``, early in training and throughout it. Blockwise LR scales each
type's peak learning rate by the inverse of that ordering, so flat types move faster while the
sharp ones keep the base LR that stability allows:

.. math::
    \eta_\mathrm{Norm} = \eta, \quad \eta_\mathrm{VO} = 4\eta, \quad \eta_\mathrm{FFN} = 6\eta,
    \quad \eta_\mathrm{QK} = 8\eta, \quad \eta_\mathrm{Emb} = 10\eta

`blockwise_lr` turns a model (or a `Plan` and the model's tensors) into torch param groups, one
per block type, each with its own ``lr``. Any optimizer that takes param groups takes them
(``torch.optim.AdamW``, `blockopt.AdamMini`), and an LR scheduler scales each group's own peak,
so the ratios hold over the whole schedule (warm-up and decay alike).

The paper's table rests on its ordering. A model whose own ordering differs can take ratios
from its own measurement instead: `sharpness_ratios` turns a `blockopt.hessian.block_sharpness`
report into ``{block type: ratio}`` (``(S_sharpest / S_type) ** 0.5``; on the demo Llama this
reached AdamW's final loss in 0.68x its steps at 200 steps, where the paper's table never did:
benchmarks/blockwise_lr.md). Ratios can also be chosen by probing: one short run per block type
with that type at 3x shows which types gain from a faster LR. On the demo Llama, Adam-mini's
probes led to ``{"embedding": 10, "head": 4, "qk": 2, "ffn": 1.5, "vo": 1, "norm": 1}`` (the
paper's QK : FFN : VO, with a faster embedding and the norms at VO's LR). At `blockopt compare`'s
100 steps it reached AdamW's final loss in 0.30-0.35x its steps with AdamW and 0.35-0.40x with
`AdamMini` on three seeds (benchmarks/blockwise_lr_probes.py).

Block types come from the Plan's ``spec.role`` (what the partition engine detected from the
model's structure), never from parameter names:

=================  ===========================  ============================================
block type         roles                        default ratio
=================  ===========================  ============================================
``embedding``      embedding                    10 (a tied embedding/output head counts here)
``qk``             query, key                   8
``ffn``            ffn                          6
``vo``             value, attn_out              4
``norm``           norm                         1 (the base)
``head``           head (untied output head)    1 (the authors' scripts; 4 trained better on
                                                the demo Llama: benchmarks/blockwise_lr.md)
``pos_embedding``  pos_embedding                1 (the authors' scripts)
``qkv``            qkv (fused projections)      ``min(qk, vo)``: see Note [fused qkv]
``router``         router (MoE gate)            1
``bias``           bias without an owner        1: see Note [biases]
``conv``           conv                         1
``linear``         linear                       1
``other``          other                        1
=================  ===========================  ============================================

Note [fused qkv]: one tensor holds query, key and value rows, and a param group has one LR. QK
wants 8x, V only 4x; a V too fast is what destabilises training (it is the sharper part), a QK
too slow only trains it more slowly. So the fused tensor follows the smaller of the two ratios
(4x by default, and it follows ``ratios["qk"]``/``ratios["vo"]`` when you change those). Pass
``ratios={"qkv": ...}`` to choose another value.

Note [biases]: the authors' scripts group a bias with its layer (an MLP bias trains at the FFN's
LR, a LayerNorm bias at the norm's). With ``bias="owner"`` (the default) a bias takes the block
type of the one other parameter registered on the same module (``fc.bias`` -> ``fc.weight``'s
role); a bias with no such owner (none, or several candidates) is of type ``bias``. With
``bias="separate"`` every bias is of type ``bias``.

Note [LR floor]: an LR scheduler multiplies each group's peak, so its floor (e.g. cosine to 0.1x)
is scaled by the group's ratio too. The authors use one absolute floor for every group
(``base / 20``). To reproduce that, give `torch.optim.lr_scheduler.LambdaLR` one function per
group, using the ``lr_ratio`` stored in each group, e.g.
``LambdaLR(opt, [lambda s, r=g["lr_ratio"]: max(f(s), floor / r) for g in groups])``, or
decay each group from its peak to ``floor / r`` of it (what ``blockopt.bench.train.train_run``'s
``shared_floor=True`` does). On the demo Llama at 200 steps the floor made no difference
(benchmarks/blockwise_lr.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..partition import BlockSpec, Plan, partition

if TYPE_CHECKING:
    from ..hessian import SharpnessReport

# Block types in the order their groups are emitted.
BLOCK_TYPES = (
    "embedding", "pos_embedding", "head", "qk", "vo", "qkv", "ffn", "router", "norm", "bias", "conv", "linear", "other",
)

# Plan role -> block type. Every role of `ROLES` is listed (a test checks it).
ROLE_TO_TYPE = MappingProxyType({
    "embedding": "embedding",
    "pos_embedding": "pos_embedding",
    "head": "head",
    "query": "qk",
    "key": "qk",
    "value": "vo",
    "attn_out": "vo",
    "qkv": "qkv",
    "ffn": "ffn",
    "router": "router",
    "norm": "norm",
    "bias": "bias",
    "conv": "conv",
    "linear": "linear",
    "other": "other",
})

# The paper's tuned multipliers (Norm is the base). ``qkv`` is absent on purpose: it follows
# min(qk, vo) unless given (Note [fused qkv]).
DEFAULT_RATIOS = MappingProxyType({
    "embedding": 10.0,
    "qk": 8.0,
    "ffn": 6.0,
    "vo": 4.0,
    "norm": 1.0,
    "head": 1.0,
    "pos_embedding": 1.0,
    "router": 1.0,
    "bias": 1.0,
    "conv": 1.0,
    "linear": 1.0,
    "other": 1.0,
})

BIAS_OPTIONS = ("owner", "separate")


def resolve_ratios(ratios: Mapping[str, float] | None = None) -> dict[str, float]:
    """The full ratio table: `DEFAULT_RATIOS` updated with ``ratios`` (validated), ``qkv`` filled in."""
    if ratios is None:
        ratios = {}
    if not isinstance(ratios, Mapping):
        raise TypeError(f"ratios must be a mapping {{block type: multiplier}}, got {type(ratios).__name__}")
    unknown = [k for k in ratios if k not in BLOCK_TYPES]
    if unknown:
        hints = [f"{k!r} is a role: use {ROLE_TO_TYPE[k]!r}" for k in unknown if k in ROLE_TO_TYPE and ROLE_TO_TYPE[k] != k]
        raise ValueError(
            f"unknown block type(s) {unknown} in ratios; block types are {list(BLOCK_TYPES)}"
            + (f" ({'; '.join(hints)})" if hints else "")
        )
    for key, value in ratios.items():
        _check_positive(f"ratios[{key!r}]", value)
    table = {**DEFAULT_RATIOS, **{k: float(v) for k, v in ratios.items()}}
    table.setdefault("qkv", min(table["qk"], table["vo"]))
    return table


def sharpness_ratios(
    sharpness: Mapping[str, float] | SharpnessReport,
    *,
    measure: str = "gauss_newton",
    power: float = 0.5,
    max_ratio: float = 10.0,
) -> dict[str, float]:
    """LR ratios from measured sharpness: ``(S_sharpest / S_type) ** power``, between 1 and
    ``max_ratio``, so that the sharpest type trains at the base LR and flatter ones faster.

    The paper's ratios rest on its ordering (Emb << QK < FFN < VO << Norm). Where a model's own
    ordering differs (on the demo Llama the embedding is among the sharpest and the norms in the
    middle: benchmarks/blockwise_lr.md), ratios from its own measurement follow the principle
    where the paper's table does not.

    Args:
        sharpness: a `blockopt.hessian.SharpnessReport` (from `block_sharpness`), or a mapping
            ``{block type: average sharpness}``.
        measure (str): with a report, which of its measures to use (default ``"gauss_newton"``,
            Tr(G_bb)/m_b, which is positive; a Hessian trace can be negative early on).
        power (float): 0.5 (default) scales the LR with the inverse square root of sharpness,
            1 with its inverse. 0.5 trained best on the demo Llama (benchmarks/blockwise_lr.md).
        max_ratio (float): the largest multiplier handed out (default 10, the paper's largest).

    Returns:
        ``{block type: ratio}`` for every block type of `BLOCK_TYPES` except ``qkv`` (which then
        follows ``min(qk, vo)``, Note [fused qkv], unless it was measured itself): measured types
        get their ratio, the others the base (1). Pass it as ``blockwise_lr(..., ratios=...)``.
    """
    if hasattr(sharpness, "values_of"):
        sharpness = sharpness.values_of(measure)
    if not isinstance(sharpness, Mapping) or not sharpness:
        raise ValueError("sharpness must be a non-empty mapping {block type: sharpness} or a SharpnessReport")
    _check_positive("power", power)
    _check_positive("max_ratio", max_ratio)
    if max_ratio < 1:
        raise ValueError(f"max_ratio must be >= 1 (the sharpest type trains at the base LR), got {max_ratio}")
    values = {k: _number(f"sharpness[{k!r}]", v) for k, v in sharpness.items()}
    unknown = [k for k in values if k not in BLOCK_TYPES]
    if unknown:
        raise ValueError(f"unknown block type(s) {unknown} in sharpness; block types are {list(BLOCK_TYPES)}")
    bad = {k: v for k, v in values.items() if not v > 0}
    if bad:
        raise ValueError(f"sharpness must be positive to set LR ratios, got {bad}; measure 'gauss_newton' is "
                         "(a Hessian trace can be negative early in training)")
    sharpest = max(values.values())
    ratios = {t: 1.0 for t in BLOCK_TYPES if t != "qkv"}
    ratios.update({k: min(max_ratio, (sharpest / v) ** power) for k, v in values.items()})
    return ratios


def block_types(plan: Plan, *, bias: str = "owner") -> dict[str, str]:
    """Parameter name (canonical, as in the plan) -> block type, from each spec's ``role``.

    ``bias="owner"`` gives a bias the type of the other parameter on its module (Note [biases]).
    """
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a blockopt.Plan, got {type(plan).__name__}")
    if bias not in BIAS_OPTIONS:
        raise ValueError(f"bias must be one of {BIAS_OPTIONS}, got {bias!r}")
    owners: dict[str, list[BlockSpec]] = {}
    if bias == "owner":
        for spec in plan.values():
            if spec.role != "bias":
                owners.setdefault(_module_path(spec.name), []).append(spec)
    out = {}
    for name, spec in plan.items():
        role = spec.role
        if role == "bias" and bias == "owner":
            candidates = owners.get(_module_path(name), [])
            if len(candidates) == 1:
                role = candidates[0].role
        out[name] = ROLE_TO_TYPE.get(role, "other")
    return out


def blockwise_lr(
    model_or_plan: nn.Module | Plan,
    lr: float,
    ratios: Mapping[str, float] | None = None,
    *,
    params: nn.Module | Iterable[tuple[str, torch.Tensor]] | None = None,
    weight_decay: float | None = None,
    bias: str = "owner",
) -> list[dict]:
    """Param groups with one learning rate per block type (sharpness-disparity multipliers).

    Args:
        model_or_plan: an ``nn.Module`` (partitioned with `blockopt.partition`), or a `Plan` you
            built (e.g. with ``n_heads=`` or ``rules=``); a plan holds no tensors, so then pass
            the tensors as ``params``.
        lr (float): the base (peak) LR: the norm's. Each group gets ``lr * ratio``.
        ratios (dict): ``{block type: multiplier}`` overriding `DEFAULT_RATIOS` for the types
            given (see the module docstring for the types and defaults). An unknown type is a
            ValueError naming it.
        params: with a plan, the model or its ``named_parameters()``; they must be the plan's
            tensors (same names and shapes). Not allowed with a model.
        weight_decay (float): if given, each type is split into a group of tensors with 2 or
            more dims (``"weight_decay": weight_decay``) and one of 1-D tensors (norm scales,
            biases: ``"weight_decay": 0.0``), the usual AdamW recipe. If ``None`` (default) the
            groups carry no ``weight_decay`` and the optimizer's own applies (note that
            `AdamMini` skips 1-D tensors by itself, ``torch.optim.AdamW`` does not).
        bias (str): ``"owner"`` (default): a bias trains at its layer's LR; ``"separate"``: all
            biases form the ``bias`` type (Note [biases]).

    Returns:
        A list of dicts, one per non-empty block type (two with ``weight_decay``), in the order
        of `BLOCK_TYPES`, each with ``params``, ``param_names``, ``lr``, ``lr_ratio`` (the
        multiplier), ``block_type`` and, with ``weight_decay``, ``weight_decay``. Every
        trainable parameter is in exactly one group.

    Example::

        groups = blockopt.blockwise_lr(model, lr=6e-4, weight_decay=0.1)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))   # or blockopt.AdamMini(groups, ...)
    """
    _check_positive("lr", lr)
    if weight_decay is not None:
        _check_nonnegative("weight_decay", weight_decay)
    table = resolve_ratios(ratios)
    plan, named = _plan_and_tensors(model_or_plan, params)
    types = block_types(plan, bias=bias)

    buckets: dict[tuple[str, bool], list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named:
        decays = weight_decay is None or tensor.ndim >= 2
        buckets.setdefault((types[plan[name].name], decays), []).append((name, tensor))

    groups = []
    for block_type in BLOCK_TYPES:
        for decays in (True, False):
            members = buckets.get((block_type, decays))
            if not members:
                continue
            group = {
                "params": [t for _, t in members],
                "param_names": [n for n, _ in members],
                "lr": lr * table[block_type],
                "lr_ratio": table[block_type],
                "block_type": block_type,
            }
            if weight_decay is not None:
                group["weight_decay"] = float(weight_decay) if decays else 0.0
            groups.append(group)
    return groups


# ---- plumbing -------------------------------------------------------------------------------
def _module_path(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _plan_and_tensors(model_or_plan, params) -> tuple[Plan, list[tuple[str, torch.Tensor]]]:
    """The plan and the named tensors to group, checked against each other."""
    if isinstance(model_or_plan, nn.Module):
        if params is not None:
            raise TypeError(
                "params= is only for a Plan (which holds no tensors); with a model, the model's own "
                "parameters are used"
            )
        plan = partition(model_or_plan)
        return plan, _named_trainable(model_or_plan.named_parameters(), plan)
    if isinstance(model_or_plan, Plan):
        if params is None:
            raise TypeError(
                "a Plan holds no tensors: pass them too, e.g. blockwise_lr(plan, lr, params=model) "
                "or params=model.named_parameters()"
            )
        named = params.named_parameters() if isinstance(params, nn.Module) else params
        if isinstance(named, torch.Tensor):
            raise TypeError("params must be the model or its named_parameters(), got a single Tensor")
        return model_or_plan, _named_trainable(named, model_or_plan)
    raise TypeError(
        f"blockwise_lr takes an nn.Module or a blockopt.Plan, got {type(model_or_plan).__name__}"
        + (" (pass the model itself, or a Plan plus params=, not a parameter list)" if isinstance(model_or_plan, Iterable) else "")
    )


def _named_trainable(named, plan: Plan) -> list[tuple[str, torch.Tensor]]:
    out, seen_ids, covered = [], {}, set()
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], torch.Tensor)):
            raise TypeError(f"expected (name, tensor) pairs such as model.named_parameters(), got {type(item).__name__}")
        name, tensor = item
        if id(tensor) in seen_ids:
            raise ValueError(f"parameter {name!r} is given twice (also as {seen_ids[id(tensor)]!r}); pass each parameter once")
        seen_ids[id(tensor)] = name
        if name not in plan:
            if tensor.requires_grad:
                raise ValueError(
                    f"parameter {name!r} is not in the plan: build the plan from the same model (blockopt.partition(model))"
                )
            continue  # frozen and not planned: nothing to train
        spec = plan[name]
        if tuple(spec.shape) != tuple(tensor.shape):
            raise ValueError(
                f"plan says {name!r} has shape {spec.shape} but the parameter has {tuple(tensor.shape)}: the plan is for another model"
            )
        if spec.name in covered:
            raise ValueError(f"parameter {name!r} is given twice (it is an alias of {spec.name!r}); pass each parameter once")
        covered.add(spec.name)
        out.append((name, tensor))
    missing = [n for n in plan if n not in covered]
    if missing:
        raise ValueError(
            f"the plan has parameters that were not given ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): "
            "pass all of the model's parameters, or partition only the ones you train"
        )
    if not out:
        raise ValueError("no trainable parameters to group")
    return out


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_positive(name: str, value) -> None:
    if _number(name, value) <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_nonnegative(name: str, value) -> None:
    if _number(name, value) < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


__all__ = ["BLOCK_TYPES", "DEFAULT_RATIOS", "ROLE_TO_TYPE", "block_types", "blockwise_lr", "resolve_ratios"]
