"""Reading a state dict into a blockwise optimizer: which saved entry is which parameter, and
whether it fits, decided before anything is applied.

Note [which saved entry is which parameter]: torch matches a state dict to the optimizer by
position. Names are better where both sides have the same ones (a reordered param group still
loads right), but the same parameters often carry other names: ``AdamMini(model)`` names them,
``AdamMini(model.parameters())`` calls them ``param.<i>``, and ``torch.compile`` or a DDP/FSDP
wrapper adds ``_orig_mod.`` / ``module.`` prefixes. So within each param group: by name when the
saved names are exactly this group's names in another order, by position otherwise; a state dict
whose names are this optimizer's but split into groups otherwise is refused. What decides
whether an entry fits is its content: every key the optimizer keeps, with the shape this
optimizer's plan gives it. A misfit is refused naming the first offending parameter, and nothing
is changed.
"""

from __future__ import annotations

from collections.abc import Mapping
from numbers import Number
from typing import Any

import torch

from .state import EXP_AVG_SQ, STEP


def check_structure(state_dict: Any) -> None:
    """Refuse what is not an optimizer state dict at all, before any part of it is read."""
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state dict: expected a mapping with 'state' and 'param_groups'")
    groups = state_dict["param_groups"]
    if not isinstance(state_dict["state"], Mapping) or not isinstance(groups, (list, tuple)) \
            or not all(isinstance(g, Mapping) and "params" in g for g in groups):
        raise ValueError("not an optimizer state dict: 'state' must be a mapping and 'param_groups' a list of "
                         "dicts, each with 'params'")


def align_state_dict(groups: list[dict], state_dict: Any) -> tuple[dict, list[tuple[Any, torch.Tensor, str]]]:
    """``(aligned, pairs)``: ``state_dict`` with each group's saved ids in this optimizer's order
    and this optimizer's names (torch's loader then matches by position), old formats converted
    (a Python number ``step`` becomes a float32 tensor, as torch's own optimizers keep it), and
    the ``(saved id, parameter, name)`` pairs. Raises ``ValueError`` when the structure differs
    (of a state dict `check_structure` passed)."""
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(groups):
        raise ValueError(
            f"the state dict has {len(saved_groups)} param groups, this optimizer has {len(groups)}: build the "
            "optimizer with the same param groups as the one that saved it"
        )
    _refuse_regrouped(saved_groups, groups)
    aligned_groups, pairs = [], []
    for gi, (saved, group) in enumerate(zip(saved_groups, groups)):
        ids, names = list(saved["params"]), list(group["param_names"])
        if len(ids) != len(names):
            raise ValueError(
                f"param group {gi}: the state dict has {len(ids)} parameters, this optimizer has {len(names)}: build the "
                "optimizer over the same parameters as the one that saved it"
            )
        saved_names = saved.get("param_names")
        if saved_names is not None and list(saved_names) != names and sorted(saved_names) == sorted(names) \
                and len(set(names)) == len(names):
            by_name = dict(zip(saved_names, ids))
            ids = [by_name[n] for n in names]
        aligned_groups.append({**saved, "params": ids, "param_names": names})
        pairs.extend(zip(ids, group["params"], names))
    listed = {saved_id for saved_id, _, _ in pairs}
    stray = [key for key in state_dict["state"] if key not in listed]
    if stray:  # (torch would keep it in `state`, keyed by the id: state of no parameter)
        raise ValueError(
            f"the state dict holds state for id {stray[0]!r}, which none of its param groups lists: it is not "
            "the state dict of an optimizer over these parameters (or it was edited)"
        )
    state = {key: _current_format(value) for key, value in state_dict["state"].items()}
    return {**state_dict, "state": state, "param_groups": aligned_groups}, pairs


def _refuse_regrouped(saved_groups: list[dict], groups: list[dict]) -> None:
    """Refuse a state dict whose names are this optimizer's, each once, split into param groups
    otherwise: by position, a parameter moved to another group would take another's state, and a
    group's settings (``momentum_dtype``, ``param_rounding``) say how its entries were saved."""
    saved_of = {n: gi for gi, saved in enumerate(saved_groups) for n in (saved.get("param_names") or ())}
    live_of = {n: gi for gi, group in enumerate(groups) for n in group["param_names"]}
    if len(saved_of) != sum(len(saved.get("param_names") or ()) for saved in saved_groups) or saved_of.keys() != live_of.keys():
        return  # other names (prefixes, unnamed parameters) or repeated ones: by position
    moved = next((n for n in live_of if live_of[n] != saved_of[n]), None)
    if moved is not None:
        raise ValueError(
            f"{moved!r} is in param group {live_of[moved]} here but was saved in param group {saved_of[moved]}: loading "
            "by position would give parameters each other's state; build the optimizer with the same parameters in "
            "each group as the one that saved it (the groups' settings may differ)"
        )


def _current_format(saved: Any) -> Any:
    if isinstance(saved, Mapping) and isinstance(saved.get(STEP), Number) and not isinstance(saved.get(STEP), bool):
        return {**saved, STEP: torch.tensor(float(saved[STEP]), dtype=torch.float32)}
    return saved


def check_fits(saved: Mapping, name: str, param: torch.Tensor, expected: Mapping[str, tuple[int, ...]], spec) -> None:
    """Refuse a saved entry that lacks a key this optimizer keeps, or holds it in another shape."""
    for key, shape in expected.items():
        value = saved.get(key)
        if value is None:
            raise ValueError(
                f"the state of {name!r} has no {key!r} (it has {sorted(saved)}): it was saved by another optimizer"
            )
        if not isinstance(value, torch.Tensor) or tuple(value.shape) == tuple(shape):
            continue
        if key == EXP_AVG_SQ and tuple(value.shape) == tuple(param.shape) and spec.n_blocks != param.numel():
            raise ValueError(
                f"the state of {name!r} has a per-coordinate {key!r} {tuple(value.shape)}, as torch.optim.Adam/AdamW keep: "
                f"it was saved by another optimizer (blockopt keeps one value per block, here {spec.n_blocks})"
            )
        if len(shape) == 1 and shape[0] == spec.n_blocks and key != STEP:  # a block statistic
            raise ValueError(
                f"state {key!r} of {name!r} has shape {tuple(value.shape)}, this optimizer expects {tuple(shape)} "
                f"({spec.rule}, {spec.n_blocks} blocks): the saving optimizer partitioned it differently or it comes "
                "from another model; build both the same way (the same model form, or plan=saved_optimizer.plan)"
            )
        raise ValueError(
            f"state {key!r} of {name!r} has shape {tuple(value.shape)}, this optimizer expects {tuple(shape)}: it was "
            "saved with other settings (rank, momentum policy) or for another model; build both the same way"
        )
