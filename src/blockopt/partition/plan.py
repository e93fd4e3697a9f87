"""`Plan`: every trainable parameter name -> its frozen `BlockSpec`, with a readable report."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from .block_types import BIAS_OPTIONS, block_types
from .spec import RULES, BlockSpec


@dataclass(frozen=True)
class PlanSummary:
    """Counts per rule and the number of second-moment scalars the plan needs."""

    n_tensors: int
    n_params: int
    n_blocks: int  # second-moment scalars Adam-mini keeps (AdamW keeps n_params)
    tensors_per_rule: dict[str, int]
    blocks_per_rule: dict[str, int]
    params_per_rule: dict[str, int]

    @property
    def v_fraction(self) -> float:
        """Second-moment scalars as a fraction of AdamW's (one per parameter)."""
        return self.n_blocks / max(self.n_params, 1)

    def __str__(self) -> str:
        lines = [f"{'rule':<11}{'tensors':>8}{'params':>19}{'blocks':>13}"]
        for rule in RULES:
            if self.tensors_per_rule.get(rule):
                lines.append(
                    f"{rule:<11}{self.tensors_per_rule[rule]:>8}{self.params_per_rule[rule]:>19,}"
                    f"{self.blocks_per_rule[rule]:>13,}"
                )
        lines.append(f"{'total':<11}{self.n_tensors:>8}{self.n_params:>19,}{self.n_blocks:>13,}")
        lines.append(
            f"second-moment scalars: {self.n_blocks:,} vs AdamW's {self.n_params:,} "
            f"({100 * self.v_fraction:.3f}%)"
        )
        return "\n".join(lines)


class Plan(Mapping[str, BlockSpec]):
    """The partition of a model: parameter name -> `BlockSpec`.

    A plan is pure data (no tensors): it can be printed, pickled, compared and built on the
    ``meta`` device. Tied parameters have one spec under their first name; ``plan[alias]`` finds it.
    """

    def __init__(self, specs: Mapping[str, BlockSpec] | list[BlockSpec], warnings: tuple[str, ...] = ()):
        try:
            items = list(specs.values()) if isinstance(specs, Mapping) else list(specs)
        except TypeError:  # (not iterable: a module)
            items = None
        if items is None or not all(isinstance(spec, BlockSpec) for spec in items):
            got = type(specs).__name__ if items is None else type(next(s for s in items if not isinstance(s, BlockSpec))).__name__
            raise TypeError(f"Plan takes BlockSpecs (got {got}): a model's plan is blockopt.partition(model) "
                            "(or blockopt.partition(model.named_parameters(), n_heads=...))")
        self._specs: dict[str, BlockSpec] = {}
        self._alias: dict[str, str] = {}
        for spec in items:
            if spec.name in self._specs or spec.name in self._alias:
                raise ValueError(f"parameter {spec.name!r} appears twice in the plan")
            self._specs[spec.name] = spec
            for alias in spec.aliases:
                self._alias[alias] = spec.name
        self.warnings = tuple(warnings)
        # bias option -> block_types(self), built on first use (a plan never changes after __init__)
        self._block_types: dict[str, dict[str, str]] = {}

    # Mapping protocol (canonical names only; aliases resolve in __getitem__/__contains__)
    def __getitem__(self, name: str) -> BlockSpec:
        if name in self._specs:
            return self._specs[name]
        if name in self._alias:
            return self._specs[self._alias[name]]
        raise KeyError(f"{name!r} is not a trainable parameter of this plan")

    def __contains__(self, name: object) -> bool:
        return name in self._specs or name in self._alias

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Plan) and self._specs == other._specs

    def __hash__(self) -> int:  # Mapping sets __hash__ = None when __eq__ is defined
        return hash(tuple(self._specs.items()))

    def __reduce__(self):
        return (Plan, (list(self._specs.values()), self.warnings))

    def merged(self, other: "Plan") -> "Plan":
        """A plan with ``other``'s specs added (names must not clash)."""
        return Plan(list(self._specs.values()) + list(other._specs.values()), self.warnings + other.warnings)

    def block_type(self, name: str, *, bias: str = "owner") -> str:
        """The block type of parameter ``name`` (or an alias): ``"qk"``, ``"vo"``, ``"ffn"``, ...

        Read from its spec's role (`blockopt.partition.block_types`); with ``bias="owner"`` a bias
        takes its layer's type, with ``"separate"`` the type ``"bias"``.
        """
        spec = self[name]
        if bias not in BIAS_OPTIONS or bias not in self._block_types:
            self._block_types[bias] = block_types(self, bias=bias)  # raises for an unknown option
        return self._block_types[bias][spec.name]

    def summary(self) -> PlanSummary:
        tensors, blocks, params = Counter(), Counter(), Counter()
        for spec in self._specs.values():
            tensors[spec.rule] += 1
            blocks[spec.rule] += spec.n_blocks
            params[spec.rule] += spec.numel
        return PlanSummary(
            n_tensors=len(self._specs),
            n_params=sum(params.values()),
            n_blocks=sum(blocks.values()),
            tensors_per_rule=dict(tensors),
            blocks_per_rule=dict(blocks),
            params_per_rule=dict(params),
        )

    def table(self, max_rows: int | None = None) -> str:
        """The report: one line per tensor (name, shape, rule, blocks, layout, why)."""
        rows = [("name", "shape", "rule", "blocks", "layout", "why")]
        for spec in self._specs.values():
            name = spec.name + (f" (= {', '.join(spec.aliases)})" if spec.aliases else "")
            shape = "x".join(map(str, spec.shape)) or "scalar"
            rows.append((name, shape, spec.rule, f"{spec.n_blocks:,}", spec.describe(), spec.reason))
        hidden = 0
        if max_rows is not None and len(rows) - 1 > max_rows:
            hidden = len(rows) - 1 - max_rows
            rows = rows[: max_rows + 1]
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        out = []
        for r in rows:
            out.append("  ".join(c.ljust(w) if i != 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r[:5], widths))) + "  " + r[5])
        if hidden:
            out.append(f"... {hidden} more tensors")
        return "\n".join(out)

    def __str__(self) -> str:
        parts = [self.table(), "", str(self.summary())]
        if self.warnings:
            parts += [""] + [f"warning: {w}" for w in self.warnings]
        return "\n".join(parts)

    def __repr__(self) -> str:
        s = self.summary()
        return f"Plan({s.n_tensors} tensors, {s.n_params:,} params, {s.n_blocks:,} blocks)"
