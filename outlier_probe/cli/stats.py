"""`outlier-probe stats CKPT`: per-layer outlier statistics."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console

from outlier_probe.arch import parse_site_kinds
from outlier_probe.cli import options as o
from outlier_probe.cli.app import app, guarded
from outlier_probe.cli.progress import batch_progress
from outlier_probe.distributed import is_main
from outlier_probe.config import DEFAULT_SITE_KINDS, Device, DType, ObserverConfig, SiteSelection, StatsConfig


@app.command("stats")
@guarded
def stats(
    checkpoint: o.Checkpoint = "minilm",
    data: o.DataPath = None,
    dataset: o.Dataset = None,
    include_files: o.Include = "*.txt",
    samples: Annotated[Optional[int], typer.Option("--samples", help="Sequences (images) to evaluate, default 32; stanhop checkpoints: test windows, default every one.")] = None,
    seq_len: o.SeqLen = 128,
    batch_size: o.BatchSize = 8,
    seed: o.Seed = 0,
    sites: Annotated[Optional[list[str]], typer.Option("--sites", help="Site kinds, comma-separated: block_output, attn_output, ffn_output, norm, residual, linear_input, linear_output, all.")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only module names matching this fnmatch pattern (repeatable).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Skip module names matching this fnmatch pattern (repeatable).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Outlier channel ids kept per site.")] = 8,
    dtype: o.Dtype = DType.float32,
    device: o.DeviceOpt = Device.cpu,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    trust_remote_code: o.TrustRemote = False,
    attention: o.Attention = None,
    tokenizer: o.Tokenizer = None,
    out: o.Out = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    quiet: o.Quiet = False,
    as_json: o.Json = False,
) -> None:
    """Per-layer outlier statistics: kurtosis, inf-norm, outlier fractions and channels (stats.csv, summary.json, plots)."""
    from outlier_probe.report.stats_report import layer_tables, summary_document, summary_table, write_stats_report
    from outlier_probe.report.io import all_or_nothing, check_out_dir
    from outlier_probe.stats.run import run_stats

    cfg = StatsConfig(
        load=o.load_config(checkpoint, dtype, device, trust_remote_code, attention, tokenizer, device_map, max_memory, offload_folder),
        data=o.data_config(data, dataset, include_files, 32 if samples is None else samples, seq_len, batch_size, seed),
        sites=SiteSelection(kinds=parse_site_kinds(sites) if sites else DEFAULT_SITE_KINDS,
                            include=tuple(include or ()), exclude=tuple(exclude or ())),
        observer=ObserverConfig(top_k=top_k),
        out=o.default_out(checkpoint, out),
        plots=not no_plots,
    )
    from outlier_probe.forecast.run import is_forecaster, run_forecast_stats

    check_out_dir(cfg.out)  # fail before the model loads; create nothing until results exist
    quiet = quiet or as_json or not is_main()
    console = Console(stderr=True, quiet=quiet)
    with batch_progress(console, "measuring") as progress:
        result = run_forecast_stats(cfg, samples, progress) if is_forecaster(checkpoint) else run_stats(cfg, progress=progress)
    if not is_main():  # a data-parallel run: rank 0 alone writes and prints
        return
    with all_or_nothing():  # every report or none (errors, Ctrl-C, SIGTERM)
        written = write_stats_report(result, cfg.out, plots_on=cfg.plots)
    if as_json:
        typer.echo(json.dumps(summary_document(result), indent=2, default=str))
        return
    if not quiet:
        out_console = Console()
        for table in layer_tables(result):
            out_console.print(table)
        out_console.print(summary_table(result))
        out_console.print(f"reports: {', '.join(str(p) for p in written.values())}")
