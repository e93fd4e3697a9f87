"""Param-group builders: torch param groups with settings per kind of block, for any optimizer.

`blockwise_lr` gives each block type (`blockopt.partition.block_types`) its own learning rate.
"""

from .blockwise_lr import DEFAULT_RATIOS, blockwise_lr, resolve_ratios

__all__ = ["DEFAULT_RATIOS", "blockwise_lr", "resolve_ratios"]
