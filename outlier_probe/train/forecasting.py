"""Training a forecaster on the shared loop (`loop.run`): epochs over shuffled training windows, Adam, MSE
loss, gradient clipping, lr halved at fixed epochs (Crossformer / STanHop's `lradj type1`), early stopping
on validation MSE with patience, the best checkpoint kept and restored (what the paper's recipe does)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from outlier_probe.errors import UsageError
from outlier_probe.forecast import model as fmodel
from outlier_probe.forecast.data import Series, read_series
from outlier_probe.forecast.metrics import evaluate
from outlier_probe.train.loop import LoopOptions, LoopState, run

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
    time_budget: float | None = None  # seconds; stops at the step that crosses it (that partial epoch is evaluated)
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
    task = _ForecastTask(cfg, series, model, opt, (x_tr, y_tr), (x_va, y_va), progress, log)
    opts = LoopOptions(steps=task.steps_per_epoch * cfg.epochs, eval_every=task.steps_per_epoch, time_budget=cfg.time_budget,
                       grad_clip=cfg.grad_clip, halve_at=cfg.halve_at, metric="val_mse", patience=cfg.patience, keep_best=True)
    state = run(task, opts)
    return ForecastTrainResult(cfg.out, tuple(state.rows), state.best_round, state.best, _STOPPED[state.stopped_by],
                               state.elapsed(), model)


_STOPPED = {"steps": "epochs", "early_stopping": "early stopping", "time_budget": "time budget"}


class _ForecastTask:
    """The forecasting task for `loop.run`: a round is an epoch over a fresh random subset of the training
    windows (one permutation per epoch from a generator seeded by cfg.seed), MSE loss, validation MSE / MAE."""

    def __init__(self, cfg: ForecastTrainConfig, series: Series, model: fmodel.STanHopNet, opt: torch.optim.Optimizer,
                 train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], progress: Progress | None,
                 log: Callable[[str], None] | None) -> None:
        self.cfg, self.series, self.model, self.opt, self.train, self.val = cfg, series, model, opt, train, val
        self.on_progress, self.log = progress, log
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.n_epoch = min(cfg.train_windows or train[0].shape[0], train[0].shape[0])
        self.steps_per_epoch = math.ceil(self.n_epoch / cfg.batch_size)
        self.perm = torch.empty(0, dtype=torch.long)

    def batch(self, step: int) -> torch.Tensor:
        i = step % self.steps_per_epoch
        if i == 0:
            self.perm = torch.randperm(self.train[0].shape[0], generator=self.gen)[: self.n_epoch]
        return self.perm[i * self.cfg.batch_size : (i + 1) * self.cfg.batch_size].to(self.train[0].device)

    def loss(self, idx: torch.Tensor) -> tuple[torch.Tensor, int]:
        x, y = self.train
        return torch.nn.functional.mse_loss(self.model(x[idx]), y[idx]), idx.numel()

    def evaluate(self, state: LoopState) -> dict[str, Any]:
        val = evaluate(self.model, *self.val)
        row = {"epoch": state.rounds, "step": state.step, "lr": self.opt.param_groups[0]["lr"], "train_mse": state.round_loss,
               "val_mse": val.mse, "val_mae": val.mae, "elapsed_s": round(state.elapsed(), 2)}
        if self.log:
            self.log(f"epoch {state.rounds}: train {row['train_mse']:.4f} val {val.mse:.4f} ({row['elapsed_s']:.0f} s)")
        return row

    def save(self, state: LoopState) -> None:
        if self.cfg.out is None:
            return
        import pandas as pd

        from outlier_probe.report.io import write_csv, write_json

        fmodel.save(self.model, self.cfg.out)
        write_csv(self.cfg.out / "train_log.csv", pd.DataFrame(state.rows))
        write_json(self.cfg.out / "training.json", {"settings": self.cfg.describe(), "data": self.series.describe(),
                                                     "best_epoch": state.best_round, "best_val_mse": state.best,
                                                     "stopped_by": _STOPPED[state.stopped_by]})

    def progress(self, state: LoopState) -> None:
        if self.on_progress is not None:
            self.on_progress(state.step, self.cfg.epochs * self.steps_per_epoch, f"epoch {(state.step - 1) // self.steps_per_epoch + 1}")
