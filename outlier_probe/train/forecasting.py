"""Training a forecaster: epochs over shuffled training windows, Adam, MSE loss, gradient clipping,
lr halved at fixed epochs (Crossformer / STanHop's `lradj type1`), early stopping on validation MSE
with patience, the best checkpoint kept (what the paper's recipe does)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.forecast import model as fmodel
from outlier_probe.forecast.data import Series, read_series
from outlier_probe.forecast.metrics import evaluate

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ForecastTrainConfig:
    data: Path
    model: fmodel.StanhopConfig = field(default_factory=fmodel.StanhopConfig)
    lr: float = 1e-4
    batch_size: int = 128
    epochs: int = 100
    patience: int = 5
    halve_at: tuple[int, ...] = (2, 4, 6, 8, 10)  # epochs (1-based) after which the lr is halved
    grad_clip: float = 5.0
    train_windows: int | None = None  # per epoch, a random subset of the training windows; None: all
    val_windows: int | None = None  # the first N validation windows; None: all
    seed: int = 0
    threads: int | None = None
    time_budget: float | None = None  # seconds; stops after the epoch that crosses it
    device: str = "cpu"
    out: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", Path(self.data))
        for name in ("batch_size", "epochs", "patience"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        for name in ("train_windows", "val_windows", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d["data"], d["out"] = str(self.data), None if self.out is None else str(self.out)
        d["model"] = self.model.to_dict()
        return d


@dataclass(frozen=True)
class ForecastTrainResult:
    out: Path | None
    rows: tuple[dict[str, Any], ...]
    best_epoch: int
    best_val_mse: float
    stopped_by: str
    seconds: float
    model: Any = field(repr=False, default=None)


def train_forecaster(cfg: ForecastTrainConfig, progress: Progress | None = None, log: Callable[[str], None] | None = None) -> ForecastTrainResult:
    series = read_series(cfg.data, cfg.model.in_len, cfg.model.horizon)
    mcfg = replace(cfg.model, data_dim=len(series.columns), columns=series.columns)
    previous_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, series, mcfg, progress, log)
    finally:
        torch.set_num_threads(previous_threads)


def _train(cfg: ForecastTrainConfig, series: Series, mcfg: fmodel.StanhopConfig, progress: Progress | None,
           log: Callable[[str], None] | None) -> ForecastTrainResult:
    dev = torch.device(cfg.device)
    x_tr, y_tr = (t.to(dev) for t in series.tensors("train"))
    x_va, y_va = (t.to(dev) for t in series.tensors("val", cfg.val_windows))
    model = fmodel.build(mcfg, cfg.seed).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_epoch = min(cfg.train_windows or x_tr.shape[0], x_tr.shape[0])
    steps_per_epoch = math.ceil(n_epoch / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    best, best_epoch, best_state, bad, rows, stopped = math.inf, 0, None, 0, [], "epochs"
    start, step = time.perf_counter(), 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(x_tr.shape[0], generator=gen)[:n_epoch]
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        for i in range(0, n_epoch, cfg.batch_size):
            idx = perm[i : i + cfg.batch_size].to(dev)
            loss = torch.nn.functional.mse_loss(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_sum += loss.detach() * idx.numel()
            step += 1
            if progress is not None:
                progress(step, total, f"epoch {epoch}")
        val = evaluate(model, x_va, y_va)
        if not math.isfinite(val.mse):
            raise ProbeError(f"training diverged in epoch {epoch} (validation MSE {val.mse}); lower --lr")
        row = {"epoch": epoch, "step": step, "lr": opt.param_groups[0]["lr"], "train_mse": float(loss_sum) / n_epoch,
               "val_mse": val.mse, "val_mae": val.mae, "elapsed_s": round(time.perf_counter() - start, 2)}
        rows.append(row)
        if log:
            log(f"epoch {epoch}: train {row['train_mse']:.4f} val {val.mse:.4f} ({row['elapsed_s']:.0f} s)")
        if val.mse < best:
            best, best_epoch, bad = val.mse, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad += 1
            if bad >= cfg.patience:
                stopped = "early stopping"
                break
        if epoch in cfg.halve_at:
            for g in opt.param_groups:
                g["lr"] *= 0.5
        if cfg.time_budget is not None and time.perf_counter() - start >= cfg.time_budget:
            stopped = "time budget"
            break
    model.load_state_dict(best_state)
    model.eval()
    if cfg.out is not None:
        from outlier_probe.report.io import write_csv, write_json

        fmodel.save(model, cfg.out)
        import pandas as pd

        write_csv(cfg.out / "train_log.csv", pd.DataFrame(rows))
        write_json(cfg.out / "training.json", {"settings": cfg.describe(), "data": series.describe(),
                                                "best_epoch": best_epoch, "best_val_mse": best, "stopped_by": stopped})
    return ForecastTrainResult(cfg.out, tuple(rows), best_epoch, best, stopped, time.perf_counter() - start, model)
