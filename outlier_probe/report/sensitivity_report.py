"""Rendering and writing of `sensitivity` results: Rich tables, sensitivity.csv, summary.json, the bar
plot, plan.json and the llm-compressor style recipe.yaml."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from outlier_probe.diagnose.divergence import DIVERGENCE_NOTES
from outlier_probe.quant.keep import PLAN_KIND
from outlier_probe.report.io import ensure_writable_dir, write_csv, write_figure, write_json, write_text
from outlier_probe.report.meta import header

GROUP_COLUMNS = ["rank", "group", "points", "alone_metric", "alone_divergence", "all_but_metric", "all_but_divergence"]


def num(value: float) -> str:
    """Compact number for 80-column tables: 4 significant digits, exponent form when large or tiny."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = f"{value:.2e}" if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3) else f"{value:.4g}"
    return text.replace("e+0", "e").replace("e-0", "e-").replace("e+", "e")


def group_rows(result: Any) -> list[dict[str, Any]]:
    return [{"rank": g.rank, "group": g.name, "points": len(g.points),
             "alone_metric": g.only.value, "alone_divergence": g.only.divergence,
             "all_but_metric": g.all_but.value, "all_but_divergence": g.all_but.divergence} for g in result.groups]


def plan_document(result: Any) -> dict[str, Any] | None:
    plan = result.plan
    if plan is None:
        return None
    final = plan.final
    return {
        "kind": PLAN_KIND,
        "model": result.model["source"],
        "recipe": result.settings["recipe"],
        "metric": result.metric.value,
        "budget": plan.budget.describe(),
        "met": plan.met,
        "float": result.float_value,
        "steps": [{"step": s.step, "kept_groups": list(s.kept), "metric": s.value, result.divergence: s.divergence,
                   "loss": s.loss, "meets_budget": s.meets} for s in plan.steps],
        "kept_groups": list(final.kept),
        "final_metric": final.value,
        "keep_float_points": result.keep_points(final.kept),
        "ignore": result.ignore_list(final.kept),
        "verify": "outlier-probe quantize CKPT --keep-float plan.json with the same recipe and data options "
                  "reproduces final_metric bit for bit",
    }


def sensitivity_document(result: Any) -> dict[str, Any]:
    return {
        **header("sensitivity"),
        "model": result.model,
        "data": result.data,
        "calibration": result.calibration,
        "settings": result.settings,
        "metric": result.metric.value,
        "metric_note": result.metric_note,
        "definitions": {
            "divergence": DIVERGENCE_NOTES[result.divergence],
            "alone": "only this group quantized, every other quantization point in float",
            "all_but": "every quantization point quantized except this group's",
            "rank": "1 = largest divergence when quantized alone",
        },
        "float": result.float_value,
        "quantized": {"metric": result.quantized.value, result.divergence: result.quantized.divergence},
        "groups": group_rows(result),
        "plan": plan_document(result),
        "cost": {"quantized_runs": result.runs, "groups": len(result.groups), "seconds": result.seconds},
    }


def recipe_yaml(result: Any) -> str:
    doc = plan_document(result)
    assert doc is not None
    lines = [f"# outlier-probe sensitivity plan for {doc['model']}: {doc['budget']} budget on {doc['metric']}",
             f"# kept in float: {', '.join(doc['kept_groups']) or 'nothing'}; paste under your quantization modifier",
             "ignore:"]
    if doc["ignore"]:
        lines += [f'  - "{name}"' for name in doc["ignore"]]
    else:
        lines[-1] = "ignore: []"
    return "\n".join(lines) + "\n"


def bar_plot(result: Any, out: Path) -> Path:
    from outlier_probe.report.plots import _pyplot

    plt = _pyplot()
    groups = list(result.groups)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(groups) + 2), 4))
    x = range(len(groups))
    ax.bar([i - 0.2 for i in x], [max(g.only.divergence, 1e-12) for g in groups], 0.4, label="only this group quantized")
    ax.bar([i + 0.2 for i in x], [max(g.all_but.divergence, 1e-12) for g in groups], 0.4, label="all but this group")
    ax.set_xticks(list(x))
    ax.set_xticklabels([g.name for g in groups], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel(DIVERGENCE_NOTES[result.divergence].split(" of ")[0].split(",")[0])
    ax.set_title(f"{result.model['name']}: W{result.settings['recipe']['w_bits']}A{result.settings['recipe']['a_bits']} sensitivity (ranked)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.32), ncol=2, frameon=False)
    fig.tight_layout()
    try:
        return write_figure(out, fig, dpi=110)
    finally:
        plt.close(fig)


def write_sensitivity_report(result: Any, out: Path) -> dict[str, Path]:
    import pandas as pd

    out = ensure_writable_dir(out)
    written = {
        "sensitivity.csv": write_csv(out / "sensitivity.csv", pd.DataFrame(group_rows(result), columns=GROUP_COLUMNS)),
        "sensitivity.png": bar_plot(result, out / "sensitivity.png"),
    }
    if result.plan is not None:
        written["plan.json"] = write_json(out / "plan.json", plan_document(result))
        written["recipe.yaml"] = write_text(out / "recipe.yaml", recipe_yaml(result))
    written["summary.json"] = write_json(out / "summary.json", sensitivity_document(result))
    return written


def groups_table(result: Any, limit: int = 20) -> Table:
    d = result.divergence
    table = Table(title=f"{result.model['name']}: groups by damage ({result.metric.value}, float {num(result.float_value)}, "
                        f"all quantized {num(result.quantized.value)})")
    table.add_column("#", justify="right")
    table.add_column("group", overflow="fold", min_width=10)
    for col in ("alone", f"alone {d}", "all but", f"all but {d}"):
        table.add_column(col, justify="right", no_wrap=True)
    for g in result.groups[:limit]:
        table.add_row(str(g.rank), g.name, num(g.only.value), num(g.only.divergence),
                      num(g.all_but.value), num(g.all_but.divergence))
    return table


def plan_table(result: Any) -> Table:
    plan = result.plan
    verdict = "met" if plan.met else "NOT met (best step shown as the plan)"
    table = Table(title=f"plan: budget {plan.budget.describe()}: {verdict}")
    table.add_column("step", justify="right")
    table.add_column("also in float", overflow="fold", min_width=12)
    for col in (result.metric.value.replace("_", " "), "loss", result.divergence, "ok"):
        table.add_column(col, justify="right", no_wrap=True)
    for s in plan.steps:
        mark = "*" if s.step == plan.final.step else ""
        loss = f"{num(100 * s.loss)}%" if plan.budget.relative and math.isfinite(s.loss) else num(s.loss)
        table.add_row(f"{s.step}{mark}", f"+{s.kept[-1]}" if s.kept else "(all quantized)", num(s.value), loss, num(s.divergence),
                      "yes" if s.meets else "no")
    return table
