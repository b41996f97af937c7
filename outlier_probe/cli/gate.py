"""`outlier-probe gate`: fail CI when a checkpoint's outliers or quantization loss exceed thresholds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from outlier_probe.cli import options as o
from outlier_probe.cli.app import app, guarded
from outlier_probe.config import AttentionVariant, DataConfig, DType, SiteKind
from outlier_probe.errors import ProbeError, UsageError

EPILOG = (
    "Thresholds: flags win over --config FILE.toml (or the nearest pyproject.toml with a "
    "[tool.outlier-probe.gate] table), which wins over defaults.\n\n"
    "Exit codes: 0 all checks pass; 1 a threshold is exceeded (or a metric worsened beyond "
    "--baseline-tolerance); 2 usage or configuration error (unknown key, wrong type, report missing, "
    "checkpoint could not be measured)."
)


@app.command("gate", epilog=EPILOG)
@guarded
def gate(
    checkpoint: Annotated[Optional[str], typer.Argument(help="Checkpoint to measure (folder, GGUF file or hub id); or use --report.", show_default=False)] = None,
    report: Annotated[Optional[list[Path]], typer.Option("--report", help="Check reports that `stats` / `quantize` wrote (no model is loaded). Repeatable.", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="TOML file with the gate keys (top level or [tool.outlier-probe.gate]); replaces pyproject.toml discovery.", show_default=False)] = None,
    max_avg_kurtosis: Annotated[Optional[float], typer.Option(help="Max mean paper kurtosis over sites.", show_default=False)] = None,
    max_kurtosis: Annotated[Optional[float], typer.Option(help="Max paper kurtosis of any site.", show_default=False)] = None,
    max_inf_norm: Annotated[Optional[float], typer.Option(help="Max paper inf-norm of any site (of --site-kind, if given).", show_default=False)] = None,
    site_kind: Annotated[Optional[SiteKind], typer.Option(metavar="KIND", help="Restrict --max-inf-norm to one kind of site: " + ", ".join(k.value for k in SiteKind) + ".", show_default=False)] = None,
    max_outlier_fraction: Annotated[Optional[float], typer.Option(help="Max fraction of |x| > 6 at any site.", show_default=False)] = None,
    max_ppl_increase: Annotated[Optional[float], typer.Option(help="Max quantized - float perplexity (runs quantize).", show_default=False)] = None,
    max_ppl_ratio: Annotated[Optional[float], typer.Option(help="Max quantized / float perplexity (runs quantize).", show_default=False)] = None,
    min_recovery: Annotated[Optional[float], typer.Option(help="Min quantized / float accuracy (runs quantize).", show_default=False)] = None,
    max_sink_rate: Annotated[Optional[float], typer.Option(help="Max mean attention sink rate over heads (runs attention).", show_default=False)] = None,
    max_massive_ratio: Annotated[Optional[float], typer.Option(help="Max massive-activation ratio top |x| / median |x| (runs attention).", show_default=False)] = None,
    baseline: Annotated[Optional[Path], typer.Option(help="Earlier report folder: fail when a metric worsens beyond --baseline-tolerance.", show_default=False)] = None,
    baseline_tolerance: Annotated[Optional[float], typer.Option(help="Relative worsening allowed against --baseline [default: 0.10].", show_default=False)] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Also write JUnit XML here (one test case per check).", show_default=False)] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON on stdout (no table).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Folder for the reports and gate.json [default: reports/gate/<name>/, or the report folder].", show_default=False)] = None,
    data: Annotated[Optional[Path], typer.Option(help="Text file or folder to measure on (as for `stats`).", show_default=False)] = None,
    samples: Annotated[Optional[int], typer.Option(help="Number of sequences [default: 32].", show_default=False)] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per sequence [default: 128].", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per batch [default: 8].", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Data seed [default: 0].", show_default=False)] = None,
    attention: Annotated[Optional[AttentionVariant], typer.Option(help="Attention variant to load the model with.", show_default=False)] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow custom modelling code from the checkpoint.")] = False,
    dtype: Annotated[Optional[DType], typer.Option("--dtype", help="Model dtype [default: float32].", show_default=False)] = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
) -> None:
    """Check a checkpoint (or its reports) against thresholds; exit 0 pass, 1 fail, 2 usage error."""
    from outlier_probe import gate as gate_lib
    from outlier_probe.report import gate_output

    data_opts = {"data": data, "samples": samples, "seq_len": seq_len, "batch_size": batch_size, "seed": seed}
    measure_opts = {**data_opts, "attention": attention, "trust_remote_code": trust_remote_code or None, "dtype": dtype,
                    "device_map": device_map, "max_memory": max_memory, "offload_folder": offload_folder}
    if (checkpoint is None) == (not report):
        raise UsageError("give a checkpoint to measure or --report FOLDER, exactly one of them")
    if report and any(v is not None for v in measure_opts.values()):
        given = ", ".join("--" + k.replace("_", "-") for k, v in measure_opts.items() if v is not None)
        raise UsageError(f"{given} only apply when measuring a checkpoint, not with --report")

    flags = {
        "max_avg_kurtosis": max_avg_kurtosis, "max_kurtosis": max_kurtosis, "max_inf_norm": max_inf_norm,
        "site_kind": site_kind, "max_outlier_fraction": max_outlier_fraction, "max_ppl_increase": max_ppl_increase,
        "max_ppl_ratio": max_ppl_ratio, "min_recovery": min_recovery, "baseline": baseline,
        "max_sink_rate": max_sink_rate, "max_massive_ratio": max_massive_ratio,
        "baseline_tolerance": baseline_tolerance,
    }  # fmt: skip
    resolved = gate_lib.resolve_config(flags, config_file=config)

    from outlier_probe.report.io import all_or_nothing, check_out_dir, check_out_file, ensure_writable_dir

    try:
        # every output path is checked before anything is measured or written; then all are written or none
        target = out or (gate_lib.default_out_dir(checkpoint) if checkpoint is not None else None)
        if target is not None:
            check_out_dir(target)
        if junit is not None:
            check_out_file(junit, "--junit")
        with all_or_nothing():
            if checkpoint is not None:
                settings = gate_lib.MeasureSettings(
                    data=DataConfig(path=data, **{k: v for k, v in data_opts.items() if k != "data" and v is not None}),
                    attention=attention,
                    trust_remote_code=trust_remote_code,
                    placement=o.placement(device_map, max_memory, offload_folder, dtype),
                )
                result = gate_lib.gate_checkpoint(checkpoint, settings, resolved, target)
            else:
                result = gate_lib.check_reports(report, resolved)  # reads only
            from outlier_probe.distributed import is_main

            if not is_main():  # a data-parallel run: rank 0 alone writes and prints
                raise typer.Exit(result.exit_code)
            out_dir = check_out_dir(target or result.reports.folders[0])
            gate_output.write_gate_json(result, ensure_writable_dir(out_dir) / "gate.json")
            if junit is not None:
                gate_output.write_junit(result, junit)
    except UsageError:
        raise
    except ProbeError as err:  # exit 1 means "a threshold is exceeded" and nothing else
        raise UsageError(str(err)) from None

    if json_output:
        import json

        print(json.dumps(gate_output.gate_to_dict(result), indent=2))
    else:
        gate_output.render_table(result, Console())
    gate_output.emit_github_annotations(result, stream=sys.stderr if json_output else sys.stdout)
    raise typer.Exit(result.exit_code)
