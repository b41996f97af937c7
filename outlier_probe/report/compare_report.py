"""Rendering and writing of `compare` results: Rich table, compare.csv / .json / .md, layers.png, per-model reports.

Layout of the report folder:

    compare.csv  compare.json  compare.md  layers.png
    <name>/stats/{stats.csv,summary.json}          (what `stats` writes; `gate --report <out>/<name>` reads it)
    <name>/quantize/{quantize.csv,sites.csv,summary.json}   (unless --no-quantize)
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from outlier_probe.compare_types import DEFINITIONS as COMPARE_DEFINITIONS
from outlier_probe.compare_types import ATTENTION_FIGURES, FIGURES, QUANT_FIGURES, CompareResult
from outlier_probe.report import plots
from outlier_probe.report.io import ensure_writable_dir, write_csv, write_json, write_text
from outlier_probe.report.meta import header
from outlier_probe.report.numbers import SCI_ABOVE, SCI_BELOW, compact
from outlier_probe.report.numbers import percent as as_percent
from outlier_probe.report.quant_report import write_quantize_report
from outlier_probe.report.stats_report import write_stats_report
from outlier_probe.stats.summary import DEFINITIONS as STATS_DEFINITIONS

COLUMNS = ["name", "source", "attention", "family", "metric", "higher_is_better", *FIGURES, *ATTENTION_FIGURES,
           *(f"{f}_vs_baseline" for f in (*FIGURES, *ATTENTION_FIGURES))]

# (figure, header) of the table; the metric columns are dropped when nothing was quantized
_TABLE = (
    ("float", "FP {metric}"),
    ("quantized", "W8A8 {metric}"),
    ("degradation", "degradation"),
    ("degradation_rel", "degradation %"),
    ("avg_kurtosis", "avg kurtosis"),
    ("max_kurtosis", "max kurtosis"),
    ("max_inf_norm_block_output", "max inf-norm"),
    ("max_inf_norm", "max inf-norm (all sites)"),
    ("sink_rate", "sink rate"),
    ("null_mass", "null mass"),
    ("massive_ratio", "massive x median"),
)
CAPTION = ("kurtosis / inf-norm: paper definitions; max inf-norm = block outputs (as in the papers); "
           "(x%) = change vs the first model")


def _fmt(value: Any, signed: bool = False, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if percent:
        return as_percent(value)
    if value != 0 and not SCI_BELOW <= abs(value) < SCI_ABOVE:
        return compact(value, signed=signed)  # 4.03e4, not 4.028e+04: the table stays readable at 80 columns
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def cell(row: dict[str, Any], figure: str, baseline: bool, sep: str = " ") -> str:
    """`13.3 (-85.7%)`: the figure and, except for the baseline row, its relative change vs the baseline."""
    text = _fmt(row[figure], signed=figure == "degradation", percent=figure == "degradation_rel")
    rel = row[f"{figure}_vs_baseline"]
    if baseline or text == "-" or rel is None or math.isnan(rel):
        return text
    pct = 100 * rel
    if abs(pct) >= SCI_ABOVE:
        return f"{text}{sep}({as_percent(rel)})"
    return f"{text}{sep}({pct:+.1f}%)" if abs(pct) < 100 else f"{text}{sep}({pct:+.0f}%)"


_SHORT_METRIC = {"perplexity": "ppl", "mlm_perplexity": "MLM ppl", "accuracy": "acc", "hidden_cosine": "cos"}
_SHORT_HEAD = {"degradation": "Δ", "degradation_rel": "Δ %", "avg_kurtosis": "avg\nkurt", "max_kurtosis": "max\nkurt",
               "max_inf_norm_block_output": "max\ninf-norm", "max_inf_norm": "inf-norm\nall sites",
               "sink_rate": "sink\nrate", "null_mass": "null\nmass", "massive_ratio": "massive\nx med"}


def _columns(result: CompareResult, short: bool = False) -> list[tuple[str, str]]:
    """(figure, header) of the shown columns; `short`: the terminal's narrower headers."""
    quantized = all(r.quant is not None for r in result.runs)
    metric = result.rows()[0]["metric"] or "metric"
    if short:
        metric = _SHORT_METRIC.get(metric, metric)
        heads = [(f, _SHORT_HEAD.get(f, h.replace(" ", "\n"))) for f, h in _TABLE]
    else:
        heads = list(_TABLE)
    heads = [(f, h) for f, h in heads if f not in ATTENTION_FIGURES or all(r.attention is not None for r in result.runs)]
    return [(f, h.format(metric=metric)) for f, h in heads if quantized or f not in QUANT_FIGURES]


def compare_table(result: CompareResult, width: int | None = None) -> Table:
    """The terminal table: the same cells as compare.md, the change vs the baseline under each figure.

    One row per model; when that is wider than `width` (the terminal), one column per model instead.
    """
    rows = result.rows()
    columns = _columns(result, short=True)
    title = f"{len(rows)} models vs {rows[0]['name']} (baseline)"
    cells = [[cell(row, f, i == 0, sep="\n") for f, _h in columns] for i, row in enumerate(rows)]
    labels = [f"{row['name']}\n[dim]{row['attention']}[/]" for row in rows]
    longest = [max(len(line) for c in col for line in c.split("\n")) for col in zip(*cells)]
    needed = 12 + sum(max(w, 6) + 2 for w in longest)
    table = Table(title=title, caption=CAPTION, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    if width is None or needed <= width:
        table.add_column("model", overflow="fold", min_width=10)
        for _f, head in columns:
            table.add_column(head, justify="right")
        for label, row_cells in zip(labels, cells):
            table.add_row(label, *row_cells)
        return table
    table.add_column("figure")
    for label in labels:
        table.add_column(label, justify="right", overflow="fold")
    for j, (_f, head) in enumerate(columns):
        table.add_row(head.replace("\n", " "), *(" ".join(c[j].split("\n")) for c in cells))
    return table


def compare_markdown(result: CompareResult, doc: dict[str, Any] | None = None) -> str:
    rows = result.rows()
    columns = _columns(result)
    heads = ["model", "attention", *(h for _f, h in columns)]
    lines = [
        f"# outlier-probe compare: {', '.join(r['name'] for r in rows)}",
        "",
        "| " + " | ".join(heads) + " |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * len(columns)) + " |",
    ]
    for i, row in enumerate(rows):
        cells = [row["name"], row["attention"], *(cell(row, f, i == 0) for f, _h in columns)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", CAPTION + ".", ""]
    doc = doc or compare_document(result)
    lines += ["Regenerate with:", "", "```bash", command_line(result), "```", ""]
    lines += ["Definitions:", ""] + [f"- `{k}`: {v}" for k, v in doc["definitions"].items()]
    if result.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in result.notes]
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    data = result.runs[0].stats.data
    lines += ["", f"Data: {data.get('description')}; {data.get('sequences')} sequences, {data.get('tokens')} tokens.",
              f"Versions: {versions}. Created {doc['created']}.", ""]
    return "\n".join(lines)


def command_line(result: CompareResult) -> str:
    """The `outlier-probe compare` command that reproduces these settings."""
    s = result.settings
    data, recipe, load = s["data"], s["recipe"], s["entries"][0]["load"]
    parts = ["outlier-probe", "compare", *(r.entry.spec for r in result.runs)]
    if data["path"]:
        parts += ["--data", data["path"], "--include-files", data["include"]]
    if data["dataset"]:
        parts += ["--dataset", data["dataset"]]
    parts += ["--samples", data["samples"], "--seq-len", data["seq_len"], "--batch-size", data["batch_size"],
              "--seed", data["seed"]]
    if s["quantize"]:
        parts += ["--recipe", recipe["recipe"], "--w-bits", recipe["w_bits"], "--a-bits", recipe["a_bits"],
                  "--a-estimator", recipe["a_estimator"], "--w-estimator", recipe["w_estimator"],
                  "--percentile", recipe["percentile"], "--calib-batches", recipe["calib_batches"]]
        if recipe["per_channel"]:
            parts.append("--per-channel")
        if s["metric"]:
            parts += ["--metric", s["metric"]]
    else:
        parts.append("--no-quantize")
    if not s.get("attention", True):
        parts.append("--no-attention")
    if s.get("mitigation_table"):
        parts.append("--mitigations")
        given = s.get("mitigations") or []
        alphas = [str(m["smoothquant"]) for m in given if m.get("smoothquant") is not None]
        parts += ["--smoothquant", ",".join(alphas)] if alphas else []
        parts += ["--rotate", "hadamard"] if any(m.get("rotate") for m in given) else []
        parts += ["--a-granularity", "per-token"] if any(m.get("a_granularity") == "per-token" for m in given) else []
        for label, keep in s.get("keep_float") or []:
            parts += ["--keep-float", keep["source"] if label == keep["source"] else f"{label}={keep['source']}"]
    parts += ["--dtype", load["dtype"], "--device", load["device"]]
    if load["trust_remote_code"]:
        parts.append("--trust-remote-code")
    if load["tokenizer"]:
        parts += ["--tokenizer", load["tokenizer"]]
    return " ".join(shlex.quote(str(p)) for p in parts)


def compare_document(result: CompareResult) -> dict[str, Any]:
    notes = {r.quant.rows()[0]["metric"]: r.quant.metric_note for r in result.runs if r.quant is not None}
    return _finite_or_none({
        **header("compare"),
        "baseline": result.runs[0].entry.name,
        "command_line": command_line(result),
        "settings": result.settings,
        "definitions": {**STATS_DEFINITIONS, **COMPARE_DEFINITIONS, **{f"metric:{k}": v for k, v in notes.items()}},
        "notes": result.notes,
        "rows": result.rows(),
        "models": [
            {
                "name": r.entry.name,
                "spec": r.entry.spec,
                "model": r.stats.model,
                "data": r.stats.data,
                "summary": r.stats.summary,
                "quantize": None if r.quant is None else {"run": r.quant.rows()[0], "calibration": r.quant.calibration,
                                                          "site_summary": r.quant.site_summary},
                "reports": {"stats": f"{r.entry.name}/stats", "quantize": f"{r.entry.name}/quantize" if r.quant else None},
            }
            for r in result.runs
        ],
    })


def _finite_or_none(obj: Any) -> Any:
    """NaN / inf -> null, so compare.json is strict JSON (NaN marks a figure that was not measured)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def _plot_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The block outputs (the papers' per-layer figure); every site when the family has none."""
    blocks = [r for r in rows if r["kind"] == "block_output"]
    return blocks or rows


def write_compare_report(result: CompareResult, out: Path, plots_on: bool = True) -> dict[str, Path]:
    """Per-model stats / quantize folders, then layers.png, compare.csv, compare.json, compare.md (each atomic)."""
    import pandas as pd

    out = ensure_writable_dir(out)
    written: dict[str, Path] = {}
    for run in result.runs:
        folder = out / run.entry.name
        for name, path in write_stats_report(run.stats, ensure_writable_dir(folder / "stats"), plots_on=plots_on).items():
            written[f"{run.entry.name}/stats/{name}"] = path
        if run.quant is not None:
            for name, path in write_quantize_report(run.quant, folder / "quantize").items():
                written[f"{run.entry.name}/quantize/{name}"] = path
        if run.attention is not None:
            from outlier_probe.report.attention_report import write_attention_report

            for name, path in write_attention_report(run.attention, folder / "attention").items():
                written[f"{run.entry.name}/attention/{name}"] = path
    if plots_on:
        curves = {r.entry.name: _plot_rows(r.stats.rows()) for r in result.runs}
        written["layers.png"] = plots.layer_curves(curves, out / "layers.png", title="outliers by layer, all models")
    doc = compare_document(result)
    written["compare.csv"] = write_csv(out / "compare.csv", pd.DataFrame(result.rows(), columns=COLUMNS))
    written["compare.json"] = write_json(out / "compare.json", doc)
    written["compare.md"] = write_text(out / "compare.md", compare_markdown(result, doc))
    return written
