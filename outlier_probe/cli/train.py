"""`outlier-probe train`: train a small vanilla / OutEffHop / clipped / gated model and log its outliers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from outlier_probe.cli import options as o
from outlier_probe.cli.app import app, guarded
from outlier_probe.config import Device

Int = Optional[int]


def _opt(*names: str, help: str) -> typer.models.OptionInfo:  # noqa: A002 - Typer's own keyword
    return typer.Option(*names, help=help)


@app.command("train")
@guarded
def train_command(
    arch: Annotated[Optional[str], _opt("--arch", help="Model family: opt, bert (MLM), gpt2, llama, vit (images), stanhop (forecaster on a CSV). Default opt, or the family of --from.")] = None,
    size: Annotated[Optional[str], _opt("--size", help="Shape preset: micro, tiny, small, medium, base (default tiny).")] = None,
    layers: Annotated[Int, _opt("--layers", help="Override the preset's number of layers.")] = None,
    hidden: Annotated[Int, _opt("--hidden", help="Override the preset's hidden size.")] = None,
    heads: Annotated[Int, _opt("--heads", help="Override the preset's number of attention heads.")] = None,
    attention: Annotated[str, _opt("--attention", help="softmax (vanilla), softmax1 (OutEffHop), clipped, gated, softpick, sigmoid-gate (Qwen3-Next output gate), sink (learned per-head sink logit); stanhop: softmax, softmax1, sparsemax, entmax, clipped, gated, clipped+softmax1, gated+softmax1.")] = "softmax",
    gamma: Annotated[float, _opt("--gamma", help="Clipped softmax lower clip (<= 0).")] = -0.025,
    zeta: Annotated[float, _opt("--zeta", help="Clipped softmax upper stretch (>= 1).")] = 1.0,
    alpha: Annotated[Optional[float], _opt("--alpha", help="Clipped softmax: gamma = -alpha / T, T the keys per row (the paper's form; replaces --gamma). alpha < 1 keeps uniform attention unclipped at initialisation.")] = None,
    gate_init: Annotated[float, _opt("--gate-init", help="Gated attention: gate value at initialisation, in (0, 1).")] = 0.25,
    init_from: Annotated[Optional[str], _opt("--from", help="Fine-tune this checkpoint (folder or hub id) with --attention swapped in.")] = None,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    data: Annotated[Optional[Path], _opt("--data", help="Text file or folder of text files (see --include-files), default the built-in English text; vit: an image folder (one sub-folder per class) or MNIST-style idx files.")] = None,
    include_files: o.Include = "*.txt",
    max_chars: Annotated[Int, _opt("--max-chars", help="Read at most this many characters of text.")] = None,
    tokenizer: Annotated[Optional[str], _opt("--tokenizer", help="Existing tokenizer folder; default: a byte-level BPE trained on the data.")] = None,
    vocab_size: Annotated[int, _opt("--vocab-size", help="Vocabulary of the trained BPE tokenizer.")] = 4096,
    seq_len: Annotated[int, _opt("--seq-len", help="Tokens per packed training sequence.")] = 128,
    batch_size: Annotated[Int, _opt("--batch-size", help="Sequences (images, windows) per optimizer step (default 16; stanhop: the preset's).")] = None,
    steps: Annotated[Int, _opt("--steps", help="Total optimizer steps (default 1000 unless --time-budget is given).")] = None,
    time_budget: Annotated[Optional[float], _opt("--time-budget", help="Total training seconds; stops at whichever of --steps / --time-budget comes first.")] = None,
    lr: Annotated[Optional[float], _opt("--lr", help="Peak learning rate (AdamW; default 1e-3; stanhop: Adam, the preset's).")] = None,
    min_lr_ratio: Annotated[float, _opt("--min-lr-ratio", help="Final lr as a fraction of --lr.")] = 0.1,
    warmup: Annotated[int, _opt("--warmup", help="Linear warmup steps.")] = 100,
    schedule: Annotated[str, _opt("--schedule", help="cosine, linear or constant after warmup.")] = "cosine",
    beta1: Annotated[float, _opt("--beta1", help="AdamW beta1.")] = 0.9,
    beta2: Annotated[float, _opt("--beta2", help="AdamW beta2.")] = 0.95,
    weight_decay: Annotated[float, _opt("--weight-decay", help="AdamW weight decay on matrices only.")] = 0.1,
    grad_clip: Annotated[Optional[float], _opt("--grad-clip", help="Max global gradient norm (0: off; default 1; stanhop 5).")] = None,
    in_len: Annotated[Int, _opt("--in-len", help="stanhop: input window length (default by the preset: 168, or 720 for horizons >= 168).")] = None,
    horizon: Annotated[int, _opt("--horizon", help="stanhop: forecast horizon.")] = 24,
    seg_len: Annotated[Int, _opt("--seg-len", help="stanhop: segment length (default 6, or 24 for horizons >= 168).")] = None,
    epochs: Annotated[Int, _opt("--epochs", help="stanhop: maximum epochs (paper 100).")] = None,
    patience: Annotated[Int, _opt("--patience", help="stanhop: early-stopping patience in epochs (paper 5).")] = None,
    eval_every: Annotated[int, _opt("--eval-every", help="Steps between eval loss + outlier measurements (train_log.csv rows).")] = 100,
    eval_samples: Annotated[int, _opt("--eval-samples", help="Held-out sequences (images) for the eval loss.")] = 64,
    log_every: Annotated[int, _opt("--log-every", help="Steps between train-loss reads for the progress display.")] = 10,
    save_every: Annotated[int, _opt("--save-every", help="Steps between checkpoints (0: at the end and on Ctrl-C).")] = 0,
    seed: Annotated[int, _opt("--seed", help="Seed for the initialisation, batch order and MLM masks.")] = 0,
    device: o.DeviceOpt = Device.auto,
    precision: Annotated[str, _opt("--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, or bf16 (autocast; faster on CPUs with bf16 instructions).")] = "auto",
    threads: Annotated[Int, _opt("--threads", help="CPU threads (default: every core this process may use).")] = None,
    channels: Annotated[Int, _opt("--channels", help="vit: 1 (grayscale) or 3 (default; grayscale replicated).")] = None,
    image_size: Annotated[Int, _opt("--image-size", help="vit: image side (default: the idx files' size, else 28).")] = None,
    patch_size: Annotated[int, _opt("--patch-size", help="vit: patch side (4 or 7 for 28x28 digits).")] = 4,
    out: Annotated[Optional[Path], _opt("--out", help="Output folder (default runs/<run name>).")] = None,
    run_name: Annotated[Optional[str], _opt("--run-name", help="Name in the `run` column of train_log.csv.")] = None,
    resume: Annotated[bool, _opt("--resume", help="Continue the run saved in --out (same settings; --steps is the new total).")] = False,
    overwrite: Annotated[bool, _opt("--overwrite", help="Replace a checkpoint already in --out.")] = False,
    no_plots: Annotated[bool, _opt("--no-plots", help="Skip outliers.png.")] = False,
    quiet: o.Quiet = False,
    as_json: o.Json = False,
) -> None:
    """Train a small model from scratch (or fine-tune --from) and log eval loss and outliers to train_log.csv."""
    if arch == "stanhop":
        from outlier_probe.cli.train_forecast import train_stanhop

        return train_stanhop(size=size, layers=layers, hidden=hidden, heads=heads, attention=attention, data=data, in_len=in_len,
                             horizon=horizon, seg_len=seg_len, epochs=epochs, patience=patience, batch_size=batch_size, lr=lr,
                             grad_clip=grad_clip, seed=seed, device=device, threads=threads, out=out, overwrite=overwrite,
                             quiet=quiet, as_json=as_json)
    from outlier_probe.train import TrainConfig, train

    cfg = TrainConfig(
        arch=arch, size=size, layers=layers, hidden=hidden, heads=heads, attention=attention, gamma=gamma, zeta=zeta, alpha=alpha,
        gate_init=gate_init, init_from=init_from, placement=o.placement(device_map, max_memory, offload_folder), data=data, include=include_files, max_chars=max_chars, tokenizer=tokenizer,
        vocab_size=vocab_size, seq_len=seq_len, batch_size=16 if batch_size is None else batch_size, steps=steps,
        time_budget=time_budget, lr=1e-3 if lr is None else lr,
        min_lr_ratio=min_lr_ratio, warmup=warmup, schedule=schedule, betas=(beta1, beta2), weight_decay=weight_decay,
        grad_clip=1.0 if grad_clip is None else grad_clip, eval_every=eval_every, eval_samples=eval_samples, log_every=log_every, save_every=save_every,
        seed=seed, device=device, precision=precision, threads=threads, channels=channels, image_size=image_size, patch_size=patch_size, out=out,
        run_name=run_name, resume=resume, overwrite=overwrite, plots=not no_plots,
    )
    quiet = quiet or as_json
    console = Console(stderr=True, quiet=quiet)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("step {task.fields[step]}"),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn())
    # only on a terminal: in a pipe or CI log a live bar is noise, and a failed run would leave a blank line on stderr
    with Progress(*columns, console=console, disable=quiet or not console.is_terminal, transient=True, refresh_per_second=4) as bar:
        task = bar.add_task(f"training {cfg.run}", total=1.0, step=0, loss="-", tps="-")

        def update(status) -> None:  # noqa: ANN001 - a train.TrainStatus
            bar.update(task, completed=status.fraction, step=status.step,
                       loss=_fmt(status.train_loss), tps=_fmt(status.tokens_per_s, ".0f"))

        result = train(cfg, progress=update)
    last = result.rows[-1] if result.rows else {}
    summary = {"out": str(result.out), "steps": result.steps, "tokens": result.tokens, "stopped_by": result.stopped_by,
               "final_eval_loss": result.final_eval_loss, "avg_kurtosis": last.get("avg_kurtosis"),
               "max_inf_norm": last.get("max_inf_norm"), "tokens_per_s": result.tokens_per_s}
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    if not quiet:
        from outlier_probe.report.train_report import train_table

        Console().print(train_table(cfg.run, summary))

def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)
