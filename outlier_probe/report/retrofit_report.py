"""`retrofit` outputs: retrofit.csv (before / after per twin and seed), curves.csv, curves.png, summary.md,
retrofit.json. Everything is rendered in memory first, then written; the CLI checked the folder before the run."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from outlier_probe.report.meta import header

CSV_FILE, CURVES_FILE, PLOT_FILE, SUMMARY_FILE, JSON_FILE = "retrofit.csv", "curves.csv", "curves.png", "summary.md", "retrofit.json"
OUTPUTS = (CSV_FILE, CURVES_FILE, PLOT_FILE, SUMMARY_FILE, JSON_FILE)
# (column, header, format) of the summary tables: one figure per cell, compact
TABLE = (("avg_kurtosis", "avg kurt", ".4g"), ("max_inf_norm", "max inf", ".4g"), ("w8a8_loss", "W8A8 loss", ".3g"),
         ("objective_metric", "objective", ".3g"), ("hidden_cosine", "hid cos", ".4f"), ("embedding_cosine", "emb cos", ".4f"))


def rows(result: Any) -> list[dict[str, Any]]:
    """One row for the original, then a start and an end row per twin and seed."""
    out = [{"twin": "original", "seed": None, "phase": "original", "step_s": math.nan, **result.original.row()}]
    for t in result.twins:
        for phase, m in (("start", t.before), ("end", t.after)):
            out.append({"twin": t.variant.value, "seed": t.seed, "phase": phase, "step_s": t.step_s if phase == "end" else math.nan,
                        "params": ";".join(f"{k}={v:g}" for k, v in t.params.items()), **m.row()})
    return out


def curve_rows(result: Any, tokens_per_step: int) -> list[dict[str, Any]]:
    return [{"run": f"{t.variant.value}-s{t.seed}", "twin": t.variant.value, "seed": t.seed, "tokens": r["step"] * tokens_per_step, **r}
            for t in result.twins for r in t.curve]


def spread(values: list[float]) -> str:
    """mean ± half-range over seeds (the seeds' spread), or the one value."""
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return "n/a"
    mean = statistics.fmean(vals)
    return f"{mean:.4g}" if len(vals) == 1 else f"{mean:.4g} ± {(max(vals) - min(vals)) / 2:.2g}"


def aggregate(result: Any) -> list[dict[str, Any]]:
    """Per twin: each measured figure at start and end, mean ± half-range over seeds."""
    out = []
    for variant in dict.fromkeys(t.variant for t in result.twins):
        twins = [t for t in result.twins if t.variant is variant]
        row: dict[str, Any] = {"twin": variant.value, "seeds": len(twins)}
        for key, _, _ in TABLE + (("sink_rate", "", ""), ("null_mass", "", ""), ("massive_ratio", "", "")):
            row[f"{key}_start"] = spread([getattr(t.before, key) for t in twins])
            row[f"{key}_end"] = spread([getattr(t.after, key) for t in twins])
        row["step_s"] = spread([t.step_s for t in twins])
        out.append(row)
    return out


def markdown(result: Any, command: str) -> str:
    o = result.original
    lines = [f"# retrofit: {result.model['name']} ({result.model['family']}, objective {result.objective.value})", "",
             f"Command: `{command}`", "",
             f"Original: avg kurtosis {o.avg_kurtosis:.4g}, max inf-norm {o.max_inf_norm:.4g} at {o.max_inf_norm_site} "
             f"(top channels {o.top_channels}), W8A8 loss {o.w8a8_loss:.3g} ({o.metric}).", "", *_head_lines(result),
             "Start and end of each twin, mean ± half-range over seeds:", "",
             "| twin | phase | " + " | ".join(h for _, h, _ in TABLE) + " |", "|---|---|" + "---|" * len(TABLE)]
    for agg in aggregate(result):
        for phase in ("start", "end"):
            lines.append(f"| {agg['twin']} | {phase} | " + " | ".join(agg[f"{k}_{phase}"] for k, _, _ in TABLE) + " |")
    lines += ["", "Attention (start → end): sink rate, null mass (softmax1's unused mass), largest massive-activation ratio:", "",
              "| twin | sink start | sink end | null start | null end | massive start | massive end | s/step |", "|---|" + "---|" * 7]
    for agg in aggregate(result):
        lines.append(f"| {agg['twin']} | {agg['sink_rate_start']} | {agg['sink_rate_end']} | {agg['null_mass_start']} | "
                     f"{agg['null_mass_end']} | {agg['massive_ratio_start']} | {agg['massive_ratio_end']} | {agg['step_s']} |")
    return "\n".join(lines) + "\n"


def _head_lines(result: Any) -> list[str]:
    h = getattr(result, "head", None) or {}
    if not h:
        return []
    return [f"MLM head: {h['head_steps']} steps on the frozen backbone (lr {h['head_lr']:g}); held-out MLM perplexity "
            f"{h['mlm_perplexity_untrained_head']:.4g} untrained -> {h['mlm_perplexity_trained_head']:.4g} trained "
            "(every twin and the control start from this head).", ""]


def write(result: Any, out: Path, command: str) -> list[Path]:
    """Write every output (each atomically): the CSVs, the curve plot, summary.md and retrofit.json."""
    import pandas as pd

    from outlier_probe.report.io import write_csv, write_json, write_text
    from outlier_probe.report.plots import retrofit_curves

    s = result.settings
    curves = curve_rows(result, s["batch_size"] * s["seq_len"])
    write_csv(out / CSV_FILE, pd.DataFrame(rows(result)))
    write_csv(out / CURVES_FILE, pd.DataFrame(curves))
    retrofit_curves(curves, out / PLOT_FILE, title=f"{result.model['name']} retrofit ({result.objective.value}): outliers over every "
                    f"site group during fine-tuning (probe batch every {s.get('eval_every', '?')} steps)")
    write_text(out / SUMMARY_FILE, markdown(result, command))
    write_json(out / JSON_FILE, {**header("retrofit"), "command_line": command, "settings": s, "model": result.model,
                                 "data": result.data, "head": getattr(result, "head", {}), "aggregate": aggregate(result),
                                 "checkpoints": {f"{t.variant.value}-s{t.seed}": t.saved for t in result.twins if getattr(t, "saved", None)}})
    return [out / f for f in OUTPUTS]


def retrofit_table(result: Any) -> Any:
    """The terminal table: end-of-fine-tuning figures per twin, mean ± half-range over seeds (80 columns)."""
    from rich.table import Table

    t = Table(title="retrofit: end of fine-tuning (mean ± half-range over seeds)")
    for name in ("twin", "avg kurt", "max inf", "W8A8 loss", "emb cos"):
        t.add_column(name, overflow="fold")
    for a in aggregate(result):
        t.add_row(a["twin"], a["avg_kurtosis_end"], a["max_inf_norm_end"], a["w8a8_loss_end"], a["embedding_cosine_end"])
    return t
