"""What AdamMini and AdaPM share: their hyperparameters, the block second moment's place in a
step's batch, and its one reduction across ranks. (Shared here so neither imports the other.)

Note [one all-reduce per step]: each block's ``mean(g^2)`` needs the whole block. Where a sharding
cuts blocks, every tensor's per-block partial ``sum(g^2)``, of every param group, is computed
first and summed across ranks with one collective (`Collectives.sum_blocks`); the update then
takes those sums (``sq_sums``) instead of computing its own. With nothing cut, ``sq_sums`` stays
``None`` and the fused kernels sum each block while it is in cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ..distributed import Collectives
from ..kernels.adam_mini import IMPLEMENTATIONS, block_sq_sums
from ..validation import boolean, choice, pair, real
from .base import ParamBatch
from .momentum import MOMENTUM_DTYPES
from .nonfinite import NONFINITE

ADAM_HYPERPARAMETERS = {
    "lr": real(0, tensor=True),
    "betas": pair(real(0, 1, high_open=True)),
    "eps": real(0),
    "weight_decay": real(0),
    "decay_1d": boolean(),
    "maximize": boolean(),
    "implementation": choice(*IMPLEMENTATIONS),
    "nonfinite": choice(*NONFINITE),
    "momentum_dtype": choice(*MOMENTUM_DTYPES, hint="how the first moment is stored; see blockopt.optim.momentum"),
}


@dataclass
class SecondMomentBatch(ParamBatch):
    """A batch whose tensors keep one second-moment value per block (``exp_avg_sqs``) and a step count."""

    exp_avg_sqs: list[Tensor] = field(default_factory=list)
    steps: list[Tensor] = field(default_factory=list)
    sq_sums: list[Tensor] | None = None  # per-block sum(g^2), summed across ranks; None when no block is cut


def reduce_block_sq_sums(batches: list[SecondMomentBatch], collectives: Collectives) -> None:
    """Note [one all-reduce per step]: fill every batch's ``sq_sums`` when blocks are cut."""
    layouts = [layout for batch in batches for layout in batch.layouts]
    if not collectives.cuts_blocks(layouts):
        return
    for batch in batches:
        batch.sq_sums = block_sq_sums(batch.grads, batch.exp_avg_sqs, batch.layouts)
    collectives.sum_blocks([s for batch in batches for s in batch.sq_sums], layouts)
