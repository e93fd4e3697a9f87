"""Shard views: a parameter's `BlockSpec` seen from the rank that holds one shard of it.

Under FSDP2 (``fully_shard``) or any DTensor sharding, a rank holds a box of the global tensor.
Blocks of the global spec may lie wholly inside the box (their statistics are local), partly
inside it (a head, a column, a norm weight cut by the sharding: the rank holds a partial sum and
must add the other ranks' parts), or outside it. A `ShardView` describes this as data:

* ``local``: a `BlockSpec` over the *local* tensor whose blocks are the pieces of global blocks
  held here, in order. Every global block meets the box in a contiguous run of local units (the
  box's row-major order preserves the global order), so the pieces are again "segments" and the
  step's three operations (`block_sum`, `expand`, and `block_numel`, answered with the *global*
  block sizes so means come out right) keep their fast reshape-based paths.
* ``ranges``: the global block ids of the local pieces, as consecutive ``(start, stop)`` ranges.
* ``shared``: local indices of the pieces whose block continues on another rank; only these take
  part in the per-step all-reduce. ``shared_union``: the ids cut anywhere (the same list on every
  rank, so every rank lays out the all-reduce buffer identically); ``owned``: which local pieces
  this rank writes when a global copy of block statistics is assembled (each block by exactly
  one rank: the lowest mesh coordinate that holds part of it).

Only the standard placements are supported: ``Shard(d)`` (torch.chunk semantics, as DTensor and
FSDP2 use) and ``Replicate()`` (replicas hold the same values: nothing is summed over them).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..partition import BlockSpec

try:  # torch.distributed is optional in some builds
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = Replicate = Shard = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The rank's own shard of a DTensor (a view sharing its storage); other tensors unchanged."""
    return t.to_local() if is_dtensor(t) else t


Box = tuple[tuple[int, int], ...]  # (start, size) per tensor dim


def shard_box(shape: tuple[int, ...], placements, coordinate: tuple[int, ...], mesh_shape: tuple[int, ...]) -> Box:
    """The box of a global tensor held at ``coordinate`` of a device mesh (torch.chunk semantics)."""
    box = [(0, n) for n in shape]
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Replicate):
            continue
        if type(placement) is not Shard:  # _StridedShard, Partial, custom placements
            raise NotImplementedError(
                f"blockopt supports Shard(d) and Replicate() placements of parameters, got {placement!r}; "
                "shard parameters with fully_shard (Shard(0)) or plain DTensor Shard/Replicate placements"
            )
        dim = placement.dim if placement.dim >= 0 else placement.dim + len(shape)
        start, size = box[dim]
        chunks = mesh_shape[mesh_dim]
        full = -(-size // chunks)  # ceil
        lo = min(full * coordinate[mesh_dim], size)
        box[dim] = (start + lo, min(size, lo + full) - lo)
    return tuple(box)


def flat_start(box: Box, shape: tuple[int, ...]) -> int | None:
    """The row-major index in a tensor of ``shape`` of the first element of ``box``, when the box
    is one contiguous run of the flattened tensor (every dim after the first one longer than 1 is
    whole), else ``None``. An empty box starts at 0."""
    if any(size == 0 for _, size in box):
        return 0
    first = next((d for d, (_, size) in enumerate(box) if size > 1), len(box))
    if any(box[d] != (0, shape[d]) for d in range(first + 1, len(box))):
        return None
    start, stride = 0, 1
    for (lo, _), n in zip(reversed(box), reversed(shape)):
        start += lo * stride
        stride *= n
    return start


def _segment_table(spec: BlockSpec):
    """Per segment: (first unit, n_units, units per block, first block id)."""
    table, unit, block = [], 0, 0
    for units, per_block in spec.segments:
        table.append((unit, units, per_block, block))
        unit += units
        block += units // per_block
    return table


def block_runs(spec: BlockSpec, box: Box) -> tuple[list[int], list[int]]:
    """Global block ids met by ``box`` and the number of local units of each, in local order."""
    dims = spec.block_dims
    if any(size == 0 for _, size in box):
        return [], []
    intervals = [box[d] for d in dims]
    extents = [spec.shape[d] for d in dims]
    # The box's units are one contiguous range of global units when every block dim after the
    # first one that is cut to more than one unit is whole.
    cut = next((j for j, (_, size) in enumerate(intervals) if size > 1), len(dims))
    contiguous = all(intervals[j] == (0, extents[j]) for j in range(cut + 1, len(dims)))
    if contiguous:
        first = 0
        for (start, _), extent in zip(intervals, extents):
            first = first * extent + start
        count = math.prod(size for _, size in intervals)
        ids, lengths = [], []
        for seg_unit, seg_units, per_block, seg_block in _segment_table(spec):
            lo, hi = max(first, seg_unit), min(first + count, seg_unit + seg_units)
            if lo >= hi:
                continue
            b_lo, b_hi = (lo - seg_unit) // per_block, (hi - 1 - seg_unit) // per_block
            for b in range(b_lo, b_hi + 1):
                ids.append(seg_block + b)
                lengths.append(min(hi, seg_unit + (b + 1) * per_block) - max(lo, seg_unit + b * per_block))
        return ids, lengths
    # General case (a block dim cut after a cut one): enumerate the box's units.
    units = torch.zeros((), dtype=torch.int64)
    for (start, size), extent in zip(intervals, extents):
        units = units.unsqueeze(-1) * extent + torch.arange(start, start + size)
    units = units.reshape(-1)
    table = _segment_table(spec)
    starts = torch.tensor([row[0] for row in table])
    seg = torch.searchsorted(starts, units, right=True) - 1
    per_block = torch.tensor([row[2] for row in table])[seg]
    block = torch.tensor([row[3] for row in table])[seg] + (units - starts[seg]) // per_block
    ids, lengths = torch.unique_consecutive(block, return_counts=True)
    return ids.tolist(), lengths.tolist()


def as_segments(lengths: list[int]) -> tuple[tuple[int, int], ...]:
    """Run lengths -> ``(n_units, units_per_block)`` segments (equal neighbours merged)."""
    segments: list[list[int]] = []
    for length in lengths:
        if segments and segments[-1][1] == length:
            segments[-1][0] += length
        else:
            segments.append([length, length])
    return tuple((units, per_block) for units, per_block in segments)


def id_ranges(ids: list[int]) -> tuple[tuple[int, int], ...]:
    """Block ids -> consecutive ``(start, stop)`` ranges."""
    out: list[list[int]] = []
    for i in ids:
        if out and out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, i + 1])
    return tuple((a, b) for a, b in out)


def global_block_sizes(spec: BlockSpec) -> list[int]:
    """The size of each of the whole tensor's blocks, in block-id order."""
    return [size for (units, per_block), size in zip(spec.segments, spec.block_sizes) for _ in range(units // per_block)]


@dataclass(frozen=True, eq=False)
class ShardView:
    """A global `BlockSpec` as seen from one rank's shard (see the module docstring).

    The step treats it like a spec: ``block_sum`` gives this shard's partial sums of its pieces,
    ``block_numel`` the *global* size of each piece's block, ``expand`` broadcasts per-piece
    values over the local tensor.
    """

    spec: BlockSpec  # the global layout
    local: BlockSpec  # the pieces held here, over the local shape
    ranges: tuple[tuple[int, int], ...]  # global ids of the local pieces
    shared: Tensor  # local piece indices whose block continues on another rank
    shared_ids: Tensor  # their global ids (sorted, like `shared`)
    shared_union: Tensor  # global ids of every block cut by the sharding (same on every rank)
    owned: Tensor  # bool per local piece: this rank writes it when statistics are gathered
    global_sizes: Tensor | float  # global elements of each piece's block
    mesh: object  # the DeviceMesh
    reduce_mesh_dims: tuple[int, ...]  # mesh dims the parameter is sharded over
    box: Box = ()  # (global start, size) of the local shard along each dim of the parameter
    cut_dims: tuple[int, ...] = ()  # the parameter dims its placements split (the same on every rank; () for a ZeRO piece)

    # ---- what a step reads -----------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def role(self) -> str:
        return self.spec.role

    @property
    def n_blocks(self) -> int:
        return self.local.n_blocks

    @property
    def numel(self) -> int:
        return self.local.numel

    def block_sum(self, x: Tensor) -> Tensor:
        return self.local.block_sum(x)

    def block_numel(self, like: Tensor) -> Tensor | float:
        if isinstance(self.global_sizes, float):
            return self.global_sizes
        return self.global_sizes.to(device=like.device, dtype=like.dtype)

    def block_mean(self, x: Tensor) -> Tensor:
        return self.block_sum(x) / self.block_numel(x)

    def expand(self, per_block: Tensor) -> Tensor:
        return self.local.expand(per_block)

    # ---- moving block statistics between the local and the global form ---------------------
    def to_local(self, global_values: Tensor) -> Tensor:
        """``(spec.n_blocks, ...)`` global statistics -> this rank's ``(n_blocks, ...)`` pieces."""
        if not self.ranges:
            return global_values[:0].clone()
        return torch.cat([global_values[a:b] for a, b in self.ranges]).clone()

    def global_index(self) -> Tensor:
        """Global block id of each local piece."""
        if not self.ranges:
            return torch.zeros(0, dtype=torch.int64)
        return torch.cat([torch.arange(a, b) for a, b in self.ranges])

    # ---- where the shard lies in the flattened parameter -----------------------------------
    def flat_start(self) -> int | None:
        """The row-major index, in the whole parameter, of this shard's first element, when the
        shard is one contiguous run of the flattened parameter (a ``Shard(0)`` shard, a ZeRO
        piece); ``None`` when it is not (a shard along a later dim)."""
        return flat_start(self.box, tuple(self.spec.shape))

    def local_rows(self, full: Tensor) -> Tensor:
        """The rows of ``full`` (a tensor whose dim 0 runs along the parameter's) this shard holds."""
        if not self.box:
            return full
        start, size = self.box[0]
        return full[start:start + size]


def shard_view(spec: BlockSpec, param: Tensor) -> ShardView:
    """The `ShardView` of ``spec`` for this rank's shard of the DTensor ``param``."""
    mesh, placements = param.device_mesh, tuple(param.placements)
    shape = tuple(param.shape)
    if shape != tuple(spec.shape):
        raise ValueError(f"{spec.name}: the plan says shape {spec.shape}, the DTensor's global shape is {shape}")
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise RuntimeError(f"{spec.name}: this rank is not part of the parameter's device mesh")
    return _shard_view(spec, placements, tuple(coordinate), tuple(mesh.shape), mesh, tuple(param.to_local().shape))


def _shard_view(spec, placements, coordinate, mesh_shape, mesh, local_shape) -> ShardView:
    reduce_dims = tuple(i for i, p in enumerate(placements) if not isinstance(p, Replicate))
    box = shard_box(spec.shape, placements, coordinate, mesh_shape)
    if tuple(size for _, size in box) != tuple(local_shape):
        raise NotImplementedError(
            f"{spec.name}: local shard shape {tuple(local_shape)} is not the torch.chunk shard {tuple(s for _, s in box)} "
            "of its placements; blockopt supports even-or-chunked Shard(d) layouts (as fully_shard makes them)"
        )
    ids, lengths = block_runs(spec, box)
    cut, owner = _cut_blocks(spec, tuple(placements), tuple(mesh_shape), reduce_dims)
    sizes = global_block_sizes(spec)
    global_sizes: Tensor | float
    if len(set(sizes)) <= 1:
        global_sizes = float(sizes[0]) if sizes else 1.0
    else:
        global_sizes = torch.tensor([float(sizes[i]) for i in ids], dtype=torch.float64)
    # An empty shard holds no block: described as per-coordinate over zero entries.
    empty = math.prod(local_shape) == 0
    local = BlockSpec(
        name=spec.name, shape=tuple(local_shape), rule=spec.rule, reason=spec.reason, role=spec.role,
        block_dims=tuple(range(len(local_shape))) if empty else spec.block_dims,
        segments=((0, 1),) if empty else as_segments(lengths), n_heads=spec.n_heads,
    )
    here = coordinate_key(coordinate, reduce_dims)
    cut_dims = sorted({p.dim % max(len(spec.shape), 1) for p, n in zip(placements, mesh_shape) if isinstance(p, Shard) and n > 1})
    shared = [j for j, i in enumerate(ids) if i in cut]
    return ShardView(
        spec=spec,
        local=local,
        ranges=id_ranges(ids),
        shared=torch.tensor(shared, dtype=torch.int64),
        shared_ids=torch.tensor([ids[j] for j in shared], dtype=torch.int64),
        shared_union=torch.tensor(sorted(cut), dtype=torch.int64),
        owned=torch.tensor([owner.get(i, here) == here for i in ids], dtype=torch.bool),
        global_sizes=global_sizes,
        mesh=mesh,
        reduce_mesh_dims=reduce_dims,
        box=box,
        cut_dims=tuple(cut_dims),
    )


def coordinate_key(coordinate, reduce_dims) -> tuple[int, ...]:
    return tuple(coordinate[d] for d in reduce_dims)


@functools.lru_cache(maxsize=4096)
def _cut_blocks(spec, placements, mesh_shape, reduce_dims):
    """Blocks held in part by more than one shard, and the owner (lowest shard) of each.

    Computed from the placements alone (no communication), the same on every rank."""
    sizes = global_block_sizes(spec)
    holders: dict[int, list[tuple[int, ...]]] = {}
    for key in itertools.product(*(range(mesh_shape[d]) for d in reduce_dims)):
        coordinate = [0] * len(mesh_shape)
        for d, c in zip(reduce_dims, key):
            coordinate[d] = c
        box = shard_box(spec.shape, placements, tuple(coordinate), mesh_shape)
        ids, lengths = block_runs(spec, box)
        per_unit = math.prod(size for d, (_, size) in enumerate(box) if d not in spec.block_dims)
        for i, length in zip(ids, lengths):
            if length * per_unit < sizes[i]:
                holders.setdefault(i, []).append(key)
    return frozenset(holders), {i: min(keys) for i, keys in holders.items()}
