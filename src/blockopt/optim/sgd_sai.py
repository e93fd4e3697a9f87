r"""SGD-SaI (Xu et al., 2024, "No More Adam"): SGD with momentum, step sizes scaled at initialisation.

Each block :math:`b` of a parameter gets one step-size multiplier, its gradient signal-to-noise
ratio, computed once, from the parameter's first gradient :math:`g^{(0)}`, and then kept fixed:

.. math::
    \mathrm{gsnr}_b &= \frac{\lVert g^{(0)}_b \rVert_2}{\operatorname{std}(g^{(0)}_b) + \epsilon}
        \qquad (\text{unbiased std; } \sqrt{|b|} \text{ for a 1-element or all-zero } g^{(0)}_b) \\
    m &\leftarrow g \ \ (\text{first step}), \qquad m \leftarrow \mu\, m + (1-\mu)\, g \ \ (\text{later}) \\
    p_i &\leftarrow p_i\,(1 - \eta\lambda) - \eta\, s_b\, m_i \quad (i \in b),
        \qquad s_b = \mathrm{gsnr}_b \ \text{ or, with normalize, } \ \mathrm{gsnr}_b / \max_{b'} \mathrm{gsnr}_{b'}

With the defaults (one block per tensor, no normalisation) this is exactly the ``sgd-sai`` 1.0.3
package. Only ``m`` (like the parameter) and one scalar per block are kept: half of AdamW's state,
and less with ``momentum_dtype`` (``m`` in bf16 or int8/int4 codes, `blockopt.optim.momentum`).
Its notes say where and why it departs from the package.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..distributed import SINGLE_PROCESS, Collectives
from ..kernels import block_numel, expand
from ..kernels.codecs import StoredMomentum
from ..partition import BlockSpec, PartitionWarning, Plan
from ..validation import boolean, choice, real, validate
from . import momentum as storage
from . import param_rounding
from .adam_family import MomentumStorage
from .base import BlockwiseOptimizer, ParamBatch
from .nonfinite import NONFINITE
from .state import GSNR, MOMENTUM_BUFFER, STEP, stat_dtype

BLOCKS = ("tensor", "plan")

_TENSOR_REASON = "SGD-SaI blocks='tensor': one block per tensor, as in sgd-sai 1.0.3"
_BUFFER_KEYS = storage.keys(MOMENTUM_BUFFER)  # momentum_buffer, or its codes and scales


@dataclass
class SGDSaIBatch(ParamBatch):
    LIKE_PARAM = ("momentum_buffers",)
    momentum_buffers: list[Tensor | StoredMomentum | None] = field(default_factory=list)  # None while momentum == 0
    gsnrs: list[Tensor] = field(default_factory=list)
    new_gsnr: list[bool] = field(default_factory=list)  # this step is the parameter's first with a gradient
    new_momentum: list[bool] = field(default_factory=list)  # its buffer starts at m = g
    steps: list[Tensor | None] = field(default_factory=list)  # counted only where rounding keys need them


class SGDSaI(MomentumStorage, BlockwiseOptimizer):
    r"""SGD-SaI: SGD with momentum whose per-block step sizes are set once, by the gradient SNR.

    Args:
        params: an ``nn.Module``, ``model.named_parameters()``, plain parameters, or param groups
            (dicts), as for `blockopt.AdamMini`.
        lr (float): learning rate :math:`\eta`. Without ``normalize`` the effective step of a
            block is ``lr * gsnr_b``, and ``gsnr_b`` grows like the square root of the block size,
            so this lr is much smaller than a plain SGD lr (it is the package's lr). (Default: 1e-2)
        momentum (float): :math:`\mu`, in ``[0, 1)``; the buffer is an EMA, ``m = mu*m + (1-mu)*g``,
            started at ``m = g``. ``0`` keeps no buffer (half the state again). (Default: 0.9)
        eps (float): added to the block's standard deviation; must be > 0. (Default: 1e-8)
        weight_decay (float): decoupled weight decay :math:`\lambda`: ``p *= 1 - lr*wd``. (Default: 1e-2)
        blocks (str): ``"tensor"``: one block per parameter tensor, as in the package; ``"plan"``:
            the blocks of the `Plan` (one per head, per output neuron, per token, ...; biases per
            coordinate, which then get ``gsnr = 1``, see below). (Default: "tensor")
        normalize (bool): divide every ``gsnr_b`` by the largest ``gsnr`` of its param group (the
            paper's normalisation; then ``lr`` is on a plain-SGD scale). The maximum is taken over
            all blocks of every parameter of the group that has its gsnr at the group's first step
            with gradients, over all ranks under FSDP (the true maximum over the global blocks, so
            sharding does not change the step); it is then kept in ``group["gsnr_max"]`` so that
            parameters whose first gradient comes later are scaled the same way (their ratio to
            the others stays the raw gsnr ratio, and may exceed 1). The weight decay is applied
            as ``lr * weight_decay``, so when the lr grows by the largest gsnr (hundreds for a
            large embedding), divide ``weight_decay`` by as much to keep the same decay per step:
            on the demo Llama the shared 0.1 at lr 5 halves the weights at every step
            (``benchmarks/studies/sgd_sai``). (Default: False)
        decay_1d (bool): also decay 1-D parameters (norm scales, biases). On by default, as in the
            package; `blockopt.AdamMini` defaults to off. (Default: True)
        maximize (bool): maximise the objective instead (the gsnr does not depend on the sign).
            (Default: False)
        plan, n_heads, n_kv_heads, head_dim, dim, rules, value, conv: passed to
            `blockopt.partition` (they matter for ``blocks="plan"``).
        nonfinite (str): ``"warn"``, ``"skip_tensor"``, ``"skip_step"`` or ``"ignore"``, as for
            `blockopt.AdamMini`; the watched statistic is the gsnr. (Default: "warn")
        momentum_dtype (str or None): how the momentum buffer is stored between steps: ``None``
            (the parameter's dtype), ``"float32"``, ``"bfloat16"`` (stochastic rounding),
            ``"int8"`` or ``"int4"`` (companded codes, a float32 scale per 256 elements of a row,
            stochastic rounding), as for `blockopt.AdamMini`; per param group. Each step decodes
            m, updates it and encodes it again, a tensor at a time. See `blockopt.optim.momentum`.
            (Default: None)
        param_rounding (str): how bf16/fp16 parameters are written: ``"nearest"``,
            ``"stochastic"`` (bf16 only; unbiased) or ``"kahan"`` (a compensation tensor keeps what
            rounding dropped), for training without float32 master weights; per param group.
            float32/float64 parameters are written the same under every setting. See
            `blockopt.optim.param_rounding`. (Default: "nearest")
        seed (int): the seed of the stochastic rounding's random bits, as for `AdamMini`.
            (Default: 0)

    Note [degenerate blocks]: the unbiased std of a 1-element block is undefined; the package
    turns it into 0, so the block steps with ``|g|/eps`` (about 1e8 times too far). Here such a
    block gets ``gsnr = 1``: it is the limit of ``||g|| / rms(g)`` and what the usual
    ``gsnr ~ sqrt(block size)`` scaling gives for one element, i.e. plain SGD with momentum.
    A block whose first gradient is exactly zero has no ratio to measure either. The package
    gives it ``gsnr = 0``, so it never moves again except by weight decay; here it gets
    ``sqrt(block size)``, the gsnr of a zero-mean gradient, which is what nearly every real block
    measures at initialisation. This is common, not an edge case: with ``blocks="plan"`` every
    embedding row whose token is missing from the first batch (on the demo Llama, more than half
    of the 2048 rows) would stay frozen for good, and with one block per tensor so would a LoRA
    ``A`` factor, whose first gradient is zero while ``B`` starts at zero. A block whose first
    gradient is constant and non-zero still gets ``||g||/eps``, as in the package (it does not
    happen with real gradients).

    Note [first gradient]: the gsnr of a parameter is computed at the first step where it has a
    gradient, not at the optimizer's first step, so parameters unfrozen later, or added with
    ``add_param_group``, get theirs from their own first gradient (the package raises there).

    State per parameter: ``gsnr`` (``(n_blocks,)``, float32 for float32/bf16/fp16 parameters,
    float64 for float64 ones) and ``momentum_buffer`` (like the parameter, in its dtype or
    ``momentum_dtype``; ``momentum_buffer_codes`` and ``momentum_buffer_scales`` for int8/int4;
    absent while ``momentum == 0``). Where rounding is keyed by the step count (a bf16/int8/int4
    momentum, ``param_rounding="stochastic"``), ``step`` (float32 scalar tensor, counted from the
    first step that needs it); under ``param_rounding="kahan"``, ``param_compensation`` (like a
    bf16/fp16 parameter). The keys are the package's, and a ``sgd_sai.SGD_sai`` state dict loads
    (its scalar gsnr becomes ``(1,)``; into any ``momentum_dtype``).
    """

    HYPERPARAMETERS = {
        "lr": real(0, tensor=True, hint="pass a non-negative learning rate, e.g. lr=1e-2"),
        "momentum": real(0, 1, high_open=True,
                         hint="use e.g. momentum=0.9, or 0 for no momentum (momentum=1 never lets a gradient in)"),
        "eps": real(0, low_open=True, hint="it keeps gsnr = ||g|| / (std(g) + eps) finite for blocks whose gradient "
                                           "has no spread: use a small positive value such as the default 1e-8"),
        "weight_decay": real(0, hint="pass weight_decay >= 0 (0 disables it)"),
        "normalize": boolean(),
        "decay_1d": boolean(),
        "maximize": boolean(),
        "nonfinite": choice(*NONFINITE),
        "blocks": choice(*BLOCKS, hint="'tensor' is one block per parameter tensor (the sgd-sai package), "
                                       "'plan' uses the blocks of blockopt.partition"),
        "momentum_dtype": choice(*storage.MOMENTUM_DTYPES, aliases=storage.MOMENTUM_DTYPE_ALIASES,
                                 hint="how the momentum buffer is stored; see blockopt.optim.momentum"),
        "param_rounding": param_rounding.RULE,
        "seed": storage.SEED,  # optimizer-wide, not a group setting
    }
    _Batch = SGDSaIBatch
    _STATISTICS, _STATISTICS_KEY = "gsnrs", GSNR
    _STAT_KEYS = (GSNR,)
    _GROUP_DEFAULTS = {"normalize": False, "decay_1d": True, "maximize": False, "gsnr_max": None, "nonfinite": "warn",
                       "momentum_dtype": None, "param_rounding": "nearest"}
    _OPTIONS = {**BlockwiseOptimizer._OPTIONS, "_blocks": "tensor", "seed": 0}
    _MOMENTUM_KEY = MOMENTUM_BUFFER

    def __init__(
        self,
        params,
        lr: float = 1e-2,
        momentum: float = 0.9,
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        blocks: str = "tensor",
        normalize: bool = False,
        decay_1d: bool = True,
        maximize: bool = False,
        plan: Plan | None = None,
        n_heads: int | None = None,
        n_kv_heads: int | None = None,
        head_dim: int | None = None,
        dim: int | None = None,
        rules: dict[str, str] | None = None,
        value: str | None = None,
        conv: str | None = None,
        nonfinite: str = "warn",
        momentum_dtype: str | None = None,
        param_rounding: str = "nearest",
        seed: int = 0,
    ):
        validate(self.HYPERPARAMETERS, {"blocks": blocks, "seed": seed})
        self._blocks = blocks
        self.seed = seed
        defaults = dict(
            lr=lr, momentum=momentum, eps=eps, weight_decay=weight_decay, normalize=normalize,
            decay_1d=decay_1d, maximize=maximize, gsnr_max=None, nonfinite=nonfinite,
            momentum_dtype=momentum_dtype, param_rounding=param_rounding,
        )
        options = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, dim=dim, rules=rules, value=value, conv=conv)
        with self._quiet_partition():
            super().__init__(params, defaults, plan=plan, partition_options=options)

    # ---- blocks ---------------------------------------------------------------------------
    @property
    def blocks(self) -> str:
        """``"tensor"`` or ``"plan"``: where the blocks come from."""
        return self._blocks

    @contextlib.contextmanager
    def _quiet_partition(self):
        """With one block per tensor the partition only names parameters: its warnings about
        unsure block detection do not apply, so they are silenced."""
        with warnings.catch_warnings():
            if self._blocks == "tensor":
                warnings.simplefilter("ignore", PartitionWarning)
            yield

    def block_spec(self, name: str) -> BlockSpec:
        """The block layout this optimizer uses for parameter ``name``."""
        return self._mode_spec(self.plan[name])

    def _mode_spec(self, spec: BlockSpec) -> BlockSpec:
        if self._blocks == "plan" or spec.rule == "whole":
            return spec
        cache = self.__dict__.setdefault("_tensor_specs", {})
        whole = cache.get(spec)
        if whole is None:
            whole = cache[spec] = spec.with_rule("whole", reason=_TENSOR_REASON)
        return whole

    # ---- param groups and checkpoints ----------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        with self._quiet_partition():
            super().add_param_group(param_group)
        # the group's per-tensor specs, made now: made inside the first step, they would cost a
        # compiled step a graph break (a spec checks itself as it is made)
        self.layouts(self.param_groups[-1])

    def _state_shapes(self, name: str, param: Tensor) -> dict[str, tuple[int, ...]]:
        # The momentum buffer is absent while momentum == 0, so only its shape is checked (below).
        return {GSNR: (self.block_spec(name).n_blocks,)}

    def _convert_loaded(self, state_dict: dict, pairs) -> dict:
        # A step count the saved settings keep none of is not the checkpoint's: torch's
        # set_state_dict(full_state_dict=True) merges the live optimizer's own (zero-step) state
        # into entries that lack its keys; left in, it would key the conversion's rounding.
        saved_group = {pid: g for g in state_dict["param_groups"] for pid in g["params"]}
        state = dict(state_dict["state"])
        for saved_id, p, _ in pairs:
            entry, group = state.get(saved_id), saved_group.get(saved_id)
            if entry and STEP in entry and group is not None and "momentum_dtype" in group \
                    and not _counts_steps({"param_rounding": "nearest", **group}, p):  # (saved before the setting: nearest)
                state[saved_id] = {k: v for k, v in entry.items() if k != STEP}
        return super()._convert_loaded({**state_dict, "state": state}, pairs)

    def _validate_state_dict(self, state_dict, pairs) -> None:
        """The base checks, then the momentum buffer's storage where there is one (already
        converted to this optimizer's ``momentum_dtype``)."""
        super()._validate_state_dict(state_dict, pairs)
        for saved_id, p, name in pairs:
            saved = state_dict["state"].get(saved_id) or {}
            if not any(key in saved for key in _BUFFER_KEYS):
                continue
            expected = storage.state_shapes(self._kept_as(self._group_of(p)["momentum_dtype"], name), tuple(p.shape),
                                            MOMENTUM_BUFFER)
            for key, shape in expected.items():
                value = saved.get(key)
                if not isinstance(value, Tensor):
                    raise ValueError(f"the state of {name!r} has no {key!r} (it has {sorted(saved)}): it was saved by "
                                     "another optimizer")
                if tuple(value.shape) != shape:
                    raise ValueError(
                        f"state {key!r} of {name!r} has shape {tuple(value.shape)}, expected {shape}: it comes from "
                        "another model"
                    )

    def load_state_dict(self, state_dict) -> None:
        """Load state (atomic: a state dict from another model or block layout changes nothing).

        A state dict of the ``sgd-sai`` package loads too when ``blocks="tensor"``: its scalar
        ``gsnr`` is the one block's value."""
        if self._blocks == "tensor" and isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict):
            state = {k: _scalar_gsnr_as_block(v) for k, v in state_dict["state"].items()}
            state_dict = {**state_dict, "state": state}
        super().load_state_dict(state_dict)

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_blocks"] = self._blocks
        return state

    # ---- the step --------------------------------------------------------------------------
    def _gather_state(self, batch: SGDSaIBatch, name, p, layout, state, plain) -> None:
        group = batch.group
        # (a gsnr or buffer that exists was filled: a step that raises removes what it created,
        # Note [a step that raises changes nothing] in `blockopt.optim.base`)
        first = GSNR not in state
        if first:  # one value per block meeting this rank's shard (all blocks when not sharded)
            state[GSNR] = torch.zeros(layout.n_blocks, dtype=stat_dtype(p), device=batch.params[-1].device)
        fresh_m = False
        if group["momentum"] != 0:
            fresh_m = not any(key in state for key in _BUFFER_KEYS)
            batch.momentum_buffers.append(self._keep_momentum(batch, name, p, state, plain))
        else:
            batch.momentum_buffers.append(None)
        if STEP not in state and _counts_steps(group, p):
            state[STEP] = torch.tensor(0.0, dtype=torch.float32)
        batch.steps.append(state.get(STEP))
        batch.gsnrs.append(state[GSNR])
        batch.new_gsnr.append(first)
        batch.new_momentum.append(fresh_m)

    def _reduce(self, batches: list[SGDSaIBatch], collectives: Collectives) -> None:
        """Phase 1: the gsnr of every parameter at its first gradient, all groups together (one
        all-reduce where a sharding cuts blocks). Phase 2: each normalising group's largest gsnr,
        once (one MAX over ranks for all groups). Later steps communicate nothing."""
        new = [(b, i) for b in batches for i, flag in enumerate(b.new_gsnr) if flag]
        if new:
            init_gsnrs([b.grads[i] for b, i in new], [b.gsnrs[i] for b, i in new], [b.layouts[i] for b, i in new],
                       eps=[b.group["eps"] for b, _ in new], collectives=collectives)
        pending = [b.group for b in batches if b.group["normalize"] and b.group["gsnr_max"] is None]
        if pending:
            per_group = [[self.state[p][GSNR] for p in g["params"] if GSNR in self.state.get(p, {})] for g in pending]
            layouts = [layout for b in batches for layout in b.layouts]
            for group, value in zip(pending, group_gsnr_max(per_group, collectives, layouts)):
                group["gsnr_max"] = value if value > 0 else None  # all-zero first gradients: try again later

    def _update(self, batch: SGDSaIBatch, collectives: Collectives) -> None:
        """Phase 3: the update, with the gsnrs and maxima of phases 1 and 2."""
        group, lr = batch.group, self._lr(batch.group)  # (a tensor lr read once)
        sgd_sai_update(
            batch.params, batch.grads, batch.momentum_buffers, batch.gsnrs, batch.layouts,
            scale=step_scale(lr, group["normalize"], group["gsnr_max"]), lr=lr,
            momentum=group["momentum"], weight_decays=batch.weight_decays, maximize=group["maximize"],
            new_momentum=batch.new_momentum, steps=batch.steps,
        )


def _counts_steps(group: dict, param: Tensor) -> bool:
    """Whether ``param``'s rounding is keyed by the step count (Note [seeded rounding] in
    `blockopt.kernels.codecs`): a compressed momentum buffer, or a stochastically rounded parameter."""
    compressed = group["momentum"] != 0 and group["momentum_dtype"] not in (None, "float32")
    return compressed or param_rounding.needs_steps(group, param)


def _scalar_gsnr_as_block(saved):
    """sgd-sai keeps a tensor's gsnr as a 0-d tensor; here it is the ``(1,)`` vector of one block."""
    if isinstance(saved, dict) and isinstance(saved.get(GSNR), Tensor) and saved[GSNR].ndim == 0:
        return {**saved, GSNR: saved[GSNR].reshape(1)}
    return saved


# ---- the math: functions over tensor lists -------------------------------------------------
def gsnr_block_stats(grads: Sequence[Tensor], dtypes: Sequence[torch.dtype], specs: Sequence) -> list[Tensor]:
    """This rank's per-block statistics of each gradient, ``(n_blocks, 3)`` in the given dtype.

    Columns: ``sum(g)``, ``sum((g - mean_local)^2)`` and ``sum(g) * mean_local``, where
    ``mean_local`` is the block's mean over the elements held here. All three add up across
    shards (Chan et al.'s parallel variance: the total squared deviation is the sum of the
    shards' own ones plus ``sum_k S_k^2/n_k - S^2/n``), so a sum over ranks gives what
    `gsnr_from_stats` needs without the cancellation of ``sum(g^2) - S^2/n``.

    Note [numerics of the gsnr]: the deviations are taken from each shard's own block means, so
    the variance loses no digits to a large mean; on one process the correction term is exactly
    zero and the result is the two-pass variance.
    """
    out = []
    for g, dtype, spec in zip(grads, dtypes, specs):
        g = g.to(dtype)
        total = spec.block_sum(g)
        count = spec.block_sum(torch.ones_like(g))  # elements held here (the block size on one process)
        mean = total / count.clamp_min(1)
        dev = g - expand(spec, mean)
        out.append(torch.stack([total, spec.block_sum(dev * dev), total * mean], dim=-1))
    return out


def gsnr_from_stats(stats: Tensor, spec, *, eps: float) -> Tensor:
    """``(n_blocks,)`` gsnr from the (summed) `gsnr_block_stats` of one parameter.

    ``||g|| / (std(g) + eps)`` with the unbiased std; ``sqrt(block size)`` for a block with
    nothing to measure, one element or an all-zero gradient (Note [degenerate blocks] in
    `SGDSaI`). ``spec.block_numel`` gives the global block sizes."""
    total, m2_local, between_local = stats.unbind(-1)
    n = torch.as_tensor(block_numel(spec, stats), dtype=stats.dtype, device=stats.device)
    centred = total * (total / n)  # n * mean^2, computed like the local column
    m2 = m2_local + (between_local - centred).clamp_min(0)
    norm = (m2 + centred).sqrt()
    std = (m2 / (n - 1).clamp_min(1)).sqrt()
    measured = (n > 1) & (norm != 0)  # a nan norm (a non-finite gradient) stays nan: nonfinite="warn" reports it
    return torch.where(measured, norm / (std + eps), n.sqrt().expand_as(norm))


def group_gsnr_max(per_group: Sequence[Sequence[Tensor]], collectives: Collectives = SINGLE_PROCESS,
                   layouts: Sequence = ()) -> list[float]:
    """The largest gsnr of each group, as floats; over the ranks ``layouts`` live on (one MAX for
    every group) when they are sharded."""
    tensors = [t for group in per_group for t in group]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)
    device = tensors[0].device if tensors else torch.device("cpu")
    zero = torch.zeros((), dtype=dtype, device=device)
    local = torch.stack([
        torch.stack([t.max().to(dtype) if t.numel() else zero for t in group]).max() if group else zero
        for group in per_group
    ])
    collectives.max_(local, layouts)
    return local.tolist()


def init_gsnrs(grads: Sequence[Tensor], gsnrs: Sequence[Tensor], specs: Sequence, *, eps: float | Sequence[float],
               collectives: Collectives = SINGLE_PROCESS) -> None:
    """Fill each ``gsnrs[i]`` from ``grads[i]`` (its parameter's first gradient); the block
    statistics are summed across ranks with one collective where a sharding cuts blocks.
    ``eps`` may differ per tensor (tensors of several param groups)."""
    eps = [eps] * len(grads) if isinstance(eps, (int, float)) else list(eps)
    stats = gsnr_block_stats(grads, [s.dtype for s in gsnrs], specs)
    collectives.sum_blocks(stats, specs)
    for gsnr, spec, stat, e in zip(gsnrs, specs, stats, eps):
        gsnr.copy_(gsnr_from_stats(stat, spec, eps=e))


def step_scale(lr: float, normalize: bool, gsnr_max: float | None) -> float:
    """What multiplies ``gsnr_b * m``: ``lr``, or with ``normalize`` ``lr / gsnr_max`` (0 while
    every gsnr is 0: there is nothing to normalise by yet)."""
    if not normalize:
        return lr
    return lr / gsnr_max if gsnr_max is not None and gsnr_max > 0 else 0.0


def sgd_sai(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor | None],
    gsnrs: Sequence[Tensor],
    specs: Sequence,
    *,
    lr: float,
    momentum: float,
    eps: float,
    weight_decays: Sequence[float],
    maximize: bool = False,
    new_gsnr: Sequence[bool] | None = None,
    new_momentum: Sequence[bool] | None = None,
    normalize: bool = False,
    gsnr_max: float | None = None,
    collectives: Collectives = SINGLE_PROCESS,
    steps: Sequence[Tensor | None] | None = None,
) -> float | None:
    """Functional SGD-SaI over lists of tensors (all updated in place); one param group.

    The three phases of `SGDSaI.step` in order: `init_gsnrs` for the tensors flagged in
    ``new_gsnr``, the group's largest gsnr (`group_gsnr_max`) when ``normalize`` and no
    ``gsnr_max`` is given, then `sgd_sai_update`.

    Args:
        params, grads: the tensors (local shards under FSDP).
        momentum_buffers: like ``params``, or a `StoredMomentum` (a compressed buffer, decoded
            and encoded again by the step); ``None`` entries step without momentum (``m = g``).
        gsnrs: ``(n_blocks,)`` tensors in the statistics dtype; those flagged in ``new_gsnr`` are
            filled from this step's gradient first.
        specs: `BlockSpec`s, or `ShardView`s of sharded parameters (only ``block_sum``,
            ``block_numel``, ``expand`` are used).
        new_momentum: flags of buffers to start at ``m = g``.
        normalize, gsnr_max: scale by ``1/gsnr_max``; if ``gsnr_max`` is None it is the largest
            of ``gsnrs`` (across ranks).
        collectives: a `blockopt.distributed.Collectives` for sharded tensors: one block-sum
            reduction at a step that computes gsnrs, one MAX when the maximum is computed.
        steps: step counts (scalar tensors, incremented here), needed where a buffer is a
            `StoredMomentum` (its rounding key); ``None`` entries are not counted.

    Returns:
        The ``gsnr_max`` used when ``normalize`` (None if every gsnr was 0), else None.
    """
    n = len(params)
    todo = [i for i in range(n) if new_gsnr is not None and new_gsnr[i]]
    if todo:
        init_gsnrs([grads[i] for i in todo], [gsnrs[i] for i in todo], [specs[i] for i in todo], eps=eps,
                   collectives=collectives)
    if normalize:
        if gsnr_max is None:
            gsnr_max = group_gsnr_max([gsnrs], collectives, specs)[0]
        gsnr_max = gsnr_max if gsnr_max > 0 else None
    sgd_sai_update(params, grads, momentum_buffers, gsnrs, specs, scale=step_scale(lr, normalize, gsnr_max), lr=lr,
                   momentum=momentum, weight_decays=weight_decays, maximize=maximize,
                   new_momentum=[False] * n if new_momentum is None else new_momentum, steps=steps)
    return gsnr_max if normalize else None


def sgd_sai_update(params, grads, momentum_buffers, gsnrs, specs, *, scale: float, lr: float, momentum: float,
                   weight_decays, maximize: bool, new_momentum, steps=None) -> None:
    """``m <- g`` (fresh) or ``mu m + (1 - mu) g``; ``p <- p (1 - lr wd) - scale gsnr_b m``, in the
    statistics dtype, rounded once into each tensor. A compressed buffer (`StoredMomentum`) is
    decoded for its tensor's update and encoded with the key of the step count it reaches."""
    steps = [None] * len(params) if steps is None else steps
    for p, g, m, gsnr, spec, wd, fresh, step_t in zip(params, grads, momentum_buffers, gsnrs, specs, weight_decays,
                                                       new_momentum, steps):
        if step_t is not None:
            step_t += 1
        work = gsnr.dtype  # float32 for bf16/fp16 parameters, their own dtype otherwise
        g = g.to(work)
        if maximize:
            g = -g
        p_w = p.to(work)  # the tensor itself when the dtypes match
        direction = g
        if isinstance(m, StoredMomentum):
            direction = _step_stored(m, g, step_t, tuple(p.shape), momentum=momentum, fresh=fresh)
        elif m is not None:
            m_w = m.to(work)
            if fresh:
                m_w.copy_(g)
            else:
                m_w.mul_(momentum).add_(g, alpha=1 - momentum)
            if m_w is not m:
                m.copy_(m_w)
            direction = m_w
        if wd != 0:
            p_w.mul_(1 - lr * wd)
        p_w.addcmul_(expand(spec, gsnr * scale), direction, value=-1)
        if p_w is not p:
            p.copy_(p_w)


# (the rounding key is read from the step count as a number: a compiled step runs this eagerly,
# rather than recompiling for every new count)
@torch.compiler.disable
def _step_stored(m: StoredMomentum, g: Tensor, step_t: Tensor, shape: tuple[int, ...], *, momentum: float,
                 fresh: bool) -> Tensor:
    """A compressed buffer's new m (decoded in ``g``'s dtype, updated, and encoded again with the
    key of the step count ``step_t`` has reached); the unrounded m is returned for the update."""
    m_w = g.clone() if fresh else m.decode(shape, g.dtype).mul_(momentum).add_(g, alpha=1 - momentum)
    m.encode_(m_w, int(step_t))
    return m_w
