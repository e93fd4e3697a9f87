"""The package's rooms keep to their walls (ARCHITECTURE.md): read from each module's imports.

- no optimizer module talks to ``torch.distributed`` or builds DTensors: `blockopt.distributed`
  is the one door;
- the optimizers never import each other's modules (what AdamMini and AdaPM share lives in
  ``optim/adam_family.py``; Adam-mini's step lives in ``kernels/``);
- kernels know layouts (``partition``) and nothing else of blockopt;
- ``partition`` imports nothing else of blockopt, so every other room can use it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "blockopt"
OPTIMIZERS = {"adam_mini", "adapm", "sgd_sai"}


def _imports(path: Path) -> set[str]:
    """Absolute dotted names of everything ``path`` imports (relative imports resolved)."""
    package = ["blockopt", *path.relative_to(SRC).parent.parts]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _modules(room: str) -> list[Path]:
    return sorted((SRC / room).rglob("*.py"))


@pytest.mark.parametrize("path", _modules("optim"), ids=lambda p: p.name)
def test_optimizers_reach_distribution_only_through_blockopt_distributed(path):
    imported = _imports(path)
    assert not any(name.startswith("torch.distributed") for name in imported), sorted(imported)
    assert not any(name.endswith(".DTensor") for name in imported)


@pytest.mark.parametrize("path", [p for p in _modules("optim") if p.stem in OPTIMIZERS], ids=lambda p: p.name)
def test_optimizers_do_not_import_each_other(path):
    others = {f"blockopt.optim.{name}" for name in OPTIMIZERS - {path.stem}}
    imported = _imports(path)
    assert not any(name == o or name.startswith(o + ".") for name in imported for o in others), sorted(imported)


@pytest.mark.parametrize("path", _modules("kernels"), ids=lambda p: str(p.relative_to(SRC)))
def test_kernels_depend_on_partition_only(path):
    ours = {name for name in _imports(path) if name.startswith("blockopt.")}
    allowed = ("blockopt.kernels", "blockopt.partition")
    assert all(name.startswith(allowed) for name in ours), sorted(ours)


@pytest.mark.parametrize("path", _modules("partition"), ids=lambda p: p.name)
def test_partition_imports_nothing_else_of_blockopt(path):
    ours = {name for name in _imports(path) if name.startswith("blockopt.")}
    assert all(name.startswith(("blockopt.partition", "blockopt.validation")) for name in ours), sorted(ours)
