"""A `BlockSpec` as the fused kernels read it (shared by the CPU and CUDA kernels).

The tensor is viewed as ``(outer, units, inner)``, ``units`` being its flattened block dims;
block ``b`` owns units ``bounds[b]:bounds[b + 1]`` of every outer index. So with
``width = units * inner``, block ``b`` is the column range ``[bounds[b] * inner,
bounds[b + 1] * inner)`` of the ``(outer, width)`` view: a contiguous run when ``outer == 1``
(rows, heads, whole, experts), a band of columns otherwise (the neurons of an ``(in, out)``
weight). ``bounds`` is ``None`` for the per-coordinate rule (every element a block).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ...partition import BlockSpec


class KernelLayout:
    __slots__ = ("outer", "inner", "bounds")

    def __init__(self, outer: int, inner: int, bounds: Tensor | None):
        self.outer, self.inner, self.bounds = outer, inner, bounds


@functools.lru_cache(maxsize=None)
def _layout_of(shape: tuple[int, ...], block_dims: tuple[int, ...], segments: tuple[tuple[int, int], ...]) -> KernelLayout | None:
    numel = math.prod(shape)
    n_blocks = sum(units // per_block for units, per_block in segments)
    if numel == 0:
        return None
    if n_blocks == numel:
        return KernelLayout(1, 1, None)
    if block_dims and list(block_dims) != list(range(block_dims[0], block_dims[-1] + 1)):
        return None  # blocks index non-adjacent dims: not ranges of units
    first = block_dims[0] if block_dims else len(shape)
    last = block_dims[-1] + 1 if block_dims else len(shape)
    sizes = [per_block for units, per_block in segments for _ in range(units // per_block)]
    bounds = torch.tensor([0, *sizes], dtype=torch.int64).cumsum_(0)
    return KernelLayout(math.prod(shape[:first]), math.prod(shape[last:]), bounds)


def kernel_layout(spec) -> KernelLayout | None:
    """The layout of ``spec``, or ``None`` where no kernel takes it (not a `BlockSpec`, e.g. a
    shard's view; blocks over non-adjacent dims; an empty tensor). Cached: equal specs share one
    layout object."""
    if not isinstance(spec, BlockSpec):
        return None
    return _layout_of(spec.shape, spec.block_dims, spec.segments)
