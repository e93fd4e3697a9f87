"""The one door to distribution: everything an optimizer needs from other ranks or DTensors.

The math of a step only ever sees local tensors, a layout that answers ``block_sum``,
``block_numel`` and ``expand`` (for a sharded parameter, a `ShardView` of its `BlockSpec`), and
a `Collectives` for what needs other ranks (block sums cut by the sharding: one all-reduce per
step; maxima; row-sharded factor products). State is placed like its parameter by `shard_like`,
`rows_like`, `split_rows_like` and `replicated_like`, and checkpoints gather block statistics with
`gather_block_stats`. No optimizer module imports ``torch.distributed`` itself. DDP needs
nothing from here: its parameters are whole on every rank. Under DeepSpeed ZeRO the step sees
pieces of DeepSpeed's flat partitions and a `ZeroCollectives` (`zero_partitions`, zero.py).
"""

from .collectives import SINGLE_PROCESS, Collectives, ShardedCollectives, collectives_for
from .diagnostics import AllReduceCounter
from .placement import replicated_like, rows_like, shard_like, split_rows_like
from .reduce import BlockSumReducer, RowShards, gather_block_stats, gather_shards
from .shard import ShardView, is_dtensor, local_tensor, shard_box, shard_view
from .zero import ZeroCollectives, ZeroPartitions, flat_boxes, zero_partitions

__all__ = [
    "AllReduceCounter", "BlockSumReducer", "ConvertingLoadPlanner", "Collectives", "RowShards", "SINGLE_PROCESS", "ShardView", "ShardedCollectives", "collectives_for",
    "gather_block_stats", "gather_shards", "is_dtensor", "local_tensor", "replicated_like", "rows_like", "shard_box", "shard_like",
    "shard_view", "split_rows_like",
    "ZeroCollectives", "ZeroPartitions", "flat_boxes", "zero_partitions",
]


def __getattr__(name: str):
    if name == "ConvertingLoadPlanner":  # (imports torch.distributed.checkpoint, which takes a while: on first use)
        from .checkpoint import ConvertingLoadPlanner

        return ConvertingLoadPlanner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
