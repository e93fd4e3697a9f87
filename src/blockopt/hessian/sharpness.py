r"""Sharpness by block type: how curved the loss is along each type's parameters.

For a block type :math:`b` (all tensors of that type, e.g. every query and key matrix: ``qk``)
let :math:`H_{bb}` be the Hessian of the loss restricted to those parameters (the principal
sub-matrix; other parameters held fixed). Two measures are computed from Hessian-vector products
(double backward), never from the Hessian itself:

* ``lambda_max``: the largest eigenvalue of :math:`H_{bb}`, by power iteration. This is the
  curvature that bounds a stable step along the type's directions (GD needs
  :math:`\eta < 2/\lambda_{\max}`).
* ``trace_per_param``: :math:`\operatorname{Tr}(H_{bb}) / m_b`, the average curvature per
  parameter of the type, estimated with Hutchinson's estimator
  :math:`\mathbb{E}_v[v^\top H_{bb} v]` (Rademacher :math:`v` on the type's :math:`m_b`
  coordinates). This is the "average sharpness" of Wang et al. (2025), who compare block types
  by :math:`\operatorname{Tr}(H_b)/m_b`, here on the exact Hessian.
* ``gauss_newton``: :math:`\operatorname{Tr}(G_{bb}) / m_b` for the Gauss-Newton matrix
  :math:`G = \frac1N\sum_t J_t^\top H^{(z)}_t J_t` of a cross-entropy loss over :math:`N`
  positions (:math:`J_t` the Jacobian of position t's logits, :math:`H^{(z)}_t` the softmax
  Hessian): the positive semi-definite part of the Hessian, which Hessian approximations of
  the kind Wang et al. use estimate. Sampling labels :math:`\hat y_t` from the model's own
  softmax makes :math:`N\lVert\nabla_b \bar\ell(\hat y)\rVert^2` (the gradient of the mean loss
  on those labels) an unbiased estimate of :math:`\operatorname{Tr}(G_{bb})`: one backward pass
  per sample, for every type at once (Note [Gauss-Newton trace by sampled labels]). It needs the
  logits (``logits_fn``).

Note [Gauss-Newton trace by sampled labels]: for cross-entropy, the softmax Hessian at
position t is the covariance of the score :math:`s_t = \nabla_z \ell_t(\hat y_t)` under
:math:`\hat y_t \sim \mathrm{softmax}(z_t)`, so :math:`G = \frac1N\sum_t
\mathbb{E}[J_t^\top s_t s_t^\top J_t]`. With :math:`\hat g = \frac1N \sum_t J_t^\top s_t`,
:math:`\mathbb{E}[N \hat g \hat g^\top] = G` because the scores of different positions are
independent with mean zero, so the cross terms vanish.

Both use the one batch the caller's ``loss_fn`` evaluates (sharpness is a property of that
loss), a fixed seed, and a few iterations/probes: a meter, not an eigen-solver. The operators
(HVP, power iteration, Hutchinson) and the meter share this module (over 400 lines) because the
notes here explain both and the operators exist to serve the meter.

Note [power iteration and negative curvature]: power iteration finds the eigenvalue of largest
*magnitude*. Away from a minimum :math:`H_{bb}` can have a negative eigenvalue larger in
magnitude than the top one; then a second run on :math:`H_{bb} - \mu I` (with :math:`\mu` the
negative eigenvalue found, so every eigenvalue of the shifted matrix is >= 0) finds
:math:`\lambda_{\max} - \mu`, and :math:`\mu` is added back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..partition import BLOCK_TYPES, Plan, partition
from ..validation import check, choice, integer, real, validate

MEASURES = ("lambda_max", "trace", "gauss_newton")
DEFAULT_MEASURES = ("lambda_max", "trace")  # the ones that need only the loss
# iteration and sampling settings (gn_samples: the standard error needs two samples)
SETTINGS = {"iters": integer(1), "tol": real(0), "probes": integer(1), "gn_samples": integer(2)}

MatVec = Callable[[list[Tensor]], list[Tensor]]


# ---- the math: operators on lists of tensors ----------------------------------------------------
def _dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _norm(a: Sequence[Tensor]) -> Tensor:
    return _dot(a, a).sqrt()


def hvp_operator(grads: Sequence[Tensor], params: Sequence[Tensor]) -> MatVec:
    r"""``v -> H v`` for the Hessian of the loss whose gradients (taken with ``create_graph=True``)
    are ``grads`` with respect to ``params``: :math:`H v = \nabla_\theta (g \cdot v)`.

    Restricting to a subset of parameters is passing only their grads and params: the result is
    :math:`H_{bb} v` (the other parameters are held fixed).
    """
    live = [i for i, g in enumerate(grads) if g.requires_grad]  # a constant gradient has zero curvature

    def matvec(vectors: list[Tensor]) -> list[Tensor]:
        if not live:
            return [torch.zeros_like(p) for p in params]
        out = torch.autograd.grad(
            [grads[i] for i in live], list(params), grad_outputs=[vectors[i] for i in live],
            retain_graph=True, allow_unused=True, materialize_grads=True,
        )
        return [o.detach() for o in out]

    return matvec


@dataclass(frozen=True)
class PowerResult:
    """The outcome of `power_iteration`."""

    eigenvalue: float
    vector: list[Tensor]
    iterations: int  # matrix-vector products used
    converged: bool  # relative change of the estimate fell below ``tol``


def power_iteration(
    matvec: MatVec,
    like: Sequence[Tensor],
    *,
    iters: int = 20,
    tol: float = 1e-3,
    seed: int = 0,
    top: bool = True,
) -> PowerResult:
    """The dominant eigenvalue of a symmetric operator by power iteration (Rayleigh quotients).

    Args:
        matvec: ``v -> A v`` on lists of tensors shaped like ``like``.
        like: tensors giving the shapes, dtype and device of a vector.
        iters: most matrix-vector products per run.
        tol: stop when the estimate changes by less than ``tol`` times its size.
        seed: seeds the start vector (a Gaussian, drawn on the CPU: the same on every device).
        top: return the largest (algebraic) eigenvalue: if the dominant one is negative, rerun on
            the shifted operator (Note [power iteration and negative curvature]). With
            ``top=False`` the eigenvalue of largest magnitude is returned as found.
    """
    validate(SETTINGS, {"iters": iters, "tol": tol})
    first = _power(matvec, like, iters=iters, tol=tol, seed=seed)
    if not top or first.eigenvalue >= 0:
        return first
    mu = first.eigenvalue

    def shifted(v: list[Tensor]) -> list[Tensor]:
        return [hv - mu * x for hv, x in zip(matvec(v), v)]

    second = _power(shifted, like, iters=iters, tol=tol, seed=seed + 1)
    return PowerResult(
        eigenvalue=second.eigenvalue + mu, vector=second.vector,
        iterations=first.iterations + second.iterations, converged=first.converged and second.converged,
    )


def _power(matvec: MatVec, like: Sequence[Tensor], *, iters: int, tol: float, seed: int) -> PowerResult:
    generator = torch.Generator().manual_seed(seed)
    v = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(device=t.device, dtype=t.dtype) for t in like]
    scale = _norm(v)
    v = [x / scale for x in v]
    estimate, converged, n = float("nan"), False, 0
    for n in range(1, iters + 1):
        w = matvec(v)
        new = _dot(v, w).item()  # Rayleigh quotient (v has unit norm)
        size = _norm(w)
        if size.item() == 0.0:  # v is in the null space: A is zero on the type, or v was unlucky
            estimate, converged = 0.0, True
            break
        v = [x / size for x in w]
        if math.isfinite(estimate) and abs(new - estimate) <= tol * max(abs(new), 1e-30):
            estimate, converged = new, True
            break
        estimate = new
    return PowerResult(eigenvalue=estimate, vector=v, iterations=n, converged=converged)


def hutchinson_trace(matvec: MatVec, like: Sequence[Tensor], *, probes: int = 8, seed: int = 0) -> tuple[float, float]:
    r"""``(mean, standard error)`` of :math:`v^\top A v` over ``probes`` Rademacher vectors: an
    unbiased estimate of :math:`\operatorname{Tr}(A)`."""
    samples = _hutchinson_samples(matvec, like, probes=probes, seed=seed).sum(dim=1)
    return _mean_and_stderr(samples)


def _hutchinson_samples(matvec: MatVec, like: Sequence[Tensor], *, probes: int, seed: int) -> Tensor:
    r"""``(probes, len(like))`` float64: :math:`v_t^\top (A v)_t` for each probe and tensor ``t``.

    Summed over ``t`` a row is :math:`v^\top A v`. Each column alone is an unbiased estimate of
    the trace of tensor ``t``'s diagonal block: the cross terms :math:`v_t^\top A_{ts} v_s`
    (``s != t``) have mean zero, as the probes of different tensors are independent."""
    check("probes", probes, SETTINGS["probes"])
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(probes):
        v = [
            (torch.randint(0, 2, t.shape, generator=generator).to(torch.float64) * 2 - 1).to(device=t.device, dtype=t.dtype)
            for t in like
        ]
        rows.append(torch.stack([(x * hx).sum().to(torch.float64).cpu() for x, hx in zip(v, matvec(v))]))
    return torch.stack(rows)


def _mean_and_stderr(samples: Tensor) -> tuple[float, float]:
    n = samples.shape[0]
    mean = samples.mean().item()
    return mean, (samples.std(unbiased=True).item() / math.sqrt(n)) if n > 1 else float("nan")


# ---- the meter: block types of a model ----------------------------------------------------------
@dataclass(frozen=True)
class TypeSharpness:
    """Sharpness of one block type (``None`` for a measure that was not asked for)."""

    block_type: str
    n_params: int
    param_names: tuple[str, ...]
    lambda_max: float | None = None
    power_iterations: int | None = None
    converged: bool | None = None
    trace_per_param: float | None = None
    trace_stderr: float | None = None  # standard error of trace_per_param over the probes
    # per tensor: name -> (Tr(H_tt)/numel, its standard error), from the same probes (noisier)
    tensor_traces: Mapping[str, tuple[float, float]] | None = None
    gauss_newton_per_param: float | None = None  # Tr(G_bb) / m_b
    gauss_newton_stderr: float | None = None
    # per tensor: name -> (Tr(G_tt)/numel, its standard error), from the same sampled labels
    tensor_gauss_newton: Mapping[str, tuple[float, float]] | None = None


class SharpnessReport(Mapping[str, TypeSharpness]):
    """Block type -> `TypeSharpness`, in the order of `blockopt.partition.BLOCK_TYPES`."""

    def __init__(self, entries: Sequence[TypeSharpness], settings: dict):
        self._entries = {e.block_type: e for e in entries}
        self.settings = dict(settings)

    def __getitem__(self, key: str) -> TypeSharpness:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def values_of(self, measure: str) -> dict[str, float]:
        """``{block type: value}`` of ``"lambda_max"`` or ``"trace"`` (trace per parameter)."""
        attr = _measure_attr(measure)
        return {k: getattr(e, attr) for k, e in self._entries.items() if getattr(e, attr) is not None}

    def ordering(self, measure: str = "lambda_max") -> list[str]:
        """Block types from flattest to sharpest under ``measure``."""
        values = self.values_of(measure)
        return sorted(values, key=values.__getitem__)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "types": {k: asdict(e) for k, e in self._entries.items()}}

    def __str__(self) -> str:
        rows = [("type", "params", "lambda_max", "iters", "Tr(H)/m", "+-", "Tr(G)/m", "+-")]

        def fmt(value, digits):
            return "-" if value is None else f"{value:.{digits}g}"

        for e in self._entries.values():
            rows.append((
                e.block_type, f"{e.n_params:,}", fmt(e.lambda_max, 4),
                "-" if e.power_iterations is None else f"{e.power_iterations}{'' if e.converged else '*'}",
                fmt(e.trace_per_param, 4), fmt(e.trace_stderr, 2),
                fmt(e.gauss_newton_per_param, 4), fmt(e.gauss_newton_stderr, 2),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
        if any(e.converged is False for e in self._entries.values()):
            lines.append("* power iteration stopped at the iteration limit before converging")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SharpnessReport({', '.join(self._entries)})"


def _measure_attr(measure: str) -> str:
    check("measure", measure, choice(*MEASURES))
    return {"lambda_max": "lambda_max", "trace": "trace_per_param", "gauss_newton": "gauss_newton_per_param"}[measure]


def block_sharpness(
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    *,
    plan: Plan | None = None,
    types: Sequence[str] | None = None,
    measures: Sequence[str] = DEFAULT_MEASURES,
    iters: int = 20,
    tol: float = 1e-3,
    probes: int = 8,
    seed: int = 0,
    bias: str = "owner",
    logits_fn: Callable[[], Tensor] | None = None,
    gn_samples: int = 16,
) -> SharpnessReport:
    r"""Sharpness of the loss per block type of ``model`` (`blockopt.partition.block_types`).

    Args:
        model: the model; its trainable parameters are grouped into block types by the Plan's
            roles.
        loss_fn: ``() -> scalar loss`` on the batch to measure, e.g.
            ``lambda: model(x, y)[1]``. Called once; its graph is differentiated twice.
        plan: use this partition (default: ``blockopt.partition(model)``).
        types: measure only these block types (default: every type the model has).
        measures: any of ``"lambda_max"`` (power iteration), ``"trace"`` (Hutchinson
            :math:`\operatorname{Tr}(H_{bb})/m_b`) and ``"gauss_newton"``
            (:math:`\operatorname{Tr}(G_{bb})/m_b` by sampled labels; needs ``logits_fn``).
        iters, tol: power-iteration limit and relative tolerance (per type).
        probes: Rademacher probes per type for the trace.
        seed: start vectors and probes; each type's come from ``seed`` alone, so adding or
            removing a type does not change another's result.
        bias: how biases are typed (``"owner"`` or ``"separate"``: `Plan.block_type`).
        logits_fn: ``() -> logits`` (``(..., vocab)``) of the same batch, for ``"gauss_newton"``
            (the loss it stands for is the mean cross-entropy over all positions).
        gn_samples: sampled label sets for ``"gauss_newton"`` (one backward pass each).

    Costs ``len(types) * (iters + probes)`` Hessian-vector products, each about two backward
    passes, plus ``gn_samples`` backward passes for ``"gauss_newton"``. ``loss_fn`` runs with `scaled_dot_product_attention` restricted to its math kernel
    (the fused kernels have no double backward). Dropout or other randomness in the forward pass is frozen by the single call of
    ``loss_fn``; call ``model.eval()`` first if you want it off.
    """
    measures = (measures,) if isinstance(measures, str) else measures  # ("trace", not its letters)
    types = (types,) if isinstance(types, str) else types
    unknown = [m for m in measures if m not in MEASURES]
    if unknown or not measures:
        raise ValueError(f"measures must be a non-empty subset of {MEASURES}, got {list(measures)}")
    if "gauss_newton" in measures and logits_fn is None:
        raise ValueError("measure 'gauss_newton' needs logits_fn: () -> the batch's logits, shape (..., vocab)")
    plan = partition(model) if plan is None else plan
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in named if n not in plan or tuple(plan[n].shape) != tuple(p.shape)]
    if missing:
        raise ValueError(f"parameters {missing[:3]} are not in the plan (or have other shapes): build the plan from this model")
    by_type: dict[str, list[tuple[str, Tensor]]] = {}
    for name, p in named:
        by_type.setdefault(plan.block_type(name, bias=bias), []).append((name, p))
    present = [t for t in BLOCK_TYPES if t in by_type]
    if types is not None:
        bad = [t for t in types if t not in present]
        if bad:
            raise ValueError(f"block type(s) {bad} not in this model; it has {present}")
        present = [t for t in present if t in types]

    gauss_newton = None
    if "gauss_newton" in measures:
        gauss_newton = _gauss_newton_samples(logits_fn, [p for _, p in named], samples=gn_samples, seed=seed)
        gn_column = {n: i for i, (n, _) in enumerate(named)}
    if not {"lambda_max", "trace"} & set(measures):
        entries = [
            _type_entry(t, by_type[t], gauss_newton_fields(gauss_newton, [gn_column[n] for n, _ in by_type[t]], by_type[t]))
            for t in present
        ]
        return SharpnessReport(entries, _settings(measures, iters, tol, probes, seed, bias, gn_samples))

    # Fused attention kernels (flash, memory-efficient) have no double backward; the math one does.
    with sdpa_kernel(SDPBackend.MATH):
        loss = loss_fn()
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError("loss_fn must return a scalar loss tensor that depends on the model's parameters")
    params = [p for _, p in named]
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True, materialize_grads=True)
    grad_of = dict(zip((n for n, _ in named), grads))

    entries = []
    for index, block_type in enumerate(present):
        members = by_type[block_type]
        names = tuple(n for n, _ in members)
        ps = [p for _, p in members]
        matvec = hvp_operator([grad_of[n] for n in names], ps)
        n_params = sum(p.numel() for p in ps)
        fields: dict = {}
        if "lambda_max" in measures:
            result = power_iteration(matvec, ps, iters=iters, tol=tol, seed=seed)
            fields.update(lambda_max=result.eigenvalue, power_iterations=result.iterations, converged=result.converged)
        if "trace" in measures:
            samples = _hutchinson_samples(matvec, ps, probes=probes, seed=seed)
            mean, err = _mean_and_stderr(samples.sum(dim=1))
            per_tensor = {}
            for column, (name, p) in enumerate(members):
                t_mean, t_err = _mean_and_stderr(samples[:, column])
                per_tensor[name] = (t_mean / p.numel(), t_err / p.numel())
            fields.update(trace_per_param=mean / n_params, trace_stderr=err / n_params, tensor_traces=per_tensor)
        if gauss_newton is not None:
            fields.update(gauss_newton_fields(gauss_newton, [gn_column[n] for n in names], members))
        entries.append(_type_entry(block_type, members, fields))
    del grads, grad_of, loss  # free the double-backward graph now
    return SharpnessReport(entries, _settings(measures, iters, tol, probes, seed, bias, gn_samples))


def _type_entry(block_type: str, members: list[tuple[str, Tensor]], fields: dict) -> TypeSharpness:
    return TypeSharpness(
        block_type=block_type, n_params=sum(p.numel() for _, p in members),
        param_names=tuple(n for n, _ in members), **fields,
    )


def _settings(measures, iters, tol, probes, seed, bias, gn_samples) -> dict:
    return dict(measures=list(measures), iters=iters, tol=tol, probes=probes, seed=seed, bias=bias, gn_samples=gn_samples)


def gauss_newton_fields(samples: Tensor, columns: list[int], members: list[tuple[str, Tensor]]) -> dict:
    """``gauss_newton_per_param``, its standard error and the per-tensor values for the tensors
    (``members``) at ``columns``."""
    n_params = sum(p.numel() for _, p in members)
    mean, err = _mean_and_stderr(samples[:, columns].sum(dim=1))
    per_tensor = {}
    for column, (name, p) in zip(columns, members):
        t_mean, t_err = _mean_and_stderr(samples[:, column])
        per_tensor[name] = (t_mean / p.numel(), t_err / p.numel())
    return dict(
        gauss_newton_per_param=mean / n_params, gauss_newton_stderr=err / n_params, tensor_gauss_newton=per_tensor,
    )


def _gauss_newton_samples(logits_fn: Callable[[], Tensor], params: Sequence[Tensor], *, samples: int, seed: int) -> Tensor:
    r"""``(samples, len(params))``: per sample, :math:`N\lVert\hat g_i\rVert^2` for each tensor
    (Note [Gauss-Newton trace by sampled labels])."""
    check("gn_samples", samples, SETTINGS["gn_samples"])
    logits = logits_fn()
    if not isinstance(logits, Tensor) or logits.ndim < 2 or not logits.requires_grad:
        raise ValueError("logits_fn must return the logits, shape (..., vocab), as a tensor that depends on the parameters")
    flat = logits.reshape(-1, logits.shape[-1])
    n = flat.shape[0]
    probs = torch.softmax(flat.detach().double(), dim=-1)
    generator = torch.Generator(device=probs.device).manual_seed(seed)
    rows = []
    for k in range(samples):
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        loss = nn.functional.cross_entropy(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat, labels)
        grads = torch.autograd.grad(loss, params, retain_graph=k < samples - 1, allow_unused=True, materialize_grads=True)
        rows.append(torch.stack([n * g.detach().double().square().sum() for g in grads]))
    return torch.stack(rows)
