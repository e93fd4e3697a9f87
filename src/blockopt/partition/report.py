"""A Plan as rows a person can read at 70B: identical layers collapse into one row with a count.

Tensors whose names differ only in numeric components (layer, expert) and whose specs agree on
everything a row shows (shape, rule, blocks, layout, role, reason) become one row:
``model.layers.{0..79}.self_attn.q_proj.weight`` with count 80. A layer that differs keeps a row
of its own (the indices then read ``{0..3,5..79}`` and ``4``), so collapsing hides nothing.
Rows render as an aligned table, as JSON-ready dicts or as CSV, for people and for tools.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import torch

from .memory import state_memory
from .plan import Plan
from .spec import BlockSpec

ROW_FIELDS = ("name", "count", "shape", "rule", "n_blocks", "role", "layout", "reason", "aliases")
_INDEX = re.compile(r"0|[1-9][0-9]*")  # a name component that indexes a ModuleList (no leading zeros)


@dataclass(frozen=True)
class PlanRow:
    """One tensor, or ``count`` tensors with the same spec whose names differ only in indices."""

    name: str  # indices that vary are written {0..79}
    count: int
    shape: tuple[int, ...]
    rule: str
    n_blocks: int  # per tensor
    role: str
    layout: str
    reason: str
    aliases: tuple[str, ...] = ()  # other names of a tied tensor (such a tensor never collapses)

    def to_dict(self) -> dict:
        return {field: getattr(self, field) for field in ROW_FIELDS} | {
            "shape": list(self.shape), "aliases": list(self.aliases)
        }


def plan_rows(plan: Plan, *, collapse: bool = True) -> list[PlanRow]:
    """The rows of ``plan`` in model order; with ``collapse``, identical layers share one row.

    A collapsed row stands where its first tensor stood, so 80 identical layers read like one.
    """
    # A row under construction: name parts (an index part is a frozenset of ints), count, spec,
    # and what must agree for two rows to merge.
    rows = [
        (_parts(spec.name) if collapse and not spec.aliases else (spec.name,), 1, spec, _spec_key(spec))
        for spec in plan.values()
    ]
    depth = max((len(row[0]) for row in rows), default=0)
    for position in reversed(range(depth)):  # innermost index first: experts, then layers
        rows = _merge_at(rows, position)
    return [_row(parts, count, spec) for parts, count, spec, _ in rows]


def _parts(name: str) -> tuple:
    return tuple(frozenset({int(p)}) if _INDEX.fullmatch(p) else p for p in name.split("."))


def _spec_key(spec: BlockSpec) -> tuple:
    return spec.shape, spec.rule, spec.n_blocks, spec.role, spec.describe(), spec.reason


def _merge_at(rows: list[tuple], position: int) -> list[tuple]:
    """Merge rows that differ only in the index set at ``position`` (first row's place kept)."""
    merged: dict[tuple, list] = {}
    for n, (parts, count, spec, same) in enumerate(rows):
        if position < len(parts) and isinstance(parts[position], frozenset):
            key = (len(parts), parts[:position], parts[position + 1 :], same)
        else:
            key = (n,)  # nothing to merge at this position
        if key in merged:
            first = merged[key]
            first[0] = parts[:position] + (first[0][position] | parts[position],) + parts[position + 1 :]
            first[1] += count
        else:
            merged[key] = [parts, count, spec, same]
    return [tuple(row) for row in merged.values()]


def _row(parts: tuple, count: int, spec: BlockSpec) -> PlanRow:
    name = ".".join(_indices(p) if isinstance(p, frozenset) else p for p in parts)
    return PlanRow(name, count, spec.shape, spec.rule, spec.n_blocks, spec.role, spec.describe(), spec.reason, spec.aliases)


def _indices(values: frozenset) -> str:
    """``{0..3,5..79}`` for a set of indices; a single index as itself."""
    if len(values) == 1:
        return str(next(iter(values)))
    ordered, runs = sorted(values), []
    start = prev = ordered[0]
    for i in ordered[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        runs.append(str(start) if start == prev else f"{start},{prev}" if prev == start + 1 else f"{start}..{prev}")
        start = prev = i
    return "{" + ",".join(runs) + "}"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def rows_table(rows: Sequence[PlanRow], max_rows: int | None = None) -> str:
    """The rows as an aligned table (name, count, shape, rule, blocks per tensor, layout, why)."""
    lines = [("name", "count", "shape", "rule", "blocks", "layout", "why")]
    for row in rows[:max_rows]:
        name = row.name + (f" (= {', '.join(row.aliases)})" if row.aliases else "")
        lines.append((name, str(row.count), _shape(row.shape), row.rule, f"{row.n_blocks:,}", row.layout, row.reason))
    widths = [max(len(line[i]) for line in lines) for i in range(6)]
    right = {1, 4}  # numbers
    out = [
        "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))) + "  " + line[6]
        for line in lines
    ]
    hidden = rows[len(lines) - 1 :]
    if hidden:
        out.append(f"... {len(hidden)} more rows ({sum(r.count for r in hidden)} tensors)")
    return "\n".join(out)


def rows_csv(rows: Iterable[PlanRow]) -> str:
    """The rows as CSV with a header (`ROW_FIELDS`); a shape reads ``4096x4096``, aliases ``a;b``."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(ROW_FIELDS)
    for row in rows:
        values = row.to_dict() | {"shape": _shape(row.shape), "aliases": ";".join(row.aliases)}
        writer.writerow(values[field] for field in ROW_FIELDS)
    return buffer.getvalue()


def plan_dict(plan: Plan, rows: Sequence[PlanRow]) -> dict:
    """Rows, summary, AdamW vs Adam-mini state bytes and warnings, as JSON-ready data."""
    s = plan.summary()
    return {
        "rows": [row.to_dict() for row in rows],
        "summary": {
            "n_tensors": s.n_tensors, "n_params": s.n_params, "n_blocks": s.n_blocks,
            "tensors_per_rule": s.tensors_per_rule, "params_per_rule": s.params_per_rule,
            "blocks_per_rule": s.blocks_per_rule,
        },
        "state_bytes": [asdict(state_memory(plan, dtype)) for dtype in (torch.float32, torch.bfloat16)],
        "warnings": list(plan.warnings),
    }
