"""`BlockSpec`: how one parameter tensor is cut into blocks, described as data.

A spec never says *why* a layout was chosen in code paths; it says *what* the layout is:

* ``block_dims``: the tensor dims that index blocks. Every other dim is reduced inside a block.
  ``(0,)`` means "one block per row (or per group of rows)", ``(1,)`` "per column",
  ``()`` "the whole tensor", all dims "every coordinate".
* ``segments``: the flattened ``block_dims`` index ("units") is split into consecutive segments
  ``(n_units, units_per_block)``. One segment ``(out, 1)`` is one block per output neuron;
  ``(out, head_dim)`` is one block per head; a fused QKV projection is three segments
  ``((h, hd), (h, hd), (h, 1))``: query heads, key heads, value neurons.

The step reads only this data (`block_sum`, `block_numel`, `expand`), so adding an architecture
never touches an optimizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

RULES = ("rows", "cols", "heads", "whole", "coordinate")

# What a block *is* in the model. Optimizers that treat block types differently (blockwise LR,
# AdaPM) read this; Adam-mini itself only needs the layout.
ROLES = (
    "embedding",  # token embedding (rows = tokens)
    "pos_embedding",  # learned position / type embeddings
    "head",  # output projection onto the vocabulary
    "query",
    "key",
    "value",
    "qkv",  # a fused query/key/value projection
    "attn_out",
    "ffn",
    "router",  # mixture-of-experts gate: one row per expert
    "norm",
    "bias",
    "conv",
    "linear",  # a Linear layer outside attention and MLPs
    "other",
)


@dataclass(frozen=True)
class BlockSpec:
    """The block layout of one parameter.

    Attributes:
        name: canonical parameter name (first name in ``model.named_parameters()``).
        shape: the parameter's shape.
        rule: one of ``rows``, ``cols``, ``heads``, ``whole``, ``coordinate``.
        reason: one line saying how the rule was decided (shown in the plan report).
        role: what the tensor is (see ``ROLES``); used by block-type-aware optimizers.
        block_dims: dims that index blocks; the rest are averaged within a block.
        segments: ``(n_units, units_per_block)`` pairs over the flattened ``block_dims``.
        aliases: other names of the same tensor (tied weights).
        n_heads: head count used for a ``heads`` layout (``None`` otherwise).
    """

    name: str
    shape: tuple[int, ...]
    rule: str
    reason: str
    role: str = "other"
    block_dims: tuple[int, ...] = ()
    segments: tuple[tuple[int, int], ...] = ((1, 1),)
    aliases: tuple[str, ...] = ()
    n_heads: int | None = None
    _reduce_dims: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown block rule {self.rule!r} for {self.name}; expected one of {RULES}")
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r} for {self.name}; expected one of {ROLES}")
        ndim = len(self.shape)
        if any(not 0 <= d < ndim for d in self.block_dims) or list(self.block_dims) != sorted(set(self.block_dims)):
            raise ValueError(f"{self.name}: block_dims {self.block_dims} invalid for shape {self.shape}")
        n_units = math.prod(self.shape[d] for d in self.block_dims)
        if sum(u for u, _ in self.segments) != n_units:
            raise ValueError(
                f"{self.name}: segments {self.segments} cover {sum(u for u, _ in self.segments)} units, "
                f"but block_dims {self.block_dims} of shape {self.shape} have {n_units}"
            )
        for units, per_block in self.segments:
            if per_block < 1 or units % per_block:
                raise ValueError(f"{self.name}: segment ({units}, {per_block}) does not split evenly")
        object.__setattr__(self, "_reduce_dims", tuple(d for d in range(ndim) if d not in self.block_dims))

    # ---- derived facts -------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return sum(units // per_block for units, per_block in self.segments)

    @property
    def reduce_dims(self) -> tuple[int, ...]:
        return self._reduce_dims

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Elements per block, one entry per segment."""
        inner = math.prod(self.shape[d] for d in self._reduce_dims)
        return tuple(per_block * inner for _, per_block in self.segments)

    @property
    def uniform(self) -> bool:
        return len(self.segments) == 1

    def describe(self) -> str:
        """Short layout text for reports, e.g. ``12 heads | 12 heads | 768 cols``."""
        if self.rule in ("whole", "coordinate"):
            return self.rule
        unit = {(0,): "rows", (1,): "cols"}.get(self.block_dims, "units")
        segments, repeats = _period(self.segments)
        parts = [f"{units // per} {unit}" if per == 1 else f"{units // per} x{per} {unit}" for units, per in segments]
        text = " | ".join(parts)
        return f"{repeats} x ({text})" if repeats > 1 else text

    # ---- the three operations a step needs ----------------------------------------------
    def block_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` (shaped like the parameter) within each block -> ``(n_blocks,)``."""
        s = x.sum(dim=self._reduce_dims) if self._reduce_dims else x
        s = s.reshape(-1)
        if self.uniform:
            per_block = self.segments[0][1]
            return s if per_block == 1 else s.view(-1, per_block).sum(dim=1)
        parts = s.split([units for units, _ in self.segments])
        return torch.cat([p.view(-1, k).sum(dim=1) for p, (_, k) in zip(parts, self.segments)])

    def block_numel(self, like: torch.Tensor) -> torch.Tensor | float:
        """Elements per block: a float when all blocks are equal, else a ``(n_blocks,)`` tensor."""
        sizes = self.block_sizes
        if self.uniform:
            return float(sizes[0])
        counts = [units // per_block for units, per_block in self.segments]
        return torch.tensor(sizes, dtype=like.dtype, device=like.device).repeat_interleave(
            torch.tensor(counts, device=like.device)
        )

    def block_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_sum(x) / self.block_numel(x)

    def expand(self, per_block: torch.Tensor) -> torch.Tensor:
        """``(n_blocks,)`` values -> a tensor that broadcasts against the parameter."""
        if self.uniform:
            k = self.segments[0][1]
            units = per_block if k == 1 else per_block.repeat_interleave(k)
        else:
            counts = [u // k for u, k in self.segments]
            repeats = torch.tensor([k for _, k in self.segments], device=per_block.device).repeat_interleave(
                torch.tensor(counts, device=per_block.device)
            )
            units = per_block.repeat_interleave(repeats)
        return units.view(self.broadcast_shape)

    @property
    def broadcast_shape(self) -> tuple[int, ...]:
        return tuple(1 if d in self._reduce_dims else n for d, n in enumerate(self.shape))

    def block_index(self) -> torch.Tensor:
        """LongTensor shaped like the parameter: the block number (0..n_blocks-1) of each entry."""
        return self.expand(torch.arange(self.n_blocks)).expand(self.shape).contiguous()

    # ---- construction --------------------------------------------------------------------
    def with_rule(self, rule: str, *, reason: str, n_heads: int | None = None, neuron_dim: int | None = None) -> "BlockSpec":
        """The same tensor under another rule (used by user overrides)."""
        layout = layout_for(rule, self.shape, n_heads=n_heads, neuron_dim=neuron_dim, name=self.name)
        return replace(self, rule=rule, reason=reason, n_heads=n_heads if rule == "heads" else None, **layout)


def _period(segments: tuple) -> tuple[tuple, int]:
    """(the shortest run of segments that repeats, how many times): a per-head layout is one
    head's segments repeated ``n_heads`` times."""
    n = len(segments)
    for p in range(1, n // 2 + 1):
        if n % p == 0 and segments == segments[:p] * (n // p):
            return segments[:p], n // p
    return segments, 1


def layout_for(
    rule: str, shape: tuple[int, ...], *, n_heads: int | None = None, neuron_dim: int | None = None, name: str = "?"
) -> dict:
    """``block_dims``/``segments`` for a simple (single-segment) rule."""
    ndim = len(shape)
    if rule == "whole" or ndim == 0:
        return {"block_dims": (), "segments": ((1, 1),)}
    if rule == "coordinate":
        return {"block_dims": tuple(range(ndim)), "segments": ((math.prod(shape), 1),)}
    if rule == "rows":
        return {"block_dims": (0,), "segments": ((shape[0], 1),)}
    if rule == "cols":
        if ndim < 2:
            raise ValueError(f"rule 'cols' needs a tensor with at least 2 dims; {name} has shape {tuple(shape)}")
        return {"block_dims": (1,), "segments": ((shape[1], 1),)}
    if rule == "heads":
        dim = 0 if neuron_dim is None else neuron_dim
        if n_heads is None:
            raise ValueError(
                f"rule 'heads' for {name} needs a head count: pass n_heads= (and n_kv_heads= for keys "
                "with grouped-query attention) to blockopt.partition / AdamMini"
            )
        width = shape[dim]
        if n_heads <= 0 or width % n_heads:
            raise ValueError(
                f"n_heads={n_heads} does not divide the width {width} of {name} (shape {tuple(shape)}); "
                "pass the model's real number of heads (n_kv_heads for key/value projections under GQA)"
            )
        return {"block_dims": (dim,), "segments": ((width, width // n_heads),)}
    raise ValueError(f"unknown block rule {rule!r} for {name}; expected one of {RULES}")


def make_spec(name: str, shape, rule: str, reason: str, role: str = "other", **kw) -> BlockSpec:
    """Build a single-segment spec from a rule name."""
    n_heads = kw.pop("n_heads", None)
    neuron_dim = kw.pop("neuron_dim", None)
    shape = tuple(shape)
    layout = layout_for(rule, shape, n_heads=n_heads, neuron_dim=neuron_dim, name=name)
    return BlockSpec(
        name=name, shape=shape, rule=rule, reason=reason, role=role,
        n_heads=n_heads if rule == "heads" else None, **layout, **kw,
    )
