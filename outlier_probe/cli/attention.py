"""`outlier-probe attention CKPT`: attention sinks per head and massive activations per layer."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from outlier_probe.cli import options as o
from outlier_probe.cli.app import app, guarded
from outlier_probe.cli.progress import batch_progress
from outlier_probe.config import Device, DType, ObserverConfig
from outlier_probe.diagnose.massive import MIN_ABS, MIN_RATIO


@app.command("attention")
@guarded
def attention(
    checkpoint: o.Checkpoint = "minilm",
    massive_abs: Annotated[float, typer.Option("--massive-abs", help="Massive activation: |x| above this (and --massive-ratio times the median |x|).")] = MIN_ABS,
    massive_ratio: Annotated[float, typer.Option("--massive-ratio", help="Massive activation: |x| also above this many times the median |x|.")] = MIN_RATIO,
    top_k: Annotated[int, typer.Option("--top-k", help="Outlier channels kept per block output (as `stats`).")] = 8,
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
    attention_variant: o.Attention = None,
    tokenizer: o.Tokenizer = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    out: o.Out = None,
    quiet: o.Quiet = False,
    as_json: o.Json = False,
) -> None:
    """Per head: mass on the first / special / delimiter tokens, entropy, sink rate, null mass; per layer: massive activations."""
    from outlier_probe.diagnose.attention_run import AttentionConfig, run_attention
    from outlier_probe.report.attention_report import attention_document, heads_table, massive_table, write_attention_report
    from outlier_probe.report.io import all_or_nothing, check_out_dir

    cfg = AttentionConfig(
        load=o.load_config(checkpoint, dtype, device, trust_remote_code, attention_variant, tokenizer, device_map, max_memory,
                           offload_folder),
        data=o.data_config(data, dataset, include_files, samples, seq_len, batch_size, seed),
        observer=ObserverConfig(top_k=top_k), min_abs=massive_abs, min_ratio=massive_ratio,
    )
    target = check_out_dir(o.default_out(checkpoint, out, "-attention"))
    quiet = quiet or as_json
    console = Console(stderr=True, quiet=quiet)
    with batch_progress(console, "attention") as progress:
        result = run_attention(cfg, progress=progress)
    with all_or_nothing():  # every report or none (errors, Ctrl-C, SIGTERM)
        written = write_attention_report(result, target)
    if as_json:
        typer.echo(json.dumps(attention_document(result), indent=2, default=str))
        return
    if not quiet:
        c = Console()
        c.print(heads_table(result))
        c.print(massive_table(result))
        s = result.summary()
        yes = {True: "yes", False: "no", None: "-"}
        c.print(f"sink rate {num_(s['sink_rate'])}; largest |x| / median {num_(s['massive_ratio'])}: layer "
                f"{s['massive_layer']}, token {s['massive_token']}, channel {s['massive_channel']} (a sink token: "
                f"{yes[s['massive_on_sink']]}; a top outlier channel of `stats`: {yes[s['massive_in_top_channels']]}); "
                f"massive layers (> {num_(cfg.min_abs)} and > {num_(cfg.min_ratio)}x median): {s['massive_layers']}")
        c.print(f"reports: {', '.join(str(p) for p in written.values())}")


def num_(value: float) -> str:
    from outlier_probe.report.sensitivity_report import num

    return num(value)
