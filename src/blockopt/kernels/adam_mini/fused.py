"""The ``"fused"`` implementation of Adam-mini: each tensor goes to the fused kernel of its device
(C++ on the CPU, Triton on CUDA), everything no kernel takes to the batched implementation.

The kernels sum each block's g^2 and update it in one pass, so they can't wait for other ranks'
block sums: steps handed precomputed ``sq_sums`` (blocks cut by a sharding) run batched throughout.
"""

from __future__ import annotations

import torch

from . import cpu, cuda
from .batched import batched_adam_mini
from .decoded import step_with_decoded
from .layout import kernel_layouts

BACKENDS = (cpu, cuda)  # modules with handles(p) and step(...) -> positions left over (decided from
                       # dtypes, devices and layouts, never from values: a compiled step knows them while tracing)
_PLAIN = (torch.Tensor, torch.nn.Parameter)  # subclasses (DTensor, ...) dispatch elsewhere


def fused_adam_mini(params, grads, exp_avgs, exp_avg_sqs, steps, specs, *, lr, beta1, beta2, eps,
                    weight_decays, maximize, sq_sums=None) -> None:
    """Same signature and results as `reference_adam_mini`; a backend may take compressed first
    moments (`StoredMomentum`) itself, the rest are decoded (Note [compressed momentum in a step])."""
    left = list(range(len(params)))
    if sq_sums is None:
        layouts = kernel_layouts(specs)
        for backend in BACKENDS:
            take = [i for i in left if layouts[i] is not None and type(params[i]) in _PLAIN and backend.handles(params[i])]
            if not take:
                continue

            def pick(xs):
                return [xs[i] for i in take]

            skipped = backend.step(
                pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(steps), pick(layouts), lr=lr,
                beta1=beta1, beta2=beta2, eps=eps, weight_decays=pick(weight_decays), maximize=maximize,
            )
            # (not `set(take).difference(<generator>)`: dynamo traced that as `set(take)`, so a
            # compiled step dropped the tensors the kernel left, silently)
            left_over = {take[j] for j in skipped}
            taken = {i for i in take if i not in left_over}
            left = [i for i in left if i not in taken]
    if left:
        def pick(xs):
            return [xs[i] for i in left]

        step_with_decoded(
            batched_adam_mini, pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(steps), pick(specs),
            lr=lr, beta1=beta1,
            beta2=beta2, eps=eps, weight_decays=pick(weight_decays), maximize=maximize,
            sq_sums=None if sq_sums is None else pick(sq_sums),
        )
