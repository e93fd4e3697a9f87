"""The collectives of blockwise optimizers on sharded parameters.

Note [one all-reduce per step]: a step computes, for every parameter, per-block partial sums
(``sum(g^2)`` for Adam-mini; ``sum(g)`` and ``sum(g^2)`` for SGD-SaI). Only the blocks cut by
the sharding need other ranks' parts. `BlockSumReducer` copies those partial sums, for every
parameter of the step, into one buffer laid out by the global ids of all cut blocks (the same
layout on every rank, known from the placements alone), makes one ``all_reduce`` over the ranks
the parameters are sharded across, and copies the totals back. Blocks a rank holds whole never
travel. A mesh sharded along several dims (e.g. FSDP over one and another Shard over the other)
gets one all-reduce per sharded mesh dim; replicated mesh dims hold equal values and are skipped.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .shard import ShardView


def _all_reduce(buffer: Tensor, mesh, mesh_dims: tuple[int, ...]) -> None:
    for d in mesh_dims:
        dist.all_reduce(buffer, group=mesh.get_group(d))


class BlockSumReducer:
    """Sums per-block partial statistics over the ranks that share each block, in place.

    ``views`` lists, in order, the layout of each tensor of the lists it will be called with:
    a `ShardView` for a sharded parameter, anything else (a `BlockSpec`) for a local one. Called
    with a list of tensors whose first dim indexes the local blocks (trailing dims allowed), it
    makes one all-reduce per device mesh (and sharded mesh dim) and dtype, and none when no
    block is cut.
    """

    def __init__(self, views: Sequence):
        # (mesh, mesh dims) -> [(position in the list, local piece indices, buffer indices)]
        self._layout: dict[tuple, list[tuple[int, Tensor, Tensor]]] = defaultdict(list)
        self._sizes: dict[tuple, int] = defaultdict(int)
        for i, view in enumerate(views):
            if not isinstance(view, ShardView) or len(view.shared_union) == 0:
                continue
            key = (view.mesh, view.reduce_mesh_dims)
            offset = self._sizes[key]
            buffer_index = offset + torch.searchsorted(view.shared_union, view.shared_ids)
            self._layout[key].append((i, view.shared, buffer_index))
            self._sizes[key] += len(view.shared_union)

    @property
    def active(self) -> bool:
        """Whether any block is cut (so a call communicates)."""
        return bool(self._layout)

    def __call__(self, sums: list[Tensor]) -> None:
        for (mesh, mesh_dims), entries in self._layout.items():
            by_kind: dict[tuple, list] = defaultdict(list)
            for entry in entries:
                s = sums[entry[0]]
                by_kind[s.dtype, s.device, tuple(s.shape[1:])].append(entry)
            for (dtype, device, trailing), group in by_kind.items():
                size = self._sizes[mesh, mesh_dims]
                buffer = torch.zeros((size, *trailing), dtype=dtype, device=device)
                for i, local_index, buffer_index in group:
                    if len(local_index):
                        buffer[buffer_index.to(device)] = sums[i][local_index.to(device)]
                _all_reduce(buffer, mesh, mesh_dims)
                for i, local_index, buffer_index in group:
                    if len(local_index):
                        sums[i][local_index.to(device)] = buffer[buffer_index.to(device)]


def gather_block_stats(views: Sequence[ShardView], local_values: Sequence[Tensor]) -> list[Tensor]:
    """Global ``(spec.n_blocks, ...)`` statistics assembled from every rank's pieces.

    Collective: every rank of the meshes must call it with the same parameters in the same order.
    Each block is written by exactly one rank (its owner), so one all-reduce per mesh sums the
    pieces into the global vector, identical on every rank.
    """
    out: list[Tensor | None] = [None] * len(views)
    by_mesh: dict[tuple, list[int]] = defaultdict(list)
    for i, (view, value) in enumerate(zip(views, local_values)):
        by_mesh[view.mesh, view.reduce_mesh_dims, value.dtype, value.device, tuple(value.shape[1:])].append(i)
    for (mesh, mesh_dims, dtype, device, trailing), indices in by_mesh.items():
        sizes = [views[i].spec.n_blocks for i in indices]
        buffer = torch.zeros((sum(sizes), *trailing), dtype=dtype, device=device)
        offset = 0
        for i, size in zip(indices, sizes):
            view, value = views[i], local_values[i]
            owned = view.owned.to(device)
            buffer[offset + view.global_index().to(device)[owned]] = value[owned]
            offset += size
        _all_reduce(buffer, mesh, mesh_dims)
        for i, part in zip(indices, buffer.split(sizes)):
            out[i] = part.clone()
    return out  # type: ignore[return-value]


def gather_shards(views: Sequence[ShardView], local_values: Sequence[Tensor]) -> list[Tensor]:
    """Each tensor whole (the global shape of its view's parameter), the same on every rank,
    from every rank's shard.

    Collective, like `gather_block_stats`: each rank writes its shard into a zero buffer and one
    all-reduce per mesh and dtype sums them. Every element is held by exactly one shard of the
    summed mesh dims (replicated dims are not summed) and adding zeros is exact, so the whole
    tensor is bit for bit what the shards held.
    """
    out: list[Tensor | None] = [None] * len(views)
    by_mesh: dict[tuple, list[int]] = defaultdict(list)
    for i, (view, value) in enumerate(zip(views, local_values)):
        by_mesh[view.mesh, view.reduce_mesh_dims, value.dtype, value.device].append(i)
    for (mesh, mesh_dims, dtype, device), indices in by_mesh.items():
        shapes = [tuple(views[i].spec.shape) for i in indices]
        sizes = [math.prod(shape) for shape in shapes]
        buffer = torch.zeros(sum(sizes), dtype=dtype, device=device)
        for i, part, shape in zip(indices, buffer.split(sizes), shapes):
            box = tuple(slice(start, start + size) for start, size in views[i].box)
            part.view(shape)[box] = local_values[i]
        _all_reduce(buffer, mesh, mesh_dims)
        for i, part, shape in zip(indices, buffer.split(sizes), shapes):
            out[i] = part.view(shape)
    return out  # type: ignore[return-value]


class RowShards:
    """Collectives for a matrix whose rows are sharded like a parameter's dim 0 (FSDP2's
    ``Shard(0)``), for algorithms that keep a row-sharded factor ``L`` (``m x r``) beside a
    replicated one: gathering ``L`` whole, and summing row-wise partial products ``L_i^T X_i``.

    Gathers are all-reduces of zero-padded buffers (each row is held by exactly one rank, and
    adding zeros is exact), so the gathered matrix is bit-identical to the unsharded one.
    """

    def __init__(self, view: ShardView):
        if any(size != full for (_, size), full in zip(view.box[1:], view.spec.shape[1:])):
            raise NotImplementedError(
                f"{view.name}: only parameters sharded along dim 0 (FSDP2's Shard(0)) are supported here; "
                f"this shard covers {view.box} of {tuple(view.spec.shape)}"
            )
        self.mesh, self.mesh_dims = view.mesh, view.reduce_mesh_dims
        self.rows = slice(view.box[0][0], view.box[0][0] + view.box[0][1]) if view.box else slice(0, view.spec.shape[0])
        self.n_rows = view.spec.shape[0] if view.spec.shape else 1

    def gather_rows(self, local: Tensor) -> Tensor:
        """The full ``(m, ...)`` matrix from every rank's ``local`` rows (the same on every rank)."""
        full = local.new_zeros((self.n_rows, *local.shape[1:]))
        full[self.rows] = local
        _all_reduce(full, self.mesh, self.mesh_dims)
        return full

    def local_rows(self, full: Tensor) -> Tensor:
        return full[self.rows]

    def sum_(self, partial: Tensor) -> Tensor:
        """Sum ``partial`` (a rank's share of a sum over rows) over the ranks, in place."""
        _all_reduce(partial, self.mesh, self.mesh_dims)
        return partial

