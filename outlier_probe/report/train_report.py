"""Rendering of a `train` run's summary: the Rich table printed at the end of the run."""

from __future__ import annotations

from typing import Any, Mapping

from rich.table import Table

from outlier_probe.report.numbers import compact


def train_table(run: str, summary: Mapping[str, Any]) -> Table:
    """One row per figure of the summary (out folder, steps, losses, outliers, throughput)."""
    table = Table(title=f"train: {run}")
    table.add_column("")
    table.add_column("value", justify="right", overflow="fold")  # the out folder may wrap; numbers fit
    for key, value in summary.items():
        if isinstance(value, float):
            text = f"{value:,.0f}" if key == "tokens_per_s" and value < 1e7 else compact(value)
        else:
            text = "-" if value is None else str(value)
        table.add_row(key, text)
    return table
