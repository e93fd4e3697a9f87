"""`Collectives`: everything a step may ask of the other ranks, behind one object.

The math of every optimizer sees local tensors and layouts (`BlockSpec`, or a `ShardView` for a
sharded parameter) and, for what needs other ranks, a `Collectives`:

* ``cuts_blocks(layouts)``: whether any block of these layouts is split across ranks;
* ``sum_blocks(sums, layouts)``: sum per-block partial statistics over the ranks sharing each
  block, in place, with one all-reduce for the whole list (Note [one all-reduce per step]);
* ``max_(values, layouts)``: an elementwise maximum over the ranks the layouts live on;
* ``rows(layout)``: the row-sharded factor products of a parameter split along dim 0
  (`RowShards`), or ``None`` when it is whole here;
* ``gather_whole(values, layouts)``: tensors shaped like their (sharded) parameters' shards,
  whole on every rank, with one all-reduce for the whole list;
* ``check_same_settings(settings, layouts)``: refuse, on every rank, optimizers built otherwise
  on the ranks that share the layouts' parameters (once, at the first sharded step; ``settings``
  makes the optimizer's settings only then).

`SINGLE_PROCESS` is the implementation that has nothing to do. An optimizer gets the one that
fits its step's layouts from `collectives_for`; DDP needs nothing (its parameters are whole on
every rank), FSDP2 and DTensor shardings get a `ShardedCollectives`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch.distributed as dist
from torch import Tensor

from .reduce import BlockSumReducer, RowShards, gather_shards
from .shard import ShardView


class Collectives:
    """Single process (or nothing sharded): every block is whole here, so nothing is sent."""

    def cuts_blocks(self, layouts: Sequence) -> bool:
        return False

    def sum_blocks(self, sums: list[Tensor], layouts: Sequence) -> None:
        pass

    def max_(self, values: Tensor, layouts: Sequence) -> None:
        pass

    def rows(self, layout) -> RowShards | None:
        return None

    def gather_whole(self, values: list[Tensor], layouts: Sequence) -> list[Tensor]:
        return values

    def check_same_settings(self, settings: Callable[[], dict[str, str]], layouts: Sequence) -> None:
        pass


SINGLE_PROCESS = Collectives()


class ShardedCollectives(Collectives):
    """Parameters sharded as DTensors. Keeps the reducers of the few layout lists a step asks
    about (the whole step's, each param group's, the first-gradient subset of SGD-SaI), until the
    set of parameters with gradients changes."""

    KEPT = 8

    def __init__(self) -> None:
        self._kept: dict[tuple[int, ...], tuple[Sequence, BlockSumReducer]] = {}
        self._settings_checked = False

    def _reducer(self, layouts: Sequence) -> BlockSumReducer:
        key = tuple(id(layout) for layout in layouts)
        kept = self._kept.get(key)
        if kept is None:
            if len(self._kept) >= self.KEPT:
                self._kept.clear()
            # the layouts are kept with the reducer so that their ids stay unique
            kept = self._kept[key] = (list(layouts), BlockSumReducer(layouts))
        return kept[1]

    def cuts_blocks(self, layouts: Sequence) -> bool:
        return any(isinstance(layout, ShardView) for layout in layouts) and self._reducer(layouts).active

    def sum_blocks(self, sums: list[Tensor], layouts: Sequence) -> None:
        reducer = self._reducer(layouts)
        if reducer.active:
            reducer(sums)

    def max_(self, values: Tensor, layouts: Sequence) -> None:
        meshes = dict.fromkeys((v.mesh, v.reduce_mesh_dims) for v in layouts if isinstance(v, ShardView))
        for mesh, dims in meshes:  # max is idempotent: several meshes or dims are harmless
            for d in dims:
                dist.all_reduce(values, op=dist.ReduceOp.MAX, group=mesh.get_group(d))

    def rows(self, layout) -> RowShards | None:
        return RowShards(layout) if isinstance(layout, ShardView) else None

    def gather_whole(self, values: list[Tensor], layouts: Sequence) -> list[Tensor]:
        sharded = [i for i, layout in enumerate(layouts) if isinstance(layout, ShardView)]
        whole = list(values)
        for i, value in zip(sharded, gather_shards([layouts[i] for i in sharded], [values[i] for i in sharded])):
            whole[i] = value
        return whole


    # Note [one optimizer on every rank]: the ranks that share a sharded parameter step it as one
    # process would only when their optimizers agree. Built otherwise (a momentum_dtype or seed
    # taken from the rank), replicated codes diverge silently, or the ranks issue different
    # collectives and hang until the timeout. One object gather, at the first sharded step.
    def check_same_settings(self, settings: Callable[[], dict[str, str]], layouts: Sequence) -> None:
        if self._settings_checked:
            return
        settings = settings()
        groups = dict.fromkeys(v.mesh.get_group(d) for v in layouts if isinstance(v, ShardView) for d in v.reduce_mesh_dims)
        for group in groups:
            seen: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(seen, settings, group=group)
            for rank, other in enumerate(seen):
                differ = sorted(k for k in settings.keys() | other.keys() if settings.get(k) != other.get(k))
                if differ:
                    key = differ[0]
                    raise ValueError(
                        f"the optimizers of the ranks sharing these sharded parameters differ: {key} is "
                        f"{settings.get(key, 'absent')} on rank {dist.get_rank()} and {other.get(key, 'absent')} on "
                        f"rank {dist.get_global_rank(group, rank)} ({len(differ)} setting(s) differ). Build the "
                        "optimizer alike on every rank (the same seed, momentum_dtype and groups); steps would "
                        "diverge or hang otherwise"
                    )
        self._settings_checked = True


def collectives_for(layouts: Sequence, sharded: ShardedCollectives) -> Collectives:
    """`SINGLE_PROCESS` unless some layout is a `ShardView`; then ``sharded`` (the optimizer's own,
    so its reducer cache lives as long as the optimizer)."""
    return sharded if any(isinstance(layout, ShardView) for layout in layouts) else SINGLE_PROCESS
