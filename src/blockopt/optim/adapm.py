r"""AdaPM (Zhang, Liu & Fang, 2025): Adam(-mini) with *partial* momentum, chosen per block type.

Every parameter tensor gets one momentum policy, read from its `BlockSpec.role` in the `Plan`:

* ``"none"``: no first moment, :math:`m_t = g_t` (RMSprop-like; no state);
* ``"full"``: Adam's first moment :math:`m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t` (a tensor like
  the parameter);
* ``"lowrank"``: a rank-:math:`r` first moment :math:`M_t = L_t R_t` (``L``: :math:`m\times r`,
  ``R``: :math:`r\times n`, of the matrix view :math:`G_t` (``shape[0]`` rows) of the gradient),
  plus a clipped correction fed back from the fit's residual.

The second moment is Adam-mini's one value per block (default) or Adam's one per coordinate.
With the step count :math:`t`, learning rate :math:`\eta`, weight decay :math:`\lambda` and
:math:`\hat v_b = v_b / (1-\beta_2^t)`, a step is

.. math::
    v_b &\leftarrow \beta_2 v_b + (1-\beta_2)\,\operatorname{mean}_{i\in b}(g_i^2) \\
    p_i &\leftarrow p_i(1-\eta\lambda) - \eta\,\frac{u_i}{\sqrt{\hat v_b} + \epsilon}
        \quad (i\in b), \qquad
    u = \begin{cases}
        g & \text{none} \\
        m_t / (1-\beta_1^t) & \text{full} \\
        L_t R_t / (1-\beta_1^t) + c_t & \text{lowrank}
    \end{cases}

and for a low-rank tensor, with the target :math:`T_t = \beta_1 L_{t-1}R_{t-1} + (1-\beta_1) G_t`
(the EMA step applied to the stored momentum),

.. math::
    (L_t, R_t) &\approx \arg\min_{L,R} \tfrac12 \lVert LR - T_t\rVert_F^2
        \quad\text{(K warm-started iterations, below)} \\
    \Delta_t &= T_t - L_t R_t \\
    c_t &= \frac{\Delta_t}{1-\beta_1}\,
        \min\Bigl(1,\ \kappa\,\frac{\lVert G_t\rVert_F}{\lVert\Delta_t\rVert_F/(1-\beta_1)}\Bigr)

One fit iteration, from :math:`(L, R) = (L_{t-1}, R_{t-1})` and with step size :math:`\gamma`:

.. math::
    R^\top &= Q_R S \ \text{(thin QR)}, &
        L &\leftarrow (1-\gamma)\, L S^\top + \gamma\, T_t Q_R \\
    L &= Q_L S_L \ \text{(thin QR)}, &
        R &\leftarrow (1-\gamma)\, S_L Q_R^\top + \gamma\, Q_L^\top T_t, \quad L \leftarrow Q_L

:math:`T_t Q_R = \beta_1 L_{t-1}(R_{t-1}Q_R) + (1-\beta_1) G_t Q_R` and
:math:`Q_L^\top T_t = \beta_1 (Q_L^\top L_{t-1}) R_{t-1} + (1-\beta_1) Q_L^\top G_t`: the fit never
forms :math:`T_t`. Only :math:`\Delta_t` (for the correction) is one transient :math:`m\times n`
buffer, reused for the update, so a step holds at most one parameter-sized temporary at a time.

Note [what comes from the paper]
    No official code is public. From the paper: the policy per block type (none for the token
    embedding and attention output, full for value, low-rank ``L R`` for query, key and MLP), the
    fit of the factors by a few warm-started gradient-descent iterations on
    :math:`\lVert LR - (\beta_1 L_{t-1}R_{t-1} + (1-\beta_1) g)\rVert^2`, a bias correction fed
    by the clipped approximation residual, and the pairing with Adam-mini's second moment. Ours:
    the form of the descent (below), the initialisation, the correction's scale and clip, and the
    policies of the roles the paper does not name.

Note [the fit: preconditioned gradient descent, alternating least squares at step size 1]
    The gradient of :math:`f = \frac12\lVert LR - T\rVert^2` in ``L`` is :math:`(LR-T)R^\top`.
    Preconditioned by :math:`(RR^\top)^{-1}` (scaled gradient descent, Tong, Ma & Chi 2021), a step
    of size :math:`\gamma` is :math:`L - \gamma(LR-T)R^\top(RR^\top)^{-1} = (1-\gamma)L + \gamma\,
    TR^\top(RR^\top)^{-1}`, which is the first line above once ``R`` is re-expressed with
    orthonormal rows (``L R`` unchanged); likewise for ``R``. So ``fit_lr=1`` (the default) is
    alternating least squares, i.e. warm-started subspace iteration (as in PowerSGD), and
    ``fit_lr < 1`` a damped gradient descent that keeps part of the previous fit. Why not plain
    gradient descent: its stable step is :math:`1/\lVert R\rVert_2^2`, and the momentum's scale
    follows the gradient's, which differs by orders of magnitude across tensors and over training,
    so any fixed step is too small somewhere and divergent elsewhere; the preconditioned step is
    scale-free, its rate does not depend on the factors' conditioning, and every
    :math:`\gamma\in(0,1]` decreases :math:`f` monotonically (each half-step is a convex quadratic
    moved :math:`\gamma` of the way to its minimiser). Why the QRs: no linear solves, factors stay
    well-conditioned, and a QR always returns ``r`` orthonormal columns, so rank the target lacks
    for one step (a zero gradient, a rank-deficient first gradient) is not lost for good. ``L`` is
    stored orthonormal. The first step starts from ``L = 0`` (so :math:`M_0 = 0`, as Adam's
    :math:`m_0`) and a Gaussian ``R`` drawn from a generator seeded by ``seed`` and the parameter's
    name (never the global RNG), which makes the first fit a randomized range finder.

Note [bias correction: the residual estimates the momentum the factors lost]
    The fit drops :math:`\Delta_t` from the momentum at every step, and what was dropped at step
    :math:`k` would still weigh :math:`\beta_1^{t-k}` in a full momentum at step :math:`t`:
    :math:`m_t - T_t = \sum_{k<t}\beta_1^{t-k}\Delta_k`. Taking the recent residuals equal to the
    current one, :math:`m_t - L_tR_t \approx \Delta_t/(1-\beta_1)`. With it the direction is exact
    for a constant gradient once the factors' subspace has settled (it converges to the gradient's
    top-r singular subspace; the part outside it then moves as without momentum, :math:`u = g`),
    just as Adam's :math:`1/(1-\beta_1^t)` makes :math:`m_t` exact for a constant gradient; at
    the first step :math:`u_1 = g_1` exactly. Without the correction the low-rank momentum keeps
    only the gradient's rank-r part, a bias that never decays (on the demo Llama: +9% final
    validation loss against AdamW, +2% with it). The estimate multiplies the residual's noise (and the momentum lost
    when the subspace turns) by :math:`1/(1-\beta_1)`, hence the clip: the correction never exceeds
    ``residual_clip`` times the current gradient in Frobenius norm (1 by default: for a constant
    gradient it is its out-of-subspace part, never larger than the gradient; on the demo Llama
    it never binds, it guards against a subspace that turns abruptly).
    ``residual_clip=0`` is plain low-rank momentum, ``None`` no clip. When the rank reaches
    :math:`\min(m, n)` the fit is exact, :math:`\Delta_t = 0`, and the tensor gets full momentum.

Note [default policies]
    The paper's: ``none`` for the token embedding and the attention output projection (sparse or
    noisy gradients, for which momentum does not pay its memory), ``full`` for the attention value,
    ``lowrank`` for query, key and MLP weights. Beyond the paper: ``none`` for learned position
    embeddings (embeddings, like the token table) and the untied output head (a table over the
    vocabulary, tied to the token embedding in the paper's GPT-2; on the demo Llama ``lowrank``
    for it ends at +3.6% validation loss against AdamW where ``none`` ends at +1.9%, and ``full``
    would cost twice the whole momentum budget; see ``benchmarks/adapm.md``); ``lowrank``
    for ``linear`` (dense matrices outside attention, e.g. MLPs that detection calls plain Linear);
    ``full`` for fused ``qkv`` projections (they hold the value, which needs full momentum, and a
    role covers the whole tensor), and for ``norm``, ``bias``, ``router`` (small, and routing is
    sensitive), ``conv`` and ``other`` (no evidence either way: stay with Adam). A ``lowrank``
    policy on a tensor with fewer than 2 dims gives it ``full`` momentum (a vector costs little);
    tensors with more than 2 dims use the matrix view ``(shape[0], numel // shape[0])``.

Note [sharded low-rank momentum]
    Under FSDP2 a parameter's rows are split over ranks (``Shard(0)``), and so are the matrix
    view's. ``L`` is kept split the same way and ``R`` replicated, both as DTensors (DCP saves
    and reshards them). Every product in the fit is then row-local except two: the QR of ``L``,
    computed on the gathered ``m x r`` factor (bit-identical to the unsharded one, so every rank
    gets the one-process ``Q``), and :math:`Q_L^\top T`, a sum over rows. Those are two all-reduces
    per fit iteration, plus one scalar each for the clip's two Frobenius norms. Shardings along
    other dims raise `NotImplementedError`.

Note [cost]
    Per low-rank tensor and step: ``fit_iters`` times two products of the ``m x n`` gradient with
    an ``r``-column matrix and two thin QRs (``m x r``, ``n x r``), then two rank-r products into
    the residual buffer: about :math:`(4K + 4)\,mnr` flops, matmul-shaped. Memory: ``r (m + n)``
    state values instead of ``m n``, and one float32 ``m x n`` buffer during the step (plus,
    briefly, the ``g^2`` whose block sums feed the second moment, as in Adam-mini's step).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..distributed.shard import ShardView, is_dtensor, local_tensor
from ..partition import BlockSpec, Plan
from ..partition.spec import ROLES
from .adam_mini import IMPLEMENTATIONS, _check_hyperparameters, adam_mini, block_sq_sums, step_work
from .base import BlockwiseOptimizer, _check_range
from .state import EXP_AVG, EXP_AVG_L, EXP_AVG_R, EXP_AVG_SQ, STEP, stat_dtype

if TYPE_CHECKING:
    from ..distributed.reduce import RowShards

POLICIES = ("none", "full", "lowrank")
SECOND_MOMENTS = ("adam-mini", "adam")

# Note [default policies] (module docstring) says why.
DEFAULT_MOMENTUM: dict[str, str] = {
    "embedding": "none",
    "attn_out": "none",
    "value": "full",
    "query": "lowrank",
    "key": "lowrank",
    "ffn": "lowrank",
    "pos_embedding": "none",
    "head": "none",
    "linear": "lowrank",
    "qkv": "full",
    "norm": "full",
    "bias": "full",
    "router": "full",
    "conv": "full",
    "other": "full",
}
assert set(DEFAULT_MOMENTUM) == set(ROLES)

# Hook for distributed training: sums the per-block partial sums of g^2 across ranks in place.
BlockSumReducer = Callable[[list[Tensor]], None]
# One tensor's momentum: None (policy "none"), m (policy "full") or the factors (L, R) ("lowrank").
Momentum = Tensor | tuple[Tensor, Tensor] | None


def resolve_momentum(momentum: str | Mapping[str, str] | None) -> dict[str, str]:
    """The policy of every role: the defaults, updated by ``momentum`` (one policy for all roles,
    or ``{role: policy}``); an unknown role or policy is a ValueError naming it."""
    if momentum is None:
        return dict(DEFAULT_MOMENTUM)
    if isinstance(momentum, str):
        _check_policy(momentum, "momentum")
        return {role: momentum for role in ROLES}
    if not isinstance(momentum, Mapping):
        raise TypeError(f"momentum must be a policy name or a mapping {{role: policy}}, got {type(momentum).__name__}")
    policies = dict(DEFAULT_MOMENTUM)
    for role, policy in momentum.items():
        if role not in ROLES:
            raise ValueError(f"momentum: unknown role {role!r}; roles are {', '.join(ROLES)}")
        _check_policy(policy, f"momentum[{role!r}]")
        policies[role] = policy
    return policies


def _check_policy(policy, where: str) -> None:
    if policy not in POLICIES:
        raise ValueError(f"{where}: unknown momentum policy {policy!r}; choose one of {', '.join(POLICIES)}")


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _check_adapm_hyperparameters(*, rank=None, fit_iters=None, fit_lr=None, residual_clip=..., **adam) -> None:
    _check_hyperparameters(**adam)
    if rank is not None:
        _check_int("rank", rank, 1)
    if fit_iters is not None:
        _check_int("fit_iters", fit_iters, 1)
    if fit_lr is not None:
        _check_range("fit_lr", fit_lr, 0.0, 1.0, high_open=False)
        if fit_lr == 0:
            raise ValueError("fit_lr must be in (0, 1] (1 = alternating least squares), got 0: the factors would never move")
    if residual_clip is not ... and residual_clip is not None:
        _check_range("residual_clip", residual_clip, 0.0)


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The matrix view a low-rank momentum factorises: ``(shape[0], numel // shape[0])``."""
    rows = shape[0]
    return rows, math.prod(shape) // rows


def _factors_placed_like(p: Tensor, left: Tensor | None, right: Tensor | None, view: ShardView) -> tuple:
    """Note [sharded low-rank momentum]: the factors of a sharded parameter, as DTensors on its
    mesh: ``L`` (``m x r``) split over rows like the parameter, ``R`` (``r x n``) replicated.
    DCP saves and reshards them like any DTensor state."""
    from torch.distributed.tensor import DTensor, Replicate

    from ..distributed.reduce import RowShards

    rows = RowShards(view)  # refuses shardings other than along dim 0
    mesh = p.device_mesh
    L = R = None
    if left is not None:
        L = DTensor.from_local(rows.local_rows(left).clone(), mesh, p.placements, shape=left.shape, stride=left.stride())
    if right is not None:
        R = DTensor.from_local(right, mesh, [Replicate()] * mesh.ndim, shape=right.shape, stride=right.stride())
    return L, R


class AdaPM(BlockwiseOptimizer):
    """AdaPM: partial momentum (none / full / low-rank per block type) with Adam-mini's second moment.

    The update, the fit of the low-rank factors and the residual correction are in the module
    docstring, with notes on each design choice.

    Args:
        params: an ``nn.Module``, ``model.named_parameters()``, plain parameters or param groups,
            as for `AdamMini`. Roles (hence policies) come from the `Plan`, never from names.
        lr (float): learning rate. (Default: 1e-3)
        betas (tuple[float, float]): coefficients of the moving averages of g and mean(g^2).
            (Default: (0.9, 0.999))
        eps (float): added to the square root of the second moment. (Default: 1e-8)
        weight_decay (float): decoupled weight decay (AdamW-style). (Default: 0)
        rank (int): rank r of low-rank momenta (capped at ``min(m, n)`` of each matrix view).
            (Default: 8)
        momentum (str | dict[str, str]): policy per role, ``"none"``, ``"full"`` or
            ``"lowrank"``; a mapping updates the defaults (``{"head": "lowrank"}``), a string sets
            every role (``"full"`` is Adam-mini / AdamW). (Default: `DEFAULT_MOMENTUM`)
        second_moment (str): ``"adam-mini"`` (one value per block of the plan) or ``"adam"``
            (one per coordinate). (Default: "adam-mini")
        fit_iters (int): fit iterations per step (each: two thin QRs and two products of the
            gradient with an ``r``-column matrix). (Default: 2)
        fit_lr (float): step size of the fit in (0, 1]; 1 is alternating least squares.
            (Default: 1.0)
        residual_clip (float | None): the residual correction's Frobenius norm is clipped to this
            times the gradient's; 0 disables the correction, ``None`` the clip. (Default: 1.0)
        seed (int): seeds the initial right factors (with each parameter's name). (Default: 0)
        decay_1d (bool): also decay 1-D parameters. (Default: False)
        maximize (bool): maximise the objective instead. (Default: False)
        plan, n_heads, n_kv_heads, head_dim, dim, rules, value, conv: as for `AdamMini`.
        implementation (str): the Adam-mini step run on ``full``-momentum tensors (see
            `AdamMini`); ``none`` and ``lowrank`` tensors always take the per-tensor loop.
            (Default: "auto")

    ``rank``, ``fit_iters``, ``fit_lr`` and ``residual_clip`` may differ per param group;
    ``momentum`` and ``second_moment`` shape the state, so they are fixed per optimizer.

    State per parameter: ``step`` (float32 scalar tensor); ``exp_avg`` (``full``: like the
    parameter, in its dtype); ``exp_avg_l`` ``(m, r)`` and ``exp_avg_r`` ``(r, n)`` (``lowrank``:
    float32, float64 for float64 parameters; ``L`` has orthonormal columns); ``exp_avg_sq``
    (``(n_blocks,)``, or ``(numel,)`` with ``second_moment="adam"``; float32 or float64).
    ``opt.policies`` maps every parameter name to the policy it gets.
    """

    _STAT_KEYS = (EXP_AVG_SQ, EXP_AVG_L, EXP_AVG_R)
    _OPTIONS = {**BlockwiseOptimizer._OPTIONS, "momentum": dict(DEFAULT_MOMENTUM), "second_moment": "adam-mini", "seed": 0}

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        rank: int = 8,
        momentum: str | Mapping[str, str] | None = None,
        second_moment: str = "adam-mini",
        fit_iters: int = 2,
        fit_lr: float = 1.0,
        residual_clip: float | None = 1.0,
        seed: int = 0,
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
        _check_adapm_hyperparameters(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, fit_iters=fit_iters, fit_lr=fit_lr,
            residual_clip=residual_clip,
        )
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        if second_moment not in SECOND_MOMENTS:
            raise ValueError(f"second_moment must be one of {SECOND_MOMENTS}, got {second_moment!r}")
        _check_int("seed", seed, 0)
        self.momentum = resolve_momentum(momentum)
        self.second_moment = second_moment
        self.seed = seed
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, rank=rank, fit_iters=fit_iters,
            fit_lr=fit_lr, residual_clip=residual_clip, decay_1d=decay_1d, maximize=maximize,
            implementation=implementation,
        )
        options = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, dim=dim, rules=rules, value=value, conv=conv)
        super().__init__(params, defaults, plan=plan, partition_options=options)

    def add_param_group(self, param_group: dict) -> None:
        keys = ("lr", "betas", "eps", "weight_decay", "rank", "fit_iters", "fit_lr", "residual_clip")
        _check_adapm_hyperparameters(**{k: param_group[k] for k in keys if k in param_group})
        super().add_param_group(param_group)

    # ---- policies and layouts ----------------------------------------------------------
    def policy(self, name: str) -> str:
        """The momentum policy of parameter ``name``: its role's, ``lowrank`` only for >= 2 dims."""
        spec = self.plan[name]
        policy = self.momentum[spec.role]
        if policy == "lowrank" and (len(spec.shape) < 2 or spec.numel == 0):
            return "full"
        return policy

    @property
    def policies(self) -> dict[str, str]:
        """``{parameter name: policy}`` for every parameter of every group."""
        return {n: self.policy(n) for g in self.param_groups for n in g["param_names"]}

    def block_spec(self, name: str) -> BlockSpec:
        """The second moment's layout: the plan's blocks, or one block per coordinate ("adam")."""
        spec = self.plan[name]
        if self.second_moment == "adam-mini":
            return spec
        cache = self.__dict__.setdefault("_coordinate_specs", {})
        cached = cache.get(name)
        if cached is None or cached[0] != spec:
            cached = cache[name] = (spec, spec.with_rule("coordinate", reason="AdaPM second_moment='adam': per coordinate"))
        return cached[1]

    def _rank(self, group: dict, shape: Sequence[int]) -> int:
        return min(group["rank"], *matrix_shape(shape))

    def _group_of(self, param: Tensor) -> dict:
        return next(g for g in self.param_groups if any(q is param for q in g["params"]))

    def _place_loaded_stat(self, p: Tensor, key: str, value: Tensor, layout) -> Tensor:
        if key in (EXP_AVG_L, EXP_AVG_R) and isinstance(layout, ShardView) and not is_dtensor(value):
            # full factors (a one-process checkpoint) for a sharded parameter: L's rows, R whole
            left, right = (value, None) if key == EXP_AVG_L else (None, value)
            placed = _factors_placed_like(p, left, right, layout)
            return placed[0] if key == EXP_AVG_L else placed[1]
        return super()._place_loaded_stat(p, key, value, layout)

    def _state_shapes(self, spec: BlockSpec, param: Tensor) -> dict[str, tuple[int, ...]]:
        group = self._group_of(param)
        name = next(n for n, q in zip(group["param_names"], group["params"]) if q is param)
        shapes = {STEP: (), EXP_AVG_SQ: (self.block_spec(name).n_blocks,)}
        policy = self.policy(name)
        if policy == "full":
            shapes[EXP_AVG] = tuple(param.shape)
        elif policy == "lowrank":
            m, n = matrix_shape(param.shape)
            r = self._rank(group, param.shape)
            shapes[EXP_AVG_L], shapes[EXP_AVG_R] = (m, r), (r, n)
        return shapes

    def _validate_state_dict(self, state_dict):
        """The base checks (every expected key, with its shape), and no momentum this optimizer's
        policy does not keep (a ``full`` checkpoint loaded where the role has ``none``)."""
        pairs = super()._validate_state_dict(state_dict)
        for saved_id, p in pairs:
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            group = self._group_of(p)
            name = next(n for n, q in zip(group["param_names"], group["params"]) if q is p)
            expected = self._state_shapes(self.plan[name], p)
            extra = [key for key in (EXP_AVG, EXP_AVG_L, EXP_AVG_R) if key in saved and key not in expected]
            if extra:
                raise ValueError(
                    f"state for {name!r} has {extra[0]!r}, but its momentum policy here is {self.policy(name)!r}: "
                    "it was saved with another momentum= setting"
                )
        return pairs

    def _initial_right_factor(self, name: str, r: int, n: int, like: Tensor) -> Tensor:
        """A Gaussian ``(r, n)`` factor scaled to unit-norm rows in expectation, drawn from a
        generator of its own (the global RNG is left alone), the same for a name and a seed."""
        generator = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
        draw = torch.randn(r, n, generator=generator, dtype=torch.float64) / math.sqrt(n)
        return draw.to(device=like.device, dtype=stat_dtype(like))

    # ---- the step ----------------------------------------------------------------------
    def _init_group(self, group, params, grads, momenta, exp_avg_sqs, steps, layouts, weight_decays) -> None:
        """Gather the group's tensors with a gradient (their local shards, for DTensors)."""
        for name, p in zip(group["param_names"], group["params"]):
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("AdaPM does not support sparse gradients")
            policy = self.policy(name)
            layout = self._layout(name, p)
            state = self.state[p]
            if not state:
                state[STEP] = torch.tensor(0.0, dtype=torch.float32)
                if policy == "full":
                    state[EXP_AVG] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif policy == "lowrank":
                    m, n = matrix_shape(p.shape)
                    r = self._rank(group, p.shape)
                    left = torch.zeros(m, r, dtype=stat_dtype(p), device=p.device)
                    right = self._initial_right_factor(name, r, n, p)
                    state[EXP_AVG_L], state[EXP_AVG_R] = (
                        _factors_placed_like(p, left, right, layout) if is_dtensor(p) else (left, right))
                state[EXP_AVG_SQ] = torch.zeros(layout.n_blocks, dtype=stat_dtype(p), device=local_tensor(p).device)
            params.append(local_tensor(p))
            grads.append(local_tensor(p.grad))
            if policy == "full":
                momenta.append(local_tensor(state[EXP_AVG]))
            elif policy == "lowrank":
                momenta.append((local_tensor(state[EXP_AVG_L]), local_tensor(state[EXP_AVG_R])))
            else:
                momenta.append(None)
            exp_avg_sqs.append(state[EXP_AVG_SQ])
            steps.append(state[STEP])
            layouts.append(layout)
            decays = p.ndim >= 2 or group["decay_1d"]
            weight_decays.append(group["weight_decay"] if decays else 0.0)

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimisation step (``closure`` re-evaluates the loss, as in torch.optim).

        With sharded (DTensor) parameters the partial block sums of every group are summed across
        ranks with one all-reduce for the whole step, as in `AdamMini`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, tensors, sq_sums in step_work(self):
            params, grads, momenta, exp_avg_sqs, steps, layouts, weight_decays = tensors
            beta1, beta2 = group["betas"]
            adapm(
                params, grads, momenta, exp_avg_sqs, steps, layouts,
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decays=weight_decays,
                fit_iters=group["fit_iters"], fit_lr=group["fit_lr"], residual_clip=group["residual_clip"],
                maximize=group["maximize"], sq_sums=sq_sums, implementation=group["implementation"],
            )
        return loss

    # ---- pickling / deepcopy / old checkpoints -------------------------------------------
    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, default in (("decay_1d", False), ("maximize", False), ("implementation", "auto"), ("rank", 8),
                                 ("fit_iters", 2), ("fit_lr", 1.0), ("residual_clip", 1.0)):
                group.setdefault(key, default)


# ---- the math: functions over tensor lists -------------------------------------------------
def adapm(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Momentum],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    specs: Sequence[BlockSpec | ShardView],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decays: Sequence[float],
    fit_iters: int = 2,
    fit_lr: float = 1.0,
    residual_clip: float | None = 1.0,
    maximize: bool = False,
    reduce_block_sums: BlockSumReducer | None = None,
    sq_sums: Sequence[Tensor] | None = None,
    implementation: str = "reference",
) -> None:
    """Functional AdaPM over lists of tensors (all updated in place).

    ``momenta[i]`` says the policy of tensor ``i``: ``None`` (no momentum), its first moment
    (``full``), or its factors ``(L, R)`` (``lowrank``; ``L`` ``(m, r)``, ``R`` ``(r, n)`` over the
    matrix view ``(shape[0], numel // shape[0])``). ``exp_avg_sqs[i]`` has one value per block of
    ``specs[i]``. ``reduce_block_sums``, called once with every tensor's per-block ``sum(g^2)``
    (a list aligned with ``params``, each ``(n_blocks,)``), lets a distributed caller sum blocks
    split across ranks; ``sq_sums`` hands in those sums already reduced. ``full`` tensors take
    `adam_mini` with ``implementation``; the others a per-tensor loop.
    """
    if sq_sums is None and reduce_block_sums is not None:
        sq_sums = block_sq_sums(grads, exp_avg_sqs, specs)
        reduce_block_sums(sq_sums)

    full = [i for i, momentum in enumerate(momenta) if isinstance(momentum, Tensor)]
    if full:
        def pick(xs):
            return [xs[i] for i in full]

        adam_mini(
            pick(params), pick(grads), pick(momenta), pick(exp_avg_sqs), pick(steps), pick(specs),
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decays=pick(weight_decays), maximize=maximize,
            sq_sums=None if sq_sums is None else pick(sq_sums), implementation=implementation,
        )
    full_set = set(full)
    for i, (p, g, momentum, v, step_t, spec, wd) in enumerate(zip(params, grads, momenta, exp_avg_sqs, steps, specs, weight_decays)):
        if i in full_set:
            continue
        sq_sum = sq_sums[i] if sq_sums is not None else None
        if momentum is None:
            _no_momentum_step(p, g, v, step_t, spec, sq_sum, lr=lr, beta2=beta2, eps=eps, wd=wd, maximize=maximize)
        else:
            _lowrank_step(
                p, g, momentum[0], momentum[1], v, step_t, spec, sq_sum, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                wd=wd, maximize=maximize, fit_iters=fit_iters, fit_lr=fit_lr, residual_clip=residual_clip,
            )


def _second_moment(g: Tensor, v: Tensor, step: float, spec, sq_sum: Tensor | None, *, beta2: float, eps: float) -> Tensor:
    """Update ``v`` with this step's block means of g^2; return the denominator, expanded."""
    if sq_sum is None:
        gw = g.to(v.dtype)
        sq_sum = spec.block_sum(gw * gw)
    v.mul_(beta2).add_(sq_sum / spec.block_numel(v), alpha=1 - beta2)
    denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    return spec.expand(denom)


def _apply(p: Tensor, u: Tensor, denom: Tensor, *, lr: float, wd: float, scratch: bool) -> None:
    """``p <- p (1 - lr wd) - lr u / denom``, rounded once into ``p``'s dtype.

    ``scratch``: ``u`` is a temporary of the step, free to overwrite (needed for low-precision ``p``)."""
    if p.dtype == u.dtype:
        if wd != 0:
            p.mul_(1 - lr * wd)
        p.addcdiv_(u, denom, value=-lr)
        return
    # bf16/fp16 parameter, float32 update: form the whole change in the float32 buffer and add it
    # once (a float32 copy of p would be a second parameter-sized temporary).
    change = u if scratch else u.clone()
    change.div_(denom).mul_(-lr)
    if wd != 0:
        change.add_(p, alpha=-lr * wd)
    p.add_(change)


def _no_momentum_step(p, g, v, step_t, spec, sq_sum, *, lr, beta2, eps, wd, maximize) -> None:
    """Policy ``none``: ``u = g`` (no first moment, so no first bias correction)."""
    step_t += 1
    denom = _second_moment(g, v, step_t.item(), spec, sq_sum, beta2=beta2, eps=eps)
    if p.dtype == v.dtype and g.dtype == v.dtype:
        if wd != 0:
            p.mul_(1 - lr * wd)
        p.addcdiv_(g, denom, value=lr if maximize else -lr)
        return
    u = g.to(v.dtype, copy=True)
    if maximize:
        u.neg_()
    _apply(p, u, denom, lr=lr, wd=wd, scratch=True)


def fit_lowrank(L: Tensor, R: Tensor, G: Tensor, *, beta1: float, iters: int, fit_lr: float,
                rows: RowShards | None = None) -> tuple[Tensor, Tensor]:
    """Factors ``(L, R)`` fitting ``T = beta1 L R + (1 - beta1) G`` (module docstring), warm-started at
    the given ``L``, ``R``; ``T`` is never formed. Returns new tensors; ``L`` has orthonormal columns.

    With ``rows`` (Note [sharded low-rank momentum]) ``L`` and ``G`` are this rank's rows and ``R``
    is replicated: the QR of ``L`` runs on the gathered ``m x r`` factor and ``Q_L^T T`` is summed
    over the ranks, two collectives per iteration."""
    L0, R0 = L, R

    def t_times(Q: Tensor) -> Tensor:  # T @ Q, Q (n, r): row-local
        return torch.addmm((G @ Q).mul_(1 - beta1), L0, R0 @ Q, alpha=beta1)

    def t_transposed_times(P: Tensor) -> Tensor:  # P^T @ T, P (m, r): a sum over rows
        partial = torch.addmm((P.T @ G).mul_(1 - beta1), P.T @ L0, R0, alpha=beta1)
        return partial if rows is None else rows.sum_(partial)

    def thin_qr(A: Tensor) -> tuple[Tensor, Tensor]:  # of the row-sharded L: the whole factor's QR
        if rows is None:
            return torch.linalg.qr(A)
        Q, S = torch.linalg.qr(rows.gather_rows(A))
        return rows.local_rows(Q), S

    for _ in range(iters):
        Q_R, S = torch.linalg.qr(R.T)  # L R = (L S^T) Q_R^T
        L_ls = t_times(Q_R)
        L = L_ls if fit_lr == 1 else torch.add((L @ S.T).mul_(1 - fit_lr), L_ls, alpha=fit_lr)
        Q_L, S_L = thin_qr(L)  # L Q_R^T = Q_L (S_L Q_R^T)
        R_ls = t_transposed_times(Q_L)
        R = R_ls if fit_lr == 1 else torch.add((S_L @ Q_R.T).mul_(1 - fit_lr), R_ls, alpha=fit_lr)
        L = Q_L
    return L, R


def _frobenius_norm(x: Tensor, rows: RowShards | None) -> Tensor:
    if rows is None:
        return torch.linalg.vector_norm(x)
    return rows.sum_(x.square().sum()).sqrt()


def _lowrank_step(p, g, L, R, v, step_t, spec, sq_sum, *, lr, beta1, beta2, eps, wd, maximize, fit_iters, fit_lr,
                  residual_clip) -> None:
    """Policy ``lowrank``: refit ``L R``, feed back the clipped residual, take the step. For a
    sharded parameter (``spec`` a `ShardView`) ``p``, ``g`` and ``L`` are this rank's rows."""
    rows = None
    if isinstance(spec, ShardView):
        from ..distributed.reduce import RowShards

        rows = RowShards(spec)
    step_t += 1
    step = step_t.item()
    work = v.dtype
    m, n = L.shape[0], R.shape[1]
    # The step's one parameter-sized temporary: the gradient in the statistics dtype (the fit reads
    # it), then the residual, then the update direction.
    D = g.to(dtype=work, memory_format=torch.contiguous_format, copy=True).view(m, n)
    if maximize:
        D.neg_()
    denom = _second_moment(D.view(p.shape), v, step, spec, sq_sum, beta2=beta2, eps=eps)
    L_new, R_new = fit_lowrank(L, R, D, beta1=beta1, iters=fit_iters, fit_lr=fit_lr, rows=rows)

    # Note [bias correction: the residual estimates the momentum the factors lost]
    scale = 1.0 / (1 - beta1)
    if residual_clip is None or residual_clip > 0:
        limit = None if residual_clip is None else residual_clip * _frobenius_norm(D, rows)
        D.mul_(1 - beta1).addmm_(L, R, alpha=beta1).addmm_(L_new, R_new, alpha=-1.0)  # the residual T - L_new R_new
        correction = D.mul_(scale)
        if limit is not None:
            norm = _frobenius_norm(correction, rows)
            correction.mul_(torch.where(norm > limit, limit / norm.clamp_min(torch.finfo(work).tiny), 1.0))
        u = correction.addmm_(L_new, R_new, alpha=1 / (1 - beta1**step))
    else:
        u = torch.mm(L_new, R_new, out=D).mul_(1 / (1 - beta1**step))
    L.copy_(L_new)
    R.copy_(R_new)
    _apply(p, u.view(p.shape), denom, lr=lr, wd=wd, scratch=True)
