"""Gate rendering: JUnit XML, GitHub annotations, JSON, Rich table."""

from __future__ import annotations

import io
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from rich.console import Console

from outlier_probe.gate_types import CheckResult, GateConfig, GateResult, ReportFiles, ResolvedGate
from outlier_probe.report import gate_output


def make_result(*checks: CheckResult) -> GateResult:
    config = GateConfig(max_kurtosis=10.0, max_inf_norm=50.0)
    sources = {"max_kurtosis": "flag", "max_inf_norm": "/repo/pyproject.toml"}
    reports = ReportFiles((Path("reports/x"),), Path("reports/x/stats.csv"), None, "tiny-opt")
    return GateResult(ResolvedGate(config, sources, Path("/repo/pyproject.toml")), reports, checks)


FAILING = CheckResult("max_kurtosis", "max_kurtosis", "<=", 10.0, 45.25, "model.decoder.layers.3.fc2")
PASSING = CheckResult("max_inf_norm", "max_inf_norm", "<=", 50.0, 12.0, "model.decoder.layers.1")
NAN = CheckResult("baseline:max_outlier_fraction", "max_outlier_fraction", "<=", 0.0011, math.nan, None, "baseline 0.001 +10%")


def test_junit_has_one_case_per_check_and_marks_failures(tmp_path: Path) -> None:
    result = make_result(FAILING, PASSING, NAN)
    path = gate_output.write_junit(result, tmp_path / "gate.xml")
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite is not None and suite.get("tests") == "3" and suite.get("failures") == "2"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert list(cases) == ["max_kurtosis", "max_inf_norm", "baseline:max_outlier_fraction"]
    failure = cases["max_kurtosis"].find("failure")
    assert failure is not None and "45.25" in failure.get("message", "") and "layers.3.fc2" in failure.get("message", "")
    assert cases["max_inf_norm"].find("failure") is None
    assert cases["baseline:max_outlier_fraction"].find("failure") is not None  # NaN never passes
    props = {p.get("name"): p.get("value") for p in suite.iter("property")}
    assert props["max_kurtosis"] == "10.0"
    assert [p.name for p in tmp_path.iterdir()] == ["gate.xml"]  # atomic: no temporary file left


def test_annotations_only_under_github_actions(monkeypatch: pytest.MonkeyPatch) -> None:
    result = make_result(FAILING, PASSING)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    stream = io.StringIO()
    assert gate_output.emit_github_annotations(result, stream) is False
    assert stream.getvalue() == ""
    monkeypatch.setenv("GITHUB_ACTIONS", "false")
    assert gate_output.emit_github_annotations(result, stream) is False
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert gate_output.emit_github_annotations(result, stream) is True
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("::error title=outlier-probe gate%3A max_kurtosis::max_kurtosis = 45.25")
    assert lines[1] == "::notice title=outlier-probe gate::1 of 2 checks failed"


def test_annotation_escaping() -> None:
    check = CheckResult("max_kurtosis", "max_kurtosis", "<=", 1.0, 2.0, "a,b\nc%")
    (error, _notice) = gate_output.github_annotations(make_result(check))
    assert "\n" not in error and "a,b%0Ac%25" in error


def test_all_pass_notice() -> None:
    lines = gate_output.github_annotations(make_result(PASSING))
    assert lines == ["::notice title=outlier-probe gate::all 1 checks passed"]


def test_json_is_strict_and_carries_the_resolved_config(tmp_path: Path) -> None:
    result = make_result(FAILING, NAN)
    data = json.loads(json.dumps(gate_output.gate_to_dict(result), allow_nan=False))
    assert data["passed"] is False and data["exit_code"] == 1
    assert data["config"]["max_kurtosis"] == 10.0 and data["config"]["baseline_tolerance"] == 0.1
    assert data["sources"]["max_kurtosis"] == "flag"
    assert data["checks"][1]["measured"] is None and data["checks"][0]["worst"] == "model.decoder.layers.3.fc2"
    saved = json.loads(gate_output.write_gate_json(result, tmp_path / "gate.json").read_text())
    assert saved["checks"] == data["checks"]


def test_table_shows_each_check() -> None:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    gate_output.render_table(make_result(FAILING, PASSING), console)
    text = console.file.getvalue()
    assert "FAIL" in text and "PASS" in text and "model.decoder.layers.3.fc2" in text and "45.25" in text
    assert "gate failed: 1 of 2 checks" in text and "/repo/pyproject.toml" in text


def test_fmt() -> None:
    assert gate_output.fmt(math.inf) == "inf" and gate_output.fmt(math.nan) == "nan" and gate_output.fmt(0.000123456) == "0.0001235"
