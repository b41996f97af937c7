"""Dependencies point one way: report/ renders plain result objects and never imports the decision layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "outlier_probe"
DECISIONS = {"outlier_probe.gate", "outlier_probe.compare", "outlier_probe.reproduce", "outlier_probe.cli"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


@pytest.mark.parametrize("path", sorted((PACKAGE / "report").glob("*.py")), ids=lambda p: p.name)
def test_report_imports_nothing_from_the_decision_layer(path: Path) -> None:
    bad = sorted(n for n in _imports(path) if any(n == d or n.startswith(d + ".") for d in DECISIONS))
    assert not bad, f"{path.name} imports {bad}; render the plain types of gate_types / compare_types instead"


def test_the_scan_sees_an_import_of_the_decision_layer(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from outlier_probe.gate import CheckResult\nimport outlier_probe.compare\n")
    assert {"outlier_probe.gate", "outlier_probe.compare"} <= _imports(module)
