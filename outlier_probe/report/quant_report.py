"""Rendering and writing of `quantize` results: Rich tables, quantize.csv, sites.csv, summary.json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from outlier_probe.report.io import ensure_writable_dir, write_csv, write_json, write_tensors
from outlier_probe.report.meta import header
from outlier_probe.report.numbers import compact, percent
from outlier_probe.report.stats_report import SHORT_KIND
from outlier_probe.stats.summary import DEFINITIONS

RUN_COLUMNS = ["run", "metric", "higher_is_better", "float", "quantized", "abs_change", "rel_change",
               "w_bits", "a_bits", "per_channel", "w_estimator", "a_estimator", "description",
               "mitigation", "transformed_float", "transform_error", "gap_closed"]
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
        **({"act_scales": {"file": "act_scales.safetensors", "source": result.act_scales_source}}
           if getattr(result, "act_scales", None) else {}),
    }


def write_quantize_report(result: Any, out: Path) -> dict[str, Path]:
    import pandas as pd

    out = ensure_writable_dir(out)
    return {
        "quantize.csv": write_csv(out / "quantize.csv", pd.DataFrame(result.rows(), columns=RUN_COLUMNS)),
        "sites.csv": write_csv(out / "sites.csv", pd.DataFrame(result.site_rows(), columns=SITE_COLUMNS).astype({"layer": "Int64"})),
        "summary.json": write_json(out / "summary.json", quantize_document(result)),
        **_act_scales(result, out),
    }


def _act_scales(result: Any, out: Path) -> dict[str, Path]:
    """SmoothQuant's input maxima, for `quantize --act-scales` to reuse (as the reference code's act_scales/)."""
    from outlier_probe.quant.mitigations.smoothing import ACT_SCALES_FILE

    if not getattr(result, "act_scales", None):
        return {}
    meta = {"tool": "outlier-probe", "model": str(result.model.get("name", "")), "source": result.act_scales_source,
            "content": "max |x_j| per input channel j of each smoothed Linear, float32"}
    return {ACT_SCALES_FILE: write_tensors(out / ACT_SCALES_FILE, result.act_scales, meta)}


def runs_table(result: Any) -> Table:
    rows = result.rows()
    metric = rows[0]["metric"] if rows else ""
    if any(r["mitigation"] != "plain" for r in rows):
        return mitigation_table(result)
    table = Table(title=f"{result.model['name']}: float vs quantized {metric}", caption=result.metric_note)
    table.add_column("run", overflow="fold")
    table.add_column("recipe", overflow="fold")
    for col in ("float", "quantized", "change", "relative"):
        table.add_column(col, justify="right", no_wrap=True)
    for r in rows:
        worse = (r["abs_change"] < 0) if r["higher_is_better"] else (r["abs_change"] > 0)
        style = "red" if worse and abs(r["rel_change"]) > 0.05 else ("yellow" if worse else "green")
        table.add_row(r["run"], r["description"], compact(r["float"]), compact(r["quantized"]),
                      f"[{style}]{compact(r['abs_change'], signed=True)}[/]", f"[{style}]{percent(r['rel_change'])}[/]")
    return table


def sites_tables(result: Any, limit: int = 15) -> list[Table]:
    """The `limit` sites of lowest SQNR, one table per run (a run column would leave the site names no room)."""
    tables = []
    for run in result.runs:
        if not run.sites:
            continue
        shown = run.sites[:limit]
        short = {s["kind"]: SHORT_KIND.get(s["kind"], s["kind"]) for s in shown}
        legend = ", ".join(f"{v} = {k}" for k, v in short.items() if v != k)
        table = Table(title=f"{run.run}: worst quantization sites (lowest SQNR first, top {limit})",
                      caption=f"kind: {legend}" if legend else None)
        table.add_column("site", overflow="fold")  # names wrap; numbers never do
        table.add_column("kind", overflow="fold")
        for col in ("SQNR dB", "kurtosis", "inf-norm"):
            table.add_column(col, justify="right", no_wrap=True)
        for s in shown:
            table.add_row(s["site"], short[s["kind"]], compact(s["sqnr_db"], 3), compact(s["paper_kurtosis"]),
                          compact(s["paper_inf_norm"]))
        tables.append(table)
    return tables


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
        shown = r["transformed_float"] if math.isfinite(r["transformed_float"]) else r["float"]
        table.add_row(r["run"], compact(shown), compact(r["quantized"]),
                      "-" if math.isnan(closed) else f"[{style}]{percent(closed, signed=True)}[/]")
    return table
