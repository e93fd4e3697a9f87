"""A `BlockSpec` as the fused kernels read it (shared by the CPU and CUDA kernels).

The tensor is viewed as ``(outer, units, inner)``, ``units`` being its flattened block dims;
the units are cut into consecutive ``segments`` ``(n_units, units_per_block)``, as in the spec,
so block ``b`` owns units ``bounds[b]:bounds[b + 1]`` of every outer index. With
``width = units * inner``, block ``b`` is the column range ``[bounds[b] * inner,
bounds[b + 1] * inner)`` of the ``(outer, width)`` view: a contiguous run when ``outer == 1``
(rows, heads, whole, experts), a band of columns otherwise (the neurons of an ``(in, out)``
weight). ``segments`` is ``None`` for the per-coordinate rule (every element a block).

Note [layouts under torch.compile]: a layout is plain integers (the CPU kernel takes the
segments, not a tensor of bounds), so while a step is traced it is computed from the spec's
constants and folded away, with no cache for dynamo to look into; eagerly it is cached.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import Tensor

from ...partition import BlockSpec


class KernelLayout:
    def __init__(self, outer: int, inner: int, segments: tuple[tuple[int, int], ...] | None, n_blocks: int):
        self.outer, self.inner, self.segments, self.n_blocks = outer, inner, segments, n_blocks

    @functools.cached_property
    def bounds(self) -> Tensor | None:
        """``(n_blocks + 1,)`` int64 unit offsets of the blocks (``None`` per coordinate)."""
        if self.segments is None:
            return None
        sizes = [per_block for units, per_block in self.segments for _ in range(units // per_block)]
        return torch.tensor([0, *sizes], dtype=torch.int64).cumsum_(0)


def _layout_of(shape: tuple[int, ...], block_dims: tuple[int, ...], segments: tuple[tuple[int, int], ...]) -> KernelLayout | None:
    numel = math.prod(shape)
    n_blocks = sum(units // per_block for units, per_block in segments)
    if numel == 0:
        return None
    if n_blocks == numel:
        return KernelLayout(1, 1, None, n_blocks)
    if block_dims and list(block_dims) != list(range(block_dims[0], block_dims[-1] + 1)):
        return None  # blocks index non-adjacent dims: not ranges of units
    first = block_dims[0] if block_dims else len(shape)
    last = block_dims[-1] + 1 if block_dims else len(shape)
    return KernelLayout(math.prod(shape[:first]), math.prod(shape[last:]), tuple(segments), n_blocks)


_cached_layout_of = functools.lru_cache(maxsize=None)(_layout_of)


def kernel_layout(spec) -> KernelLayout | None:
    """The layout of ``spec``, or ``None`` where no kernel takes it (not a `BlockSpec`, e.g. a
    shard's view; blocks over non-adjacent dims; an empty tensor). Eagerly cached: equal specs
    share one layout object (Note [layouts under torch.compile])."""
    if not isinstance(spec, BlockSpec):
        return None
    layout_of = _layout_of if torch.compiler.is_compiling() else _cached_layout_of
    return layout_of(spec.shape, spec.block_dims, spec.segments)


def kernel_layouts(specs) -> list[KernelLayout | None]:
    """`kernel_layout` of every spec (one look at whether a compile is tracing, not one per tensor)."""
    if torch.compiler.is_compiling():
        return [kernel_layout(spec) for spec in specs]
    return [_cached_layout_of(spec.shape, spec.block_dims, spec.segments) if isinstance(spec, BlockSpec) else None
            for spec in specs]


def _kernel_args(layouts: tuple[KernelLayout, ...]) -> tuple[tuple[int, ...], ...]:
    counts = tuple(0 if layout.segments is None else len(layout.segments) for layout in layouts)
    pairs = tuple(itertools.chain.from_iterable(itertools.chain.from_iterable(layout.segments or ()) for layout in layouts))
    return tuple(layout.outer for layout in layouts), tuple(layout.inner for layout in layouts), counts, pairs


_cached_kernel_args = functools.lru_cache(maxsize=64)(_kernel_args)


def kernel_args(layouts) -> tuple[tuple[int, ...], ...]:
    """``layouts`` as the kernels take them: ``outer`` and ``inner`` per layout, its number of
    segments (0 per coordinate) and all ``(n_units, units_per_block)`` pairs, flattened. Eagerly
    cached (a step with thousands of tensors passes the same lists every time)."""
    layouts = tuple(layouts)
    return _kernel_args(layouts) if torch.compiler.is_compiling() else _cached_kernel_args(layouts)
