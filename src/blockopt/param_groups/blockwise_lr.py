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
from its own measurement instead: `blockopt.hessian.sharpness_ratios` turns a
`blockopt.hessian.block_sharpness` report into ``{block type: ratio}`` (``(S_sharpest / S_type) **
0.5``; on the demo Llama this reached AdamW's final loss in 0.68x its steps at 200 steps, where the
paper's table never did: benchmarks/studies/blockwise_lr). Ratios can also be chosen by probing: one
short run per block type with that type at 3x shows which types gain from a faster LR. On the demo
Llama, Adam-mini's probes led to ``{"embedding": 10, "head": 4, "qk": 2, "ffn": 1.5, "vo": 1,
"norm": 1}`` (the paper's QK : FFN : VO, with a faster embedding and the norms at VO's LR). At
`blockopt compare`'s 100 steps it reached AdamW's final loss in 0.30-0.35x its steps with AdamW and
0.35-0.40x with `AdamMini` on three seeds (benchmarks/studies/blockwise_lr/blockwise_lr_probes.py).

Block types come from the Plan (`Plan.block_type`: the spec's ``role``, what the partition engine
detected from the model's structure, never parameter names; the roles of each type and how a bias
is typed, Note [biases], are in `blockopt.partition.block_types`). The default ratio of each type:

=================  ============================================
block type         default ratio
=================  ============================================
``embedding``      10 (a tied embedding/output head counts here)
``qk``             8
``ffn``            6
``vo``             4
``norm``           1 (the base)
``head``           1 (the authors' scripts; 4 trained better on the demo Llama:
                   benchmarks/studies/blockwise_lr)
``pos_embedding``  1 (the authors' scripts)
``qkv``            ``min(qk, vo)``: see Note [fused qkv]
``router``         1
``bias``           1 (a bias without an owner, or every bias with ``bias="separate"``)
``conv``           1
``linear``         1
``other``          1
=================  ============================================

Note [fused qkv]: one tensor holds query, key and value rows, and a param group has one LR. QK
wants 8x, V only 4x; a V too fast is what destabilises training (it is the sharper part), a QK
too slow only trains it more slowly. So the fused tensor follows the smaller of the two ratios
(4x by default, and it follows ``ratios["qk"]``/``ratios["vo"]`` when you change those). Pass
``ratios={"qkv": ...}`` to choose another value.

Note [LR floor]: an LR scheduler multiplies each group's peak, so its floor (e.g. cosine to 0.1x)
is scaled by the group's ratio too. The authors use one absolute floor for every group
(``base / 20``). To reproduce that, give `torch.optim.lr_scheduler.LambdaLR` one function per
group, using the ``lr_ratio`` stored in each group, e.g.
``LambdaLR(opt, [lambda s, r=g["lr_ratio"]: max(f(s), floor / r) for g in groups])``, or
decay each group from its peak to ``floor / r`` of it (what ``blockopt.bench.train.train_run``'s
``shared_floor=True`` does). On the demo Llama at 200 steps the floor made no difference
(benchmarks/studies/blockwise_lr).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType

import torch
import torch.nn as nn

from ..partition import BLOCK_TYPES, ROLE_TO_TYPE, Plan, partition
from ..validation import check, real

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

_POSITIVE = real(0, low_open=True)


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
        check(f"ratios[{key!r}]", value, _POSITIVE)
    table = {**DEFAULT_RATIOS, **{k: float(v) for k, v in ratios.items()}}
    table.setdefault("qkv", min(table["qk"], table["vo"]))
    return table


def blockwise_lr(
    model_or_plan: nn.Module | Plan,
    lr: float,
    ratios: Mapping[str, float] | None = None,
    *,
    params: nn.Module | Iterable[tuple[str, torch.Tensor]] | None = None,
    weight_decay: float | None = None,
    bias: str = "owner",
) -> ParamGroups:
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
            biases form the ``bias`` type (Note [biases] in `blockopt.partition.block_types`).

    Returns:
        A list of dicts, one per non-empty block type (two with ``weight_decay``), in the order
        of `BLOCK_TYPES`, each with ``params``, ``param_names``, ``lr``, ``lr_ratio`` (the
        multiplier), ``block_type`` and, with ``weight_decay``, ``weight_decay``. Every
        trainable parameter is in exactly one group. The list (a `ParamGroups`) also holds the
        plan, which blockopt's optimizers take from it (so query and key keep their heads).

    Example::

        groups = blockopt.blockwise_lr(model, lr=6e-4, weight_decay=0.1)
        opt = torch.optim.AdamW(groups, betas=(0.9, 0.95))   # or blockopt.AdamMini(groups, ...)
    """
    check("lr", lr, real(0, low_open=True, tensor=True))
    check("weight_decay", weight_decay, real(0, optional=True))
    table = resolve_ratios(ratios)
    plan, named = _plan_and_tensors(model_or_plan, params)

    buckets: dict[tuple[str, bool], list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in named:
        decays = weight_decay is None or tensor.ndim >= 2
        buckets.setdefault((plan.block_type(name, bias=bias), decays), []).append((name, tensor))

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
    return ParamGroups(groups, plan)


class ParamGroups(list):
    """Param groups (a plain ``list`` of dicts, for any optimizer) that remember the `Plan` they
    were made from. blockopt's optimizers take that plan when given no ``plan=`` and no partition
    options: planned again from the names alone, a model's attention weights would lose the heads
    its structure showed (query and key split per neuron, with a warning)."""

    def __init__(self, groups: Iterable[dict], plan: Plan):
        super().__init__(groups)
        self.plan = plan


# ---- plumbing -------------------------------------------------------------------------------
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


__all__ = ["DEFAULT_RATIOS", "blockwise_lr", "resolve_ratios"]
