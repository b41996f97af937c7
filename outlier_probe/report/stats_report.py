"""Rendering and writing of `stats` results: Rich table, stats.csv, summary.json, PNG plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from outlier_probe.report import plots
from outlier_probe.report.io import ensure_writable_dir, write_csv, write_json
from outlier_probe.report.meta import header
from outlier_probe.stats.summary import DEFINITIONS

COLUMNS = ["site", "kind", "layer", "n_sequences", "count", "mean", "var", "std", "kurtosis", "excess_kurtosis",
           "paper_kurtosis", "paper_inf_norm", "max_abs", "frac_gt_threshold", "frac_gt_ksigma", "top_channels"]


def stats_frame(rows: list[dict[str, Any]]) -> Any:
    import pandas as pd

    return pd.DataFrame(rows, columns=COLUMNS).astype({"layer": "Int64"})


def summary_document(result: Any, command: str = "stats") -> dict[str, Any]:
    return {
        **header(command),
        "model": result.model,
        "data": result.data,
        "settings": result.settings,
        "definitions": DEFINITIONS,
        "summary": result.summary,
    }


def write_stats_report(result: Any, out: Path, plots_on: bool = True) -> dict[str, Path]:
    """stats.csv, summary.json and (optionally) the plots, each written atomically. Returns the paths."""
    out = ensure_writable_dir(out)
    rows = result.rows()
    written = {
        "stats.csv": write_csv(out / "stats.csv", stats_frame(rows)),
        "summary.json": write_json(out / "summary.json", summary_document(result)),
    }
    if plots_on:
        written["layers.png"] = plots.layer_curves({result.model["name"]: rows}, out / "layers.png", title=result.model["name"])
        worst = result.summary.get("max_inf_norm_site")
        site = next((s for s in result.sites if s.site.name == worst), None)
        if site is not None:
            written["histogram.png"] = plots.histogram(
                site.stats.hist_edges, site.stats.hist_counts, out / "histogram.png", f"|x| at {worst}"
            )
    return written


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) < 1e5 else f"{value:.3g}"
    return str(value)


_SHORT = {"block_output": "block", "attn_output": "attn", "ffn_output": "ffn", "residual": "resid",
          "linear_input": "lin-in", "linear_output": "linear"}


def stats_table(result: Any) -> Table:
    """One row per layer; for each site kind the worst paper kurtosis / inf-norm of that layer; worst values in red."""
    rows = result.rows()
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None}) + ([None] if any(r["layer"] is None for r in rows) else [])
    table = Table(title=f"{result.model['name']}: outliers per layer (kurtosis / inf-norm, paper definitions)",
                  header_style="bold", caption="block = residual stream after the layer, resid = residual sum entering a norm")
    table.add_column("layer", justify="right")
    for kind in kinds:
        short = _SHORT.get(kind, kind)
        table.add_column(f"{short}\nkurt", justify="right")
        table.add_column(f"{short}\ninf", justify="right")
    worst_k = result.summary.get("max_kurtosis")
    worst_i = result.summary.get("max_inf_norm")
    for layer in layers:
        cells = ["-" if layer is None else str(layer)]
        for kind in kinds:
            sel = [r for r in rows if r["layer"] == layer and r["kind"] == kind]
            if not sel:
                cells += ["", ""]
                continue
            k = max(r["paper_kurtosis"] for r in sel)
            i = max(r["paper_inf_norm"] for r in sel)
            cells.append(f"[bold red]{_fmt(k)}[/]" if k == worst_k else _fmt(k))
            cells.append(f"[bold red]{_fmt(i)}[/]" if i == worst_i else _fmt(i))
        table.add_row(*cells)
    return table


def summary_table(result: Any) -> Table:
    s = result.summary
    table = Table(title="model summary", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("where")
    table.add_row("average kurtosis", _fmt(s["avg_kurtosis"]), f"over {s['sites']} sites")
    table.add_row("max kurtosis", _fmt(s["max_kurtosis"]), str(s["max_kurtosis_site"]))
    table.add_row("max inf-norm", _fmt(s["max_inf_norm"]), str(s["max_inf_norm_site"]))
    table.add_row("max inf-norm, block outputs", _fmt(s["max_inf_norm_block_output"]), "")
    table.add_row("global max |x|", _fmt(s["max_abs"]), str(s["max_abs_site"]))
    table.add_row("max fraction |x| > 6", _fmt(s["max_outlier_fraction"], 6), str(s["max_outlier_fraction_site"]))
    table.add_row("data", "", f"{result.data.get('description')}; {result.data.get('sequences')} seq, {result.data.get('tokens'):,} tokens" if result.data.get("tokens") else str(result.data.get("description")))
    return table
