"""`BlockwiseOptimizer`: the plumbing shared by every optimizer that takes its blocks from a Plan.

It turns whatever the user passes (a module, ``named_parameters()``, plain parameters, or param
groups) into named param groups plus a `Plan`, keeps every parameter's `BlockSpec` reachable by
name, rejects bad input before anything is applied, and makes ``load_state_dict`` atomic and
exact. Subclasses only gather state and call their functional step.
"""

from __future__ import annotations

import copy

import itertools
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn
from torch.optim import Optimizer

from ..distributed.shard import ShardView, is_dtensor, shard_view
from ..partition import BlockSpec, Plan, partition
from ..partition.engine import PartitionWarning
from .state import stat_dtype


def _check_range(name: str, value: float, low: float, high: float | None = None, *, high_open: bool = True) -> None:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = value >= low and (high is None or (value < high if high_open else value <= high))
    if not ok:
        bound = f"[{low}, {high})" if high is not None and high_open else f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")


class BlockwiseOptimizer(Optimizer):
    """Base class: named param groups + a `Plan` (``self.plan``) mapping names to `BlockSpec`.

    Subclasses define ``_state_shapes(spec, param) -> {key: shape}`` (used to validate state
    dicts) and may list ``_STAT_KEYS``: state entries kept in `stat_dtype` (at least float32),
    which ``load_state_dict`` restores exactly instead of casting them to the parameter's dtype.
    Optimizer-wide settings kept as attributes (not per group) are listed in ``_OPTIONS`` with the
    value a pickle from before the setting existed gets; pickles carry them, and
    ``load_state_dict`` keeps the live ones.
    """

    _STAT_KEYS: tuple[str, ...] = ()
    _OPTIONS: dict[str, Any] = {"_partition_options": {}}

    def __init__(self, params, defaults: dict[str, Any], *, plan: Plan | None = None, partition_options: dict | None = None):
        self._partition_options = {k: v for k, v in (partition_options or {}).items() if v is not None}
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan must be a blockopt.Plan (from blockopt.partition), got {type(plan).__name__}")
        groups, self.plan = self._named_groups(params, plan)
        super().__init__(groups, defaults)

    # ---- turning user input into named groups + a plan ----------------------------------
    def _named_groups(self, params, plan: Plan | None) -> tuple[list[dict], Plan]:
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors, named tensors or dicts, or an nn.Module; got a single Tensor")
        if isinstance(params, nn.Module):
            plan = plan if plan is not None else partition(params, **self._partition_options)
            tensors = dict(params.named_parameters())
            missing = [n for n in plan if n not in tensors]
            if missing:
                raise ValueError(f"plan has parameters the model lacks ({missing[:3]}...): build the plan from this model")
            names = [n for n in plan]
            return [{"params": [tensors[n] for n in names], "param_names": names}], plan

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
            groups.append(self._name_group(dict(g), counter, where=f"param group {i}"))
        self._check_unique(groups)

        pairs = [(n, p) for g in groups for n, p in zip(g["param_names"], g["params"])]
        if plan is None:
            unnamed = any(g.pop("_unnamed", False) for g in groups)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", PartitionWarning)
                plan = partition(_all_trainable(pairs), **self._partition_options)
            if unnamed:
                warnings.warn(
                    f"{type(self).__name__} got parameters without names, so blocks come from shapes only "
                    "(matrices per row, vectors per coordinate). Pass the model, or model.named_parameters(), "
                    "so blocks follow its structure (heads, embeddings, norms).",
                    PartitionWarning, stacklevel=4,
                )
            else:
                for w in caught:
                    warnings.warn(w.message, w.category, stacklevel=4)
        else:
            for g in groups:
                g.pop("_unnamed", None)
        for n, p in pairs:
            self._check_spec(plan, n, p)
        return groups, plan

    @staticmethod
    def _name_group(group: dict, counter, where: str) -> dict:
        """Normalise one group to ``params`` (tensors) + ``param_names`` (str), naming unnamed ones."""
        ps = group["params"]
        ps = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        if not ps:
            raise ValueError(f"{where} has an empty 'params' list")
        tensors, names = [], []
        given = group.get("param_names")
        if given is not None and len(given) != len(ps):
            raise ValueError(f"{where}: param_names has {len(given)} names for {len(ps)} parameters")
        for j, item in enumerate(ps):
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                name, t = item
            elif isinstance(item, torch.Tensor):
                name, t = (given[j] if given is not None else None), item
            else:
                raise TypeError(f"{where}: expected tensors or (name, tensor) pairs, got {type(item).__name__}")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: parameter {name or j} is a {type(t).__name__}, not a Tensor")
            if not t.is_leaf:
                raise ValueError(f"{where}: can't optimize a non-leaf Tensor ({name or j})")
            if name is None:
                name = f"param.{next(counter)}"
                group["_unnamed"] = True
            tensors.append(t)
            names.append(name)
        group["params"], group["param_names"] = tensors, names
        return group

    def _check_unique(self, groups: list[dict], existing: Iterable[dict] = ()) -> None:
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

    @staticmethod
    def _check_spec(plan: Plan, name: str, p: torch.Tensor) -> None:
        if name not in plan:
            raise ValueError(f"parameter {name!r} is not in the plan: build the plan from the same model (blockopt.partition(model))")
        spec = plan[name]
        if tuple(spec.shape) != tuple(p.shape):
            raise ValueError(f"plan says {name!r} has shape {spec.shape} but the parameter has {tuple(p.shape)}: the plan is for another model")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as torch.optim does); new names are partitioned from their names/shapes
        unless the plan already covers them."""
        offset = sum(len(g["params"]) for g in self.param_groups)
        group = self._name_group(dict(param_group), itertools.count(offset), where="new param group")
        unnamed = group.pop("_unnamed", False)
        self._check_unique([group], self.param_groups)
        new = [(n, p) for n, p in zip(group["param_names"], group["params"]) if n not in self.plan]
        plan = self.plan
        if new:
            if unnamed:
                warnings.warn("parameters added without names: blocks come from shapes only", PartitionWarning, stacklevel=2)
            plan = plan.merged(partition(_all_trainable(new), **self._partition_options))
        for n, p in zip(group["param_names"], group["params"]):
            self._check_spec(plan, n, p)
        super().add_param_group(group)
        self.plan = plan

    def specs(self, group: dict) -> list[BlockSpec]:
        return [self.plan[n] for n in group["param_names"]]

    def layouts(self, group: dict) -> list[BlockSpec | ShardView]:
        """What the step sees of each parameter: its `BlockSpec`, or for a sharded (DTensor)
        parameter the `ShardView` of this rank's shard (cached until its placements change)."""
        return [self._layout(n, p) for n, p in zip(group["param_names"], group["params"])]

    def block_spec(self, name: str) -> BlockSpec:
        """The layout this optimizer steps parameter ``name`` with (its Plan spec, unless a
        subclass chooses otherwise, like SGD-SaI's one block per tensor)."""
        return self.plan[name]

    def _layout(self, name: str, p: torch.Tensor) -> BlockSpec | ShardView:
        spec = self.block_spec(name)
        if not is_dtensor(p):
            return spec
        views = self.__dict__.setdefault("_shard_views", {})
        key = (spec, p.device_mesh, tuple(p.placements))
        cached = views.get(name)
        if cached is None or cached[0] != key:
            cached = views[name] = (key, shard_view(spec, p))
        return cached[1]

    def _block_sum_reducer(self, layouts: list) -> "BlockSumReducer | None":
        """The hook summing cut blocks' partial sums across ranks for a step over ``layouts``,
        or ``None`` when no block is cut (nothing sharded, or shards along block boundaries)."""
        if not any(isinstance(layout, ShardView) for layout in layouts):
            return None
        from ..distributed.reduce import BlockSumReducer

        key = tuple(id(layout) for layout in layouts)
        cache = self.__dict__.setdefault("_reducers", {})
        if key not in cache:
            cache.clear()  # the parameters with gradients changed: keep one layout at a time
            cache[key] = (layouts, BlockSumReducer(layouts))  # layouts kept so their ids stay unique
        reducer = cache[key][1]
        return reducer if reducer.active else None

    # ---- checkpoints ------------------------------------------------------------------
    def _state_shapes(self, spec: BlockSpec, param: torch.Tensor) -> dict[str, tuple[int, ...]]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with the block statistics of sharded parameters in global form.

        Note [checkpoints of sharded parameters]: a rank keeps the statistics of the blocks that
        meet its shard; a checkpoint holds each parameter's global ``(n_blocks,)`` vector, the
        same on every rank, so it loads at any world size (DCP saves it once). Assembling it is
        one all-reduce, so with sharded parameters this is a collective: call it on every rank,
        as ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` does.
        """
        packed = super().state_dict()
        sharded = [
            (index, key, self._layout(name, p))
            for index, (name, p) in enumerate((n, p) for g in self.param_groups for n, p in zip(g["param_names"], g["params"]))
            if is_dtensor(p) and p in self.state
            for key in self._STAT_KEYS
            # (state kept as DTensors, like AdaPM's factors, is already global: DCP handles it)
            if isinstance(self.state[p].get(key), torch.Tensor) and not is_dtensor(self.state[p][key])
        ]
        if not sharded:
            return packed
        from ..distributed.reduce import gather_block_stats

        local = [packed["state"][index][key] for index, key, _ in sharded]
        full = gather_block_stats([view for _, _, view in sharded], local)
        state = dict(packed["state"])
        for (index, key, _), value in zip(sharded, full):
            state[index] = {**state[index], key: value}
        return {**packed, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; a state dict from another model or plan raises and changes nothing.

        For sharded (DTensor) parameters, plain full-size tensors (from a single-process or
        full-state-dict checkpoint) are cut to this rank's shard, and block statistics in global
        form to the blocks meeting it: a checkpoint loads at any world size.
        """
        pairs = self._validate_state_dict(state_dict)
        super().load_state_dict(state_dict)
        # torch casts every floating state tensor to the parameter's dtype; block statistics
        # must stay float32 for bf16/fp16 params, so restore them from the saved values.
        names = {id(p): n for g in self.param_groups for n, p in zip(g["param_names"], g["params"])}
        for saved_id, p in pairs:
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state, layout = self.state[p], self._layout(names[id(p)], p)
            for key in self._STAT_KEYS:
                if isinstance(saved.get(key), torch.Tensor):
                    value = saved[key].to(device=p.device, dtype=stat_dtype(p), copy=True)
                    state[key] = self._place_loaded_stat(p, key, value, layout)
            if is_dtensor(p):
                for key, value in list(state.items()):
                    if key not in self._STAT_KEYS and isinstance(value, torch.Tensor) and not is_dtensor(value) \
                            and tuple(value.shape) == tuple(p.shape) and value.ndim > 0:
                        state[key] = _shard_like(value, p)

    def _place_loaded_stat(self, p: torch.Tensor, key: str, value: torch.Tensor, layout) -> torch.Tensor:
        """A loaded statistic in the form the step keeps: global block statistics are cut to the
        blocks meeting this rank's shard; DTensors are already placed."""
        if isinstance(layout, ShardView) and not is_dtensor(value):
            return layout.to_local(value)
        return value

    def _validate_state_dict(self, state_dict) -> list[tuple[Any, torch.Tensor]]:
        if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state dict: expected a mapping with 'state' and 'param_groups'")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}: "
                "it was saved from a different setup"
            )
        pairs = []
        for gi, (sg, g) in enumerate(zip(saved_groups, self.param_groups)):
            if len(sg["params"]) != len(g["params"]):
                raise ValueError(
                    f"param group {gi}: state dict has {len(sg['params'])} parameters, this optimizer has {len(g['params'])}: "
                    "it comes from another model"
                )
            saved_names = sg.get("param_names")
            if saved_names is not None and list(saved_names) != list(g["param_names"]):
                i, a, b = next((i, a, b) for i, (a, b) in enumerate(zip(saved_names, g["param_names"])) if a != b)
                raise ValueError(
                    f"param group {gi}: state dict entry {i} is {a!r} but this optimizer has {b!r}: it comes from another model"
                )
            pairs.extend(zip(sg["params"], g["params"]))
        for saved_id, p in pairs:
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            name = next(g["param_names"][i] for g in self.param_groups for i, q in enumerate(g["params"]) if q is p)
            for key, shape in self._state_shapes(self.plan[name], p).items():
                value = saved.get(key)
                if value is None:
                    raise ValueError(f"state for {name!r} lacks {key!r}: it was saved by a different optimizer")
                if isinstance(value, torch.Tensor) and tuple(value.shape) != tuple(shape):
                    raise ValueError(
                        f"state {key!r} of {name!r} has shape {tuple(value.shape)}, expected {tuple(shape)} under this plan "
                        f"({self.plan[name].rule}, {self.plan[name].n_blocks} blocks): it comes from another model or plan"
                    )
        return pairs

    # ---- pickling / deepcopy ----------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["plan"] = self.plan
        state.update({name: getattr(self, name) for name in self._OPTIONS})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also comes through here, with only state and param_groups:
        # the live options must survive that; a pickle from before an option existed gets its default.
        for name, default in self._OPTIONS.items():
            if name not in state and name not in self.__dict__:
                state[name] = copy.deepcopy(default)
        super().__setstate__(state)


def _shard_like(full: torch.Tensor, param) -> torch.Tensor:
    """A full-size tensor cut to ``param``'s shard, as a DTensor placed like it (no communication)."""
    from torch.distributed.tensor import DTensor

    from ..distributed.shard import shard_box

    box = shard_box(tuple(param.shape), param.placements, tuple(param.device_mesh.get_coordinate()), tuple(param.device_mesh.shape))
    local = full.to(param.device)[tuple(slice(start, start + size) for start, size in box)]
    return DTensor.from_local(local.clone(), param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def _all_trainable(pairs):
    """Named tensors for `partition`, frozen ones included: the user passed them explicitly (they
    may be unfrozen later), so each needs a spec. A shape-only meta tensor stands in for them."""
    return [(n, p if p.requires_grad else torch.empty(p.shape, device="meta", requires_grad=True)) for n, p in pairs]
