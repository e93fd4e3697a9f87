r"""Hessian blocks of a model's loss, entry by entry: exact for chosen tensors, sampled for large ones.

For tensors :math:`a` and :math:`b` of a model (flattened, in the order given), `hessian_block`
returns the dense block :math:`H_{ab} = \partial^2 L / \partial a\, \partial b^\top` of the loss
:math:`L` at the model's current parameters, every other parameter held fixed. Column :math:`j`
is the Hessian-vector product :math:`H e_j`, computed reverse-over-reverse: the gradient's graph
is built once (``torch.func.vjp`` of ``torch.func.grad``) and pulled back along many basis vectors
:math:`e_j` in one batched call (``torch.func.vmap``), ``chunk_size`` vectors at a time so memory
stays bounded (about ``chunk_size`` times one backward pass's activations). On the CPU this runs
about twice as fast as forward-over-reverse (``jvp`` of ``grad``), which redoes the forward pass
for every vector.

A tensor of :math:`d` parameters costs :math:`d` products, too many for a large one. `sample_columns`
draws :math:`m` of its nonzero columns uniformly without replacement, and `block_mass` turns them into an
estimate of how much of the tensor's squared Hessian lies inside the blocks of a partition (a
ratio estimator with its standard error; exact when every column is drawn).

Note [the loss as a function of the tensors]: ``loss_fn`` is a closure that calls the model
(``lambda: model(x, y)[1]``). `torch.func.functional_call` swaps the chosen tensors into the model
for the duration of one call, so the closure sees them; tied names share one tensor (pass the
first name, as `blockopt.partition` does). Attention runs on the math kernel, the one whose
derivatives have derivatives. The forward pass runs once, so dropout's masks are frozen for the
whole block: a model in training mode with dropout is warned about (``model.eval()`` measures the
loss without it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..validation import check, integer

DEFAULT_CHUNK = 32  # Hessian-vector products per batched call


class _Closure(nn.Module):
    """``loss_fn`` as the forward of a module that holds the model, for `functional_call`."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[], Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self) -> Tensor:
        return self.loss_fn()


def _tensors(model: nn.Module, names: Sequence[str]) -> dict[str, Tensor]:
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"{unknown[:3]} are not parameters of {type(model).__name__}; names are those of "
                         f"model.named_parameters(), e.g. {list(params)[:3]}")
    return {n: params[n].detach() for n in dict.fromkeys(names)}


class _HessianProducts:
    r"""``tangents -> (n_rows_params, k)``: :math:`H_{\text{rows},\cdot} v` for ``k`` tangents (a
    dict of ``(k, *shape)`` tensors, one per tensor of ``point``), ``chunk_size`` per batched call.
    The gradient's graph is built once, here, and serves every call."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[], Tensor], point: dict[str, Tensor],
                 rows: Sequence[str], chunk_size: int):
        if model.training and any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
            warnings.warn(f"{type(model).__name__} is in training mode with dropout: the Hessian is that of one frozen "
                          "dropout mask; call model.eval() to measure the loss without dropout", stacklevel=3)
        closure = _Closure(model, loss_fn)

        def loss(values: dict[str, Tensor]) -> Tensor:
            out = functional_call(closure, {f"model.{n}": v for n, v in values.items()}, ())
            if not isinstance(out, Tensor) or out.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got {type(out).__name__} "
                                 f"{tuple(out.shape) if isinstance(out, Tensor) else ''}")
            return out.reshape(())

        with sdpa_kernel(SDPBackend.MATH):
            _check_depends(loss, point, rows)
            # reverse over reverse: the gradient's graph is built once, then pulled back along
            # every basis vector; H is symmetric, so v^T H is the column H v
            gradient, self._pullback = vjp(grad(loss), point)
        self.gradient = {n: g.detach() for n, g in gradient.items()}
        self.rows, self.chunk_size = list(rows), chunk_size

    def _hvp(self, tangent: dict[str, Tensor]) -> Tensor:
        hv = self._pullback(tangent)[0]
        return torch.cat([hv[n].reshape(-1) for n in self.rows])

    def __call__(self, tangents: dict[str, Tensor]) -> Tensor:
        k, step = next(iter(tangents.values())).shape[0], self.chunk_size
        with sdpa_kernel(SDPBackend.MATH):
            out = [vmap(self._hvp)({n: t[i : i + step] for n, t in tangents.items()}).detach().T for i in range(0, k, step)]
        return torch.cat(out, dim=1)


def _check_depends(loss: Callable[[dict[str, Tensor]], Tensor], point: dict[str, Tensor], rows: Sequence[str]) -> None:
    """torch.func differentiates a loss that does not reach the tensors it is measured at to zeros,
    silently: refuse a loss that carries no gradient at all (computed under ``torch.no_grad()``),
    and warn about each of ``rows`` it does not reach (a parameter the loss does not use, or one
    captured before the call, ``w = model.fc.weight``, which the swap cannot replace)."""
    inputs = {n: t.detach().requires_grad_() for n, t in point.items()}
    out = loss(inputs)
    if not out.requires_grad:
        raise ValueError("loss_fn's loss carries no gradient: compute it by calling the model inside loss_fn, and not "
                         "under torch.no_grad() or from detached tensors")
    grads = torch.autograd.grad(out, list(inputs.values()), allow_unused=True)
    used = {n for n, g in zip(inputs, grads) if g is not None}
    unreached = [n for n in rows if n not in used]
    if unreached:
        warnings.warn(
            f"loss_fn does not reach {', '.join(map(repr, unreached[:3]))}{' and more' if len(unreached) > 3 else ''} "
            "through the model, so its Hessian rows are zero: a parameter the loss does not use, or one taken from the "
            "model before the call (w = model.fc.weight), which the Hessian tools cannot swap; call the model inside loss_fn",
            UserWarning, stacklevel=4,
        )


def _basis(point: dict[str, Tensor], cols: Sequence[str], index: Tensor) -> dict[str, Tensor]:
    """Tangents: one unit vector per entry of ``index`` (positions in the concatenation of the
    flattened ``cols`` tensors); every tensor of ``point`` gets its (mostly zero) part."""
    k = index.numel()
    offsets, start = {}, 0
    for n in cols:
        offsets[n] = start
        start += point[n].numel()
    tangents = {n: torch.zeros(k, t.numel(), dtype=t.dtype, device=t.device) for n, t in point.items()}
    for n in cols:
        local = index - offsets[n]
        hit = (local >= 0) & (local < point[n].numel())
        tangents[n][hit.nonzero().squeeze(1), local[hit]] = 1
    return {n: t.view(k, *point[n].shape) for n, t in tangents.items()}


def hessian_block(
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    rows: str | Sequence[str],
    cols: str | Sequence[str] | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    r"""The exact Hessian block :math:`H_{\text{rows},\text{cols}}` of ``loss_fn``'s loss.

    Args:
        model: the model whose parameters are differentiated (at their current values).
        loss_fn: ``() -> scalar loss`` that calls ``model``, e.g. ``lambda: model(x, y)[1]``
            (Note [the loss as a function of the tensors]).
        rows: a parameter name, or several: their entries, flattened and concatenated in this
            order, index the block's rows.
        cols: the same for the columns (default: ``rows``, the principal block).
        chunk_size: Hessian-vector products per batched call (memory grows with it).

    Returns:
        ``(n_rows, n_cols)`` in the parameters' dtype; entry ``(i, j)`` is
        :math:`\partial^2 L / \partial r_i \partial c_j`. Costs ``n_cols`` Hessian-vector products.
    """
    check("chunk_size", chunk_size, integer(1))
    rows = [rows] if isinstance(rows, str) else list(rows)
    cols = rows if cols is None else [cols] if isinstance(cols, str) else list(cols)
    if not rows or not cols:
        raise ValueError(f"hessian_block needs at least one parameter name in rows and in cols, got rows={rows}, cols={cols}")
    point = _tensors(model, [*rows, *cols])
    n_cols = sum(point[n].numel() for n in cols)
    index = torch.arange(n_cols, device=next(iter(point.values())).device)
    return _HessianProducts(model, loss_fn, point, rows, chunk_size)(_basis(point, cols, index))


@dataclass(frozen=True)
class Columns:
    """Columns of a tensor's own Hessian block :math:`H_{ww}` (`sample_columns`)."""

    index: Tensor  # (m,) positions in the flattened tensor
    values: Tensor  # (d, m): column j is H e_{index[j]}
    population: int  # how many columns they were drawn from (every nonzero one among them: `sample_columns`)

    @property
    def exact(self) -> bool:
        """Every column that could be nonzero is here: masses from them are exact."""
        return self.index.numel() >= self.population


def sample_columns(
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    name: str,
    n_columns: int,
    *,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    enough: Callable[[Columns], bool] | None = None,
) -> Columns:
    r"""``n_columns`` columns of tensor ``name``'s own Hessian block :math:`H_{ww}`, drawn uniformly
    without replacement from its nonzero columns (all of them when there are at most
    ``n_columns``).

    Zero columns hold no mass, so leaving them out changes no mass and spends every product on
    one that counts (an embedding table's rows of tokens absent from the batch are all zero). When
    the gradient has exact zeros (a sign of such structure), which columns are nonzero comes from
    one more product, :math:`H g` for a Gaussian :math:`g`: its entry :math:`i` is zero exactly
    when column :math:`i` is (with probability one). Otherwise every column is a candidate (the
    nonzero ones are among them; a zero one drawn costs a product and changes no mass).

    ``enough``: called with the columns so far after every ``chunk_size`` of them; ``True`` stops
    the drawing there (a sequential measurement: stop once the question is answered).
    """
    check("n_columns", n_columns, integer(1))
    point = _tensors(model, [name])
    numel = point[name].numel()
    generator = torch.Generator().manual_seed(seed)
    products = _HessianProducts(model, loss_fn, point, [name], chunk_size)
    if products.gradient[name].ne(0).all():
        nonzero = torch.arange(numel)
    else:
        probe = torch.randn(1, numel, generator=generator, dtype=torch.float64).to(point[name])
        nonzero = products({name: probe.view(1, *point[name].shape)})[:, 0].ne(0).nonzero().squeeze(1).cpu()
    if n_columns < nonzero.numel():
        nonzero = nonzero[torch.randperm(nonzero.numel(), generator=generator)]
    order = nonzero[:n_columns].to(point[name].device)
    columns = Columns(order, point[name].new_zeros(numel, 0), nonzero.numel())
    for start in range(0, order.numel(), chunk_size):
        values = products(_basis(point, [name], order[start : start + chunk_size]))
        columns = Columns(order[: start + values.shape[1]], torch.cat([columns.values, values], dim=1), nonzero.numel())
        if enough is not None and enough(columns):
            break
    return columns


@dataclass(frozen=True)
class Mass:
    """The share of a Hessian block's squared entries inside a partition's blocks."""

    value: float  # nan: the block is zero
    stderr: float  # 0 when every nonzero column was measured


def block_mass(columns: Columns, block_of: Tensor) -> Mass:
    r"""How much of a tensor's Hessian lies inside a partition's blocks, from its columns.

    The mass of a partition :math:`B` of the tensor's :math:`d` entries is the Frobenius share

    .. math:: M(B) = \frac{\sum_{i,j:\,B(i)=B(j)} H_{ij}^2}{\sum_{i,j} H_{ij}^2},

    1 for one block (``whole``), the diagonal's share per coordinate. With column :math:`j`'s
    in-block and total sums :math:`a_j, t_j` and :math:`m` of the :math:`N` nonzero columns drawn
    uniformly without replacement, :math:`\hat M = \sum a_j / \sum t_j` is the ratio estimator:
    consistent, with standard error :math:`\sqrt{(1 - m/N)/m}\; s(a_j - \hat M t_j) / \bar t`
    (:math:`s`: the sample standard deviation); exact, error zero, when :math:`m = N`.

    Args:
        columns: from `sample_columns`.
        block_of: ``(d,)`` block number of each entry (``BlockSpec.block_index().flatten()``).
    """
    return block_masses(columns, {"": block_of})[""]


def block_masses(columns: Columns, partitions: Mapping[str, Tensor], *, within: Tensor | None = None) -> dict[str, Mass]:
    """`block_mass` of several partitions (``{label: block_of}``) from the same columns.

    ``within``: ``(d,)`` part number of each entry, for a tensor that fuses several logical ones
    (a query/key/value projection): only entries of the same part count, in and out of blocks,
    so each part's principal block is measured as if it were a tensor of its own."""
    squared = columns.values.T.double().square().contiguous()  # (m, d): summing along rows is the fast way
    if within is not None:
        within = within.to(squared.device)
        squared *= within.view(1, -1) == within[columns.index].view(-1, 1)
    total = squared.sum(dim=1)
    m, population = squared.shape[0], columns.population
    out = {}
    for label, block_of in partitions.items():
        if m == 0 or total.sum() == 0:
            out[label] = Mass(float("nan"), float("nan"))
            continue
        block_of = block_of.to(squared.device)
        # sum each column within each block, then keep the column's own block
        per_block = squared.new_zeros(m, int(block_of.max()) + 1).index_add_(1, block_of, squared)
        inside = per_block.gather(1, block_of[columns.index].view(-1, 1)).squeeze(1)
        value = (inside.sum() / total.sum()).item()
        if columns.exact:
            out[label] = Mass(value, 0.0)
        elif m < 2:
            out[label] = Mass(value, float("nan"))
        else:
            residual = inside - value * total
            out[label] = Mass(value, math.sqrt((1 - m / population) / m) * residual.std().item() / total.mean().item())
    return out
