"""Adam-mini's step in every implementation, behind one functional, `adam_mini`.

=============  ==========================================================================
``reference``  `reference.reference_adam_mini`: the per-tensor loop, the readable definition
``batched``    `batched.batched_adam_mini`: the same ops grouped into ``torch._foreach_*`` calls
``fused``      `fused.fused_adam_mini`: the C++ kernel (`cpu`) for CPU tensors, Triton (`cuda`)
               for CUDA tensors, everything else batched
``auto``       the fastest available: today ``fused``
=============  ==========================================================================

All take the same arguments and compute the same update (tested in float64). AdamMini runs it on
every tensor, AdaPM on its full-momentum tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..codecs import StoredMomentum

from .batched import batched_adam_mini
from .decoded import step_with_decoded
from .fused import fused_adam_mini
from .reference import block_sq_sums, reference_adam_mini

IMPLEMENTATIONS = ("auto", "reference", "batched", "fused")

# "fused" steps what its kernels take and hands the rest to "batched", so it is also the best
# choice for "auto" wherever no kernel fits (other devices, precomputed sums, no compiler).
_STEPS = {"auto": fused_adam_mini, "fused": fused_adam_mini, "batched": batched_adam_mini, "reference": reference_adam_mini}


def adam_mini(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor | StoredMomentum],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    specs: Sequence,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decays: Sequence[float],
    maximize: bool = False,
    sq_sums: Sequence[Tensor] | None = None,
    collectives=None,
    implementation: str = "reference",
) -> None:
    """Functional Adam-mini over lists of tensors (all updated in place).

    ``specs`` may be `BlockSpec`s or, for shards of distributed parameters, `ShardView`s.
    ``sq_sums`` hands in each tensor's per-block ``sum(g^2)`` already summed across ranks (a
    caller stepping several param groups reduces them all at once); otherwise, when
    ``collectives`` (a `blockopt.distributed.Collectives`) says blocks are cut by a sharding,
    they are computed and summed here with one collective. An ``exp_avgs`` entry may be a
    `StoredMomentum` (a first moment kept compressed, ``momentum_dtype``): every implementation
    decodes, updates and encodes it (Note [compressed momentum in a step]).
    """
    step = _STEPS.get(implementation)
    if step is None:
        raise ValueError(f"implementation must be one of {', '.join(map(repr, IMPLEMENTATIONS))}, got {implementation!r}")
    if sq_sums is None and collectives is not None and collectives.cuts_blocks(specs):
        sq_sums = block_sq_sums(grads, exp_avg_sqs, specs)
        collectives.sum_blocks(sq_sums, specs)
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decays=weight_decays, maximize=maximize)
    if step is fused_adam_mini:  # (the kernels take compressed momenta themselves)
        step(params, grads, exp_avgs, exp_avg_sqs, steps, specs, sq_sums=sq_sums, **hyper)
    else:
        step_with_decoded(step, params, grads, exp_avgs, exp_avg_sqs, steps, specs, sq_sums=sq_sums, **hyper)


__all__ = ["IMPLEMENTATIONS", "adam_mini", "batched_adam_mini", "block_sq_sums", "fused_adam_mini", "reference_adam_mini"]
