"""Compressed first moments (`StoredMomentum`) for implementations that update float tensors.

Note [compressed momentum in a step]: the reference and batched implementations, and whatever
the fused kernels leave, step a compressed m by decoding it to the statistics dtype (float32, or
float64 for float64 parameters), running the plain update on the copy, and encoding the new m
back with the step's rounding key. The copies are made a slice of tensors at a time, so they
never outgrow the largest tensor (or 4M elements). The fused kernels do the same in registers
and produce the same codes (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..codecs import StoredMomentum
from .. import stat_dtype

SLICE_ELEMENTS = 1 << 22


def slices(numels: Sequence[int], budget: int | None = None) -> list[list[int]]:
    """Consecutive runs of positions whose elements add up to at most ``max(budget, the largest)``
    (``budget``: `SLICE_ELEMENTS` by default)."""
    budget = max([SLICE_ELEMENTS if budget is None else budget, *numels])
    runs: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(numels):
        if runs[-1] and used + n > budget:
            runs.append([])
            used = 0
        runs[-1].append(i)
        used += n
    return [run for run in runs if run]


def step_with_decoded(step: Callable, params, grads, exp_avgs, exp_avg_sqs, steps, specs, *, weight_decays,
                      sq_sums=None, **hyper) -> None:
    """Run ``step`` (an implementation taking float ``exp_avgs``) over lists where some first
    moments are `StoredMomentum` (Note [compressed momentum in a step])."""
    stored = [i for i, m in enumerate(exp_avgs) if isinstance(m, StoredMomentum)]
    if not stored:
        step(params, grads, exp_avgs, exp_avg_sqs, steps, specs, weight_decays=weight_decays, sq_sums=sq_sums, **hyper)
        return

    def run(index: list[int], momenta: list[Tensor]) -> None:
        def pick(xs):
            return [xs[i] for i in index]

        step(pick(params), pick(grads), momenta, pick(exp_avg_sqs), pick(steps), pick(specs),
             sq_sums=None if sq_sums is None else pick(sq_sums), **{**hyper, "weight_decays": pick(weight_decays)})

    taken = set(stored)
    plain = [i for i in range(len(params)) if i not in taken]
    if plain:
        run(plain, [exp_avgs[i] for i in plain])
    _step_stored(run, params, exp_avgs, steps, stored)


# Note [compressed momentum in a compiled step]: a compiled step runs the decode, the step and the
# encode of compressed momenta eagerly, as one piece: inductor miscompiled the int8 encode (codes
# off by up to 254) or failed to build it, so `StoredMomentum.encode_` is never traced anyway, and
# the rounding keys are read from the step counts as numbers. The fused kernels are custom ops and
# compile as such.
@torch.compiler.disable
def _step_stored(run: Callable, params, exp_avgs, steps, stored: list[int]) -> None:
    for part in slices([params[i].numel() for i in stored]):
        index = [stored[j] for j in part]
        decoded = [exp_avgs[i].decode(tuple(params[i].shape), stat_dtype(params[i])) for i in index]
        run(index, decoded)
        for i, m in zip(index, decoded):
            exp_avgs[i].encode_(m, int(steps[i]))
