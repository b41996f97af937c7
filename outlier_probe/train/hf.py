"""`train(cfg)`: the transformer families on the shared loop (`loop.run`). The task: a Hugging Face model
built, `--from` a checkpoint or resumed (`setup`); causal / masked LM batches (`lm`) or images (`vision`)
through `batches`; AdamW with a warmup + cosine / linear schedule per step; every `eval_every` steps the
eval loss and an outlier probe (kurtosis, inf-norm of the block outputs); checkpoints with the optimizer
state for --resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlier_probe import arch
from outlier_probe.config import AttentionVariant, LoadConfig, SiteKind, SiteSelection, StatsConfig
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.train.batches import _Data, _loss, _Sampler, _to, _train_batch
from outlier_probe.train.config import (CONFIG_FILE, LOG_COLUMNS, LOG_FILE, STATE_FILE, _RESUME_KEYS, Precision, Progress,
                                        TrainConfig, TrainResult, TrainStatus)
from outlier_probe.train.loop import LoopOptions, LoopState, _param_groups, _threads, lr_factor, run
from outlier_probe.train.setup import _Setup, _setup


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
    state = LoopState()
    tokens0 = 0
    if cfg.resume:
        saved = torch.load(out / STATE_FILE, map_location=dev, weights_only=True)
        opt.load_state_dict(saved["optimizer"])
        state.step, tokens0, state.elapsed_before = int(saved["step"]), int(saved["tokens"]), float(saved["elapsed_s"])
        state.rows = _read_log(out / LOG_FILE)
    settings = {**settings_of(cfg), "run": cfg.run, "out": str(out), "device": device, "threads": torch.get_num_threads(), "source": setup.source,
                "data_description": d.description, "torch": torch.__version__, "transformers": transformers.__version__,
                "parameters": sum(p.numel() for p in model.parameters())}
    task = _HFTask(cfg, setup, opt, dev, settings, out, progress, tokens0, state.step)
    opts = LoopOptions(steps=cfg.steps, eval_every=cfg.eval_every, time_budget=cfg.time_budget, grad_clip=cfg.grad_clip,
                       lr_at=lambda step, frac: cfg.lr * lr_factor(cfg, step, frac), log_every=cfg.log_every,
                       save_every=cfg.save_every, graceful_stop=True, out=out, diverged_hint="lower --lr or raise --warmup")
    state = run(task, opts, state)
    rows = state.rows
    if cfg.plots and rows:
        from outlier_probe.report.plots import training_curves

        training_curves(rows, out / "outliers.png", title=f"{cfg.run}: outliers during training")
    final = rows[-1]["eval_loss"] if rows else float("nan")
    tps = task.per_step * state.run_steps / state.run_time if state.run_time > 0 else float("nan")
    return TrainResult(out, state.step, task.tokens(state), final, tuple(rows), state.stopped_by, tps, settings, model, setup.processor)


class _HFTask:
    """The transformer task for `loop.run`: batches by step, the LM / image loss, eval loss + outlier probe per round."""

    def __init__(self, cfg: TrainConfig, setup: _Setup, opt: torch.optim.Optimizer, dev: torch.device, settings: dict[str, Any],
                 out: Path, progress: Progress | None, tokens0: int, step0: int) -> None:
        self.cfg, self.setup, self.model, self.opt, self.dev, self.settings, self.out = cfg, setup, setup.model, opt, dev, settings, out
        self.on_progress, self.tokens0, self.step0 = progress, tokens0, step0
        self.per_step = cfg.batch_size * setup.data.tokens_per_sample  # training tokens of one step
        self.sampler = _Sampler(setup.data.n_train, cfg.batch_size, cfg.seed)
        self.probe_sites = arch.find_sites(self.model, SiteSelection(kinds=(SiteKind.block_output,)))
        bf16 = cfg.precision is Precision.bf16 or (cfg.precision is Precision.auto and dev.type == "cuda")
        self.autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    def tokens(self, state: LoopState) -> int:
        return self.tokens0 + (state.step - self.step0) * self.per_step

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        return _to(_train_batch(self.setup.data, self.sampler, step, self.setup.tokenizer, self.cfg.seed), self.dev)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        with self.autocast:
            loss, _ = _loss(self.model, batch, self.setup.data.task)
        return loss, 1  # the logged train loss: the mean over steps

    def evaluate(self, state: LoopState) -> dict[str, Any]:
        eval_loss = _eval_loss(self.model, self.setup.data, self.dev, self.autocast)
        summary = _probe(self.model, self.setup.data, self.probe_sites, self.setup)
        tps = state.round_steps * self.per_step / state.round_time if state.round_time > 0 else float("nan")
        return {"run": self.cfg.run, "step": state.step, "tokens": self.tokens(state), "train_loss": state.round_loss,
                "eval_loss": eval_loss, "avg_kurtosis": summary["avg_kurtosis"], "max_inf_norm": summary["max_inf_norm"],
                "tokens_per_s": tps, "elapsed_s": state.elapsed()}

    def save(self, state: LoopState) -> None:
        _save(self.model, self.setup.processor, self.opt, self.out, state.rows, self.settings, state.step, self.tokens(state),
              state.elapsed(), self.setup.data)

    def progress(self, state: LoopState) -> None:
        if self.on_progress is not None:
            self.on_progress(TrainStatus(state.step, self.cfg.steps, state.elapsed(), self.cfg.time_budget, self.tokens(state),
                                         state.train_loss, state.rows[-1]["eval_loss"] if state.rows else None,
                                         state.run_steps * self.per_step / state.run_time if state.run_time > 0 else None))


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
