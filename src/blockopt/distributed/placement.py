"""Placing optimizer state like its parameter: the only place blockopt builds DTensors.

State shaped like a sharded parameter is that parameter's shard, as a DTensor on its mesh with its
placements, so DCP saves and reshards it like the parameter. The cases that come up: a full-size
tensor cut to this rank's shard (a one-process checkpoint loaded under FSDP2); the factors of
AdaPM's low-rank momentum (``L`` split over rows like the parameter, ``R`` replicated); and the
codes and scales of a compressed momentum (rows split like the parameter's, or whole on every
rank: `blockopt.optim.momentum`, Note [compressed momentum of sharded parameters]).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reduce import RowShards
from .shard import ShardView, shard_box

try:  # torch.distributed is optional in some builds
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - builds without distributed support
    DTensor = Replicate = Shard = None


def shard_like(full: Tensor, param) -> Tensor:
    """A full-size tensor cut to ``param``'s shard, as a DTensor placed like it (no communication)."""
    box = shard_box(tuple(param.shape), param.placements, tuple(param.device_mesh.get_coordinate()), tuple(param.device_mesh.shape))
    local = full.to(param.device)[tuple(slice(start, start + size) for start, size in box)]
    return DTensor.from_local(local.clone(), param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def rows_like(param, full: Tensor, view: ShardView) -> Tensor:
    """A full ``(m, r)`` factor of ``param``'s matrix view, split over rows like ``param`` (a
    DTensor). Shardings along other dims raise `NotImplementedError` (see `RowShards`)."""
    local = RowShards(view).local_rows(full)
    return DTensor.from_local(local.clone(), param.device_mesh, param.placements, shape=full.shape, stride=full.stride())


def split_rows_like(param, local: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``local``, this rank's rows of a tensor of global ``shape`` whose dim 0 runs along
    ``param``'s dim 0, as a DTensor split over rows like ``param`` (no communication).

    ``param`` must be sharded along dim 0 only (its `ShardView.cut_dims` at most ``(0,)``), so
    its shard is whole rows and a tensor with as many rows splits at the same rows."""
    placements = [Replicate() if isinstance(p, Replicate) else Shard(0) for p in param.placements]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, param.device_mesh, placements, shape=torch.Size(shape), stride=stride)


def replicated_like(param, value: Tensor) -> Tensor:
    """``value`` (the same on every rank) as a DTensor replicated over ``param``'s mesh."""
    mesh = param.device_mesh
    return DTensor.from_local(value, mesh, [Replicate()] * mesh.ndim, shape=value.shape, stride=value.stride())
