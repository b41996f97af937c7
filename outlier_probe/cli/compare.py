"""`outlier-probe compare A B [C ...]`: a vanilla model vs its outlier-efficient twins, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from outlier_probe.cli import options as o
from outlier_probe.cli.app import app, guarded
from outlier_probe.cli.progress import batch_progress
from outlier_probe.distributed import is_main
from outlier_probe.config import Device, DType
from outlier_probe.errors import UsageError

Checkpoints = Annotated[list[str], typer.Argument(
    help="Two or more checkpoints, the first is the baseline. Each is [NAME=]PATH[@VARIANT]: PATH as for `stats`; "
         "@VARIANT (softmax, softmax1, clipped, gated, softpick, sigmoid-gate, sink) overrides the attention variant, e.g. ckpt/@softmax1; "
         "NAME= sets the display and sub-folder name. The same PATH may appear twice with different variants "
         "(the names then get the variant as suffix).",
    metavar="CHECKPOINT")]


def default_out(names: list[str]) -> Path:
    return Path("reports") / ("compare-" + "-vs-".join(names))[:120]


@app.command("compare")
@guarded
def compare(
    checkpoints: Checkpoints,
    recipe: Annotated[str, typer.Option("--recipe", help="paper (W8A8 of the papers) or linear (Linear weights+inputs only); one for all models.")] = "paper",
    bits: o.Bits = None,
    w_bits: o.WBits = None,
    a_bits: o.ABits = None,
    per_channel: o.PerChannel = False,
    w_estimator: o.WEstimator = None,
    a_estimator: o.AEstimator = None,
    percentile: o.Percentile = 99.999,
    calib_batches: o.CalibBatches = None,
    metric: o.Metric = None,
    no_quantize: Annotated[bool, typer.Option("--no-quantize", help="Outlier statistics only: no evaluation, so the FP / W8A8 / degradation columns are left out of the table and are NaN (empty in CSV, null in JSON).")] = False,
    mitigations: Annotated[bool, typer.Option("--mitigations", help="One table of the first (vanilla) model with each post-training mitigation and every other model (architecture variants): float, W8A8, gap closed, kurtosis, inf-norm, sink rate. One checkpoint is enough.")] = False,
    smoothquant: o.SmoothQuant = None,
    rotate: o.Rotate = None,
    a_granularity: o.AGranularityOpt = None,
    keep_float: Annotated[Optional[list[str]], typer.Option("--keep-float", help="With --mitigations: one more row per value, the first model with these points in float: [LABEL=]a plan.json from `sensitivity` or comma-separated fnmatch patterns (repeatable; e.g. plan=out/plan.json control='*.layers.0').")] = None,
    no_attention: Annotated[bool, typer.Option("--no-attention", help="Skip the attention pass: no sink rate, null mass or massive-activation columns.")] = False,
    data: o.DataPath = None,
    dataset: o.Dataset = None,
    include_files: o.Include = "*.txt",
    samples: Annotated[Optional[int], typer.Option("--samples", help="Sequences (images) to evaluate, default 32; stanhop checkpoints: test windows, default every one.")] = None,
    seq_len: o.SeqLen = 128,
    batch_size: o.BatchSize = 8,
    seed: o.Seed = 0,
    dtype: o.Dtype = DType.float32,
    device: o.DeviceOpt = Device.cpu,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    trust_remote_code: o.TrustRemote = False,
    tokenizer: o.Tokenizer = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Report folder (default: reports/compare-<names>/).")] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="Skip the PNG plots.")] = False,
    quiet: o.Quiet = False,
    as_json: o.Json = False,
) -> None:
    """Side-by-side outliers and W8A8 loss of several models on identical data, seed and recipe.

    One row per model: FP and W8A8 metric, degradation, average / max kurtosis, max inf-norm (block
    outputs, and over all sites), each with its change vs the first model. Writes compare.csv,
    compare.json, compare.md, layers.png and per-model stats/ and quantize/ folders
    (`gate --report OUT/NAME` checks one model).

    Example: outlier-probe compare vanilla=ckpt/@softmax outeffhop=ckpt/@softmax1
    """
    from outlier_probe.cli.quantize import recipes_from_options
    from outlier_probe.compare import CompareConfig, resolve_entries, run_compare
    from outlier_probe.report.io import all_or_nothing, check_out_dir
    from outlier_probe.report.compare_report import compare_document, compare_table, write_compare_report

    base = o.load_config("", dtype, device, trust_remote_code, None, tokenizer, device_map, max_memory, offload_folder)
    (quant,) = recipes_from_options([recipe], bits, w_bits, a_bits, per_channel, w_estimator, a_estimator, percentile,
                                 calib_batches, samples, batch_size)
    cfg = CompareConfig(
        entries=resolve_entries(checkpoints, base),
        data=o.data_config(data, dataset, include_files, 32 if samples is None else samples, seq_len, batch_size, seed),
        forecast_samples=samples,
        recipe=quant,
        quantize=not no_quantize,
        metric=metric,
        attention=not no_attention,
        mitigation_table=mitigations,
        mitigations=o.mitigations_from_options(smoothquant, rotate, a_granularity),
        keep_float=keep_float_rows(keep_float),
    )
    if cfg.mitigations and not mitigations:
        raise UsageError("--smoothquant / --rotate / --a-granularity in compare need --mitigations")
    target = check_out_dir(out or default_out([e.name for e in cfg.entries]))  # before any model loads
    quiet = quiet or as_json or not is_main()
    console = Console(stderr=True)
    console.quiet = quiet or not console.is_terminal  # no bar (and no stray blank line) when stderr is not a terminal
    with batch_progress(console, "measuring") as progress:
        result = run_compare(cfg, progress=progress)
    if not is_main():  # a data-parallel run: rank 0 alone writes and prints
        return
    table_rows = None
    with all_or_nothing():  # every report or none (errors, Ctrl-C, SIGTERM)
        written = write_compare_report(result, target, plots_on=not no_plots)
        if mitigations:
            from outlier_probe.compare import mitigation_rows
            from outlier_probe.report.compare_report import command_line
            from outlier_probe.report.mitigation_report import mitigation_table, write_mitigation_report

            table_rows = mitigation_rows(result)
            metric_name = result.runs[0].quant.rows()[0]["metric"]
            written.update(write_mitigation_report(table_rows, target, metric_name, command_line(result)))
    if as_json:
        typer.echo(json.dumps(compare_document(result), indent=2, default=str))
        return
    if not quiet:
        c = Console()
        c.print(compare_table(result, width=c.width))
        if table_rows is not None:
            c.print(mitigation_table(table_rows, metric_name))
        for note in result.notes:
            c.print(f"[yellow]note:[/] {note}")
        c.print(f"reports: {target}/ (compare.csv, compare.json, compare.md{', layers.png' if 'layers.png' in written else ''}, "
                f"{', '.join(e.name + '/' for e in cfg.entries)})")


def keep_float_rows(values: list[str] | None) -> tuple:
    """`--keep-float [LABEL=]VALUE` (repeatable) -> ((label, KeepFloat), ...): each value is one row of its own."""
    from outlier_probe.quant.keep import parse_keep_float

    rows = []
    for value in values or []:
        label, sep, rest = value.partition("=")
        if not sep or not label or any(c in label for c in "*?[,/"):
            label, rest = value, value
        rows.append((label, parse_keep_float([rest])))
    return tuple(rows)

