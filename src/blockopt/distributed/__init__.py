"""Blockwise optimizers on sharded parameters (FSDP2 / DTensor) and their checkpoints.

The math of a step only ever sees local tensors and a layout that answers ``block_sum``,
``block_numel`` and ``expand``: for a sharded parameter that layout is a `ShardView` of its
`BlockSpec`, and the blocks the sharding cuts are summed across ranks by a `BlockSumReducer`
with one all-reduce per step. DDP needs nothing from here: its parameters are whole on every rank.
"""

from .reduce import BlockSumReducer, gather_block_stats
from .shard import ShardView, is_dtensor, local_tensor, shard_box, shard_view

__all__ = ["BlockSumReducer", "ShardView", "gather_block_stats", "is_dtensor", "local_tensor", "shard_box", "shard_view"]
