"""The shared training loop: optimizer, lr schedule, evaluation cadence, outlier probe, checkpoints,
train_log.csv, progress and Ctrl-C handling. Tasks plug in through `setup` (model + data) and
`batches` (sampler + loss)."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from outlier_probe import arch
from outlier_probe.config import AttentionVariant, LoadConfig, SiteKind, SiteSelection, StatsConfig
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.train.batches import _Data, _loss, _Sampler, _to, _train_batch
from outlier_probe.train.config import (CONFIG_FILE, LOG_COLUMNS, LOG_FILE, STATE_FILE, _RESUME_KEYS, Precision, Progress,
                                        Schedule, TrainConfig, TrainingInterrupted, TrainResult, TrainStatus)
from outlier_probe.train.setup import _Setup, _setup


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """lr / peak lr at `step` (0-based), `progress` in [0, 1] (the larger of the step and the time fraction)."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule is Schedule.cosine:
        decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    elif cfg.schedule is Schedule.linear:
        decay = 1 - (1 - cfg.min_lr_ratio) * p
    else:
        decay = 1.0
    return warm * decay



def _check_out(cfg: TrainConfig, out: Path) -> None:
    from outlier_probe.report.io import ensure_writable_dir

    if cfg.resume:
        if not (out / STATE_FILE).is_file() or not (out / "config.json").is_file():
            raise ProbeError(f"nothing to resume in {out}: it has no {STATE_FILE} and checkpoint; drop --resume or fix --out")
        saved_path = out / CONFIG_FILE
        if saved_path.is_file():
            from outlier_probe.stats.run import settings_of

            saved, now = json.loads(saved_path.read_text()).get("settings", {}), settings_of(cfg)
            diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now.get(k)!r})" for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
            if diff:
                raise UsageError(f"--resume needs the settings of the run in {out}; differing: {'; '.join(diff)}")
        return
    if (out / "config.json").exists() or (out / STATE_FILE).exists():
        if not cfg.overwrite:
            raise UsageError(f"{out} already holds a checkpoint; pass --resume to continue it, --overwrite to replace it, or another --out")
        (out / STATE_FILE).unlink(missing_ok=True)
        (out / LOG_FILE).unlink(missing_ok=True)
    ensure_writable_dir(out)


def _threads(wanted: int | None) -> int:
    """CPU threads: `wanted`, else torch's default (the core count) capped at the CPU affinity (containers, taskset)."""
    if wanted is not None:
        return wanted
    try:
        return min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return torch.get_num_threads()


def train(cfg: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Train one model as `cfg` says; save the checkpoint, training state and train_log.csv in cfg.out_dir."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from outlier_probe.report.io import no_empty_folders_on_error

    out = cfg.out_dir
    with no_empty_folders_on_error(out):  # bad data must not leave an empty run folder behind
        _check_out(cfg, out)
        device = cfg.device.resolve()
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(_threads(cfg.threads))
        try:
            return _train(cfg, progress, out, device)
        finally:
            torch.set_num_threads(previous_threads)


def _train(cfg: TrainConfig, progress: Progress | None, out: Path, device: str) -> TrainResult:
    import transformers

    from outlier_probe.stats.run import settings_of

    setup = _setup(cfg, out, device)
    model, d = setup.model, setup.data
    dev = torch.device(device)

    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=device == "cuda" or None)
    step, tokens, elapsed_before, rows = 0, 0, 0.0, []
    if cfg.resume:
        state = torch.load(out / STATE_FILE, map_location=dev, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step, tokens, elapsed_before = int(state["step"]), int(state["tokens"]), float(state["elapsed_s"])
        rows = _read_log(out / LOG_FILE)
    settings = {**settings_of(cfg), "run": cfg.run, "out": str(out), "device": device, "threads": torch.get_num_threads(), "source": setup.source,
                "data_description": d.description, "torch": torch.__version__, "transformers": transformers.__version__,
                "parameters": sum(p.numel() for p in model.parameters())}

    sampler = _Sampler(d.n_train, cfg.batch_size, cfg.seed)
    probe_sites = arch.find_sites(model, SiteSelection(kinds=(SiteKind.block_output,)))
    bf16 = cfg.precision is Precision.bf16 or (cfg.precision is Precision.auto and device == "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    params = [p for g in opt.param_groups for p in g["params"]]
    acc = torch.zeros((), device=dev)  # summed train loss since the last log read, on the device
    acc_steps, window_loss, window_steps = 0, 0.0, 0  # host: summed losses since the last row
    last_train: float | None = None
    last_eval = rows[-1]["eval_loss"] if rows else None
    last_tps: float | None = None
    row_tokens, row_time = 0, 0.0  # training tokens and seconds since the last row (evals excluded)
    run_tokens, run_time = 0, 0.0
    start = time.perf_counter()
    stopped_by = "already_done" if cfg.steps is not None and step >= cfg.steps else "steps"

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    def read_loss() -> None:
        nonlocal acc, acc_steps, window_loss, window_steps, last_train
        if acc_steps:
            total = float(acc)  # the host sync, once per log interval
            if not math.isfinite(total):
                raise ProbeError(f"training diverged at step {step} (loss {total}); lower --lr or raise --warmup")
            window_loss, window_steps, last_train = window_loss + total, window_steps + acc_steps, total / acc_steps
            acc, acc_steps = torch.zeros((), device=dev), 0

    def log_row() -> None:
        nonlocal window_loss, window_steps, row_tokens, row_time, last_eval, last_tps
        read_loss()
        last_eval = _eval_loss(model, d, dev, autocast)
        summary = _probe(model, d, probe_sites, setup)
        last_tps = row_tokens / row_time if row_time > 0 else float("nan")
        rows.append({"run": cfg.run, "step": step, "tokens": tokens, "train_loss": window_loss / max(window_steps, 1),
                     "eval_loss": last_eval, "avg_kurtosis": summary["avg_kurtosis"], "max_inf_norm": summary["max_inf_norm"],
                     "tokens_per_s": last_tps, "elapsed_s": elapsed()})
        window_loss, window_steps, row_tokens, row_time = 0.0, 0, 0, 0.0

    def save() -> None:
        _save(model, setup.processor, opt, out, rows, settings, step, tokens, elapsed(), d)

    model.train()
    consistent = True  # False while the weights and the step counter disagree (inside opt.step)
    sigint = _SigintFlag()
    try:
        with _deferred_sigint() as sigint:
            while stopped_by != "already_done":
                if cfg.steps is not None and step >= cfg.steps:
                    stopped_by = "steps"
                    break
                if cfg.time_budget is not None and elapsed() >= cfg.time_budget:
                    stopped_by = "time_budget"
                    break
                t0 = time.perf_counter()
                batch = _to(_train_batch(d, sampler, step, setup.tokenizer, cfg.seed), dev)
                frac = max(step / cfg.steps if cfg.steps else 0.0, elapsed() / cfg.time_budget if cfg.time_budget else 0.0)
                lr = cfg.lr * lr_factor(cfg, step, frac)
                for group in opt.param_groups:
                    group["lr"] = lr
                with autocast:
                    loss, _ = _loss(model, batch, d.task)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
                consistent = False
                opt.step()
                step += 1
                tokens += cfg.batch_size * d.tokens_per_sample
                consistent = True
                opt.zero_grad(set_to_none=True)
                acc += loss.detach()
                acc_steps += 1
                if step % cfg.log_every == 0:
                    read_loss()
                dt = time.perf_counter() - t0
                row_tokens, row_time = row_tokens + cfg.batch_size * d.tokens_per_sample, row_time + dt
                run_tokens, run_time = run_tokens + cfg.batch_size * d.tokens_per_sample, run_time + dt
                if step % cfg.eval_every == 0:
                    log_row()
                    model.train()
                if cfg.save_every and step % cfg.save_every == 0:
                    save()
                if progress is not None:
                    progress(TrainStatus(step, cfg.steps, elapsed(), cfg.time_budget, tokens, last_train, last_eval,
                                         run_tokens / run_time if run_time > 0 else None))
                if sigint.requested:
                    raise KeyboardInterrupt
        if stopped_by != "already_done":
            if not rows or rows[-1]["step"] != step:
                log_row()
            save()
    except KeyboardInterrupt:
        how = "terminated" if sigint.signum == signal.SIGTERM else "interrupted"
        if not consistent:  # a second Ctrl-C inside opt.step: the weights are half-updated, keep the last save
            raise TrainingInterrupted(f"{how} inside step {step + 1}; nothing saved since the last checkpoint in {out}", sigint.signum) from None
        save()
        raise TrainingInterrupted(f"{how} at step {step}; checkpoint and training state saved in {out}: continue with --resume", sigint.signum) from None
    model.eval()
    if cfg.plots and rows:
        from outlier_probe.report.plots import training_curves

        training_curves(rows, out / "outliers.png", title=f"{cfg.run}: outliers during training")
    final = rows[-1]["eval_loss"] if rows else float("nan")
    return TrainResult(out, step, tokens, final, tuple(rows), stopped_by,
                       run_tokens / run_time if run_time > 0 else float("nan"), settings, model, setup.processor)


class _SigintFlag:
    requested = False
    signum = signal.SIGINT


@contextmanager
def _deferred_sigint() -> Iterator[_SigintFlag]:
    """First Ctrl-C (or SIGTERM): finish the step, save, stop. A second one interrupts at once."""
    flag = _SigintFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested, flag.signum = True, signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@torch.no_grad()
def _eval_loss(model: nn.Module, d: _Data, device: torch.device, autocast: Any) -> float:
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for batch in d.eval_batches:
        with autocast:
            loss, n = _loss(model, _to(batch, device), d.task, reduction="sum")
        total, count = total + loss.double(), count + n
    return float(total / count.clamp(min=1))


def _probe(model: nn.Module, d: _Data, sites: list[arch.Site], setup: _Setup) -> dict[str, Any]:
    """Average kurtosis and max inf-norm over the block outputs, on the fixed probe batch (float32, eval mode)."""
    from outlier_probe.data import Batches
    from outlier_probe.loading import LoadedModel
    from outlier_probe.stats.run import measure_sites
    from outlier_probe.stats.summary import summarize

    model.eval()
    loaded = LoadedModel(model, setup.processor, arch.model_info(model), "training", setup.source, AttentionVariant.softmax, {})
    results = measure_sites(loaded, Batches([d.probe], "training probe batch"), StatsConfig(load=LoadConfig(source=setup.source)), sites=sites)
    return summarize([r.row() for r in results])


def _save(model: nn.Module, processor: Any, opt: torch.optim.Optimizer, out: Path, rows: list[dict[str, Any]],
          settings: dict[str, Any], step: int, tokens: int, elapsed_s: float, d: _Data) -> None:
    """Checkpoint (safetensors + tokenizer + variant metadata), training_state.pt, train_log.csv, train_config.json."""
    import pandas as pd

    from outlier_probe.loading import save_checkpoint
    from outlier_probe.report.io import atomic_open, write_csv, write_json

    save_checkpoint(model, out, processor)
    state = {"step": step, "tokens": tokens, "elapsed_s": elapsed_s, "optimizer": opt.state_dict(), "format": 1}
    with atomic_open(out / STATE_FILE, "wb") as handle:
        torch.save(state, handle)
    write_csv(out / LOG_FILE, pd.DataFrame(rows, columns=list(LOG_COLUMNS)))
    write_json(out / CONFIG_FILE, {"settings": settings, "step": step, "tokens": tokens, "log_columns": list(LOG_COLUMNS)})


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    import pandas as pd

    frame = pd.read_csv(path)
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in frame.to_dict("records")]
