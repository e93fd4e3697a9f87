"""Batched Adam-mini: the reference math in pure PyTorch with few launches.

Tensors are grouped by (device, dtype, blocked or per-coordinate); every elementwise operation of
a group is one ``torch._foreach_*`` call. Block sums of g^2 are taken tensor by tensor with the
spec's ``block_sum`` (extra memory: one squared gradient at a time), unless the caller hands them
in already summed across ranks. Runs on any device, takes DTensor shards, and computes exactly
what `reference_adam_mini` computes: the same ops in the same order.

Note [a compiled step]: eagerly, the step counts are read as numbers (``.item()``) and the bias
corrections are Python floats, exactly as the reference computes them. Under `torch.compile` a
read would break the graph, so the corrections are computed from the step tensors instead (in
float64, as Python would), and so is a tensor ``lr``: nothing in the graph is a constant that
changes from step to step.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .. import block_numel, expand, stat_dtype
from .reference import block_sq_sums


def batched_adam_mini(params, grads, exp_avgs, exp_avg_sqs, steps, specs, *, lr, beta1, beta2, eps,
                      weight_decays, maximize, sq_sums=None) -> None:
    """Same signature and results as `reference_adam_mini`, grouped into ``torch._foreach_*`` calls."""
    if sq_sums is None:
        sq_sums = block_sq_sums(grads, exp_avg_sqs, specs)
    # Second moments and the update, one group of like tensors at a time.
    torch._foreach_add_(steps, 1)
    groups = defaultdict(list)
    for i, (p, spec) in enumerate(zip(params, specs)):
        groups[p.device, p.dtype, spec.n_blocks == spec.numel].append(i)
    for idx in groups.values():
        def pick(xs):
            return [xs[i] for i in idx]

        _update(pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(steps), pick(specs), pick(sq_sums),
                pick(weight_decays), lr=lr, beta1=beta1, beta2=beta2, eps=eps, maximize=maximize)


def _update(params, grads, exp_avgs, exp_avg_sqs, steps, specs, sq_sums, weight_decays, *, lr, beta1, beta2, eps, maximize):
    """One group: same device and dtype, and either all blocked or all per-coordinate."""
    bias_correction1, bias_correction2_sqrt = _bias_corrections(steps, beta1, beta2)
    # v_b <- beta2 v_b + (1 - beta2) mean_b(g^2); denom_b = sqrt(v_b) / sqrt(1 - beta2^t) + eps
    means = [s / block_numel(spec, v) for s, spec, v in zip(sq_sums, specs, exp_avg_sqs)]
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_add_(exp_avg_sqs, means, alpha=1 - beta2)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, bias_correction2_sqrt)
    torch._foreach_add_(denoms, eps)
    denoms = [expand(spec, d) for spec, d in zip(specs, denoms)]
    step_sizes = [-lr / bc for bc in bias_correction1]

    work = stat_dtype(params[0])
    if params[0].dtype == work and all(m.dtype == work for m in exp_avgs):
        _elementwise(params, grads, exp_avgs, denoms, step_sizes, weight_decays, lr=lr, beta1=beta1, maximize=maximize)
        return
    # Low precision (or a first moment kept in another dtype, momentum_dtype="float32" with float64
    # parameters): compute in the statistics dtype and round once, a chunk of tensors at a time so
    # the copies never outgrow the largest tensor of the group.
    budget = max(p.numel() for p in params)
    for chunk in _chunks([p.numel() for p in params], budget):
        p_w, g_w, m_w = ([xs[i].to(work) for i in chunk] for xs in (params, grads, exp_avgs))
        _elementwise(p_w, g_w, m_w, [denoms[i] for i in chunk], [step_sizes[i] for i in chunk],
                     [weight_decays[i] for i in chunk], lr=lr, beta1=beta1, maximize=maximize)
        torch._foreach_copy_([params[i] for i in chunk], p_w)
        torch._foreach_copy_([exp_avgs[i] for i in chunk], m_w)


def _bias_corrections(steps, beta1, beta2) -> tuple[list, list]:
    """``1 - beta1^t`` and ``sqrt(1 - beta2^t)`` per tensor: floats eagerly, tensors while
    compiling (Note [a compiled step])."""
    if not torch.compiler.is_compiling():
        values = [step.item() for step in steps]
        return [1 - beta1**t for t in values], [(1 - beta2**t) ** 0.5 for t in values]
    exponents = [step.to(torch.float64) for step in steps]
    return ([1 - torch.pow(beta1, t) for t in exponents],
            [(1 - torch.pow(beta2, t)).sqrt() for t in exponents])


def _elementwise(params, grads, exp_avgs, denoms, step_sizes, weight_decays, *, lr, beta1, maximize):
    """p <- p (1 - lr wd); m <- lerp(m, g, 1 - beta1); p <- p + step_size m / denom."""
    decayed = [i for i, wd in enumerate(weight_decays) if wd != 0]
    if decayed:
        torch._foreach_mul_([params[i] for i in decayed], [1 - lr * weight_decays[i] for i in decayed])
    # Note: lerp(m, -g, w) = -lerp(-m, g, w) exactly (negation commutes with rounding), so
    # maximizing negates m twice in place instead of allocating a negated copy of every gradient.
    if maximize:
        torch._foreach_neg_(exp_avgs)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    if maximize:
        torch._foreach_neg_(exp_avgs)
    if step_sizes and isinstance(step_sizes[0], torch.Tensor):  # compiling (Note [a compiled step])
        # addcdiv's value must be a number: (step_size m) / denom, in the order addcdiv takes
        steps = torch._foreach_mul(exp_avgs, [s.to(exp_avgs[0].dtype) for s in step_sizes])
        torch._foreach_div_(steps, denoms)
        torch._foreach_add_(params, steps)
        return
    torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)


def _chunks(sizes: list[int], budget: int):
    """Consecutive index lists whose sizes add up to at most ``budget`` (or one item)."""
    chunk, total = [], 0
    for i, size in enumerate(sizes):
        if chunk and total + size > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += size
    if chunk:
        yield chunk
