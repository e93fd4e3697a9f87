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

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..distributed import Collectives
from ..kernels.adam_mini import adam_mini
from ..kernels.codecs import StoredMomentum
from ..partition import Plan
from ..validation import boolean, check, validate
from ..partition.report import plan_rows, rows_table
from . import momentum
from .adam_family import ADAM_HYPERPARAMETERS, MomentumStorage, SecondMomentBatch, reduce_block_sq_sums
from .base import BlockwiseOptimizer
from .state import EXP_AVG_SQ, STEP, stat_dtype


# The name-fragment sets of adam-mini 1.1.1's Adam_mini, which its users extend after construction.
OFFICIAL_NAME_SETS = ("embd_names", "output_names", "wqk_names", "wv_names", "attn_proj_names", "mlp_names",
                      "adam_block_names")


def official_params(params, named_parameters, model_sharding, verbose):
    """The official call, ``AdamMini(named_parameters=..., model_sharding=..., verbose=...)``
    (adam-mini 1.1.1's keywords), as blockopt's: ``named_parameters`` is ``params``;
    ``model_sharding`` is accepted and needs nothing (sharded DTensor parameters are detected,
    DDP needs nothing); ``verbose`` prints the plan."""
    if model_sharding is not None:
        check("model_sharding", model_sharding, boolean())
    check("verbose", verbose, boolean())
    if named_parameters is not None:
        if params is not None:
            raise TypeError("pass the parameters once: params (first argument) or named_parameters=, not both")
        return named_parameters
    if params is None:
        raise TypeError("AdamMini needs parameters: AdamMini(model), AdamMini(model.named_parameters()) or "
                        "AdamMini(named_parameters=model.named_parameters()) as in adam-mini")
    return params


def plan_report(plan) -> str:
    """The plan as ``verbose=True`` prints it: identical layers collapsed (`blockopt plan`'s table)."""
    return rows_table(plan_rows(plan))


@dataclass
class AdamMiniBatch(SecondMomentBatch):
    LIKE_PARAM = ("exp_avgs",)
    exp_avgs: list[Tensor | StoredMomentum] = field(default_factory=list)


class AdamMini(MomentumStorage, BlockwiseOptimizer):
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
            kernel takes runs batched), ``"auto"`` (the fastest available: ``"fused"`` wherever it runs).
            All compute the same update, to rounding. (Default: "auto")
        nonfinite (str): what a step does about inf/nan gradients: ``"warn"`` (once, when a block
            statistic turns inf or nan: the whole block then stops training), ``"skip_tensor"``
            (a tensor with a non-finite gradient is not updated; counted in
            ``state[p]["nonfinite_skips"]``), ``"skip_step"`` (no update at all when any gradient
            is non-finite), ``"ignore"``. See `blockopt.optim.nonfinite`. (Default: "warn")
        momentum_dtype (str or None): how the first moment is stored between steps: ``None`` (the
            parameter's dtype), ``"float32"``, ``"bfloat16"`` (stochastic rounding), ``"int8"``
            or ``"int4"`` (companded codes with a float32 scale per 256 elements of a row, stochastic
            rounding); per param group (``torch.float32`` and ``torch.bfloat16`` stand for their
            names). See `blockopt.optim.momentum`. (Default: None)
        param_rounding (str): how bf16/fp16 parameters are written: ``"nearest"``,
            ``"stochastic"`` (bf16 only; unbiased) or ``"kahan"`` (a compensation tensor in the
            parameter's dtype keeps what rounding dropped), for training without float32 master
            weights; per param group. float32/float64 parameters are written the same under every
            setting. See `blockopt.optim.param_rounding`. (Default: "nearest")
        seed (int): the seed of the stochastic rounding's random bits (``momentum_dtype``
            ``"bfloat16"``/``"int8"``/``"int4"``, ``param_rounding="stochastic"``), in
            ``[0, 2**32)``. The bits are a hash of (seed, step, the parameter's name, the
            element), so a run and its resume draw the same bits. Give every rank the same seed,
            and independent runs (the seeds of an experiment) different ones: runs that share it
            share their rounding noise. (Default: 0)

    State per parameter: ``step`` (float32 scalar tensor), ``exp_avg`` (like the parameter, in its
    dtype or ``momentum_dtype``; for int8/int4, ``exp_avg_codes`` and ``exp_avg_scales``
    instead), ``exp_avg_sq`` (``(n_blocks,)``, float32 even for bf16/fp16 parameters);
    ``param_compensation`` (like a bf16/fp16 parameter) under ``param_rounding="kahan"``.
    """

    HYPERPARAMETERS = ADAM_HYPERPARAMETERS
    _Batch = AdamMiniBatch
    _STATISTICS, _STATISTICS_KEY = "exp_avg_sqs", EXP_AVG_SQ
    _STAT_KEYS = (EXP_AVG_SQ,)
    _GROUP_DEFAULTS = {"decay_1d": False, "maximize": False, "implementation": "auto", "nonfinite": "warn",
                       "momentum_dtype": None, "param_rounding": "nearest"}
    _OPTIONS = {**BlockwiseOptimizer._OPTIONS, "seed": 0}

    def __init__(
        self,
        params=None,
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
        nonfinite: str = "warn",
        named_parameters=None,
        model_sharding: bool | None = None,
        verbose: bool = False,
        momentum_dtype: str | None = None,
        param_rounding: str = "nearest",
        seed: int = 0,
    ):
        validate(self.HYPERPARAMETERS, {"seed": seed})
        self.seed = seed
        params = official_params(params, named_parameters, model_sharding, verbose)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, decay_1d=decay_1d,
            maximize=maximize, implementation=implementation, nonfinite=nonfinite, momentum_dtype=momentum_dtype,
            param_rounding=param_rounding,
        )
        options = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, dim=dim, rules=rules, value=value, conv=conv)
        super().__init__(params, defaults, plan=plan, partition_options=options)
        if verbose:
            print(plan_report(self.plan))

    # Note [coming from adam-mini]: the official optimizer is tuned after construction by reading
    # and assigning these name sets; here the plan is fixed at construction, so both say how.
    def __getattr__(self, name: str):
        if name in OFFICIAL_NAME_SETS:
            raise AttributeError(self._no_name_sets(name))
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if name in OFFICIAL_NAME_SETS:  # (assigned, it would sit unread: the plan is made)
            raise AttributeError(self._no_name_sets(name))
        super().__setattr__(name, value)

    @staticmethod
    def _no_name_sets(name: str) -> str:
        return (f"AdamMini has no {name!r}: blockopt plans blocks at construction, from the model's structure. "
                "Pass the model itself (AdamMini(model)), or rules={'*your_layer*.weight': 'rows'} (see print(opt.plan)); "
                "docs/coming-from-adam-mini.md")

    def _state_shapes(self, name: str, param: Tensor) -> dict[str, tuple[int, ...]]:
        stored = momentum.state_shapes(self._kept_as(self._group_of(param)["momentum_dtype"], name), tuple(param.shape))
        return {STEP: (), **stored, EXP_AVG_SQ: (self.block_spec(name).n_blocks,)}

    def _gather_state(self, batch: AdamMiniBatch, name, p, layout, state, plain) -> None:
        if EXP_AVG_SQ not in state:
            state[STEP] = torch.tensor(0.0, dtype=torch.float32)
            # one value per block meeting this rank's shard (all blocks when not sharded)
            state[EXP_AVG_SQ] = torch.zeros(layout.n_blocks, dtype=stat_dtype(p), device=batch.params[-1].device)
        batch.exp_avgs.append(self._keep_momentum(batch, name, p, state, plain))
        batch.exp_avg_sqs.append(state[EXP_AVG_SQ])
        batch.steps.append(state[STEP])

    def _reduce(self, batches: list[AdamMiniBatch], collectives: Collectives) -> None:
        reduce_block_sq_sums(batches, collectives)

    def _update(self, batch: AdamMiniBatch, collectives: Collectives) -> None:
        group = batch.group
        beta1, beta2 = group["betas"]

        adam_mini(
            **batch.arguments(), exp_avgs=batch.exp_avgs, lr=self._lr(group), beta1=beta1, beta2=beta2,
            eps=group["eps"], maximize=group["maximize"], implementation=group["implementation"],
        )
