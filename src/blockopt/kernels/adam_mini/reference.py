"""Adam-mini's step as a clear per-tensor loop: the readable definition the math tests read.

Every other implementation (`batched`, `fused`) computes what this computes, to rounding (the
batched one bit for bit). ``specs`` may be `BlockSpec`s or, for shards of distributed
parameters, `ShardView`s: only ``block_sum``, ``block_numel`` and ``expand`` are used.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def block_sq_sums(grads: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], specs: Sequence) -> list[Tensor]:
    """Each tensor's per-block ``sum(g^2)``, in the statistics dtype (float32 for bf16 grads).

    A step's first phase; under a sharding the caller sums these across ranks before the update."""
    sums = []
    for g, v, spec in zip(grads, exp_avg_sqs, specs):
        g = g.to(v.dtype)
        sums.append(spec.block_sum(g * g))
    return sums


# Note: the readable definition reads each step count as a number, so a compiled step runs it
# eagerly (a graph break); "batched" and "fused" are the implementations that compile.
@torch.compiler.disable
def reference_adam_mini(params, grads, exp_avgs, exp_avg_sqs, steps, specs, *, lr, beta1, beta2, eps,
                        weight_decays, maximize, sq_sums=None) -> None:
    """The update, tensor by tensor, computed in the statistics dtype and written back.

    ``sq_sums``: each tensor's per-block ``sum(g^2)`` (summed across ranks where blocks are cut);
    computed here when not given."""
    if sq_sums is None:
        sq_sums = block_sq_sums(grads, exp_avg_sqs, specs)
    lr = lr.item() if isinstance(lr, torch.Tensor) else lr  # (a tensor lr from a compiled caller)
    for p, g, m, v, step_t, spec, sq_sum, wd in zip(params, grads, exp_avgs, exp_avg_sqs, steps, specs, sq_sums, weight_decays):
        step_t += 1
        step = step_t.item()
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5

        work = v.dtype
        g = g.to(work)
        if maximize:
            g = -g
        p_w, m_w = p.to(work), m.to(work)  # the tensors themselves when dtypes already match
        if wd != 0:
            p_w.mul_(1 - lr * wd)
        m_w.lerp_(g, 1 - beta1)
        v.mul_(beta2).add_(sq_sum / spec.block_numel(v), alpha=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p_w.addcdiv_(m_w, spec.expand(denom), value=-lr / bias_correction1)
        if p_w is not p:
            p.copy_(p_w)
        if m_w is not m:
            m.copy_(m_w)
