"""`outlier-probe quantize CKPT`: W8A8 post-training quantization and the degradation it causes."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console

from outlier_probe.cli import options as o
from outlier_probe.cli.app import app, guarded
from outlier_probe.cli.progress import batch_progress
from outlier_probe.distributed import is_main
from outlier_probe.config import Device, DType
from outlier_probe.errors import UsageError
from outlier_probe.quant.quantizer import Estimator
from outlier_probe.quant.recipes import Backend, QuantConfig, Recipe, default_calib_batches


def recipes_from_options(recipe: list[str] | None, bits: int | None, w_bits: int | None, a_bits: int | None,
                         per_channel: bool, w_estimator: Estimator | None, a_estimator: Estimator | None,
                         percentile: float, calib_batches: int | None, samples: int | None,
                         batch_size: int) -> tuple[QuantConfig, ...]:
    """CLI options -> recipes. --bits sets both widths; --w-bits / --a-bits override it; --calib-batches
    defaults to default_calib_batches(samples, batch_size)."""
    if calib_batches is None:
        calib_batches = default_calib_batches(samples, batch_size)
    if bits is not None and not 2 <= bits <= 16:
        raise UsageError(f"--bits must be between 2 and 16, got {bits}")
    names = recipe or [Recipe.paper.value]
    out = []
    for name in names:
        try:
            rec = Recipe(name)
        except ValueError:
            raise UsageError(f"unknown --recipe {name!r}; choose from {', '.join(r.value for r in Recipe)}") from None
        out.append(QuantConfig(
            recipe=rec,
            w_bits=_first_set(w_bits, bits, 8),  # not `or`: an explicit 0 must reach the validation
            a_bits=_first_set(a_bits, bits, 8),
            per_channel=per_channel,
            w_estimator=w_estimator or Estimator.minmax,
            a_estimator=a_estimator or Estimator.running_minmax,
            percentile=percentile,
            calib_batches=calib_batches,
        ))
    return tuple(out)


def _first_set(*values: int | None) -> int:
    return next(v for v in values if v is not None)


@app.command("quantize")
@guarded
def quantize(
    checkpoint: o.Checkpoint = "minilm",
    bits: o.Bits = None,
    recipe: Annotated[Optional[list[str]], typer.Option("--recipe", help="paper (W8A8 of the papers) or linear (Linear weights+inputs only); repeatable.")] = None,
    w_bits: o.WBits = None,
    a_bits: o.ABits = None,
    per_channel: o.PerChannel = False,
    w_estimator: o.WEstimator = None,
    a_estimator: o.AEstimator = None,
    percentile: o.Percentile = 99.999,
    calib_batches: o.CalibBatches = None,
    backend: Annotated[Optional[list[Backend]], typer.Option("--backend", help="Also run a real backend: bnb-int8 (LLM.int8).")] = None,
    metric: o.Metric = None,
    keep_float: o.KeepFloatOpt = None,
    smoothquant: o.SmoothQuant = None,
    rotate: o.Rotate = None,
    a_granularity: o.AGranularityOpt = None,
    score_transformed: o.ScoreTransformed = False,
    act_scales: o.ActScales = None,
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
    attention: o.Attention = None,
    tokenizer: o.Tokenizer = None,
    out: o.Out = None,
    quiet: o.Quiet = False,
    as_json: o.Json = False,
) -> None:
    """Simulated W8A8 (or other widths) and optional LLM.int8: float vs quantized metric, per-site SQNR."""
    from outlier_probe.quant.keep import parse_keep_float
    from outlier_probe.quant.run import QuantizeConfig, run_quantize
    from outlier_probe.report.io import all_or_nothing, check_out_dir
    from outlier_probe.report.quant_report import quantize_document, runs_table, sites_tables, write_quantize_report

    recipes = recipes_from_options(recipe, bits, w_bits, a_bits, per_channel, w_estimator, a_estimator, percentile,
                                   calib_batches, samples, batch_size)
    cfg = QuantizeConfig(
        load=o.load_config(checkpoint, dtype, device, trust_remote_code, attention, tokenizer, device_map, max_memory, offload_folder),
        data=o.data_config(data, dataset, include_files, 32 if samples is None else samples, seq_len, batch_size, seed),
        recipes=recipes,
        backends=tuple(dict.fromkeys(backend or ())),
        metric=metric,
        keep_float=parse_keep_float(keep_float),
        mitigations=o.mitigations_from_options(smoothquant, rotate, a_granularity),
        score_transformed=score_transformed,
        act_scales=act_scales,
    )
    from outlier_probe.forecast.run import is_forecaster, run_forecast_quantize

    target = check_out_dir(o.default_out(checkpoint, out, "-quantize"))  # created only once results exist
    quiet = quiet or as_json or not is_main()
    console = Console(stderr=True, quiet=quiet)
    with batch_progress(console, "evaluating") as progress:
        step = lambda d, t, label: progress(d, t, f"evaluating {label}")  # noqa: E731
        result = run_forecast_quantize(cfg, samples, step) if is_forecaster(checkpoint) else run_quantize(cfg, progress=step)
    if not is_main():  # a data-parallel run: rank 0 alone writes and prints
        return
    with all_or_nothing():  # every report or none (errors, Ctrl-C, SIGTERM)
        written = write_quantize_report(result, target)
    if as_json:
        typer.echo(json.dumps(quantize_document(result), indent=2, default=str))
        return
    if not quiet:
        c = Console()
        c.print(runs_table(result))
        for table in sites_tables(result):
            c.print(table)
        c.print(f"reports: {', '.join(str(p) for p in written.values())}")
