"""Shard views checked against brute force, for every layout kind and many shardings (one process).

For each mesh coordinate the view's partial block sums, scattered to their global ids and added
up over the shards, must equal the global spec's block sums; the cut blocks must be exactly those
whose entries fall in two shards; and every block must have exactly one owner.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from blockopt.distributed.shard import _shard_view, shard_box
from blockopt.partition import BlockSpec, make_spec

SPECS = [
    make_spec("rows", (7, 5), "rows", "test"),
    make_spec("cols", (6, 5), "cols", "test"),  # Conv1D-style: blocks span every row
    make_spec("heads", (12, 4), "heads", "test", n_heads=3),
    make_spec("whole", (9,), "whole", "test"),
    make_spec("coordinate", (5, 3), "coordinate", "test"),
    make_spec("vector", (10,), "coordinate", "test"),
    # a fused qkv projection: query heads, key heads, value neurons (non-uniform segments)
    BlockSpec(name="qkv", shape=(20, 3), rule="heads", reason="test", block_dims=(0,), segments=((8, 4), (4, 4), (8, 1))),
    # a fused qkv in Conv1D layout: the segments run along the columns
    BlockSpec(name="conv_qkv", shape=(4, 18), rule="heads", reason="test", block_dims=(1,), segments=((6, 3), (6, 3), (6, 1))),
    # stacked experts: one block per (expert, row)
    BlockSpec(name="experts", shape=(3, 4, 5), rule="rows", reason="test", block_dims=(0, 1), segments=((12, 1),)),
    BlockSpec(name="experts_heads", shape=(3, 4, 2), rule="heads", reason="test", block_dims=(0, 1), segments=((12, 2),)),
]

SHARDINGS = [
    ((2,), (Shard(0),)),
    ((3,), (Shard(0),)),
    ((4,), (Shard(0),)),
    ((8,), (Shard(0),)),  # more ranks than rows: empty shards
    ((3,), (Shard(1),)),
    ((2, 2), (Replicate(), Shard(0))),  # HSDP: replicas hold the same shard
    ((2, 3), (Shard(0), Shard(1))),
    ((2, 2), (Shard(0), Shard(0))),  # the same dim sharded twice
]


def applicable(spec, placements) -> bool:
    return all(p.dim < len(spec.shape) for p in placements if isinstance(p, Shard))


CASES = [
    pytest.param(spec, mesh_shape, placements, id=f"{spec.name}-{mesh_shape}-{'/'.join(map(str, placements))}")
    for spec in SPECS
    for mesh_shape, placements in SHARDINGS
    if applicable(spec, placements)
]


def coordinates(mesh_shape):
    return list(itertools.product(*(range(n) for n in mesh_shape)))


def local_slice(x: torch.Tensor, box) -> torch.Tensor:
    return x[tuple(slice(start, start + size) for start, size in box)]


def views_of(spec, mesh_shape, placements):
    for coordinate in coordinates(mesh_shape):
        box = shard_box(spec.shape, placements, coordinate, mesh_shape)
        view = _shard_view(spec, placements, coordinate, mesh_shape, None, tuple(size for _, size in box))
        yield coordinate, box, view


def shard_key(coordinate, placements):
    return tuple(c for c, p in zip(coordinate, placements) if isinstance(p, Shard))


@pytest.mark.parametrize("spec,mesh_shape,placements", CASES)
def test_partial_sums_add_up_to_the_block_sums(spec, mesh_shape, placements):
    x = torch.randn(spec.shape, dtype=torch.float64)
    total = torch.zeros(spec.n_blocks, dtype=torch.float64)
    seen = set()
    for coordinate, box, view in views_of(spec, mesh_shape, placements):
        key = shard_key(coordinate, placements)
        if key in seen:  # a replica: the same shard, not summed again
            continue
        seen.add(key)
        local = local_slice(x, box)
        partial = view.block_sum(local)
        assert partial.shape == (view.n_blocks,)
        total.index_add_(0, view.global_index(), partial)
    torch.testing.assert_close(total, spec.block_sum(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec,mesh_shape,placements", CASES)
def test_expand_and_sizes_are_the_global_ones(spec, mesh_shape, placements):
    values = torch.rand(spec.n_blocks, dtype=torch.float64) + 1
    full = spec.expand(values).expand(spec.shape)
    sizes = spec.block_sum(torch.ones(spec.shape, dtype=torch.float64))
    for _, box, view in views_of(spec, mesh_shape, placements):
        if view.numel == 0:
            continue
        index = view.global_index()
        local = view.expand(values[index]).expand(view.local.shape)
        assert torch.equal(local, local_slice(full, box))
        numel = view.block_numel(values)
        expected = sizes[index]
        assert torch.equal(torch.as_tensor(numel, dtype=torch.float64).expand_as(expected), expected)


@pytest.mark.parametrize("spec,mesh_shape,placements", CASES)
def test_cut_blocks_and_owners(spec, mesh_shape, placements):
    index = spec.block_index()
    holders: dict[int, set] = {}
    owners: dict[int, list] = {}
    unions = set()
    for coordinate, box, view in views_of(spec, mesh_shape, placements):
        key = shard_key(coordinate, placements)
        for block in local_slice(index, box).unique().tolist():
            holders.setdefault(block, set()).add(key)
        ids = view.global_index()
        assert sorted(ids.tolist()) == sorted(local_slice(index, box).unique().tolist())
        for block, owned in zip(ids.tolist(), view.owned.tolist()):
            if owned:
                owners.setdefault(block, []).append(coordinate)
        cut_here = set(view.shared_ids.tolist())
        assert cut_here == {b for b in ids.tolist() if b in set(view.shared_union.tolist())}
        assert view.shared.tolist() == [j for j, b in enumerate(ids.tolist()) if b in cut_here]
        unions.add(tuple(view.shared_union.tolist()))
    cut = sorted(b for b, keys in holders.items() if len(keys) > 1)
    assert unions == {tuple(cut)}  # every rank lays out the all-reduce buffer the same way
    # exactly one owner per block among the distinct shards (replicas write their own copy)
    n_replicas = len(coordinates(mesh_shape)) // len({shard_key(c, placements) for c in coordinates(mesh_shape)})
    assert sorted(owners) == list(range(spec.n_blocks))
    assert all(len(coords) == n_replicas for coords in owners.values())


def test_rejects_other_placements():
    from torch.distributed.tensor import Partial

    spec = make_spec("w", (4, 4), "rows", "test")
    with pytest.raises(NotImplementedError, match="Shard"):
        shard_box(spec.shape, (Partial(),), (0,), (2,))
