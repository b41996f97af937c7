"""`compare --mitigations`: one table of post-training mitigations and architecture variants (Rich at 80
columns, mitigations.csv, mitigations.md). Takes plain rows (compare.mitigation_rows builds them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.table import Table

from outlier_probe.report.io import write_csv, write_text

COLUMNS = ["row", "kind", "float", "w8a8", "gap_closed", "avg_kurtosis", "max_inf_norm", "sink_rate"]
_HEADS = {"float": "float", "w8a8": "W8A8", "gap_closed": "gap\nclosed", "avg_kurtosis": "avg\nkurt",
          "max_inf_norm": "max\ninf-norm", "sink_rate": "sink\nrate"}
CAPTION = ("gap closed = (plain W8A8 loss - row's loss) / plain W8A8 loss, loss = degradation from the row's "
           "own float score; kurtosis / inf-norm: paper definitions over all sites of the float model quantized")


def num(value: Any) -> str:
    """Compact: at most 8 characters, exponent form for large values (1.92e4)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    v = float(value)
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if abs(v) >= 1e4:
        mant, exp = f"{v:.2e}".split("e")
        return f"{mant}e{int(exp)}"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"


def pct(value: Any) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * float(value):+.1f}%"


def _cells(r: dict[str, Any]) -> list[str]:
    return [num(r["float"]), num(r["w8a8"]), pct(r["gap_closed"]), num(r["avg_kurtosis"]), num(r["max_inf_norm"]),
            num(r["sink_rate"])]


def mitigation_table(rows: list[dict[str, Any]], metric: str) -> Table:
    table = Table(title=f"mitigations vs architecture variants ({metric})", caption=CAPTION)
    table.add_column("model / mitigation", overflow="fold", ratio=1)
    for key in COLUMNS[2:]:
        table.add_column(_HEADS[key], justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r["row"], *_cells(r))
    return table


def mitigation_markdown(rows: list[dict[str, Any]], metric: str, command: str = "") -> str:
    head = ["model / mitigation", "kind", f"float {metric}", f"W8A8 {metric}", "gap closed", "avg kurtosis",
            "max inf-norm", "sink rate"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * 6]
    lines += [f"| {r['row']} | {r['kind']} | " + " | ".join(_cells(r)) + " |" for r in rows]
    text = "\n".join(lines) + "\n\n" + CAPTION + ".\n"
    return text + (f"\nRegenerate: `{command}`\n" if command else "")


def write_mitigation_report(rows: list[dict[str, Any]], out: Path, metric: str, command: str = "") -> dict[str, Path]:
    import pandas as pd

    return {"mitigations.csv": write_csv(out / "mitigations.csv", pd.DataFrame(rows, columns=COLUMNS)),
            "mitigations.md": write_text(out / "mitigations.md", mitigation_markdown(rows, metric, command))}
