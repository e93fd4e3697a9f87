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
  whole on every rank, with one all-reduce for the whole list.

`SINGLE_PROCESS` is the implementation that has nothing to do. An optimizer gets the one that
fits its step's layouts from `collectives_for`; DDP needs nothing (its parameters are whole on
every rank), FSDP2 and DTensor shardings get a `ShardedCollectives`.
"""

from __future__ import annotations

from collections.abc import Sequence

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


SINGLE_PROCESS = Collectives()


class ShardedCollectives(Collectives):
    """Parameters sharded as DTensors. Keeps the reducers of the few layout lists a step asks
    about (the whole step's, each param group's, the first-gradient subset of SGD-SaI), until the
    set of parameters with gradients changes."""

    KEPT = 8

    def __init__(self) -> None:
        self._kept: dict[tuple[int, ...], tuple[Sequence, BlockSumReducer]] = {}

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


def collectives_for(layouts: Sequence, sharded: ShardedCollectives) -> Collectives:
    """`SINGLE_PROCESS` unless some layout is a `ShardView`; then ``sharded`` (the optimizer's own,
    so its reducer cache lives as long as the optimizer)."""
    return sharded if any(isinstance(layout, ShardView) for layout in layouts) else SINGLE_PROCESS
