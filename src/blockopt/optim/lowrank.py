r"""The low-rank first moment of AdaPM: factors ``L R`` refitted to the EMA target each step.

A rank-:math:`r` momentum of the matrix view :math:`G` (``(shape[0], numel // shape[0])``) of a
gradient is kept as ``L`` (:math:`m\times r`, orthonormal columns) and ``R`` (:math:`r\times n`).
Each step refits them to :math:`T = \beta_1 L R + (1-\beta_1) G` by `fit_lowrank` (the update
that uses them, with its residual correction, is in `blockopt.optim.adapm`).

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

Note [sharded low-rank momentum]
    Under FSDP2 a parameter's rows are split over ranks (``Shard(0)``), and so are the matrix
    view's. ``L`` is kept split the same way and ``R`` replicated, both as DTensors (DCP saves
    and reshards them). Every product in the fit is then row-local except two: the QR of ``L``,
    computed on the gathered ``m x r`` factor (bit-identical to the unsharded one, so every rank
    gets the one-process ``Q``), and :math:`Q_L^\top T`, a sum over rows. Those are two all-reduces
    per fit iteration, plus one scalar each for the clip's two Frobenius norms. Shardings along
    other dims raise `NotImplementedError`. Factors kept in bf16 (a compressed
    ``momentum_dtype``) round as one process would: a shard's rows of ``L`` draw the bits of
    their place in the whole ``L``, and every rank rounds the whole ``R`` alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..distributed import RowShards


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The matrix view a low-rank momentum factorises: ``(shape[0], numel // shape[0])``."""
    rows = shape[0]
    return rows, math.prod(shape) // rows


def fit_lowrank(L: Tensor, R: Tensor, G: Tensor, *, beta1: float, iters: int, fit_lr: float,
                rows: RowShards | None = None) -> tuple[Tensor, Tensor]:
    """Factors ``(L, R)`` fitting ``T = beta1 L R + (1 - beta1) G`` (`blockopt.optim.adapm`), warm-started at
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


def frobenius_norm(x: Tensor, rows: RowShards | None = None) -> Tensor:
    """``||x||_F``; with ``rows``, of the whole matrix whose rows ``x`` holds here."""
    if rows is None:
        return torch.linalg.vector_norm(x)
    return rows.sum_(x.square().sum()).sqrt()
