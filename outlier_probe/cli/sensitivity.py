"""`outlier-probe sensitivity CKPT`: which layers W8A8 breaks, and a mixed-precision plan that meets a budget."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console

from outlier_probe.cli import options as o
from outlier_probe.cli.app import app, fail, guarded
from outlier_probe.cli.progress import run_progress
from outlier_probe.cli.quantize import recipes_from_options
from outlier_probe.config import Device, DType
from outlier_probe.diagnose.groups import GroupBy
from outlier_probe.errors import UsageError


@app.command("sensitivity")
@guarded
def sensitivity(
    checkpoint: o.Checkpoint = "minilm",
    bits: o.Bits = None,
    recipe: Annotated[str, typer.Option("--recipe", help="paper (W8A8 of the papers) or linear (Linear weights+inputs only).")] = "paper",
    group: Annotated[GroupBy, typer.Option("--group", help="layer: one group per block plus embeddings and head; site: every quantization point.")] = GroupBy.layer,
    groups: Annotated[Optional[str], typer.Option("--groups", help="Only these groups: comma-separated fnmatch patterns on group names (e.g. 'layer.*').")] = None,
    budget: Annotated[Optional[str], typer.Option("--budget", help="Plan budget: '1%' relative loss, or '0.02' absolute, in metric units.")] = None,
    max_float: Annotated[Optional[int], typer.Option("--max-float", help="Most groups a plan may keep in float (default: all but one).")] = None,
    w_bits: o.WBits = None,
    a_bits: o.ABits = None,
    per_channel: o.PerChannel = False,
    w_estimator: o.WEstimator = None,
    a_estimator: o.AEstimator = None,
    percentile: o.Percentile = 99.999,
    calib_batches: o.CalibBatches = None,
    metric: o.Metric = None,
    data: o.DataPath = None,
    dataset: o.Dataset = None,
    include_files: o.Include = "*.txt",
    samples: o.Samples = 32,
    seq_len: o.SeqLen = 128,
    batch_size: o.BatchSize = 8,
    seed: o.Seed = 0,
    dtype: o.Dtype = DType.float32,
    device: o.DeviceOpt = Device.cpu,
    trust_remote_code: o.TrustRemote = False,
    attention: o.Attention = None,
    tokenizer: o.Tokenizer = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    out: o.Out = None,
    quiet: o.Quiet = False,
    as_json: o.Json = False,
) -> None:
    """Per-group W8A8 sensitivity (each group alone, all but each group), ranked; a plan against --budget.

    Exit 1 when no plan meets the budget (the best plan is still written and shown).
    """
    from outlier_probe.diagnose.plan import Budget
    from outlier_probe.diagnose.sensitivity import SensitivityConfig, run_sensitivity
    from outlier_probe.report.io import all_or_nothing, check_out_dir
    from outlier_probe.report.sensitivity_report import groups_table, plan_table, sensitivity_document, write_sensitivity_report

    (rec,) = recipes_from_options([recipe], bits, w_bits, a_bits, per_channel, w_estimator, a_estimator, percentile,
                                 calib_batches, samples, batch_size)
    patterns = tuple(p.strip() for p in (groups or "").split(",") if p.strip())
    if groups is not None and not patterns:
        raise UsageError("--groups is empty; give fnmatch patterns such as 'layer.*'")
    cfg = SensitivityConfig(
        load=o.load_config(checkpoint, dtype, device, trust_remote_code, attention, tokenizer, device_map, max_memory, offload_folder),
        data=o.data_config(data, dataset, include_files, samples, seq_len, batch_size, seed),
        recipe=rec, group_by=group, groups=patterns, budget=Budget.parse(budget) if budget is not None else None,
        max_float=max_float, metric=metric,
    )
    target = check_out_dir(o.default_out(checkpoint, out, "-sensitivity"))
    quiet = quiet or as_json
    console = Console(stderr=True, quiet=quiet)
    with run_progress(console, "sensitivity") as progress:
        result = run_sensitivity(cfg, progress=progress)
    with all_or_nothing():  # every report or none (errors, Ctrl-C, SIGTERM)
        written = write_sensitivity_report(result, target)
    if as_json:
        typer.echo(json.dumps(sensitivity_document(result), indent=2, default=str))
    elif not quiet:
        c = Console()
        c.print(groups_table(result))
        if result.plan is not None:
            c.print(plan_table(result))
        c.print(f"{result.runs} quantized runs in {result.seconds:.0f} s; reports: {', '.join(str(p) for p in written.values())}")
    if result.plan is not None and not result.plan.met:
        raise fail(f"no plan within --max-float meets the {result.plan.budget.describe()} budget; "
                   f"best plan (step {result.plan.final.step}) written to {written['plan.json']}", 1)
