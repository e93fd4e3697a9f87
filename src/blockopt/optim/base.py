"""`BlockwiseOptimizer`: the one skeleton every blockopt optimizer follows.

The base class owns the plumbing; an optimizer owns its math and its state shapes. A step is a
template (as torch.optim's ``step`` -> ``_init_group`` -> functional)::

    step(closure)
      loss = closure()                                  # under enable_grad, as torch.optim
      batches = [_gather(group) ...]                    # a ParamBatch per group with gradients:
                                                        #   local shards, layouts, the optimizer's state
      collectives = collectives_for(layouts)            # SINGLE_PROCESS, or the sharded one
      _reduce(batches, collectives)                     # ONE reduction across all groups
      _update(batch, collectives) for each batch        # the optimizer's functional

Subclasses define ``_Batch`` (a `ParamBatch` dataclass with their state lists), ``_gather_state``
(create a parameter's state on first use and append it to the batch), ``_reduce``, ``_update``,
``_state_shapes`` (what a state dict must hold, for atomic loading) and ``HYPERPARAMETERS`` (a
`blockopt.validation` table checked at construction and by ``add_param_group``).

The rest is here too: user input to named groups and a `Plan` (`named_params`), each parameter's
layout (its `BlockSpec`, or a `ShardView` of this rank's shard), and exact, atomic checkpoints.

Note [a step that raises changes nothing]: a step either runs whole or leaves the optimizer and
the parameters exactly as they were (no state entry created, no step counted, no skip counted,
no parameter moved), whichever group refuses and why (a sparse gradient, a ``momentum_dtype``
changed after the state was made, a ``param_rounding`` a dtype can't take, ...). Two rules make it:

* everything that can refuse runs before the first update: gathering every group (where the
  state is created and the kept state checked), ``param_rounding``'s checks
  (`param_rounding.prepare`) and ``_reduce``; the updates themselves do not refuse;
* until then a step only adds state entries (``_gather_state`` creates what is missing and never
  changes what is there), and each state dict it adds to is journaled with its length before
  (one ``len`` per tensor and step; an entry only where something was added, a first step): on a
  raise, the keys added since (a dict keeps insertion order: they are its last ones) and the
  entries made empty are removed, and the skips counted undone. So a first-use entry that
  exists is a filled one: SGD-SaI can take "no ``gsnr`` yet" to mean "this is the parameter's
  first gradient".
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
import itertools
import warnings
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..distributed import (
    Collectives, ShardedCollectives, ShardView, collectives_for, gather_block_stats, is_dtensor, local_tensor, shard_like,
    shard_view, zero_partitions,
)
from ..distributed.zero import PIECES
from ..partition import BlockSpec, Plan, partition
from ..partition.engine import PartitionWarning
from ..validation import Rule, caller_stacklevel, check, real, validate
from . import nonfinite, param_rounding
from .checkpoint import align_state_dict, check_fits, check_structure
from .named_params import all_trainable, check_naming, check_real, check_spec, check_unique, name_group, named_groups
from .state import NONFINITE_SKIPS, holds_state, stat_dtype


@dataclass
class ParamBatch:
    """One param group's parameters that have a gradient, gathered for a step: parallel lists
    (local shards for DTensors). Optimizers extend it with their state lists; every list field
    has one entry per tensor (so a batch can be cut into parts)."""

    # the state lists whose tensors are kept like the parameter, in its dtype (a first moment): a
    # step on float32 copies of bf16/fp16 parameters (`param_rounding`) takes float32 copies of these too
    LIKE_PARAM: ClassVar[tuple[str, ...]] = ()

    group: dict
    names: list[str] = field(default_factory=list)
    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    layouts: list[BlockSpec | ShardView] = field(default_factory=list)
    weight_decays: list[float] = field(default_factory=list)


@torch.library.custom_op("blockopt::checked_lr", mutates_args=())
def checked_lr(lr: Tensor) -> Tensor:
    """A compiled step's tensor lr, checked when the graph runs as an eager step checks it (the
    graph reads the tensor, which a scheduler changes in place: a ``nan`` or negative lr would train
    on). Returns a copy, so the group's update depends on it and runs after it. A CUDA lr is not
    read (that would be a host sync every step)."""
    if lr.device.type == "cpu":
        try:
            check("lr", lr, _TENSOR_LR)
        except (TypeError, ValueError) as error:
            raise type(error)(f"a compiled step's tensor lr: {error}") from None
    return lr.clone()


@checked_lr.register_fake
def _(lr: Tensor) -> Tensor:
    return torch.empty_like(lr)


_TENSOR_LR = real(0, tensor=True)  # (every optimizer's lr: a number >= 0)


class BlockwiseOptimizer(Optimizer):
    """Base class: named param groups, a `Plan` (``self.plan``) mapping names to `BlockSpec`, and
    the step template (module docstring).

    Class attributes a subclass sets: ``HYPERPARAMETERS`` (``{name: Rule}``); ``_STAT_KEYS``,
    state entries kept in `stat_dtype` (at least float32), which ``load_state_dict`` restores
    exactly instead of casting them to the parameter's dtype; ``_GROUP_DEFAULTS``, the value a
    param group from a checkpoint older than a setting gets; ``_OPTIONS``, optimizer-wide
    settings kept as attributes (not per group), with the value a pickle from before the setting
    existed gets (pickles carry them, and ``load_state_dict`` keeps the live ones).
    """

    HYPERPARAMETERS: ClassVar[dict[str, Rule]] = {}
    _Batch: ClassVar[type[ParamBatch]] = ParamBatch
    # the batch field and state key of the block statistics that nonfinite="warn" watches
    _STATISTICS: ClassVar[str] = ""
    _STATISTICS_KEY: ClassVar[str] = ""
    _STAT_KEYS: ClassVar[tuple[str, ...]] = ()
    _GROUP_DEFAULTS: ClassVar[dict[str, Any]] = {}
    _OPTIONS: ClassVar[dict[str, Any]] = {"_partition_options": {}, "_unnamed": False}

    def __init__(self, params, defaults: dict[str, Any], *, plan: Plan | None = None, partition_options: dict | None = None):
        defaults = validate(self.HYPERPARAMETERS, defaults)
        defaults = {k: tuple(v) if k in self.HYPERPARAMETERS and self.HYPERPARAMETERS[k].kind == "pair" else v
                    for k, v in defaults.items()}
        self._partition_options = {k: v for k, v in (partition_options or {}).items() if v is not None}
        if plan is not None and not isinstance(plan, Plan):
            raise TypeError(f"plan must be a blockopt.Plan (from blockopt.partition), got {type(plan).__name__}")
        groups, self.plan, unnamed = named_groups(params, plan, self._partition_options, owner=type(self).__name__)
        super().__init__(groups, defaults)  # (its add_param_group calls see groups already named)
        self._unnamed = unnamed
        # made here, not in a step: a compiled step does not keep attributes it sets on the optimizer
        self._watch = nonfinite.StatisticsWatch()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as torch.optim does); new names are partitioned from their names/shapes
        unless the plan already covers them."""
        # an optimizer-wide setting (a rule without a group default: ``seed``, AdaPM's
        # ``second_moment``; or an option kept on the optimizer: AdaPM's ``momentum`` policies)
        # would sit in the group unread
        for key in param_group:
            wide = key in self.HYPERPARAMETERS or (key in self._OPTIONS and not key.startswith("_"))
            if wide and key not in self.defaults:
                raise ValueError(f"{key} is a setting of the whole optimizer, not of a param group: pass "
                                 f"{type(self).__name__}(..., {key}={param_group[key]!r}) instead")
        param_group = validate(self.HYPERPARAMETERS, param_group)
        offset = sum(len(g["params"]) for g in self.param_groups)
        group = name_group(dict(param_group), itertools.count(offset), where="new param group")
        unnamed = group.pop("_unnamed", False)
        added = "_unnamed" in self.__dict__  # by the user, not by torch's __init__
        first = added and not any(g["params"] for g in self.param_groups)  # (only empty groups so far)
        if added and group["params"] and not first:
            check_naming([self._unnamed, unnamed])
        check_unique([group], self.param_groups)
        check_real(zip(group["param_names"], group["params"]), type(self).__name__)
        new = [(n, p) for n, p in zip(group["param_names"], group["params"]) if n not in self.plan]
        plan = self.plan
        if new:
            if unnamed:
                warnings.warn("parameters added without names: blocks come from shapes only", PartitionWarning,
                              stacklevel=caller_stacklevel())
            plan = plan.merged(partition(all_trainable(new), **self._partition_options))
        for n, p in zip(group["param_names"], group["params"]):
            check_spec(plan, n, p)
        super().add_param_group(group)
        # DeepSpeed ZeRO later swaps the tensors for flat partitions: which one was which name (distributed/zero.py)
        self.__dict__.setdefault("_names_by_id", {}).update(zip(map(id, group["params"]), group["param_names"]))
        self.plan = plan
        if first and group["params"]:  # the first parameters decide whether the optimizer names them
            self._unnamed = unnamed

    # ---- the step template ------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step (``closure`` re-evaluates the loss, as in torch.optim).

        With sharded (DTensor) parameters, whatever the step needs from other ranks is gathered
        for every group at once (Note [one all-reduce per step]). A step that raises changes
        nothing (Note [a step that raises changes nothing])."""
        if torch.compiler.is_compiling() and self._holds_dtensors():
            return self._eager_step(closure)  # Note [a compiled step of sharded parameters]
        return self._step(closure)

    # Note [a compiled step of sharded parameters]: dynamo cannot trace the step of DTensor
    # parameters (their shard layouts, the collectives, state kept whole on every rank), and a
    # partial capture of it fails inside dynamo or, with ``suppress_errors``, leaves writes undone.
    # So ``torch.compile(opt.step)`` with DTensors runs the step eagerly: one graph break, and the
    # eager step's results. (DeepSpeed steps its client itself, eagerly.)
    def _holds_dtensors(self) -> bool:
        return any(is_dtensor(p) for group in self.param_groups for p in group["params"])

    @torch.compiler.disable
    def _eager_step(self, closure):
        return self._step(closure)

    def _step(self, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not torch.compiler.is_compiling():
            self._check_changed_settings()
        skip, journal = (), []  # (journal: the state dicts this step adds to, with their lengths before)
        try:
            if not torch.compiler.is_compiling():  # (DeepSpeed steps its client eagerly)
                zero_partitions(self)  # under DeepSpeed ZeRO the groups hold flat partitions: read them once
            if any(g["nonfinite"] in nonfinite.SKIPPING for g in self.param_groups):
                skip = nonfinite.to_skip(self)  # (after ZeRO is read: its ranks agree on skips from the first step)
            batches = [batch for batch in (self._gather(group, skip, journal) for group in self.param_groups)
                       if batch.params]
            if not batches:
                self._warn_if_nothing_has_a_gradient()
                return loss
            roundings = [param_rounding.prepare(self, batch, journal) for batch in batches]  # (None: as computed)
            layouts = [layout for batch in batches for layout in batch.layouts]
            collectives = self._collectives(layouts)
            collectives.check_same_settings(self._settings_to_agree, layouts)  # (called once, when sharded)
            self._reduce(batches, collectives)
        except BaseException:
            self._undo(journal, skip)
            raise
        # nothing below refuses: every group's update runs
        for batch, rounding in zip(batches, roundings):
            if rounding is None:
                self._update(batch, collectives)
            else:
                param_rounding.apply(self, batch, collectives, rounding)
        self._watch_statistics(batches)
        return loss

    def _settings_to_agree(self) -> dict[str, str]:
        """What every rank sharing a sharded parameter must have alike (Note [one optimizer on
        every rank] in `blockopt.distributed.collectives`): each group's settings and names, and
        the optimizer-wide options (``seed``, ...)."""
        settings = {"optimizer": type(self).__name__}
        settings.update({key: repr(getattr(self, key)) for key in sorted(self.HYPERPARAMETERS)
                         if key not in self.defaults and hasattr(self, key)})
        for index, group in enumerate(self.param_groups):
            for key in sorted(self.defaults):
                value = group.get(key)
                settings[f"param group {index}'s {key}"] = repr(value.item() if isinstance(value, Tensor) else value)
            names = "\n".join(group["param_names"]).encode()
            settings[f"param group {index}'s parameters"] = f"{len(group['param_names'])} named {zlib.crc32(names):08x}"
        return settings

    @torch.compiler.disable  # (a compiled step breaks its graph here only on this path: no gradient at all)
    def _warn_if_nothing_has_a_gradient(self) -> None:
        """A step by an optimizer that holds state (it has stepped, or loaded a checkpoint) finding
        no gradient on any parameter it holds is almost always an optimizer left holding
        parameters the model no longer trains: every later step would change nothing, silently.
        Said once; a first step without gradients (before any backward) is left alone, as torch does."""
        if self.__dict__.get("_warned_no_gradients") or not self.state:
            return
        params = [p for group in self.param_groups for p in group["params"]]
        if any(p.grad is not None for p in params):  # (all skipped as non-finite: nonfinite= says so)
            return
        self._warned_no_gradients = True
        warnings.warn(
            f"{type(self).__name__}.step(): none of its {len(params)} parameters has a gradient, though it holds "
            "state from earlier steps or a checkpoint, so nothing moved. If the model's parameters were replaced "
            "after the optimizer was built (e.g. PEFT adapters reloaded by the Trainer's resume_from_checkpoint, "
            "load_state_dict(assign=True)), build the optimizer on the parameters the model trains now. "
            "(Said once.)", UserWarning, stacklevel=caller_stacklevel())

    def _check_changed_settings(self) -> None:
        """Group settings set by hand since the last step (``group["lr"] = ...``, as schedulers do)
        are checked as the constructor checks them, before anything is stepped: a ``nan`` lr or a
        ``param_rounding="Kahan"`` would otherwise train on silently. A few comparisons per group
        and step; a tensor setting (a tensor lr, changed in place by schedulers) is checked at every
        step, as the step reads it at every step."""
        checked = self.__dict__.setdefault("_checked_settings", {})
        if len(checked) > 4 * len(self.param_groups):  # groups replaced (load_state_dict makes new ones)
            checked.clear()
        read = self.__dict__["_tensor_lrs"] = {}  # this step's tensor lrs, read once (`_lr`)
        for index, group in enumerate(self.param_groups):
            if isinstance(lr := group.get("lr"), Tensor):  # (only lr may be a tensor; others are refused below)
                read[id(group)] = (lr, lr._version, self._read_tensor_lr(lr, f"param group {index}"))
            tensors = {k: v for k, v in group.items() if k in self.defaults and isinstance(v, Tensor) and k != "lr"}
            if tensors:
                self._validated(tensors, f"param group {index}")
            settings = {k: tuple(v) if isinstance(v, list) else v for k, v in group.items()
                        if k in self.defaults and not isinstance(v, Tensor)}
            seen = checked.get(id(group))
            before = seen[1] if seen is not None and seen[0] is group else {}
            if before == settings:
                continue
            changed = {k: v for k, v in settings.items() if k not in before or before[k] != v}
            normalised = self._validated(changed, f"param group {index}")  # (aliases: torch.bfloat16 -> "bfloat16")
            group.update(normalised)
            checked[id(group)] = (group, {**settings, **normalised})

    def _undo(self, journal: list[tuple[Any, dict, int]], skip) -> None:
        """Put the state back as it was before a step that raised (Note [a step that raises
        changes nothing]): the entries and keys ``journal`` says were added, the skips counted."""
        all_state = self.state
        for owner, state, length in reversed(journal):
            for key in list(state)[length:]:  # (insertion order: the keys added since are the last ones)
                del state[key]
            if not state and owner is not None and all_state.get(owner) is state:
                del all_state[owner]  # (an empty entry is what the step made: none)
        if skip:  # `nonfinite.to_skip` counted one skip for each
            for group in self.param_groups:
                for p in group["params"]:
                    if id(p) in skip and p in all_state:
                        state = all_state[p]
                        count = state.get(NONFINITE_SKIPS, 0) - 1
                        if count > 0 or holds_state(state):  # (a stepped entry holds its count from its first step)
                            state[NONFINITE_SKIPS] = count
                        else:
                            state.pop(NONFINITE_SKIPS, None)
                            if not state:  # (made by the count)
                                del all_state[p]

    def _watch_statistics(self, batches: list[ParamBatch]) -> None:
        """nonfinite="warn": a bounded look at the block statistics (`nonfinite.StatisticsWatch`)."""
        watch = self._watch
        if not watch.warned:
            columns = [(b.names, getattr(b, self._STATISTICS)) for b in batches if b.group["nonfinite"] == "warn"]
            watch.check(type(self).__name__, self._STATISTICS_KEY, columns)

    def _collectives(self, layouts: list) -> Collectives:
        # the sharded implementation caches its reducers, so each optimizer keeps its own
        # (created on first use: pickles and deep copies do not carry it)
        zero = self.__dict__.get("_zero")
        if zero is not None:
            return zero.collectives
        sharded = self.__dict__.get("_sharded")
        if sharded is None:
            sharded = self._sharded = ShardedCollectives()
        return collectives_for(layouts, sharded)

    def _gather(self, group: dict, skip=(), journal: list | None = None) -> ParamBatch:
        """The group's parameters with a gradient (less those in ``skip``, ids), their layouts and
        weight decays, and (through ``_gather_state``) their state, created on first use. Each
        state dict it adds to is recorded in ``journal`` with its length before (Note [a step
        that raises changes nothing])."""
        # Note: this loop runs every step for every tensor, so it reads each attribute once
        # (models with thousands of small tensors spend a good part of a step here).
        journal = [] if journal is None else journal
        all_state = self.state
        zero = self.__dict__.get("_zero")
        if zero is not None:  # DeepSpeed ZeRO: the group holds flat partitions, stepped as pieces
            for flat in group["params"]:
                if flat.grad is None or id(flat) in skip:
                    continue
                state = all_state[flat]
                journal.append((flat, state, len(state)))
                for piece_state in state.get(PIECES, ()):
                    journal.append((None, piece_state, len(piece_state)))
            return zero.gather(self, group, skip)
        batch = self._Batch(group)
        weight_decay, decay_1d = group["weight_decay"], group["decay_1d"]
        counts_skips = group["nonfinite"] in nonfinite.SKIPPING
        names, params, grads, layouts, decays = batch.names, batch.params, batch.grads, batch.layouts, batch.weight_decays
        gather_state = self._gather_state
        p = state = None
        try:
            for name, p, layout in zip(group["param_names"], group["params"], self.layouts(group)):
                state = None
                grad = p.grad
                if grad is None or (skip and id(p) in skip):
                    continue
                if grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients ({name}): build the "
                                       "embedding with sparse=False, or give it torch.optim.SparseAdam of its own")
                plain = type(p) is torch.nn.Parameter or type(p) is torch.Tensor  # else a DTensor: its local shard
                names.append(name)
                params.append(p if plain else local_tensor(p))
                grads.append(grad if plain else local_tensor(grad))
                layouts.append(layout)
                decays.append(weight_decay if decay_1d or p.ndim >= 2 else 0.0)
                state = all_state[p]
                length = len(state)
                gather_state(batch, name, p, layout, state, plain)
                if counts_skips and NONFINITE_SKIPS not in state:
                    state[NONFINITE_SKIPS] = 0  # (held from the first step: a DCP load fills the keys a live state holds)
                if len(state) != length:  # (a first step: only then is anything journaled)
                    journal.append((p, state, length))
        except BaseException:
            if state is not None:  # the tensor being gathered
                journal.append((p, state, length))
            raise
        return batch

    def _gather_state(self, batch: ParamBatch, name: str, param: Tensor, layout, state: dict, plain: bool) -> None:
        """Create what ``param``'s state lacks; append its (local) state to ``batch``. It may add
        entries to ``state`` and raise, but must not change the entries there (Note [a step that
        raises changes nothing]): a step that raises removes the added ones."""
        raise NotImplementedError

    def _reduce(self, batches: list[ParamBatch], collectives: Collectives) -> None:
        """Gather what the update needs from other ranks, for every batch at once (default: nothing)."""

    def _update(self, batch: ParamBatch, collectives: Collectives) -> None:
        """Run the optimizer's functional step on one batch."""
        raise NotImplementedError

    def _lr(self, group: dict) -> float | Tensor:
        """The group's learning rate as a number: a 1-element tensor lr (as torch.optim accepts,
        e.g. for LR schedulers under torch.compile) is read once a step, where the step checks it
        (`_check_changed_settings`: one host sync per group on CUDA, not one per use). While
        compiling, it stays a tensor: reading it would break the graph, and a number would be
        baked into it; `checked_lr` checks it at run time instead."""
        lr = group["lr"]
        if not isinstance(lr, Tensor):
            return lr
        if torch.compiler.is_compiling():
            return torch.ops.blockopt.checked_lr(lr)
        # (the value this step checked, while the tensor is unchanged: an update run eagerly inside
        # a compiled step, where no check ran, reads the tensor as it is now)
        read = self.__dict__.get("_tensor_lrs", {}).get(id(group))
        if read is not None and read[0] is lr and read[1] == lr._version:
            return read[2]
        return self._read_tensor_lr(lr, "lr")

    def _read_tensor_lr(self, lr: Tensor, where: str) -> float:
        """A tensor lr's value, checked as the constructor checks an lr."""
        try:
            return check("lr", lr, self.HYPERPARAMETERS["lr"])
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from None

    # ---- layouts ----------------------------------------------------------------------
    def specs(self, group: dict) -> list[BlockSpec]:
        return [self.plan[n] for n in group["param_names"]]

    def layouts(self, group: dict) -> list[BlockSpec | ShardView]:
        """What the step sees of each parameter: its `BlockSpec`, or for a sharded (DTensor)
        parameter the `ShardView` of this rank's shard (cached until its placements change).

        Note: a step asks this for every tensor, so a group's list is kept while the plan, the
        group's tensors and their names stay the same (models with thousands of small tensors
        would otherwise spend a good part of a step looking specs up)."""
        names, params = group["param_names"], group["params"]
        key = (id(self.plan), tuple(map(id, params)), tuple(names))
        cache = self.__dict__.setdefault("_layouts", {})
        kept = cache.get(id(group))
        if kept is not None and kept[0] == key:
            return kept[1]
        layouts = [self._layout(n, p) for n, p in zip(names, params)]
        if not any(isinstance(layout, ShardView) for layout in layouts):  # (shard views follow placements)
            if len(cache) > 4 * len(self.param_groups):  # groups replaced (load_state_dict makes new ones)
                cache.clear()
            cache[id(group)] = (key, layouts)
        return layouts

    def block_spec(self, name: str) -> BlockSpec:
        """The layout this optimizer steps parameter ``name`` with (its Plan spec, unless a
        subclass chooses otherwise, like SGD-SaI's one block per tensor)."""
        return self.plan[name]

    def _group_of(self, param: Tensor) -> dict:
        """The live param group holding ``param``. An index by identity, each answer checked
        against the live groups (edited in place or replaced by a load: re-indexed, never misread):
        a load asks once per parameter, and a scan per call would be quadratic in the model's size."""
        found = self.__dict__.get("_group_index", {}).get(id(param))
        if found is not None:
            group, index = found
            live = any(g is group for g in self.param_groups)  # (torch's load makes new group dicts)
            if live and index < len(group["params"]) and group["params"][index] is param:
                return group
        self._group_index = {id(q): (g, i) for g in self.param_groups for i, q in enumerate(g["params"])}
        if id(param) not in self._group_index:
            raise KeyError(f"{type(self).__name__} holds no such parameter (shape {tuple(param.shape)}) in its param groups")
        return self._group_index[id(param)][0]

    def _layout(self, name: str, p: Tensor) -> BlockSpec | ShardView:
        spec = self.block_spec(name)
        if not is_dtensor(p):
            return spec
        views = self.__dict__.setdefault("_shard_views", {})
        key = (spec, p.device_mesh, tuple(p.placements))
        cached = views.get(name)
        if cached is None or cached[0] != key:
            cached = views[name] = (key, shard_view(spec, p))
        return cached[1]

    # ---- checkpoints ------------------------------------------------------------------
    def _state_shapes(self, name: str, param: Tensor) -> dict[str, tuple[int, ...]]:
        """``{state key: shape}`` of what this optimizer keeps for parameter ``name``."""
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
        local = [packed["state"][index][key] for index, key, _ in sharded]
        full = gather_block_stats([view for _, _, view in sharded], local)
        state = dict(packed["state"])
        for (index, key, _), value in zip(sharded, full):
            state[index] = {**state[index], key: value}
        return {**packed, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state; a state dict that does not fit raises and changes nothing.

        Entries are matched to parameters by name, or by position where the names differ
        (Note [which saved entry is which parameter]); each must hold what this optimizer keeps,
        in the shapes its plan gives (a momentum first as it was saved, before it is converted to
        this optimizer's ``momentum_dtype``). For sharded (DTensor) parameters, plain full-size tensors
        (from a single-process or full-state-dict checkpoint) are cut to this rank's shard, and
        block statistics in global form to the blocks meeting it: a checkpoint loads at any world size.

        Hooks run in torch's order: ``register_load_state_dict_pre_hook`` hooks first (what they
        return is what is checked and loaded), post hooks last (they see the loaded state).
        """
        state_dict = self._run_load_pre_hooks(state_dict)
        check_structure(state_dict)
        self._check_loaded_groups(state_dict)
        zero = zero_partitions(self)
        if zero is not None:  # DeepSpeed ZeRO: per flat partition, its pieces' state (distributed/zero.py)
            state_dict = zero.loadable(self, state_dict)
            self._torch_load(state_dict)
            zero.restore_loaded(self, state_dict)
            return self._run_load_post_hooks()
        state_dict, pairs = align_state_dict(self.param_groups, state_dict)
        state_dict = self._convert_loaded(state_dict, pairs)
        state_dict = param_rounding.loaded(state_dict, self.param_groups)
        self._validate_state_dict(state_dict, pairs)
        self._torch_load(state_dict)
        self._restore_loaded(state_dict, pairs)
        # torch casts every floating state tensor to the parameter's dtype; block statistics
        # must stay float32 for bf16/fp16 params, so restore them from the saved values.
        for saved_id, p, name in pairs:
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            state, layout = self.state[p], self._layout(name, p)
            for key in self._STAT_KEYS:
                if isinstance(saved.get(key), torch.Tensor):
                    value = saved[key].to(device=p.device, dtype=self._stat_storage_dtype(p, key), copy=True)
                    state[key] = self._place_loaded_stat(p, key, value, layout)
            if is_dtensor(p):
                for key, value in list(state.items()):
                    if key not in self._STAT_KEYS and isinstance(value, torch.Tensor) and not is_dtensor(value) \
                            and tuple(value.shape) == tuple(p.shape) and value.ndim > 0:
                        state[key] = shard_like(value, p)
        self._run_load_post_hooks()

    # torch's load runs the load hooks around its own part; blockopt's checks and conversions come
    # before that part and its restoring of what torch casts after it, so the hooks run here.
    def _run_load_pre_hooks(self, state_dict: Any) -> Any:
        if not isinstance(state_dict, Mapping):
            return state_dict  # (check_structure refuses it)
        state_dict = dict(state_dict)  # (a shallow copy, as torch's load makes)
        for hook in list(self._optimizer_load_state_dict_pre_hooks.values()):
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def _run_load_post_hooks(self) -> None:
        for hook in list(self._optimizer_load_state_dict_post_hooks.values()):
            hook(self)

    def _torch_load(self, state_dict: dict) -> None:
        """torch's ``load_state_dict`` without its hooks (they run in ours)."""
        pre, post = self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = OrderedDict(), OrderedDict()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = pre, post

    def _check_loaded_groups(self, state_dict: dict) -> None:
        """The saved groups' hyperparameters replace the live ones, so they are checked as the
        constructor checks them (a saved ``lr=nan`` would otherwise train to nan silently), and a
        group without a setting this optimizer's groups always had (SGD-SaI's ``momentum``, Adam's
        ``betas``) was saved by another optimizer: refused now, not as a KeyError at the next step."""
        # (this optimizer's own settings only: a wrapper may add keys to `defaults`; _GROUP_DEFAULTS
        # holds those added in later versions, which a load fills in)
        always = [k for k in self.HYPERPARAMETERS if k in self.defaults and k not in self._GROUP_DEFAULTS]
        for index, group in enumerate(state_dict.get("param_groups", ())):
            missing = [k for k in always if k not in group]
            if missing:
                raise ValueError(
                    f"param group {index} of the state dict has no {', '.join(map(repr, missing))} (it has "
                    f"{sorted(k for k in group if k not in ('params', 'param_names'))}): it was saved by another "
                    f"optimizer than {type(self).__name__}"
                )
            self._validated({k: v for k, v in group.items() if k in self.defaults}, f"param group {index} of the state dict")

    def _validated(self, settings: dict, where: str) -> dict:
        """``settings`` checked as the constructor checks them (aliases replaced by their names);
        an error names ``where`` they come from."""
        try:
            return validate(self.HYPERPARAMETERS, settings)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{where}: {error}") from None

    def _convert_loaded(self, state_dict: dict, pairs: list[tuple[Any, Tensor, str]]) -> dict:
        """The (aligned) state dict in the form this optimizer keeps, before it is checked: a
        subclass whose storage is a setting converts entries saved with another (default: as is)."""
        return state_dict

    def _restore_loaded(self, state_dict: dict, pairs: list[tuple[Any, Tensor, str]]) -> None:
        """After torch's load, which casts every floating state tensor to its parameter's dtype
        (and integer ones to floats): what a subclass must put back exactly (default: nothing
        beyond the block statistics)."""

    def _stat_storage_dtype(self, p: Tensor, key: str) -> torch.dtype:
        """The dtype a statistic of ``p`` is kept in (a loaded one is cast to it)."""
        return stat_dtype(p)

    def _place_loaded_stat(self, p: Tensor, key: str, value: Tensor, layout) -> Tensor:
        """A loaded statistic in the form the step keeps: global block statistics are cut to the
        blocks meeting this rank's shard; DTensors are already placed."""
        if isinstance(layout, ShardView) and not is_dtensor(value):
            return layout.to_local(value)
        return value

    def _validate_state_dict(self, state_dict: dict, pairs: list[tuple[Any, Tensor, str]]) -> None:
        """Refuse (before anything is applied) a saved entry that lacks what this optimizer keeps
        or holds it in another shape. Subclasses add their own checks."""
        for saved_id, p, name in pairs:
            saved = state_dict["state"].get(saved_id)
            if holds_state(saved):
                check_fits(saved, name, p, self._state_shapes(name, p), self.block_spec(name))

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
        self.__dict__.setdefault("_watch", nonfinite.StatisticsWatch())  # (copies and pickles start a new one)
        if "_names_by_id" not in self.__dict__:  # a pickle or deep copy: its groups hold its own tensors
            self._names_by_id = {id(p): n for g in self.param_groups for n, p in zip(g["param_names"], g["params"])}
        for group in self.param_groups:  # checkpoints from before a setting existed
            for key, default in self._GROUP_DEFAULTS.items():
                group.setdefault(key, default)
