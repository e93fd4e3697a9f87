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


def stat_dtype(param: torch.Tensor) -> torch.dtype:
    """dtype of per-block statistics: at least float32, so bf16/fp16 params keep exact block means."""
    return torch.promote_types(param.dtype, torch.float32)
