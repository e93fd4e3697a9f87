"""Turning what a user passes to an optimizer into named param groups and a `Plan`.

Accepted: an ``nn.Module`` (its Plan is detected from its structure, every parameter included:
Note [frozen parameters]), ``named_parameters()``,
plain parameters (named ``param.<i>``; blocks then come from shapes only, with a warning), or
param groups (dicts whose ``params`` are tensors or ``(name, tensor)`` pairs, or that carry
``param_names``; a list of groups with a ``plan`` attribute, as `blockopt.blockwise_lr` returns, gives
its plan). Every group leaves with ``params`` and ``param_names`` of equal length, every
name unique, every parameter once, and every parameter covered by a spec of the right shape.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

from ..partition import Plan, collapse_names, partition
from ..partition.engine import PartitionWarning
from ..validation import caller_stacklevel


def named_groups(params, plan: Plan | None, partition_options: dict, owner: str) -> tuple[list[dict], Plan, bool]:
    """``(groups, plan, unnamed)`` for an optimizer called ``owner`` (used in warnings);
    ``unnamed``: the parameters came without names (then every group's did, as torch requires)."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors, named tensors or dicts, or an nn.Module; got a single Tensor")
    if isinstance(params, nn.Module):
        # Note [frozen parameters]: as torch.optim's model.parameters(), the module form holds every
        # parameter, frozen ones too, planned from the structure like the rest: one unfrozen later
        # (freeze-then-unfreeze fine-tuning) trains with its own blocks. A frozen one has no grad,
        # so it takes no step and keeps no state.
        if plan is not None and partition_options:
            raise ValueError(
                f"{owner} got plan= and partition options ({', '.join(sorted(partition_options))}): the plan fixes every "
                "block, so the options would be ignored. Build the plan with them: "
                f"plan=blockopt.partition(model, frozen=True, {', '.join(f'{k}=...' for k in sorted(partition_options))})"
            )
        plan = plan if plan is not None else partition(params, frozen=True, **partition_options)
        tensors = dict(params.named_parameters())
        missing = [n for n in plan if n not in tensors]
        if missing:
            raise ValueError(f"plan has parameters the model lacks ({missing[:3]}...): build the plan from this model")
        unplanned = [n for n in tensors if n not in plan]
        if unplanned:  # (the module form holds every parameter: one left out would never train)
            raise ValueError(
                f"plan lacks {len(unplanned)} of the model's parameters ({', '.join(collapse_names(unplanned)[:3])}"
                f"{', ...' if len(unplanned) > 3 else ''}), which {owner} would then never step. A plan of the "
                "trainable parameters leaves frozen ones out: build it with blockopt.partition(model, frozen=True), "
                "or pass only the parameters to train (model.named_parameters() filtered) with plan="
            )
        names = list(plan)
        check_real([(n, tensors[n]) for n in names], owner)
        return [{"params": [tensors[n] for n in names], "param_names": names}], plan, False

    # groups that carry the plan of the model they came from (`blockopt.blockwise_lr`): it gives
    # their tensors' blocks; tensors it lacks (a group added to the list) are planned from names
    carried = getattr(params, "plan", None) if plan is None and not partition_options else None
    carried = carried if isinstance(carried, Plan) else None
    items = list(params)
    if not items:
        raise ValueError("optimizer got an empty parameter list: pass model.parameters(), model.named_parameters() or the model")
    raw_groups = items if isinstance(items[0], Mapping) else [{"params": items}]
    if any(not isinstance(g, Mapping) for g in raw_groups):
        raise TypeError("param groups must all be dicts, or none of them")
    groups, counter = [], itertools.count()
    for i, g in enumerate(raw_groups):
        if "params" not in g:
            raise ValueError(f"param group {i} has no 'params' key")
        groups.append(name_group(dict(g), counter, where=f"param group {i}"))
    check_unique(groups)

    pairs = [(n, p) for g in groups for n, p in zip(g["param_names"], g["params"])]
    check_real(pairs, owner)
    unnamed = check_naming([g.pop("_unnamed", False) for g in groups if g["params"]])  # (an empty group is either)
    if plan is None:
        unplanned = [(n, p) for n, p in pairs if carried is None or n not in carried]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PartitionWarning)
            plan = partition(all_trainable(unplanned), **partition_options) if unplanned else carried or Plan([])
        if unplanned and carried is not None:
            plan = carried.merged(plan)
        if unnamed:
            warnings.warn(
                f"{owner} got parameters without names, so blocks come from shapes only "
                "(matrices per row, vectors per coordinate). Pass the model, or model.named_parameters(), "
                "so blocks follow its structure (heads, embeddings, norms); in transformers' Trainer: "
                "optimizers=(blockopt.hf.create_optimizer(model, args), None) (docs/integrations.md).",
                PartitionWarning, stacklevel=caller_stacklevel(),
            )
        else:
            for w in caught:
                warnings.warn(w.message, w.category, stacklevel=caller_stacklevel())
    for n, p in pairs:
        check_spec(plan, n, p)
    return groups, plan, unnamed


def check_naming(unnamed_groups: list[bool]) -> bool:
    """Named or unnamed, all groups alike (torch.optim refuses a mix too); returns "unnamed"."""
    if any(unnamed_groups) and not all(unnamed_groups):
        raise ValueError(
            "param groups mix named and unnamed parameters: name all of them (model.named_parameters(), "
            "(name, tensor) pairs or 'param_names' in each group) or none, as torch.optim requires"
        )
    return bool(unnamed_groups) and unnamed_groups[0]


def name_group(group: dict, counter, where: str) -> dict:
    """Normalise one group to ``params`` (tensors) + ``param_names`` (str), naming unnamed ones
    (and marking the group ``_unnamed``)."""
    ps = group["params"]
    ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
    if not ps:  # (as torch.optim: a no-decay group of a model without biases or norms)
        group.update(params=[], param_names=[])
        return group
    tensors, names, kinds = [], [], set()
    given = group.get("param_names")
    if given is not None and len(given) != len(ps):
        raise ValueError(f"{where}: param_names has {len(given)} names for {len(ps)} parameters")
    for j, item in enumerate(ps):
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            name, t = item
            kinds.add("named")
        elif isinstance(item, torch.Tensor):
            kinds.add("plain")
            name, t = (given[j] if given is not None else None), item
        else:
            hint = " (a dict of named parameters? pass its .items())" if isinstance(item, str) else ""
            raise TypeError(f"{where}: expected tensors or (name, tensor) pairs, got {type(item).__name__}{hint}")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: parameter {name or j} is a {type(t).__name__}, not a Tensor")
        if not t.is_leaf:
            raise ValueError(f"{where}: can't optimize a non-leaf Tensor ({name or j})")
        if name is None:
            name = f"param.{next(counter)}"
            group["_unnamed"] = True
        tensors.append(t)
        names.append(name)
    if len(kinds) > 1 and given is None:
        raise ValueError(
            f"{where} mixes (name, tensor) pairs and bare tensors: pass all of them named (model.named_parameters()) "
            "or none of them, as torch.optim requires"
        )
    group["params"], group["param_names"] = tensors, names
    return group


def check_unique(groups: list[dict], existing: Iterable[dict] = ()) -> None:
    """Every parameter once and every name once, across ``groups`` and the ``existing`` ones."""
    where: dict[int, str] = {}
    names: set[str] = set()
    for g in existing:
        for n, p in zip(g["param_names"], g["params"]):
            where[id(p)] = n
            names.add(n)
    for g in groups:
        for n, p in zip(g["param_names"], g["params"]):
            if id(p) in where:
                raise ValueError(f"parameter {n!r} is given twice (also as {where[id(p)]!r}); pass each parameter once")
            if n in names:
                raise ValueError(f"two different parameters are both named {n!r}; parameter names must be unique")
            where[id(p)] = n
            names.add(n)


def check_real(pairs, owner: str) -> None:
    """Complex parameters are refused: a block's second moment is the mean of ``|g|^2`` over real
    coordinates, and silently squaring complex gradients would diverge (docs/contract.md)."""
    for name, p in pairs:
        if p.is_complex():
            raise TypeError(
                f"{owner} does not support complex parameters ({name!r} is {p.dtype}): keep its real and imaginary "
                "parts as two real parameters (torch.view_as_real), or optimize it with torch.optim.AdamW"
            )


def check_spec(plan: Plan, name: str, p: torch.Tensor) -> None:
    if name not in plan:
        raise ValueError(f"parameter {name!r} is not in the plan: build the plan from the same model (blockopt.partition(model))")
    spec = plan[name]
    if tuple(spec.shape) != tuple(p.shape):
        raise ValueError(f"plan says {name!r} has shape {spec.shape} but the parameter has {tuple(p.shape)}: the plan is for another model")


def all_trainable(pairs):
    """Named tensors for `partition`, frozen ones included: the user passed them explicitly (they
    may be unfrozen later), so each needs a spec. A shape-only meta tensor stands in for them."""
    return [(n, p if p.requires_grad else torch.empty(p.shape, device="meta", requires_grad=True)) for n, p in pairs]
