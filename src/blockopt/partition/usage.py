"""How a module's forward uses its weight tensors: which dim of each is an output neuron.

A stacked expert tensor ``(E, a, b)`` may be stored ``(E, out, in)`` or ``(E, in, out)``; the
shape alone cannot tell (``a == b`` is common, and conventions differ between families). What
can tell is the forward: a weight that is the right operand of a matmul (``x @ W``) has its
output neurons on its last dim, one that is the left operand (``W @ x``) on its second to last.

`output_dims` runs the module's forward once on the ``meta`` device (no memory, no data) under a
dispatch mode that follows the weights through views (select, index, transpose, reshape, ...)
to the matmuls that consume them. Data-dependent ops (``nonzero``, ``.item()``, ...) have no
meta kernel; the mode answers them with a minimal stand-in (one routed token, zero), enough for
routing code to reach its matmuls. The answer is ``None`` where the forward cannot be run or
uses a weight in no matmul: the caller then falls back and says so.
"""

from __future__ import annotations

import inspect
import math
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from .context import _int_attr

aten = torch.ops.aten

# Spellings of the routing arguments of expert modules: (tokens, top-k) integer or float tensors.
_INDEX_ARGS = ("index", "indices", "idx", "ids", "selected", "expert")
_WEIGHT_ARGS = ("weight", "score", "prob", "logit", "routing", "gate")
_TOP_K_ATTRS = ("top_k", "num_experts_per_tok", "num_experts_per_token", "moe_topk", "n_activated_experts", "topk")
_HIDDEN_ATTRS = ("hidden_dim", "hidden_size", "d_model", "embed_dim", "n_embd")
_MAX_OPS = 20_000  # a forward that runs longer than this on meta is not probed (a guard, not a budget)

Dims = tuple  # per tensor dim: the frozenset of weight dims it stands for (empty: none)
_NONE: frozenset = frozenset()


class _Untraceable(Exception):
    pass


def _view_dims(dims: Dims, old: tuple[int, ...], new: tuple[int, ...]) -> Dims:
    """Dims of a reshape. Old and new dims are matched in groups of equal size products; a new
    dim stands for every weight dim of its group (a split keeps its origin, a merge unites them)."""
    out: list[frozenset] = []
    i = j = 0
    while j < len(new):
        if new[j] == 1:
            out.append(_NONE)
            j += 1
            continue
        while i < len(old) and old[i] == 1:
            i += 1
        a, b, i0, j0 = old[i] if i < len(old) else 1, new[j], i, j
        i, j = i + 1, j + 1
        while a != b and (i < len(old) or j < len(new)):
            if a < b and i < len(old):
                a, i = a * old[i], i + 1
            elif j < len(new):
                b, j = b * new[j], j + 1
            else:
                break
        origin = frozenset().union(*dims[i0:i])
        out.extend([origin] * (j - j0))
    return tuple(out)


class _Follow(TorchDispatchMode):
    """Follows tracked tensors through ops and records (output dim, contracted dim) per matmul."""

    def __init__(self, tracked: dict[int, tuple[str, Dims, torch.Tensor]]):
        super().__init__()
        self.tracked = tracked  # id(tensor) -> (weight name, dims, the tensor, kept alive)
        self.uses: dict[str, set[tuple[frozenset, frozenset]]] = {}  # weight -> (output dims, contracted dims)
        self.n_ops = 0

    def _origin(self, t) -> tuple[str, Dims] | None:
        entry = self.tracked.get(id(t)) if isinstance(t, torch.Tensor) else None
        return None if entry is None or entry[2] is not t else entry[:2]

    def _track(self, t, name: str, dims: Dims) -> None:
        if isinstance(t, torch.Tensor) and len(dims) == t.ndim and any(dims):
            self.tracked[id(t)] = (name, tuple(dims), t)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.n_ops += 1
        if self.n_ops > _MAX_OPS:
            raise _Untraceable("forward too long to probe")
        stand_in = _data_dependent(func, args, kwargs)
        if stand_in is not NotImplemented:
            return stand_in
        self._matmul(func, args)
        if func in (aten._grouped_mm.default,):  # meta kernel checks dtypes the probe does not care about
            a, b = args[0], args[1]
            return torch.empty((*a.shape[:-1], b.shape[-1]), dtype=a.dtype, device="meta")
        out = func(*args, **kwargs)
        src = next(((o, a) for a in args if (o := self._origin(a)) is not None), None)
        if src is not None:
            self._propagate(func, src[0], src[1], args, out)
        return out

    def _matmul(self, func, args) -> None:
        packet = func.overloadpacket
        if packet in (aten.mm, aten.bmm, aten._grouped_mm, aten.matmul):
            left, right = args[0], args[1]
        elif packet in (aten.addmm, aten.baddbmm, aten.addbmm):
            left, right = args[1], args[2]
        else:
            return
        for operand, out_at, in_at in ((right, -1, -2), (left, -2, -1)):
            origin = self._origin(operand)
            if origin is not None and operand.ndim >= 2:
                name, dims = origin
                self.uses.setdefault(name, set()).add((dims[out_at], dims[in_at]))

    def _propagate(self, func, origin, t, args, out) -> None:
        name, dims = origin
        packet = func.overloadpacket
        if packet is aten.select:
            d = args[1] % t.ndim
            self._track(out, name, dims[:d] + dims[d + 1 :])
        elif packet in (aten.t, aten.transpose):
            a, b = (0, 1) if packet is aten.t else (args[1] % t.ndim, args[2] % t.ndim)
            new = list(dims)
            new[a], new[b] = new[b], new[a]
            self._track(out, name, tuple(new))
        elif packet is aten.permute:
            self._track(out, name, tuple(dims[d % t.ndim] for d in args[1]))
        elif packet is aten.index and isinstance(args[1], (list, tuple)):
            idx = list(args[1])
            used = [k for k, i in enumerate(idx) if i is not None]
            if used and used == list(range(used[0], used[-1] + 1)):
                n_new = out.ndim - (t.ndim - len(used))
                self._track(out, name, dims[: used[0]] + (_NONE,) * n_new + dims[used[-1] + 1 :])
        elif packet is aten.index_select:
            d = args[1] % t.ndim
            self._track(out, name, dims[:d] + (_NONE,) + dims[d + 1 :])
        elif packet in (aten.unbind,):
            d = (args[1] if len(args) > 1 else 0) % t.ndim
            for o in out:
                self._track(o, name, dims[:d] + dims[d + 1 :])
        elif packet in (aten.split, aten.split_with_sizes, aten.chunk):
            for o in out:
                self._track(o, name, dims)
        elif packet is aten.expand:
            n_new = out.ndim - t.ndim
            kept = tuple(d if t.shape[i] == out.shape[n_new + i] else _NONE for i, d in enumerate(dims))
            self._track(out, name, (_NONE,) * n_new + kept)
        elif packet in (aten.view, aten._unsafe_view, aten.reshape, aten.squeeze, aten.unsqueeze, aten.flatten,
                        aten.unflatten):
            self._track(out, name, _view_dims(dims, tuple(t.shape), tuple(out.shape)))
        elif isinstance(out, torch.Tensor) and tuple(out.shape) == tuple(t.shape):
            # aliases, copies, casts and pointwise ops keep the layout
            self._track(out, name, dims)


def _data_dependent(func, args, kwargs):
    """Minimal stand-ins for ops whose output shape or value depends on data (meta has none)."""
    packet = func.overloadpacket
    if packet is aten._local_scalar_dense:
        t = args[0]
        return False if t.dtype == torch.bool else (0.0 if t.is_floating_point() else 0)
    if packet is aten.is_nonzero:
        return False
    if packet is aten.equal:
        return True
    if packet in (aten.nonzero,):
        return torch.zeros((1, args[0].ndim), dtype=torch.long, device="meta")
    if packet is aten.masked_select:
        return torch.empty((1,), dtype=args[0].dtype, device="meta")
    if packet is aten.repeat_interleave and kwargs.get("output_size") is None and len(args) == 1:
        return torch.zeros((args[0].shape[0],), dtype=torch.long, device="meta")
    if packet is aten.bincount:
        n = max(int(kwargs.get("minlength", args[2] if len(args) > 2 else 0) or 0), 1)
        return torch.zeros((n,), dtype=torch.long, device="meta")
    if packet in (aten._unique2, aten.unique_consecutive, aten.unique_dim):
        t = args[0]
        return (torch.empty((1,), dtype=t.dtype, device="meta"), torch.zeros(t.shape, dtype=torch.long, device="meta"),
                torch.ones((1,), dtype=torch.long, device="meta"))
    return NotImplemented


def _inputs(module: nn.Module, hidden: int, leading: tuple[int, ...], dtype, top_k: int) -> list | None:
    """Positional inputs for ``module.forward``: hidden states, then routing tensors by name."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not required:
        return None
    n_tokens = math.prod(leading)
    args = [torch.empty((*leading, hidden), dtype=dtype, device="meta")]
    for p in required[1:]:
        name = p.name.lower()
        if any(k in name for k in _INDEX_ARGS):
            args.append(torch.zeros((n_tokens, top_k), dtype=torch.long, device="meta"))
        elif any(k in name for k in _WEIGHT_ARGS):
            args.append(torch.empty((n_tokens, top_k), dtype=dtype, device="meta"))
        else:
            return None
    return args


def _run(module: nn.Module, names: dict[str, str], args: list) -> dict[str, set] | None:
    """Run ``module.forward(*args)`` with every parameter and buffer swapped for a meta tensor;
    ``names`` maps the tracked parameters' names (relative to ``module``) to the caller's keys."""
    try:
        from torch.nn.utils.stateless import _reparametrize_module
    except ImportError:  # pragma: no cover - torch without the helper
        return None
    swapped: dict[str, torch.Tensor] = {}
    tracked: dict[int, tuple[str, Dims, torch.Tensor]] = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        swapped[name] = meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        if name in names:
            tracked[id(meta)] = (names[name], tuple(frozenset({d}) for d in range(t.ndim)), meta)
    mode = _Follow(tracked)
    try:
        # calling forward (not the module) keeps the module's own hooks (FSDP's, users') out of the probe
        with torch.no_grad(), _reparametrize_module(module, swapped), mode:
            module.forward(*args)
    except Exception:  # any failure means the forward could not be followed: no answer
        return None
    return mode.uses


def _one_output_dim(uses: set[tuple[frozenset, frozenset]]) -> int | None:
    """The weight dim every matmul reads as its output (dim 0, the stack of experts, aside), or
    None when the uses disagree, lose track, or mix the output with the contracted dims."""
    outs = {frozenset(o - {0}) for o, _ in uses}
    ins = frozenset().union(*(i for _, i in uses)) if uses else _NONE
    if len(outs) != 1:
        return None
    out = next(iter(outs))
    return next(iter(out)) if len(out) == 1 and not out & ins else None


def output_dims(module: nn.Module, names: list[str], *, parent: nn.Module | None = None,
                prefix: str = "") -> dict[str, int]:
    """The output-neuron dim of each parameter ``names`` (of ``module``), read from its forward.

    Only answers it can prove: a weight missing from the result was not seen in a matmul with a
    consistent orientation (or the forward could not be run). ``parent`` (holding ``module`` at
    ``prefix``) is tried with a hidden-states input when ``module``'s own forward cannot be called.
    """
    shapes = [tuple(dict(module.named_parameters())[n].shape) for n in names]
    dtype = next((p.dtype for p in module.parameters()), torch.float32)
    if not dtype.is_floating_point:
        dtype = torch.float32
    owners = [module, getattr(module, "config", None)]
    hidden = [next(filter(None, (_int_attr(o, _HIDDEN_ATTRS) for o in owners)), None)]
    hidden += [s for shape in shapes for s in shape[1:]]
    top_k = next(filter(None, (_int_attr(o, _TOP_K_ATTRS) for o in owners)), 1)
    tries = [(module, {n: n for n in names})]
    if parent is not None:
        tries.append((parent, {f"{prefix}.{n}": n for n in names}))
    for owner, tracked in tries:
        for h in dict.fromkeys(h for h in hidden if h):
            for leading in ((2,), (1, 2)):
                args = _inputs(owner, h, leading, dtype, top_k if owner is module else 1)
                uses = _run(owner, tracked, args) if args is not None else None
                if uses is None:
                    continue
                return {n: d for n in names if (d := _one_output_dim(uses.get(n, ()))) is not None}
    return {}
