"""Render a GateResult: Rich table, JSON (stdout and gate.json), JUnit XML, GitHub annotations."""

from __future__ import annotations

import math
import os
import platform
import sys
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Mapping

from rich.console import Console
from rich.table import Table

from outlier_probe import __version__
from outlier_probe.gate_types import CheckResult, GateResult
from outlier_probe.report.io import ensure_writable_dir, write_json, write_text
from outlier_probe.report.numbers import compact

SUITE_NAME = "outlier-probe gate"


def fmt(value: float | None) -> str:
    """Numbers as people read them: 4 significant digits, nan/inf spelled out."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.4g}"


def describe(check: CheckResult) -> str:
    """One sentence: `max_kurtosis = 45.2, above the limit 10 (worst: layers.3.fc2)`."""
    if check.passed:
        relation = "within"
    else:
        relation = "below" if check.op == ">=" else "above"
    text = f"{check.name} = {fmt(check.measured)}, {relation} the limit {check.op} {fmt(check.limit)}"
    if check.detail:
        text += f" ({check.detail})"
    if check.worst:
        text += f"; worst: {check.worst}"
    return text


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) or math.isinf(value) else value  # strict JSON has no nan/inf


def gate_to_dict(result: GateResult) -> dict[str, Any]:
    """The verdict, the resolved configuration and its sources: printed by --json, saved as gate.json."""
    reports = result.reports
    return {
        "tool": "outlier-probe",
        "command": "gate",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "passed": result.passed,
        "exit_code": result.exit_code,
        "config": result.resolved.config.to_dict(),
        "sources": dict(result.resolved.sources),
        "config_file": str(result.resolved.config_file) if result.resolved.config_file else None,
        "reports": {
            "folders": [str(f) for f in reports.folders],
            "stats_csv": str(reports.stats_csv) if reports.stats_csv else None,
            "quantize_csv": str(reports.quantize_csv) if reports.quantize_csv else None,
            "model": reports.model,
        },
        "baseline": [str(f) for f in result.baseline.folders] if result.baseline else None,
        "checks": [
            {
                "name": c.name,
                "metric": c.metric,
                "op": c.op,
                "limit": _json_number(c.limit),
                "measured": _json_number(c.measured),
                "passed": c.passed,
                "worst": c.worst,
                "detail": c.detail,
            }
            for c in result.checks
        ],
        "versions": {"outlier-probe": __version__, "python": platform.python_version()},
    }


def write_gate_json(result: GateResult, path: Path) -> Path:
    return write_json(path, gate_to_dict(result))


def config_line(result: GateResult) -> str:
    """Where the thresholds came from, e.g. `config file: /x/pyproject.toml; set by flags: max_kurtosis`."""
    resolved = result.resolved
    flags = [k for k, v in resolved.sources.items() if v == "flag"]
    return f"config file: {resolved.config_file or 'none'}; set by flags: {', '.join(flags) if flags else 'none'}"


def gate_table(result: GateResult) -> Table:
    """Check | threshold | measured | result | worst site (or run); names wrap, numbers never."""
    model = f" for {result.reports.model}" if result.reports.model else ""
    table = Table(title=f"outlier-probe gate{model}", caption=config_line(result))
    table.add_column("check", overflow="fold")
    table.add_column("threshold", justify="right", no_wrap=True)
    table.add_column("measured", justify="right", no_wrap=True)
    table.add_column("result", justify="center", no_wrap=True)
    table.add_column("worst site / run", overflow="fold")
    for c in result.checks:
        verdict = "[green]PASS[/green]" if c.passed else "[bold red]FAIL[/bold red]"
        table.add_row(c.name, f"{c.op} {compact(c.limit)}", compact(c.measured), verdict, c.worst or "")
    return table


def render_table(result: GateResult, console: Console) -> None:
    """Print the gate table and the verdict line."""
    table = gate_table(result)
    console.print(table)
    n_failed = len(result.failed)
    if n_failed:
        console.print(f"[bold red]gate failed[/bold red]: {n_failed} of {len(result.checks)} checks (exit 1)")
    else:
        console.print(f"[green]gate passed[/green]: {len(result.checks)} checks")


def junit_xml(result: GateResult) -> str:
    """JUnit XML: one <testcase> per check, a <failure> on each failed one."""
    n_failed = len(result.failed)
    attrs = {"name": SUITE_NAME, "tests": str(len(result.checks)), "failures": str(n_failed), "errors": "0"}
    root = ET.Element("testsuites", attrs)
    suite = ET.SubElement(root, "testsuite", attrs)
    properties = ET.SubElement(suite, "properties")
    for key, value in result.resolved.config.to_dict().items():
        if value is not None:
            ET.SubElement(properties, "property", name=key, value=str(value))
    for c in result.checks:
        case = ET.SubElement(suite, "testcase", classname="outlier_probe.gate", name=c.name, time="0")
        if not c.passed:
            failure = ET.SubElement(case, "failure", message=describe(c), type="ThresholdExceeded")
            failure.text = describe(c)
        else:
            ET.SubElement(case, "system-out").text = describe(c)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_junit(result: GateResult, path: Path) -> Path:
    """Write the JUnit XML atomically (CI reads it even when the gate fails)."""
    ensure_writable_dir(Path(path).parent)
    return write_text(Path(path), junit_xml(result))


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def github_annotations(result: GateResult) -> list[str]:
    """`::error` per failed check and one `::notice` summary (GitHub workflow commands)."""
    lines = [
        f"::error title={_escape_property(f'outlier-probe gate: {c.name}')}::{_escape_data(describe(c))}"
        for c in result.failed
    ]
    n, n_failed = len(result.checks), len(result.failed)
    summary = f"{n_failed} of {n} checks failed" if n_failed else f"all {n} checks passed"
    lines.append(f"::notice title={_escape_property('outlier-probe gate')}::{_escape_data(summary)}")
    return lines


def emit_github_annotations(result: GateResult, stream: IO[str] | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Print the annotations when running under GitHub Actions (GITHUB_ACTIONS=true); say whether it did."""
    environ = os.environ if environ is None else environ
    if environ.get("GITHUB_ACTIONS") != "true":
        return False
    stream = sys.stdout if stream is None else stream
    for line in github_annotations(result):
        print(line, file=stream)
    stream.flush()
    return True
