"""Every result committed under benchmarks/ is in the one result schema, so any reader can open it."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockopt.bench import CompareResult, read_result

BENCHMARKS = Path(__file__).resolve().parents[3] / "benchmarks"
RESULTS = sorted(BENCHMARKS.rglob("result.json"))
COMPARISONS = sorted(BENCHMARKS.rglob("compare.json"))  # `blockopt compare` runs keep the tool's own report


def test_there_are_results():
    assert len(RESULTS) >= 40 and len(COMPARISONS) >= 5


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: str(p.parent.relative_to(BENCHMARKS)))
def test_a_result_is_a_result_document_in_its_run_folder(path):
    document = read_result(path)
    assert set(document) == {"schema", "name", "command", "created", "environment", "settings", "results"}
    assert path.parent.parent.name == "results"  # <study>/results/<run>/result.json
    assert (path.parents[2] / "README.md").exists()


@pytest.mark.parametrize("path", COMPARISONS, ids=lambda p: str(p.parent.relative_to(BENCHMARKS)))
def test_a_comparison_loads(path):
    assert CompareResult.load(path).runs
