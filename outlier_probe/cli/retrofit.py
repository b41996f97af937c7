"""`outlier-probe retrofit CKPT`: fine-tune a pretrained checkpoint into softmax1 / clipped / gated twins next to a
vanilla control, and measure outliers, W8A8 loss, attention and what the model kept, before and after."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from outlier_probe.cli import options as o
from outlier_probe.cli.app import app, guarded
from outlier_probe.config import Device

PARTS = ".retrofit-parts"  # finished twins of an interrupted run, read back by --resume


def _opt(*names: str, help: str) -> typer.models.OptionInfo:  # noqa: A002 - Typer's own keyword
    return typer.Option(*names, help=help)


@app.command("retrofit")
@guarded
def retrofit_command(
    checkpoint: o.Checkpoint = "minilm",
    attention: Annotated[str, _opt("--attention", help="Twins, comma-separated: softmax1, clipped, gated (a vanilla control always runs).")] = "softmax1,clipped,gated",
    data: Annotated[Optional[Path], _opt("--data", help="Text file or folder (default: the built-in English text).")] = None,
    include_files: o.Include = "*.txt",
    objective: Annotated[str, _opt("--objective", help="auto (the checkpoint's LM / MLM head; distill without a head), lm, mlm, distill, mlm-head (a head trained first on the frozen encoder, shared by every twin).")] = "auto",
    preset: Annotated[str, _opt("--preset", help="cpu (minutes per twin) or gpu (longer fine-tuning, larger batches).")] = "cpu",
    steps: Annotated[Optional[int], _opt("--steps", help="Optimizer steps per twin (default: the preset's).")] = None,
    batch_size: Annotated[Optional[int], _opt("--batch-size", help="Sequences per step.")] = None,
    seq_len: Annotated[Optional[int], _opt("--seq-len", help="Tokens per sequence.")] = None,
    lr: Annotated[Optional[float], _opt("--lr", help="Peak learning rate (AdamW, warmup then cosine).")] = None,
    warmup: Annotated[Optional[int], _opt("--warmup", help="Linear warmup steps.")] = None,
    eval_every: Annotated[Optional[int], _opt("--eval-every", help="Steps between curve points (outlier probe + held-out objective).")] = None,
    eval_samples: Annotated[Optional[int], _opt("--eval-samples", help="Held-out sequences for every before / after measurement.")] = None,
    head_steps: Annotated[Optional[int], _opt("--head-steps", help="mlm-head: steps training the head on the frozen backbone (default: the preset's).")] = None,
    seeds: Annotated[str, _opt("--seeds", help="Seeds, comma-separated: each runs every twin and the control.")] = "0",
    gamma: Annotated[float, _opt("--gamma", help="Clipped softmax lower clip at the start (<= 0).")] = -0.001,
    gate_init: Annotated[float, _opt("--gate-init", help="Gated attention: gate value at the start, in (0, 1).")] = 0.95,
    tokenizer: o.Tokenizer = None,
    device: o.DeviceOpt = Device.auto,
    device_map: o.DeviceMap = None,
    max_memory: o.MaxMemory = None,
    offload_folder: o.OffloadFolder = None,
    threads: Annotated[Optional[int], _opt("--threads", help="CPU threads (default: all allowed).")] = None,
    out: o.Out = None,
    save: Annotated[Optional[Path], _opt("--save", help="Folder for every twin's final checkpoint, DIR/<twin>-s<seed>/ (the mlm-head beside it).")] = None,
    overwrite: Annotated[bool, _opt("--overwrite", help="Replace the retrofit report already in --out (each file atomically, all or none).")] = False,
    resume: Annotated[bool, _opt("--resume", help="Keep the twins an interrupted run finished in --out; run the rest.")] = False,
    quiet: o.Quiet = False,
) -> None:
    """Retrofit CKPT's attention into outlier-efficient twins and measure what changes against a vanilla control."""
    from outlier_probe.errors import UsageError
    from outlier_probe.report.io import check_out_dir, ensure_writable_dir
    from outlier_probe.report.retrofit_report import OUTPUTS, retrofit_table, write
    from outlier_probe.retrofit import run_retrofit
    from outlier_probe.retrofit_config import RetrofitConfig

    try:
        seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"--seeds takes integers separated by commas, got {seeds!r}") from None
    cfg = RetrofitConfig(source=checkpoint, variants=tuple(v.strip() for v in attention.split(",") if v.strip()), data=data,
                         include=include_files, objective=objective, preset=preset, steps=steps, batch_size=batch_size,
                         seq_len=seq_len, lr=lr, warmup=warmup, eval_every=eval_every, eval_samples=eval_samples, head_steps=head_steps, seeds=seed_list,
                         gamma=gamma, gate_init=gate_init, tokenizer=tokenizer, device=device, threads=threads, out=out, save=save,
                         placement=o.placement(device_map, max_memory, offload_folder))
    if data is not None and not Path(data).exists():
        raise UsageError(f"--data {data} does not exist")
    target = check_out_dir(o.default_out(checkpoint, out, "-retrofit"))
    if not resume and not overwrite and any((target / f).exists() for f in OUTPUTS):
        raise UsageError(f"{target} already holds a retrofit report; pass --resume, --overwrite or another --out")
    if save is not None:
        ensure_writable_dir(save)
    parts = target / PARTS
    done = _read_parts(parts, cfg) if resume else {}
    console = Console(stderr=True, quiet=quiet)

    def save_part(twin: object) -> None:
        from outlier_probe.report.io import write_json

        ensure_writable_dir(parts)
        write_json(parts / f"{twin.variant.value}-s{twin.seed}.json", _twin_doc(twin, cfg))

    result = run_retrofit(cfg, log=console.print, done=done, on_twin=save_part)
    ensure_writable_dir(target)
    command = _command(cfg, preset)
    from outlier_probe.report.io import all_or_nothing

    with all_or_nothing():  # every report or none (errors, Ctrl-C, SIGTERM)
        written = write(result, target, command)
    for f in parts.glob("*.json") if parts.is_dir() else ():
        f.unlink()
    if parts.is_dir():
        parts.rmdir()
    if not quiet:
        Console().print(retrofit_table(result))
        Console().print(f"reports: {', '.join(str(p) for p in written)}")


def _command(cfg: object, preset: str) -> str:
    """The resolved settings as one command line that reruns the same experiment."""
    parts = ["outlier-probe", "retrofit", cfg.source, "--attention", ",".join(v.value for v in cfg.variants)]
    if cfg.data is not None:
        parts += ["--data", str(cfg.data), "--include-files", cfg.include]
    parts += ["--objective", cfg.objective.value, "--preset", preset, "--seeds", ",".join(map(str, cfg.seeds))]
    for name in ("steps", "batch_size", "seq_len", "lr", "warmup", "eval_every", "eval_samples", "head_steps", "gamma", "gate_init", "tokenizer", "threads"):
        if getattr(cfg, name) is not None:
            parts += [f"--{name.replace('_', '-')}", str(getattr(cfg, name))]
    place = cfg.placement
    for flag, value in (("--device-map", place.device_map), ("--max-memory", place.max_memory), ("--offload-folder", place.offload_folder)):
        if value is not None:
            parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts + ["--device", cfg.device.value] + (["--out", str(cfg.out)] if cfg.out else [])
                                    + (["--save", str(cfg.save)] if cfg.save else []))


def _twin_doc(twin: object, cfg: object) -> dict:
    from outlier_probe.stats.run import settings_of

    return {"settings": settings_of(cfg), "variant": twin.variant.value, "seed": twin.seed, "params": twin.params,
            "before": twin.before.row(), "after": twin.after.row(), "curve": twin.curve, "step_s": twin.step_s, "saved": twin.saved}


def _read_parts(parts: Path, cfg: object) -> dict:
    """Twins finished by an interrupted run with the same settings (others are redone)."""
    from outlier_probe.config import AttentionVariant
    from outlier_probe.retrofit_config import Twin
    from outlier_probe.retrofit_measure import Measurement
    from outlier_probe.stats.run import settings_of

    done, now = {}, json.loads(json.dumps(settings_of(cfg), default=str))
    for f in sorted(parts.glob("*.json")) if parts.is_dir() else ():
        doc = json.loads(f.read_text())
        if {k: v for k, v in doc["settings"].items() if k not in ("seeds", "variants")} != {k: v for k, v in now.items() if k not in ("seeds", "variants")}:
            continue
        twin = Twin(AttentionVariant(doc["variant"]), doc["seed"], doc["params"], Measurement(**doc["before"]),
                    Measurement(**doc["after"]), doc["curve"], doc["step_s"], doc.get("saved"))
        done[(twin.variant.value, twin.seed)] = twin
    return done
