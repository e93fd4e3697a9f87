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

The fit of the factors, and how they are kept under FSDP2, are in `blockopt.optim.lowrank`
(Note [the fit: ...], Note [sharded low-rank momentum]). No official code exists, so the notes
below record every choice the paper leaves open, next to the code they explain.

Note [what comes from the paper]
    No official code is public. From the paper: the policy per block type (none for the token
    embedding and attention output, full for value, low-rank ``L R`` for query, key and MLP), the
    fit of the factors by a few warm-started gradient-descent iterations on
    :math:`\lVert LR - (\beta_1 L_{t-1}R_{t-1} + (1-\beta_1) g)\rVert^2`, a bias correction fed
    by the clipped approximation residual, and the pairing with Adam-mini's second moment. Ours:
    the form of the descent (below), the initialisation, the correction's scale and clip, and the
    policies of the roles the paper does not name.

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
    validation loss against AdamW, +2% with it; benchmarks/studies/adapm). The estimate multiplies the residual's noise (and the momentum lost
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
    would cost twice the whole momentum budget; see ``benchmarks/studies/adapm``); ``lowrank``
    for ``linear`` (dense matrices outside attention, e.g. MLPs that detection calls plain Linear);
    ``full`` for fused ``qkv`` projections (they hold the value, which needs full momentum, and a
    role covers the whole tensor), and for ``norm``, ``bias``, ``router`` (small, and routing is
    sensitive), ``conv`` and ``other`` (no evidence either way: stay with Adam). A ``lowrank``
    policy on a tensor with fewer than 2 dims gives it ``full`` momentum (a vector costs little),
    and so does one on a tensor with more than 2 dims: stacked MoE experts ``(E, out, in)``, whose
    matrix view ``(E, out * in)`` would rank the experts against each other (with ``E <= r`` no
    saving at all; with more experts, all in one rank-r subspace: on Qwen2-MoE's 64 experts at rank
    8, a momentum error of 0.90 where rank 4 per expert, the same memory, has 0.65). A low-rank
    momentum per expert is not built; give experts ``momentum_dtype`` codes to save their memory.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..distributed import SINGLE_PROCESS, Collectives, ShardView, is_dtensor, local_tensor, replicated_like, rows_like
from ..kernels.adam_mini import adam_mini, block_sq_sums
from ..kernels import block_numel, expand
from ..kernels.codecs import StoredMomentum
from ..partition import BlockSpec, Plan
from ..partition.spec import ROLES
from ..validation import check, choice, integer, real, validate
from . import momentum as storage
from .adam_family import ADAM_HYPERPARAMETERS, MomentumStorage, SecondMomentBatch, reduce_block_sq_sums
from .base import BlockwiseOptimizer
from .lowrank import fit_lowrank, frobenius_norm, matrix_shape
from .state import EXP_AVG_L, EXP_AVG_R, EXP_AVG_SQ, STEP, holds_state, stat_dtype

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

# One tensor's momentum: None (policy "none"), m or its compressed storage (policy "full") or the
# factors (L, R) ("lowrank").
Momentum = Tensor | StoredMomentum | tuple[Tensor, Tensor] | None


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
    check(where, policy, choice(*POLICIES))


@dataclass
class AdaPMBatch(SecondMomentBatch):
    LIKE_PARAM = ("momenta",)
    momenta: list[Momentum] = field(default_factory=list)  # per tensor, by its policy (see `adapm`)


class AdaPM(MomentumStorage, BlockwiseOptimizer):
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
        seed (int): seeds the initial right factors (with each parameter's name) and, as in
            `AdamMini`, the stochastic rounding's bits. (Default: 0)
        decay_1d (bool): also decay 1-D parameters. (Default: False)
        maximize (bool): maximise the objective instead. (Default: False)
        plan, n_heads, n_kv_heads, head_dim, dim, rules, value, conv: as for `AdamMini`.
        implementation (str): the Adam-mini step run on ``full``-momentum tensors (see
            `AdamMini`); ``none`` and ``lowrank`` tensors always take the per-tensor loop.
            (Default: "auto")
        nonfinite (str): ``"warn"``, ``"skip_tensor"``, ``"skip_step"`` or ``"ignore"``, as for
            `AdamMini`. (Default: "warn")
        momentum_dtype (str or None): how ``full`` momenta are stored between steps, as for
            `AdamMini`; under ``"bfloat16"``, ``"int8"`` or ``"int4"`` the low-rank factors are
            kept in bfloat16 with stochastic rounding (Note [compressed low-rank factors]). (Default: None)
        param_rounding (str): how bf16/fp16 parameters are written (``"nearest"``,
            ``"stochastic"``, ``"kahan"``), as for `AdamMini`. (Default: "nearest")

    ``rank``, ``fit_iters``, ``fit_lr`` and ``residual_clip`` may differ per param group;
    ``momentum`` and ``second_moment`` shape the state, so they are fixed per optimizer.

    State per parameter: ``step`` (float32 scalar tensor); ``exp_avg`` (``full``: like the
    parameter, in its dtype or ``momentum_dtype``; ``exp_avg_codes``/``exp_avg_scales`` for int8/int4); ``exp_avg_l`` ``(m, r)`` and ``exp_avg_r`` ``(r, n)`` (``lowrank``:
    float32, float64 for float64 parameters; ``L`` has orthonormal columns); ``exp_avg_sq``
    (``(n_blocks,)``, or ``(numel,)`` with ``second_moment="adam"``; float32 or float64).
    ``opt.policies`` maps every parameter name to the policy it gets. ``param_compensation`` (like
    a bf16/fp16 parameter) under ``param_rounding="kahan"``.
    """

    HYPERPARAMETERS = {
        **ADAM_HYPERPARAMETERS,
        "rank": integer(1),
        "fit_iters": integer(1),
        "fit_lr": real(0, 1, low_open=True, hint="1 is alternating least squares; 0 would never move the factors"),
        "residual_clip": real(0, optional=True),
        "second_moment": choice(*SECOND_MOMENTS),
    }
    _Batch = AdaPMBatch
    _STATISTICS, _STATISTICS_KEY = "exp_avg_sqs", EXP_AVG_SQ
    _STAT_KEYS = (EXP_AVG_SQ, EXP_AVG_L, EXP_AVG_R)
    _GROUP_DEFAULTS = {"decay_1d": False, "maximize": False, "implementation": "auto", "rank": 8, "fit_iters": 2,
                       "fit_lr": 1.0, "residual_clip": 1.0, "nonfinite": "warn", "momentum_dtype": None,
                       "param_rounding": "nearest"}
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
        nonfinite: str = "warn",
        momentum_dtype: str | None = None,
        param_rounding: str = "nearest",
    ):
        validate(self.HYPERPARAMETERS, {"second_moment": second_moment, "seed": seed})
        self.momentum = resolve_momentum(momentum)
        self.second_moment = second_moment
        self.seed = seed
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank, fit_iters=fit_iters,
            fit_lr=fit_lr, residual_clip=residual_clip, decay_1d=decay_1d, maximize=maximize,
            implementation=implementation, nonfinite=nonfinite, momentum_dtype=momentum_dtype,
            param_rounding=param_rounding,
        )
        options = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, dim=dim, rules=rules, value=value, conv=conv)
        super().__init__(params, defaults, plan=plan, partition_options=options)

    # ---- policies and layouts ----------------------------------------------------------
    def policy(self, name: str) -> str:
        """The momentum policy of parameter ``name``: its role's, ``lowrank`` only for matrices
        (Note [default policies])."""
        spec = self.plan[name]
        policy = self.momentum[spec.role]
        if policy == "lowrank" and (len(spec.shape) != 2 or spec.numel == 0):
            return "full"
        return policy

    def _stores_momentum(self, name: str) -> bool:
        return self.policy(name) == "full"  # (low-rank factors are bf16 under any code: Note [compressed low-rank factors])

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

    def _place_loaded_stat(self, p: Tensor, key: str, value: Tensor, layout) -> Tensor:
        if key in (EXP_AVG_L, EXP_AVG_R) and isinstance(layout, ShardView) and not is_dtensor(value):
            # Note [sharded low-rank momentum]: full factors (a one-process checkpoint) for a
            # sharded parameter: L split over rows like it, R replicated
            return rows_like(p, value, layout) if key == EXP_AVG_L else replicated_like(p, value)
        return super()._place_loaded_stat(p, key, value, layout)

    def _state_shapes(self, name: str, param: Tensor) -> dict[str, tuple[int, ...]]:
        group = self._group_of(param)
        shapes = {STEP: (), EXP_AVG_SQ: (self.block_spec(name).n_blocks,)}
        policy = self.policy(name)
        if policy == "full":
            shapes.update(storage.state_shapes(self._kept_as(group["momentum_dtype"], name), tuple(param.shape)))
        elif policy == "lowrank":
            m, n = matrix_shape(param.shape)
            r = self._rank(group, param.shape)
            shapes[EXP_AVG_L], shapes[EXP_AVG_R] = (m, r), (r, n)
        return shapes

    def _validate_state_dict(self, state_dict, pairs) -> None:
        """First that each saved momentum is the one this optimizer's policy keeps (a ``full``
        checkpoint loaded where the role has ``lowrank`` names both), then the base checks
        (every expected key, with its shape)."""
        for saved_id, p, name in pairs:
            saved = state_dict["state"].get(saved_id)
            if not holds_state(saved):
                continue
            kept, expected = _policy_of(saved), _policy_of(self._state_shapes(name, p))
            if kept != expected:
                raise ValueError(
                    f"the state of {name!r} holds {kept!r} momentum, but its policy here is {self.policy(name)!r} "
                    f"(role {self.plan[name].role!r}): it was saved with another momentum= setting, or from an optimizer "
                    "built another way (a module gives roles that bare parameters lack); build both the same way"
                )
        super()._validate_state_dict(state_dict, pairs)

    def _gather(self, group: dict, skip=(), journal: list | None = None):
        # The first step draws the initial factor of every low-rank tensor at once, eagerly: a
        # generator of its own is beyond dynamo, and drawn one tensor at a time inside
        # `_gather_state` a compiled first step broke its graph once per tensor, recompiling that
        # frame each time (past torch's recompile limit, with its warning, on a model of 8+ layers).
        # Once per group, not every step: a tensor that gets its first gradient later draws its
        # own factor in `_gather_state` (one graph break, for it alone).
        scanned = self.__dict__.setdefault("_scanned_groups", set())
        if id(group) not in scanned:
            missing = [(n, p) for n, p in zip(group["param_names"], group["params"])
                       if STEP not in self.state.get(p, ()) and self.policy(n) == "lowrank"]
            if missing:
                self._draw_initial_factors(group, missing)
            scanned.add(id(group))
        return super()._gather(group, skip, journal)

    @torch.compiler.disable
    def _draw_initial_factors(self, group: dict, missing: list[tuple[str, Tensor]]) -> None:
        drawn = self.__dict__.setdefault("_drawn_factors", {})
        for name, p in missing:
            if name not in drawn:
                drawn[name] = self._initial_right_factor(name, self._rank(group, p.shape), matrix_shape(p.shape)[1], p)

    @torch.compiler.disable
    def _initial_right_factor(self, name: str, r: int, n: int, like: Tensor) -> Tensor:
        """A Gaussian ``(r, n)`` factor scaled to unit-norm rows in expectation, drawn from a
        generator of its own (the global RNG is left alone), the same for a name and a seed."""
        generator = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
        draw = torch.randn(r, n, generator=generator, dtype=torch.float64) / math.sqrt(n)
        return draw.to(device=like.device, dtype=stat_dtype(like))

    # ---- the step ----------------------------------------------------------------------
    def _gather_state(self, batch: AdaPMBatch, name, p, layout, state, plain) -> None:
        policy = self.policy(name)
        if STEP not in state:
            state[STEP] = torch.tensor(0.0, dtype=torch.float32)
            if policy == "lowrank":
                m, n = matrix_shape(p.shape)
                r = self._rank(batch.group, p.shape)
                dtype = self._factor_dtype(batch.group, p)
                left = torch.zeros(m, r, dtype=dtype, device=p.device)
                right = self.__dict__.get("_drawn_factors", {}).pop(name, None)
                if right is None or right.shape != (r, n):  # (a tensor whose first gradient came after its group's scan)
                    right = self._initial_right_factor(name, r, n, p)
                right = right.to(dtype)
                if is_dtensor(p):  # Note [sharded low-rank momentum]
                    left, right = rows_like(p, left, layout), replicated_like(p, right)
                state[EXP_AVG_L], state[EXP_AVG_R] = left, right
            state[EXP_AVG_SQ] = torch.zeros(layout.n_blocks, dtype=stat_dtype(p), device=batch.params[-1].device)
        if policy == "full":
            batch.momenta.append(self._keep_momentum(batch, name, p, state, plain))
        elif policy == "lowrank":
            factors = (local_tensor(state[EXP_AVG_L]), local_tensor(state[EXP_AVG_R]))
            kept = self._factor_dtype(batch.group, p)
            if factors[0].dtype != kept:  # as check_kept says for full momenta
                raise ValueError(
                    f"{name}: its param group says momentum_dtype={batch.group['momentum_dtype']!r}, whose low-rank "
                    f"factors for a {p.dtype} parameter are {kept}, but its state holds {factors[0].dtype} factors: the "
                    "parameter was cast after the optimizer made its state (e.g. model.double()), or the group's "
                    "momentum_dtype was changed by hand. Build the optimizer after the cast, or save opt.state_dict() "
                    "and load it into an optimizer built with the model and setting you want (it converts)")
            if factors[1].shape[0] != self._rank(batch.group, p.shape):  # (the factors were made at another rank)
                raise ValueError(
                    f"{name}: its param group now says rank={batch.group['rank']}, but its low-rank momentum has rank "
                    f"{factors[1].shape[0]}; a group's rank can't change between steps: build a new optimizer with it "
                    "(the momentum starts again)")
            if kept != stat_dtype(p):  # Note [compressed low-rank factors]
                # a shard's rows of L draw the bits of their place in the whole L, as one process
                # would (Note [sharded low-rank momentum]); R is whole on every rank
                first_row = layout.box[0][0] if isinstance(layout, ShardView) and layout.box else 0
                offsets = (first_row * factors[0].shape[1], 0)
                factors = tuple(StoredMomentum("bfloat16", (f,), storage.salt(f"{name}:{key}"), self.seed, offset=offset)
                                for f, key, offset in zip(factors, (EXP_AVG_L, EXP_AVG_R), offsets))
            batch.momenta.append(factors)
        else:
            batch.momenta.append(None)
        batch.exp_avg_sqs.append(state[EXP_AVG_SQ])
        batch.steps.append(state[STEP])

    def _reduce(self, batches: list[AdaPMBatch], collectives: Collectives) -> None:
        reduce_block_sq_sums(batches, collectives)

    # Note [compressed low-rank factors]: under a compressed ``momentum_dtype`` (bfloat16, int8,
    # int4) a low-rank tensor's factors are the rest of its first moment, and at float32 they
    # would be most of AdaPM's state. They are kept in bfloat16 with stochastic rounding (the
    # step fits them in float32, then encodes), never in int codes: L has orthonormal columns
    # and R carries the scale, which 8 bits per entry would blur.
    @staticmethod
    def _factor_dtype(group: dict, p: Tensor) -> torch.dtype:
        return stat_dtype(p) if group["momentum_dtype"] in (None, "float32") else torch.bfloat16

    def _stat_storage_dtype(self, p: Tensor, key: str) -> torch.dtype:
        if key in (EXP_AVG_L, EXP_AVG_R):  # (from a float32 checkpoint: rounded to nearest once)
            return self._factor_dtype(self._group_of(p), p)
        return super()._stat_storage_dtype(p, key)

    def _update(self, batch: AdaPMBatch, collectives: Collectives) -> None:
        group = batch.group
        beta1, beta2 = group["betas"]

        adapm(
            **batch.arguments(), momenta=batch.momenta, lr=self._lr(group), beta1=beta1, beta2=beta2, eps=group["eps"],
            fit_iters=group["fit_iters"], fit_lr=group["fit_lr"], residual_clip=group["residual_clip"],
            maximize=group["maximize"], collectives=collectives, implementation=group["implementation"],
        )


def _policy_of(entry) -> str:
    """The momentum policy a state entry (or its expected shapes) holds."""
    if EXP_AVG_L in entry:
        return "lowrank"
    return "full" if any(key in entry for key in storage.KEYS) else "none"


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
    sq_sums: Sequence[Tensor] | None = None,
    collectives: Collectives = SINGLE_PROCESS,
    implementation: str = "reference",
) -> None:
    """Functional AdaPM over lists of tensors (all updated in place).

    ``momenta[i]`` says the policy of tensor ``i``: ``None`` (no momentum), its first moment
    (``full``; a `StoredMomentum` where it is kept compressed), or its factors ``(L, R)`` (``lowrank``; ``L`` ``(m, r)``, ``R`` ``(r, n)`` over the
    matrix view ``(shape[0], numel // shape[0])``). ``exp_avg_sqs[i]`` has one value per block of
    ``specs[i]``. ``sq_sums`` hands in every tensor's per-block ``sum(g^2)`` already summed across
    ranks; otherwise, where ``collectives`` says a sharding cuts blocks, they are computed and
    summed here with one collective. ``collectives`` also makes the row sums of sharded low-rank
    fits. ``full`` tensors take
    `adam_mini` with ``implementation``; the others a per-tensor loop.
    """
    if sq_sums is None and collectives.cuts_blocks(specs):
        sq_sums = block_sq_sums(grads, exp_avg_sqs, specs)
        collectives.sum_blocks(sq_sums, specs)

    full = [i for i, momentum in enumerate(momenta) if isinstance(momentum, (Tensor, StoredMomentum))]
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
                collectives=collectives,
            )


# Note [a compiled AdaPM step]: eagerly the step count is read as a number, as the reference
# reads it. Under torch.compile a read would break the graph, so `_count` hands on the step
# tensor itself (float64, as Python's float) and the bias corrections become tensors, as does a
# tensor lr; `_add_scaled` then takes the place of the fused ops whose scale must be a number.
def _count(step_t: Tensor) -> float | Tensor:
    """The step count: a number eagerly, the tensor (float64) while compiling."""
    return step_t.to(torch.float64) if torch.compiler.is_compiling() else step_t.item()


def _add_scaled(x: Tensor, scale, a: Tensor, b: Tensor | None = None) -> Tensor:
    """``x += scale * a / b`` (``x += scale * a`` without ``b``), in ``addcdiv``'s order; in place."""
    if not isinstance(scale, Tensor):
        return x.add_(a, alpha=scale) if b is None else x.addcdiv_(a, b, value=scale)
    scaled = scale.to(a.dtype) * a
    return x.add_(scaled if b is None else scaled / b)


def _second_moment(g: Tensor, v: Tensor, step, spec, sq_sum: Tensor | None, *, beta2: float, eps: float) -> Tensor:
    """Update ``v`` with this step's block means of g^2; return the denominator, expanded."""
    if sq_sum is None:
        gw = g.to(v.dtype)
        sq_sum = spec.block_sum(gw * gw)
    v.mul_(beta2).add_(sq_sum / block_numel(spec, v), alpha=1 - beta2)
    denom = (v.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    return expand(spec, denom)


def _apply(p: Tensor, u: Tensor, denom: Tensor, *, lr: float, wd: float, scratch: bool) -> None:
    """``p <- p (1 - lr wd) - lr u / denom``, rounded once into ``p``'s dtype.

    ``scratch``: ``u`` is a temporary of the step, free to overwrite (needed for low-precision ``p``)."""
    if p.dtype == u.dtype:
        if wd != 0:
            p.mul_(1 - lr * wd)
        _add_scaled(p, -lr, u, denom)
        return
    # bf16/fp16 parameter, float32 update: form the whole change in the float32 buffer and add it
    # once (a float32 copy of p would be a second parameter-sized temporary).
    change = u if scratch else u.clone()
    change.div_(denom).mul_(-lr)
    if wd != 0:
        _add_scaled(change, -lr * wd, p)
    p.add_(change)


def _no_momentum_step(p, g, v, step_t, spec, sq_sum, *, lr, beta2, eps, wd, maximize) -> None:
    """Policy ``none``: ``u = g`` (no first moment, so no first bias correction)."""
    step_t += 1
    denom = _second_moment(g, v, _count(step_t), spec, sq_sum, beta2=beta2, eps=eps)
    if p.dtype == v.dtype and g.dtype == v.dtype:
        if wd != 0:
            p.mul_(1 - lr * wd)
        _add_scaled(p, lr if maximize else -lr, g, denom)
        return
    u = g.to(v.dtype, copy=True)
    if maximize:
        u.neg_()
    _apply(p, u, denom, lr=lr, wd=wd, scratch=True)


def _lowrank_step(p, g, L, R, v, step_t, spec, sq_sum, *, lr, beta1, beta2, eps, wd, maximize, fit_iters, fit_lr,
                  residual_clip, collectives: Collectives) -> None:
    """Policy ``lowrank``: refit ``L R``, feed back the clipped residual, take the step. For a
    sharded parameter (``spec`` a `ShardView`) ``p``, ``g`` and ``L`` are this rank's rows, and
    ``collectives.rows(spec)`` makes the fit's row sums (Note [sharded low-rank momentum])."""
    rows = collectives.rows(spec)
    step_t += 1
    step = _count(step_t)
    work = v.dtype
    stored = (L, R) if isinstance(L, StoredMomentum) else None  # Note [compressed low-rank factors]
    if stored is not None:
        L, R = (f.decode(tuple(f.stored[0].shape), work) for f in stored)
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
        limit = None if residual_clip is None else residual_clip * frobenius_norm(D, rows)
        D.mul_(1 - beta1).addmm_(L, R, alpha=beta1).addmm_(L_new, R_new, alpha=-1.0)  # the residual T - L_new R_new
        correction = D.mul_(scale)
        if limit is not None:
            norm = frobenius_norm(correction, rows)
            correction.mul_(torch.where(norm > limit, limit / norm.clamp_min(torch.finfo(work).tiny), 1.0))
        u = _add_scaled(correction, 1 / (1 - beta1**step), L_new @ R_new) if isinstance(step, Tensor) \
            else correction.addmm_(L_new, R_new, alpha=1 / (1 - beta1**step))
    else:
        u = torch.mm(L_new, R_new, out=D).mul_(1 / (1 - beta1**step))
    if stored is None:
        L.copy_(L_new)
        R.copy_(R_new)
    else:
        for factor, new in zip(stored, (L_new, R_new)):
            factor.encode_(new, step_t)
    _apply(p, u.view(p.shape), denom, lr=lr, wd=wd, scratch=True)
