"""`outlier-probe train --arch stanhop`: a forecaster on an ETT-shaped CSV (called by cli/train.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from outlier_probe.errors import UsageError


def train_stanhop(*, size: str | None, layers: int | None, hidden: int | None, heads: int | None, attention: str,
                  data: Path | None, in_len: int | None, horizon: int, seg_len: int | None, epochs: int | None,
                  patience: int | None, batch_size: int | None, lr: float | None, grad_clip: float | None, seed: int,
                  device: Any, threads: int | None, out: Path | None, overwrite: bool, quiet: bool, as_json: bool) -> None:
    from outlier_probe.forecast.hopfield import parse_variant
    from outlier_probe.forecast.reproduce import recipe_for
    from outlier_probe.train.forecasting import ForecastTrainConfig, train_forecaster
    from outlier_probe.report.io import check_out_dir

    variant = parse_variant(attention)
    if data is None:
        raise UsageError("--arch stanhop needs --data FILE.csv (a date column and numeric columns, e.g. ETTh1.csv)")
    if horizon < 1 or (in_len is not None and in_len < 1):
        raise UsageError(f"--horizon and --in-len must be >= 1, got {horizon} and {in_len}")
    model, recipe = recipe_for(size, horizon)
    over = {k: v for k, v in dict(in_len=in_len, seg_len=seg_len, e_layers=layers, d_model=hidden, n_heads=heads).items() if v is not None}
    model = replace(model, attention=variant, **over)
    recipe.update({k: v for k, v in dict(epochs=epochs, patience=patience, batch_size=batch_size, lr=lr,
                                         grad_clip=grad_clip, threads=threads).items() if v is not None})
    out = out or Path("runs") / f"stanhop-{size or 'paper'}-{variant.value.replace('+', '-')}"
    check_out_dir(out)
    if (out / "config.json").exists() and not overwrite:
        raise UsageError(f"{out} already holds a checkpoint; pass --overwrite to replace it, or another --out")
    cfg = ForecastTrainConfig(data=data, model=model, seed=seed, out=out, device=device.resolve(), **recipe)
    quiet = quiet or as_json
    console = Console(stderr=True, quiet=quiet)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), console=console, disable=quiet, transient=True) as bar:
        task = bar.add_task(f"training stanhop {variant.value}", total=1)
        result = train_forecaster(cfg, progress=lambda d, t, label: bar.update(task, completed=d, total=t, description=label))
    summary = {"out": str(result.out), "epochs": len(result.rows), "best_epoch": result.best_epoch,
               "best_val_mse": result.best_val_mse, "stopped_by": result.stopped_by, "seconds": round(result.seconds, 1)}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    elif not quiet:
        table = Table(title=f"train: stanhop {variant.value}")
        table.add_column("")
        table.add_column("value", justify="right")
        for key, value in summary.items():
            table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
        Console().print(table)
