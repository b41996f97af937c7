"""Rendering and writing of `stats` results: Rich table, stats.csv, summary.json, PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from outlier_probe.report import plots
from outlier_probe.report.io import ensure_writable_dir, write_csv, write_json
from outlier_probe.report.meta import header
from outlier_probe.report.numbers import compact
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


SHORT_KIND = {"block_output": "block", "attn_output": "attn", "ffn_output": "ffn", "residual": "resid",
              "linear_input": "lin-in", "linear_output": "linear"}  # column names that fit 80 columns
_METRICS = (("paper_kurtosis", "kurtosis", "max_kurtosis"), ("paper_inf_norm", "inf-norm", "max_inf_norm"))
CAPTION = "worst site of each kind per layer; block: residual stream after the layer; resid: residual sum into a norm"


def layer_tables(result: Any) -> list[Table]:
    """One table per metric (paper kurtosis, paper inf-norm): a row per layer, a column per site kind.

    Each cell is the worst site of that kind in that layer; the model's worst value is in red. One
    metric per table keeps every column readable at 80 columns, whatever the number of site kinds.
    """
    rows = result.rows()
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    layers = sorted({r["layer"] for r in rows if r["layer"] is not None}) + ([None] if any(r["layer"] is None for r in rows) else [])
    tables = []
    for column, label, worst_key in _METRICS:
        worst = result.summary.get(worst_key)
        table = Table(title=f"{result.model['name']}: {label} per layer (paper definition)", header_style="bold",
                      caption=CAPTION if column == _METRICS[-1][0] else None)
        table.add_column("layer", justify="right")
        for kind in kinds:
            table.add_column(SHORT_KIND.get(kind, kind), justify="right", overflow="fold")
        for layer in layers:
            cells = ["-" if layer is None else str(layer)]
            for kind in kinds:
                values = [r[column] for r in rows if r["layer"] == layer and r["kind"] == kind]
                value = max(values) if values else None
                text = compact(value) if values else ""
                cells.append(f"[bold red]{text}[/]" if values and value == worst else text)
            table.add_row(*cells)
        tables.append(table)
    return tables


def summary_table(result: Any) -> Table:
    s = result.summary
    table = Table(title="model summary", show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("where", overflow="fold")  # site names may wrap, numbers never
    table.add_row("average kurtosis", compact(s["avg_kurtosis"]), f"over {s['sites']} sites")
    table.add_row("max kurtosis", compact(s["max_kurtosis"]), str(s["max_kurtosis_site"]))
    table.add_row("max inf-norm", compact(s["max_inf_norm"]), str(s["max_inf_norm_site"]))
    table.add_row("max inf-norm (blocks)", compact(s["max_inf_norm_block_output"]), "block outputs")
    table.add_row("global max |x|", compact(s["max_abs"]), str(s["max_abs_site"]))
    table.add_row("max fraction |x| > 6", compact(s["max_outlier_fraction"]), str(s["max_outlier_fraction_site"]))
    data = result.data
    where = f"{data.get('description')}; {data.get('sequences')} seq, {data.get('tokens'):,} tokens" if data.get("tokens") else str(data.get("description"))
    table.add_row("data", "", where)
    return table
