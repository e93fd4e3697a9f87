r"""`audit`: check a partition against the measured Hessian, tensor by tensor.

Principle 1 (Adam-mini, Section 2.3) asks for one block per *smallest dense sub-block* of the
Hessian. `blockopt.partition` decides blocks from structure; `audit` measures, on one batch, how
each tensor's own Hessian block :math:`H_{ww}` is actually laid out, and says where the plan
differs.

Note [in-block mass and the fair comparison]: the mass of a partition :math:`B` of a tensor is the
Frobenius share of :math:`H_{ww}` inside :math:`B`'s blocks (`blockopt.hessian.blocks.block_mass`):
1 for ``whole``, the diagonal's share for ``coordinate``. A finer partition can only hold less, so
"the most mass" always says ``whole``; and "mass per block" rewards any fine cut of a matrix with
a heavy diagonal. Principle 1 is a statement about both at once: the blocks should be as small as
possible *while the Hessian stays inside them*. So the measured rule is

    the finest candidate (most blocks) that keeps at least ``keep`` (default 0.9) of the mass,

with ``whole`` (mass 1) as the floor. If a tensor's Hessian is block-diagonal by head, cutting a
head in two loses that head's cross terms (mass falls below ``keep``), while merging two heads
gains nothing (their cross terms are near zero): the head layout is the finest that keeps the
mass, and a plan with heads of the wrong size is caught from either side:

* **too coarse**: a finer candidate keeps the mass, so the plan's blocks merge Hessian blocks
  that do not talk to each other (the direction that causes loss spikes, docs/partition.md);
* **too fine**: the plan's own blocks hold less than ``keep``: they cut dense blocks apart.

Both are flagged only when measurable: with sampled columns, by more than ``z`` standard errors.
The diagonal counts in the mass, so a Hessian dominated by its diagonal is measured as
``coordinate`` (one learning rate per parameter is then what its curvature asks for).

Note [fused tensors]: a tensor the plan splits into logical parts (GPT-2's ``c_attn``, a fused
``qkv_proj``: query heads | key heads | value neurons) holds the Hessian of several tensors and
their cross terms (query-key products within a head are large). Separate ``q_proj``/``k_proj``
tensors are audited on their own principal blocks, cross terms left out; so a fused tensor is
audited on its parts' principal blocks (`fused_parts`), and every candidate is cut along the parts
(``rows/part``, ``whole/part``: one block per part, ...). Those layouts have no ``rules=``
spelling; the report says so instead of proposing one.

Note [sequential columns]: columns are drawn 8 at a time, and drawing stops once the measured rule
is certain: its mass is above ``keep`` and every finer candidate's below, each by ``z`` standard
errors. Clear-cut tensors (heads at 0.99, a per-row split at 0.3) stop after 8 columns; close ones
use all ``samples``; tensors with at most ``samples`` nonzero columns are always measured whole. Stopping on the data makes the error rate a little higher than a fixed
sample's at the same ``z``; at least 8 columns always back a verdict.

Candidates per tensor: the plan's own layout, ``whole``, ``coordinate``, ``rows``, ``cols``, and
``heads`` of every size that divides the width along dim 0 (``heads(k)``) and dim 1
(``col-heads(k)``). Small tensors are measured exactly (every nonzero column of :math:`H_{ww}`);
larger ones from ``samples`` of their nonzero columns drawn at random (`blockopt.hessian.blocks`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..partition import BlockSpec, Plan, make_spec, partition
from ..validation import check, integer, real
from .blocks import DEFAULT_CHUNK, Columns, Mass, block_masses, sample_columns

DEFAULT_KEEP = 0.9
DEFAULT_SAMPLES = 32
_FIRST = 8  # columns per step of the sequential measurement
VERDICTS = ("agrees", "too coarse", "too fine", "within noise", "no curvature")
FLAGGED = ("too coarse", "too fine")


@dataclass(frozen=True)
class Layout:
    """One way to cut a tensor into blocks: a rule (with its head count and the dim heads are
    counted along) and how many blocks that makes."""

    label: str
    rule: str
    n_blocks: int
    n_heads: int | None = None
    dim: int | None = None
    fused: bool = False  # cut along a fused tensor's parts too: no rules= spells it


@dataclass(frozen=True)
class TensorAudit:
    """The audit of one tensor. ``mass``: label -> in-block mass (Note [in-block mass and the fair
    comparison]) of every candidate, ``layouts`` the candidates themselves."""

    name: str
    shape: tuple[int, ...]
    role: str
    plan: str  # the plan's layout (the label of the candidate it equals)
    best: str  # the measured rule
    verdict: str
    columns: int  # Hessian columns measured
    nonzero: int  # of how many that can be nonzero (the rest hold no mass)
    mass: Mapping[str, Mass]
    layouts: Mapping[str, Layout]

    @property
    def exact(self) -> bool:
        return self.columns == self.nonzero

    @property
    def flagged(self) -> bool:
        return self.verdict in FLAGGED


class AuditReport(Sequence[TensorAudit]):
    """The audit of every tensor: ``str(report)`` is the table; `flagged`, `override`."""

    def __init__(self, rows: Sequence[TensorAudit], settings: Mapping[str, Any]):
        self._rows = list(rows)
        self.settings = dict(settings)

    def __getitem__(self, i):
        return self._rows[i]

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[TensorAudit]:
        return iter(self._rows)

    def row(self, name: str) -> TensorAudit:
        for r in self._rows:
            if r.name == name:
                return r
        raise KeyError(f"{name!r} was not audited; audited: {[r.name for r in self._rows][:5]}...")

    def without_prefix(self, prefix: str) -> AuditReport:
        """The report with ``prefix`` taken off every tensor name: a wrapper's (the bench's
        ``model.`` around an HF model), so the names and `override` are those of the wrapped model."""
        return AuditReport([replace(r, name=r.name.removeprefix(prefix)) for r in self._rows], self.settings)

    def flagged(self) -> list[TensorAudit]:
        """The tensors whose plan is measurably worse than the measured rule."""
        return [r for r in self._rows if r.flagged]

    def override(self) -> dict[str, Any]:
        """Keyword arguments for `blockopt.partition` that follow the measurement on every flagged
        tensor: ``rules`` (``{name or layer glob: rule}``) and, for ``heads``, the head counts
        (``n_heads``; ``n_kv_heads`` for keys and values). Empty when nothing is flagged."""
        spellable = [r for r in self.flagged() if _spellable(r)]
        proposals = {r.name: r.layouts[r.best] for r in spellable}
        rules = {pattern: layout.rule for pattern, layout in _collapse(proposals, [r.name for r in self._rows]).items()}
        out: dict[str, Any] = {"rules": rules} if rules else {}
        for r in spellable:
            layout = r.layouts[r.best]
            if layout.rule == "heads":
                out.setdefault(HEAD_COUNT[r.role], layout.n_heads)
        return out

    def conflicts(self) -> list[str]:
        """What `override` cannot say: layouts with no ``rules=`` spelling (per part of a fused
        tensor, heads outside attention or across the neurons) and head counts that differ
        between tensors of one kind."""
        notes, counts = [], {}
        for r in self.flagged():
            layout = r.layouts[r.best]
            if layout.fused:
                notes.append(f"{r.name} fuses several tensors: {layout.label} (the rule within each part) has no "
                             "rules= spelling; an adapter that splits it can (blockopt.register_adapter)")
            elif not _spellable(r):
                notes.append(f"{r.name} ({r.role}): {layout.label} has no rules= spelling (partition counts heads "
                             "only for attention query/key/value, along their neurons); an adapter can give it")
            elif layout.rule == "heads":
                counts.setdefault(HEAD_COUNT[r.role], {}).setdefault(layout.n_heads, []).append(r.name)
        for key, by_count in counts.items():
            if len(by_count) > 1:
                notes.append(f"{key}: tensors want different head counts "
                             f"({'; '.join(f'{k}: {names[0]}' for k, names in by_count.items())}); the override "
                             f"passes the first, one partition call takes one {key}")
        return notes

    def to_dict(self) -> dict:
        rows = []
        for r in self._rows:
            d = asdict(r)
            d["mass"] = {k: {"value": m.value, "stderr": m.stderr} for k, m in r.mass.items()}
            rows.append(d)
        return {"settings": self.settings, "tensors": rows, "override": self.override(), "conflicts": self.conflicts()}

    def table(self) -> str:
        header = ("tensor", "shape", "columns", "plan", "blocks", "mass", "measured", "blocks", "mass", "verdict")
        lines = [header]
        for r in self._rows:
            plan, best = r.layouts[r.plan], r.layouts[r.best]
            lines.append((
                r.name, "x".join(map(str, r.shape)), "all" if r.exact else f"{r.columns}/{r.nonzero}",
                r.plan, f"{plan.n_blocks:,}", _fmt(r.mass[r.plan]), r.best, f"{best.n_blocks:,}", _fmt(r.mass[r.best]),
                r.verdict,
            ))
        widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
        right = {2, 4, 5, 7, 8}
        return "\n".join(
            "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in lines
        )

    def __str__(self) -> str:
        s = self.settings
        parts = [
            self.table(), "",
            "columns: Hessian columns measured, of those that can be nonzero (all: exact). mass: share of the tensor's squared "
            "Hessian entries inside the rule's blocks (+- one standard error where sampled). measured: the finest "
            f"rule keeping >= {s['keep']:g} of it. too coarse: a finer rule keeps the mass (the plan merges blocks; "
            "the risky side); too fine: the plan's blocks hold less (they cut dense blocks; toward Adam).",
        ]
        flagged = self.flagged()
        if not flagged:
            parts.append("No tensor's plan is measurably worse than the measured rule.")
        else:
            parts.append(f"{len(flagged)} tensor(s) flagged: the plan is measurably worse than the measured rule.")
            parts.append(f"Override that follows the measurement: blockopt.partition(model, {_kwargs(self.override())})")
        parts += [f"note: {n}" for n in self.conflicts()]
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"AuditReport({len(self)} tensors, {len(self.flagged())} flagged)"


HEAD_COUNT = {"query": "n_heads", "key": "n_kv_heads", "value": "n_kv_heads"}  # role -> partition() argument


def _spellable(r: TensorAudit) -> bool:
    """Whether ``rules=`` can give the tensor its measured layout: not a per-part one of a fused
    tensor; heads only for attention's query, key and value (``n_heads=``/``n_kv_heads=`` set
    their counts, for every layer at once), along the dim the plan counts neurons on."""
    layout = r.layouts[r.best]
    if layout.fused:
        return False
    plan_dim = 1 if r.plan == "cols" or r.plan.startswith("col-") else 0
    return layout.rule != "heads" or (r.role in HEAD_COUNT and layout.dim == plan_dim)


def _fmt(m: Mass) -> str:
    if math.isnan(m.value):
        return "-"
    return f"{m.value:.3f}" if not m.stderr >= 5e-4 else f"{m.value:.3f}+-{m.stderr:.3f}"


def _kwargs(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


_INDEX = re.compile(r"(?<=\.)\d+(?=\.)")


def _collapse(proposals: Mapping[str, Layout], names: Sequence[str]) -> dict[str, Layout]:
    """``{name: layout}`` with the layers of a stack said once as a glob (``layers.*.attn.q_proj.weight``)
    when every tensor the glob matches has the same proposal."""
    out: dict[str, Layout] = {}
    by_glob: dict[str, list[str]] = {}
    for name in names:
        by_glob.setdefault(_INDEX.sub("*", name), []).append(name)
    for name, layout in proposals.items():
        glob = _INDEX.sub("*", name)
        members = by_glob[glob]
        if glob != name and all(proposals.get(m) == layout for m in members):
            out[glob] = layout
        else:
            out[name] = layout
    return out


# ---- candidates ---------------------------------------------------------------------------------
def candidates(spec: BlockSpec) -> dict[str, tuple[Layout, Tensor]]:
    """label -> (layout, block number of every entry, flattened) for one tensor: ``whole``,
    ``coordinate``, ``rows``, ``cols``, heads of every size along dims 0 and 1."""
    shape = tuple(spec.shape)
    out: dict[str, tuple[Layout, Tensor]] = {}

    def add(label: str, rule: str, **kw) -> None:
        s = make_spec(spec.name, shape, rule, "audit candidate", **kw)
        out[label] = (Layout(label, rule, s.n_blocks, kw.get("n_heads"), kw.get("neuron_dim")), s.block_index().flatten())

    add("whole", "whole")
    add("coordinate", "coordinate")
    if len(shape) >= 1:
        for dim, prefix in ((0, ""), (1, "col-"))[: min(len(shape), 2)]:
            width = shape[dim]
            for k in range(2, width):
                if width % k == 0:
                    add(f"{prefix}heads({k})", "heads", n_heads=k, neuron_dim=dim)
    if len(shape) >= 2:
        add("rows", "rows")
        add("cols", "cols")
    return out


def fused_parts(spec: BlockSpec) -> Tensor | None:
    """The part number (0, 1, ...) of every entry, flattened, of a tensor the plan splits into
    logical parts (a fused query/key/value projection: its segments, or one period of them for a
    per-head interleaved layout); ``None`` for a tensor of one part. Note [fused tensors]."""
    segments = spec.segments
    period = next(p for p in range(1, len(segments) + 1) if len(segments) % p == 0
                  and segments == segments[:p] * (len(segments) // p))
    if period == 1:
        return None
    part_of_unit = torch.cat([torch.full((n,), k % period) for k, (n, _) in enumerate(segments)])
    n_units = part_of_unit.numel()
    unit_layout = BlockSpec(name=spec.name, shape=spec.shape, rule="rows", reason="parts", block_dims=spec.block_dims,
                            segments=((n_units, 1),))
    return part_of_unit[unit_layout.block_index().flatten()]


def _per_part(options: dict[str, tuple[Layout, Tensor]], parts: Tensor) -> dict[str, tuple[Layout, Tensor]]:
    """Every candidate cut along the parts too (blocks never straddle two logical tensors)."""
    out = {}
    for label, (layout, block_of) in options.items():
        _, inverse = torch.unique(parts * (int(block_of.max()) + 1) + block_of, return_inverse=True)
        n_blocks = int(inverse.max()) + 1
        out[f"{label}/part"] = (Layout(f"{label}/part", layout.rule, n_blocks, layout.n_heads, layout.dim, fused=True), inverse)
    return out


def _plan_label(spec: BlockSpec, options: dict[str, tuple[Layout, Tensor]]) -> tuple[str, Layout, Tensor]:
    """The candidate the plan's layout equals, else the plan's own layout as a new candidate."""
    index = spec.block_index().flatten()
    for label, (layout, other) in options.items():
        if layout.n_blocks == spec.n_blocks and torch.equal(index, other):
            return label, layout, other
    label = f"plan:{spec.describe()}"
    return label, Layout(label, spec.rule, spec.n_blocks, spec.n_heads, None), index


# ---- the measurement ----------------------------------------------------------------------------
def batch_loss(model: nn.Module, batch: Any) -> Tensor:
    """The loss of ``model`` on ``batch``: ``model(*batch)`` for a tuple or list, ``model(**batch)``
    for a mapping, else ``model(batch)``; then the output itself if it is a scalar tensor, its
    ``.loss`` (Hugging Face), or the second item of a ``(logits, loss)`` pair (blockopt's bench
    models)."""
    if isinstance(batch, Mapping):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    if isinstance(out, Tensor) and out.numel() == 1:
        return out
    loss = getattr(out, "loss", None)
    if isinstance(loss, Tensor) and loss.numel() == 1:
        return loss
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[1], Tensor) and out[1].numel() == 1:
        return out[1]
    raise TypeError(f"cannot find a scalar loss in {type(model).__name__}'s output ({type(out).__name__}) on this batch; "
                    "pass loss_fn=lambda model, batch: <scalar loss>, or a batch with targets/labels")


def audit(
    model: nn.Module,
    batch: Any,
    plan: Plan | None = None,
    *,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    keep: float = DEFAULT_KEEP,
    samples: int = DEFAULT_SAMPLES,
    z: float = 2.0,
    names: Sequence[str] | None = None,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
    log: Callable[[str], None] | None = None,
) -> AuditReport:
    r"""Measure, for every tensor, how much of its Hessian the plan's blocks hold against the
    alternatives, and which rule Principle 1 asks for (Note [in-block mass and the fair comparison]).

    Args:
        model: the model, at the parameters to measure (a small instance of a big model: the
            structure, not the size, is what is checked). Put in eval mode while measuring
            (dropout off), then restored.
        batch: one batch, passed to the model as `batch_loss` says (or to ``loss_fn``).
        plan: the partition to check (default: ``blockopt.partition(model)``).
        loss_fn: ``(model, batch) -> scalar loss`` when `batch_loss` cannot find the loss.
        keep: the share of a tensor's Hessian mass the measured rule's blocks must hold.
        samples: most Hessian columns per tensor (fewer once the answer is certain: Note
            [sequential columns]); a tensor with at most this many nonzero columns is measured
            exactly when its answer needs them all. Cost: one Hessian-vector product (about two backward passes) per
            column, and one per tensor to find its nonzero columns.
        z: how many standard errors make a sampled difference "measurable".
        names: audit only these tensors (default: every tensor of the plan).
        seed: which columns are drawn.
        chunk_size: Hessian-vector products per batched call (memory grows with it).
        log: called with one line per tensor as it is measured (progress).

    Returns:
        An `AuditReport`: ``print(report)`` shows the table and the ``rules=`` override that
        follows the measurement (``report.override()`` as keyword arguments).
    """
    check("keep", keep, real(0, 1, low_open=True))
    check("samples", samples, integer(2))
    check("z", z, real(0))
    plan = partition(model) if plan is None else plan
    params = dict(model.named_parameters())
    stale = [n for n in plan if n not in params or tuple(params[n].shape) != tuple(plan[n].shape)]
    if stale:
        raise ValueError(f"plan tensors {stale[:3]} are not parameters of this model (or have other shapes): "
                         "build the plan from this model")
    if names is None:
        names = list(plan)
    else:
        missing = [n for n in names if n not in plan]
        if missing:
            raise ValueError(f"names {missing[:3]} are not in the plan; names: {list(plan)[:3]}...")
    compute = batch_loss if loss_fn is None else loss_fn

    def closure() -> Tensor:
        return compute(model, batch)

    was_training = model.training
    model.eval()
    started = time.perf_counter()
    rows = []
    try:
        for i, name in enumerate(names):
            spec = plan[name]
            rows.append(_audit_tensor(model, closure, spec, keep=keep, samples=samples, z=z, seed=seed + i,
                                      chunk_size=chunk_size))
            if log is not None:
                log(f"[{i + 1}/{len(names)}] {name}: {rows[-1].verdict} ({time.perf_counter() - started:.0f} s)")
    finally:
        model.train(was_training)
    settings = dict(keep=keep, samples=samples, z=z, seed=seed, seconds=round(time.perf_counter() - started, 1))
    return AuditReport(rows, settings)


def _audit_tensor(model, closure, spec: BlockSpec, *, keep, samples, z, seed, chunk_size) -> TensorAudit:
    parts = fused_parts(spec)
    options = candidates(spec) if parts is None else _per_part(candidates(spec), parts)
    plan_label, plan_layout, plan_index = _plan_label(spec, options)
    options.setdefault(plan_label, (plan_layout, plan_index))
    partitions = {label: block_of for label, (_, block_of) in options.items()}
    layouts = {label: layout for label, (layout, _) in options.items()}

    def settled(columns: Columns) -> bool:
        """The measured rule is certain at z standard errors (Note [sequential columns])."""
        if columns.population <= samples:  # small enough to measure exactly: do
            return columns.exact
        mass = block_masses(columns, partitions, within=parts)
        if math.isnan(mass[plan_label].value):
            return True
        best = _best(mass, layouts, keep, plan_label)
        return mass[best].value - z * _se(mass[best]) >= keep and all(
            mass[label].value + z * _se(mass[label]) < keep
            for label, layout in layouts.items() if layout.n_blocks > layouts[best].n_blocks)

    columns = sample_columns(model, closure, spec.name, samples, seed=seed, chunk_size=min(chunk_size, _FIRST),
                             enough=settled)
    mass = block_masses(columns, partitions, within=parts)

    def audit_row(best: str, verdict: str) -> TensorAudit:
        return TensorAudit(name=spec.name, shape=tuple(spec.shape), role=spec.role, plan=plan_label, best=best,
                           verdict=verdict, columns=columns.index.numel(), nonzero=columns.population, mass=mass,
                           layouts=layouts)

    if math.isnan(mass[plan_label].value):  # a zero Hessian: this batch does not curve the loss along it
        return audit_row(plan_label, "no curvature")
    best = _best(mass, layouts, keep, plan_label)
    if best == plan_label:
        return audit_row(best, "agrees")
    plan_mass, best_mass = mass[plan_label], mass[best]
    if plan_mass.value + z * _se(plan_mass) < keep:
        return audit_row(best, "too fine")
    if plan_layout.n_blocks < layouts[best].n_blocks and best_mass.value - z * _se(best_mass) >= keep:
        return audit_row(best, "too coarse")
    return audit_row(best, "within noise")


def _best(mass: Mapping[str, Mass], layouts: Mapping[str, Layout], keep: float, plan_label: str) -> str:
    """The finest candidate that keeps the mass; among equals the one holding more, the plan's on a tie."""
    kept = [label for label in layouts if mass[label].value >= keep]
    return max(kept, key=lambda label: (layouts[label].n_blocks, mass[label].value, label == plan_label))


def _se(m: Mass) -> float:
    return 0.0 if math.isnan(m.stderr) else m.stderr
