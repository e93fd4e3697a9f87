"""Every model type of the installed transformers, planned and checked: right, warned, or listed.

    python benchmarks/studies/partition_coverage/partition_coverage.py            # results/default
    python benchmarks/studies/partition_coverage/partition_coverage.py --types llama llava deepseek_v3

Each model type is built from its default config on the meta device, partitioned, and checked by
`blockopt.partition.coverage` (invariants written from the model's own modules and configs, not
from the engine). Writes ``result.json`` (every row) and ``table.md`` (the table, one row a type).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from blockopt.bench import write_result
from blockopt.partition import coverage

HERE = Path(__file__).resolve().parent


def _rules(row: coverage.Coverage) -> str:
    return ", ".join(f"{rule} {n}" for rule, n in sorted(row.rules.items(), key=lambda kv: -kv[1]))


def table(rows: list[coverage.Coverage]) -> str:
    lines = ["| model type | family | status | params | tensors | rules used | heads | warnings | plan s |",
             "|---|---|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if r.status == "unbuildable":
            lines.append(f"| {r.model_type} | {r.family} | unbuildable: {(r.error or '').replace('|', '/')[:120]} "
                         "| | | | | | |")
            continue
        lines.append(f"| {r.model_type} | {r.family} | {r.status} | {r.params:,} | {r.tensors} | {_rules(r)} | "
                     f"{r.heads} | {len(r.warnings)} | {r.plan_s:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="+", help="model types (default: every one transformers registers)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "default", help="the run's folder")
    args = parser.parse_args()
    types = args.types or coverage.model_types()
    rows, t0 = [], time.perf_counter()
    for i, model_type in enumerate(types, 1):
        row = coverage.cover(model_type)
        rows.append(row)
        silent = sum(not v.warned for v in row.violations)
        print(f"[{i}/{len(types)}] {model_type:<40} {row.status:<12} {row.plan_s:6.3f}s"
              + (f"  {silent} silent" if silent else "") + (f"  {row.error[:80]}" if row.error else ""), flush=True)
    totals = coverage.totals(rows)
    print(totals)
    results = coverage.sweep_results(rows, time.perf_counter() - t0)
    settings = {"transformers": transformers.__version__, "torch": torch.__version__, "device": "meta",
                "types": "all" if args.types is None else list(types)}
    path = write_result(args.out, name="partition_coverage", settings=settings, results=results)
    (args.out / "table.md").write_text(table(rows))
    print(f"wrote {path} and {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
