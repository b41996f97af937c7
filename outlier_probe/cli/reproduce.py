"""`outlier-probe reproduce --scale cpu-small|gpu`: train twins, compare them, write a report folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from outlier_probe.cli import options as o
from outlier_probe.cli.app import app, guarded
from outlier_probe.config import AttentionVariant
from outlier_probe.errors import UsageError
from outlier_probe.models import Arch


@app.command("reproduce")
@guarded
def reproduce(
    scale: Annotated[str, typer.Option("--scale", help="smoke (seconds), cpu-small (< 1 h on 2 cores) or gpu (~10 min on one GPU).")] = "cpu-small",
    out: Annotated[Optional[Path], typer.Option("--out", help="Report folder (default: reports/reproduction-<scale>/).")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Text corpus file or folder (default by scale).")] = None,
    image_data: Annotated[Optional[Path], typer.Option("--image-data", help="(Fashion-)MNIST idx folder for the ViT family.")] = None,
    family: Annotated[Optional[list[Arch]], typer.Option("--family", help="Only these families (repeatable).")] = None,
    variant: Annotated[Optional[list[AttentionVariant]], typer.Option("--variant", help="Variants to train (softmax is always the baseline): softmax1, clipped, gated, softpick, sigmoid-gate, sink; default: the first four (gpu: softmax and softmax1).")] = None,
    time_scale: Annotated[float, typer.Option("--time-scale", help="Multiply every training budget.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    report_only: Annotated[bool, typer.Option("--report-only", help="stanhop presets: write the report from the runs already finished; train nothing.")] = False,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="stanhop-cpu (Table 1 of the OutEffHop paper on ETTh1: 6 variants x 3 seeds, < 1 h on 2 cores) or stanhop-paper (the paper's configuration, GPU scale); --data is the ETTh1 CSV.")] = None,
    jobs: Annotated[Optional[int], typer.Option("--jobs", min=1, help="stanhop presets: train the runs in N processes, one thread each (default: min(2, CPU cores) on CPU, 1 on GPU); results do not depend on N.")] = None,
) -> None:
    """Train vanilla / softmax1 / clipped / gated twins per family, compare them, and write README.md with tables and plots."""
    if preset is not None:
        from outlier_probe.forecast.reproduce import ForecastReproduceConfig, run_forecast_reproduction

        device = "cuda" if preset == "stanhop-paper" and _cuda() else "cpu"
        jobs = jobs or (1 if device == "cuda" else min(2, len(os.sched_getaffinity(0))))
        fcfg = ForecastReproduceConfig(preset=preset, data=data, out=out or Path(f"reports/reproduction-{preset}"),
                                       device=device, report_only=report_only, jobs=jobs)
        console = Console(stderr=True)
        run_forecast_reproduction(fcfg, log=lambda msg: console.print(f"[dim]{msg}[/]"))
        Console().print(f"report: {fcfg.out / 'README.md'}")
        return
    if jobs is not None:
        raise UsageError("--jobs applies to --preset stanhop-cpu / stanhop-paper only")
    from outlier_probe.reproduce import ReproduceConfig, run_reproduction

    variants = tuple(dict.fromkeys([AttentionVariant.softmax, *variant])) if variant else None  # None: the scale's default
    cfg = ReproduceConfig(scale=scale, out=out or Path(f"reports/reproduction-{scale}"), data=data, image_data=image_data,
                          families=tuple(family) if family else None, variants=variants, seed=seed, time_scale=time_scale,
                          placement=o.placement(device_map, max_memory, offload_folder))
    console = Console(stderr=True)
    run_reproduction(cfg, log=lambda msg: console.print(f"[dim]{msg}[/]"))
    Console().print(f"report: {cfg.out / 'README.md'}")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
