"""Step kernels: the implementations of a step that are not its readable reference.

``kernels.adam_mini`` holds Adam-mini's (the update every blockopt optimizer with a block second
moment runs): ``batched`` (``torch._foreach_*``, any device), ``cpu`` (a C++ kernel built on first
use or by ``blockopt build``), ``cuda`` (Triton), and ``fused``, which hands each tensor to the
kernel of its device. Kernels see plain local tensors and layouts only: no param groups, no
state dicts, no collectives. They depend on `blockopt.partition` (for layouts) and nothing else
of blockopt.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..partition import BlockSpec


def stat_dtype(param: torch.Tensor) -> torch.dtype:
    """dtype of per-block statistics: at least float32, so bf16/fp16 params keep exact block means."""
    return torch.promote_types(param.dtype, torch.float32)


# Note [spec arithmetic under torch.compile]: two of `BlockSpec`'s operations do not trace: its
# block sizes take ``math.prod`` of a generator, and a layout of several segments expands with a
# data-dependent ``repeat_interleave``. While a step is traced, these two work them out from the
# spec's constants instead (the same values); eagerly they are the spec's own.
def block_numel(spec, like: Tensor) -> Tensor | float:
    """``spec.block_numel(like)``: elements per block, a float when all blocks are equal."""
    if not (isinstance(spec, BlockSpec) and torch.compiler.is_compiling()):
        return spec.block_numel(like)
    per_unit = spec.numel // sum(units for units, _ in spec.segments)
    if spec.uniform:
        return float(spec.segments[0][1] * per_unit)
    sizes = [per_block * per_unit for units, per_block in spec.segments for _ in range(units // per_block)]
    return torch.tensor(sizes, dtype=like.dtype, device=like.device)


def expand(spec, per_block: Tensor) -> Tensor:
    """``spec.expand(per_block)``: ``(n_blocks,)`` values broadcast against the parameter."""
    if not (isinstance(spec, BlockSpec) and not spec.uniform and torch.compiler.is_compiling()):
        return spec.expand(per_block)
    repeats = [units_per_block for units, units_per_block in spec.segments for _ in range(units // units_per_block)]
    units = per_block.repeat_interleave(torch.tensor(repeats, device=per_block.device), output_size=sum(repeats))
    return units.view(spec.broadcast_shape)
