"""Rendering and writing of `quantize` results: Rich tables, quantize.csv, sites.csv, summary.json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from outlier_probe.report.io import ensure_writable_dir, write_csv, write_json
from outlier_probe.report.meta import header
from outlier_probe.stats.summary import DEFINITIONS

RUN_COLUMNS = ["run", "metric", "higher_is_better", "float", "quantized", "abs_change", "rel_change",
               "w_bits", "a_bits", "per_channel", "w_estimator", "a_estimator", "description",
               "mitigation", "transformed_float", "gap_closed"]
SITE_COLUMNS = ["run", "site", "kind", "layer", "sqnr_db", "paper_kurtosis", "paper_inf_norm", "range_min", "range_max"]


def quantize_document(result: Any) -> dict[str, Any]:
    return {
        **header("quantize"),
        "model": result.model,
        "data": result.data,
        "calibration": result.calibration,
        "settings": result.settings,
        "metric_note": result.metric_note,
        "definitions": {**DEFINITIONS, "sqnr_db": "10 log10(sum x^2 / sum (x - q(x))^2) at the site over the evaluation batches"},
        "runs": result.rows(),
        "site_summary": result.site_summary,
    }


def write_quantize_report(result: Any, out: Path) -> dict[str, Path]:
    import pandas as pd

    out = ensure_writable_dir(out)
    return {
        "quantize.csv": write_csv(out / "quantize.csv", pd.DataFrame(result.rows(), columns=RUN_COLUMNS)),
        "sites.csv": write_csv(out / "sites.csv", pd.DataFrame(result.site_rows(), columns=SITE_COLUMNS).astype({"layer": "Int64"})),
        "summary.json": write_json(out / "summary.json", quantize_document(result)),
    }


def _f(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"


def runs_table(result: Any) -> Table:
    rows = result.rows()
    metric = rows[0]["metric"] if rows else ""
    if any(r["mitigation"] != "plain" for r in rows):
        return mitigation_table(result)
    table = Table(title=f"{result.model['name']}: float vs quantized {metric}", caption=result.metric_note)
    for col, justify in (("run", "left"), ("recipe", "left"), ("float", "right"), ("quantized", "right"),
                         ("change", "right"), ("relative", "right")):
        table.add_column(col, justify=justify)
    for r in rows:
        worse = (r["abs_change"] < 0) if r["higher_is_better"] else (r["abs_change"] > 0)
        style = "red" if worse and abs(r["rel_change"]) > 0.05 else ("yellow" if worse else "green")
        table.add_row(r["run"], r["description"], _f(r["float"]), _f(r["quantized"]),
                      f"[{style}]{r['abs_change']:+.3f}[/]", f"[{style}]{100 * r['rel_change']:+.2f}%[/]")
    return table


def sites_table(result: Any, limit: int = 15) -> Table:
    table = Table(title=f"worst quantization sites (SQNR, lowest first; top {limit} per run)")
    for col in ("run", "site", "kind", "SQNR dB", "kurtosis", "inf-norm"):
        table.add_column(col, justify="left" if col in ("run", "site", "kind") else "right",
                         overflow="fold", min_width=28 if col == "site" else None)
    for run in result.runs:
        for s in run.sites[:limit]:
            table.add_row(run.run, s["site"], s["kind"], _f(s["sqnr_db"], 1), _f(s["paper_kurtosis"], 1), _f(s["paper_inf_norm"], 2))
    return table


def mitigation_table(result: Any) -> Table:
    """Plain W8A8 and each mitigation: float (of the transformed model), quantized, gap closed."""
    rows = result.rows()
    metric = rows[0]["metric"] if rows else ""
    table = Table(title=f"{result.model['name']}: W8A8 {metric} with mitigations",
                  caption="gap closed = (plain W8A8 loss - mitigated loss) / plain W8A8 loss; "
                          "loss = degradation from the float score; recipes in quantize.csv")
    for col in ("run", "float", "quantized", "gap closed"):
        table.add_column(col, justify="left" if col == "run" else "right", overflow="fold" if col == "run" else None,
                         no_wrap=col != "run")
    for r in rows:
        closed = r["gap_closed"]
        style = "green" if closed > 0.05 else ("red" if closed < -0.05 else "yellow")
        table.add_row(r["run"], _f(r["transformed_float"], 4), _f(r["quantized"], 4),
                      "-" if math.isnan(closed) else f"[{style}]{100 * closed:+.1f}%[/]")
    return table
