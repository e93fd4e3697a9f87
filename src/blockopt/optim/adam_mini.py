r"""Adam-mini (Zhang et al., 2024): Adam with one second-moment value per block.

For every parameter tensor with gradient :math:`g` and blocks :math:`b` from the `Plan`, at step
:math:`t`:

.. math::
    p &\leftarrow p\,(1 - \eta\lambda) \\
    m &\leftarrow \beta_1 m + (1-\beta_1)\, g \\
    v_b &\leftarrow \beta_2 v_b + (1-\beta_2)\, \operatorname{mean}_{i\in b}(g_i^2) \\
    p_i &\leftarrow p_i - \frac{\eta}{1-\beta_1^t}\,
        \frac{m_i}{\sqrt{v_b/(1-\beta_2^t)} + \epsilon} \quad (i \in b)

With every block of size one this is exactly AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ..distributed.shard import local_tensor
from ..partition import BlockSpec, Plan
from ._batched import batched_adam_mini
from ._fused import fused_adam_mini
from .base import BlockwiseOptimizer, _check_range
from .state import EXP_AVG, EXP_AVG_SQ, STEP, stat_dtype

IMPLEMENTATIONS = ("auto", "reference", "batched", "fused")

# Hook for distributed training: sums the per-block partial sums of g^2 across ranks in place.
BlockSumReducer = Callable[[list[Tensor]], None]


class AdamMini(BlockwiseOptimizer):
    """Adam-mini: AdamW's first moment, one second moment per block of the `Plan`.

    Args:
        params: an ``nn.Module`` (blocks detected from its structure), ``model.named_parameters()``
            (blocks from names, as in the official package; give ``n_heads``/``n_kv_heads``), plain
            parameters, or param groups (dicts; ``param_names`` or ``(name, tensor)`` pairs welcome).
        lr (float): learning rate. (Default: 1e-3)
        betas (tuple[float, float]): coefficients of the moving averages of g and mean(g^2).
            (Default: (0.9, 0.999))
        eps (float): added to the square root of the block second moment. (Default: 1e-8)
        weight_decay (float): decoupled weight decay (AdamW-style). (Default: 0)
        decay_1d (bool): also decay 1-D parameters (norm scales, biases); off by default, as in
            the official implementation and common AdamW recipes. (Default: False)
        maximize (bool): maximise the objective instead. (Default: False)
        plan (Plan): use this partition instead of detecting one.
        n_heads, n_kv_heads, head_dim, dim, rules, value, conv: passed to `blockopt.partition`.
        implementation (str): which step implementation to run: ``"reference"`` (the clear
            per-tensor loop), ``"batched"`` (``torch._foreach_*`` over groups of tensors),
            ``"fused"`` (per param group, one C++ kernel call for the CPU tensors, built on first
            use, and up to three Triton launches per dtype for the CUDA tensors; whatever no
            kernel takes runs batched), ``"auto"`` (the fastest available: today ``"fused"``).
            All compute the same update, to rounding. (Default: "auto")

    State per parameter: ``step`` (float32 scalar tensor), ``exp_avg`` (like the parameter, in its
    dtype), ``exp_avg_sq`` (``(n_blocks,)``, float32 even for bf16/fp16 parameters).
    """

    _STAT_KEYS = (EXP_AVG_SQ,)

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        decay_1d: bool = False,
        maximize: bool = False,
        plan: Plan | None = None,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        dim: int | None = None,
        rules: dict[str, str] | None = None,
        value: str | None = None,
        conv: str | None = None,
        implementation: str = "auto",
    ):
        _check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decay_1d=decay_1d,
            maximize=maximize, implementation=implementation,
        )
        options = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, dim=dim, rules=rules, value=value, conv=conv)
        super().__init__(params, defaults, plan=plan, partition_options=options)

    def add_param_group(self, param_group: dict) -> None:
        _check_hyperparameters(**{k: param_group[k] for k in ("lr", "betas", "eps", "weight_decay") if k in param_group})
        super().add_param_group(param_group)

    def _state_shapes(self, spec: BlockSpec, param: Tensor) -> dict[str, tuple[int, ...]]:
        return {STEP: (), EXP_AVG: tuple(param.shape), EXP_AVG_SQ: (spec.n_blocks,)}

    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, steps, specs, weight_decays) -> None:
        """Gather the group's tensors with a gradient (their local shards, for DTensors)."""
        # Note: this loop runs every step for every tensor, so it reads each attribute once
        # (models with thousands of small tensors spend a good part of a step here).
        weight_decay, decay_1d, all_state = group["weight_decay"], group["decay_1d"], self.state
        for p, layout in zip(group["params"], self.layouts(group)):
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("AdamMini does not support sparse gradients")
            state = all_state[p]
            if not state:
                state[STEP] = torch.tensor(0.0, dtype=torch.float32)
                state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
                # one value per block meeting this rank's shard (all blocks when not sharded)
                state[EXP_AVG_SQ] = torch.zeros(layout.n_blocks, dtype=stat_dtype(p), device=local_tensor(p).device)
            if type(p) is torch.nn.Parameter or type(p) is torch.Tensor:
                params.append(p)
                grads.append(grad)
                exp_avgs.append(state[EXP_AVG])
            else:  # a DTensor (or another subclass): its local shard
                params.append(local_tensor(p))
                grads.append(local_tensor(grad))
                exp_avgs.append(local_tensor(state[EXP_AVG]))
            exp_avg_sqs.append(state[EXP_AVG_SQ])
            steps.append(state[STEP])
            specs.append(layout)
            weight_decays.append(weight_decay if decay_1d or p.ndim >= 2 else 0.0)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step (``closure`` re-evaluates the loss, as in torch.optim).

        With sharded (DTensor) parameters, the partial block sums of every group are summed
        across ranks with one all-reduce for the whole step (Note [one all-reduce per step])."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, tensors, sq_sums in step_work(self):
            params, grads, exp_avgs, exp_avg_sqs, steps, specs, weight_decays = tensors
            beta1, beta2 = group["betas"]
            adam_mini(
                params, grads, exp_avgs, exp_avg_sqs, steps, specs,
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decays=weight_decays,
                maximize=group["maximize"], sq_sums=sq_sums, implementation=group["implementation"],
            )
        return loss

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # checkpoints from before an option existed
            group.setdefault("decay_1d", False)
            group.setdefault("maximize", False)
            group.setdefault("implementation", "auto")


def step_work(optimizer: BlockwiseOptimizer) -> list[tuple[dict, tuple[list, ...], list[Tensor] | None]]:
    """``(group, tensor lists, sq_sums)`` for each param group with gradients, for optimizers whose
    ``_init_group`` fills ``params, grads, first moments, exp_avg_sqs, steps, layouts,
    weight_decays``. ``sq_sums`` is ``None`` unless parameters are sharded; then it holds every
    tensor's per-block ``sum(g^2)``, summed across ranks by one all-reduce for the whole step
    (Note [one all-reduce per step])."""
    work = []
    for group in optimizer.param_groups:
        tensors = ([], [], [], [], [], [], [])
        optimizer._init_group(group, *tensors)
        if tensors[0]:
            work.append((group, tensors))
    reducer = optimizer._block_sum_reducer([layout for _, tensors in work for layout in tensors[5]])
    if reducer is None:
        return [(group, tensors, None) for group, tensors in work]
    sq_sums = [block_sq_sums(tensors[1], tensors[3], tensors[5]) for _, tensors in work]
    reducer([s for sums in sq_sums for s in sums])
    return [(group, tensors, sums) for (group, tensors), sums in zip(work, sq_sums)]


def _check_hyperparameters(*, lr=None, betas=None, eps=None, weight_decay=None) -> None:
    if lr is not None:
        _check_range("lr", lr, 0.0)
    if betas is not None:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        _check_range("betas[0]", betas[0], 0.0, 1.0)
        _check_range("betas[1]", betas[1], 0.0, 1.0)
    if eps is not None:
        _check_range("eps", eps, 0.0)
    if weight_decay is not None:
        _check_range("weight_decay", weight_decay, 0.0)


# ---- the math: functions over tensor lists -------------------------------------------------
def adam_mini(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    specs: Sequence[BlockSpec],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decays: Sequence[float],
    maximize: bool = False,
    reduce_block_sums: BlockSumReducer | None = None,
    sq_sums: Sequence[Tensor] | None = None,
    implementation: str = "reference",
) -> None:
    """Functional Adam-mini over lists of tensors (all updated in place).

    ``specs`` may be `BlockSpec`s or, for shards of distributed parameters, `ShardView`s.
    ``reduce_block_sums`` lets a distributed caller sum each block's partial ``sum(g^2)`` across
    ranks (one collective for the whole list) before the means are taken. ``sq_sums`` hands in
    those per-block sums already computed (and reduced), e.g. for several param groups at once.
    """
    # "fused" steps what its kernel takes and hands the rest to "batched", so it is also the best
    # choice for "auto" wherever no kernel fits (other devices, reduce_block_sums, no compiler).
    step_fn = {
        "auto": fused_adam_mini, "fused": fused_adam_mini, "batched": batched_adam_mini, "reference": _reference_adam_mini,
    }.get(implementation)
    if step_fn is None:
        raise ValueError(f"unknown implementation {implementation!r}; expected one of {IMPLEMENTATIONS}")
    step_fn(
        params, grads, exp_avgs, exp_avg_sqs, steps, specs, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
        weight_decays=weight_decays, maximize=maximize, reduce_block_sums=reduce_block_sums, sq_sums=sq_sums,
    )


def block_sq_sums(grads: Sequence[Tensor], exp_avg_sqs: Sequence[Tensor], specs: Sequence) -> list[Tensor]:
    """Phase 1 of a step: each tensor's per-block ``sum(g^2)``, in the statistics dtype."""
    sums = []
    for g, v, spec in zip(grads, exp_avg_sqs, specs):
        g = g.to(v.dtype)
        sums.append(spec.block_sum(g * g))
    return sums


# Note: dynamo does not yet trace the layout arithmetic of every spec correctly (symbolic shapes
# in `BlockSpec.expand`), so a compiled training step runs this loop eagerly (a graph break).
@torch.compiler.disable
def _reference_adam_mini(params, grads, exp_avgs, exp_avg_sqs, steps, specs, *, lr, beta1, beta2, eps,
                         weight_decays, maximize, reduce_block_sums, sq_sums=None) -> None:
    """The clear per-tensor loop that the math tests read."""
    if sq_sums is None:
        # Phase 1: local per-block sums of g^2 (in the statistics dtype: float32 for bf16 grads).
        sq_sums = block_sq_sums(grads, exp_avg_sqs, specs)
        # Phase 2: blocks split across ranks need their partial sums added up.
        if reduce_block_sums is not None:
            reduce_block_sums(sq_sums)
    # Phase 3: the update, computed in the statistics dtype and written back.
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
