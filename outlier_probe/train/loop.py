"""The shared training loop of every task: optimizer steps (backward, gradient clipping, step), the lr
(a per-step schedule and / or halving at fixed rounds), the evaluation cadence (a round = `eval_every`
steps: an epoch for the forecaster), early stopping with patience on a validation metric with the best
weights kept and restored, the train-loss average read from the device once per `log_every` steps or
round, checkpoints (`save_every`, at the end, on Ctrl-C), log rows, progress and the step / time limits.

A task plugs in with a `Task`: its model and optimizer, the batch of step s, the loss of a batch, the
log row of a finished round (its evaluation), saving, progress. Tasks: `hf` (the transformer families:
causal / masked LM with `lm`, image classification with `vision`) and `forecasting` (STanHop-Net).
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from outlier_probe.errors import ProbeError
from outlier_probe.train.config import Schedule, TrainConfig, TrainingInterrupted


@dataclass(frozen=True)
class LoopOptions:
    steps: int | None  # optimizer steps in total (a resumed run's included); None: until the time budget
    eval_every: int  # steps per round: evaluation, log row, early stopping, lr halving happen between rounds
    time_budget: float | None = None  # seconds in total; checked before every step (the partial round is evaluated)
    grad_clip: float = 0.0  # max global grad norm; 0: none
    lr_at: Callable[[int, float], float] | None = None  # lr of step s (0-based) at progress p in [0, 1]; None: keep the optimizer's
    halve_at: tuple[int, ...] = ()  # rounds (1-based, of this call) after which the lr is halved
    metric: str | None = None  # row key that early stopping and the best checkpoint minimise
    patience: int | None = None  # stop after this many rounds in a row without a new best metric
    keep_best: bool = False  # restore the weights of the best round before the final save
    log_every: int = 0  # steps between reads of the train loss (host syncs); 0: once per round
    save_every: int = 0  # steps between checkpoints; 0: at the end only
    graceful_stop: bool = False  # Ctrl-C / SIGTERM: finish the step, save, raise TrainingInterrupted (--resume)
    out: Path | None = None  # named in the interruption message
    diverged_hint: str = "lower --lr"


@dataclass
class LoopState:
    """What the task sees: counters of the run (a resumed one included) and of this call."""

    step: int = 0  # optimizer steps done
    elapsed_before: float = 0.0  # seconds trained before a resume
    rows: list[dict[str, Any]] = field(default_factory=list)  # the log rows (a resumed run's first)
    rounds: int = 0  # rounds ended in this call; during `evaluate`, the number of the round being ended (1-based)
    train_loss: float | None = None  # mean train loss of the last read interval
    round_loss: float = float("nan")  # during `evaluate`: the mean train loss of the round (weighted by the loss's count)
    round_steps: int = 0  # steps since the last row ...
    round_time: float = 0.0  # ... and their training seconds (evaluations excluded)
    run_steps: int = 0  # steps of this call ...
    run_time: float = 0.0  # ... and their training seconds
    best: float = math.inf  # the best metric so far, its round, and rounds since
    best_round: int = 0
    bad_rounds: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    stopped_by: str = "steps"  # "steps", "time_budget", "early_stopping" or "already_done"
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start


class Task(Protocol):
    model: nn.Module
    opt: torch.optim.Optimizer

    def batch(self, step: int) -> Any: ...  # the batch of step `step` (0-based), on the device
    def loss(self, batch: Any) -> tuple[torch.Tensor, int]: ...  # mean loss (on the device), its weight in the round's average
    def evaluate(self, state: LoopState) -> dict[str, Any]: ...  # the log row of the round ending now
    def save(self, state: LoopState) -> None: ...
    def progress(self, state: LoopState) -> None: ...


def run(task: Task, opts: LoopOptions, state: LoopState | None = None) -> LoopState:
    """Train `task` until a limit (steps, time, patience); evaluate every round; save at the end."""
    state = state or LoopState()
    model, opt = task.model, task.opt
    params = [p for g in opt.param_groups for p in g["params"]]
    acc = torch.zeros((), dtype=torch.float64, device=params[0].device)  # weighted train-loss sum since the last read
    reads = {"acc_n": 0, "sum": 0.0, "n": 0}  # host: count since the last read; sum and count since the last row
    if opts.steps is not None and state.step >= opts.steps:
        state.stopped_by = "already_done"

    def read_loss() -> None:
        nonlocal acc
        if reads["acc_n"]:
            total = float(acc)  # the host sync, once per log interval
            if not math.isfinite(total):
                raise ProbeError(f"training diverged at step {state.step} (loss {total}); {opts.diverged_hint}")
            reads["sum"], reads["n"], state.train_loss = reads["sum"] + total, reads["n"] + reads["acc_n"], total / reads["acc_n"]
            acc, reads["acc_n"] = torch.zeros((), dtype=torch.float64, device=acc.device), 0

    def end_round() -> bool:
        """Log a row; True when early stopping ends the run."""
        read_loss()
        state.rounds += 1
        state.round_loss = reads["sum"] / max(reads["n"], 1)
        row = task.evaluate(state)
        state.rows.append(row)
        reads["sum"], reads["n"], state.round_steps, state.round_time = 0.0, 0, 0, 0.0
        if opts.metric is not None:
            value = row[opts.metric]
            if not math.isfinite(value):
                raise ProbeError(f"training diverged by step {state.step} ({opts.metric} {value}); {opts.diverged_hint}")
            if value < state.best:
                state.best, state.best_round, state.bad_rounds = value, state.rounds, 0
                if opts.keep_best:
                    state.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                state.bad_rounds += 1
                if opts.patience is not None and state.bad_rounds >= opts.patience:
                    return True
        if state.rounds in opts.halve_at:
            for group in opt.param_groups:
                group["lr"] *= 0.5
        return False

    model.train()
    consistent = True  # False while the weights and the step counter disagree (inside opt.step)
    sigint = _SigintFlag()
    try:
        with (_deferred_sigint() if opts.graceful_stop else _no_deferral()) as sigint:
            while state.stopped_by != "already_done":
                if opts.steps is not None and state.step >= opts.steps:
                    state.stopped_by = "steps"
                    break
                if opts.time_budget is not None and state.elapsed() >= opts.time_budget:
                    state.stopped_by = "time_budget"
                    break
                t0 = time.perf_counter()
                batch = task.batch(state.step)
                if opts.lr_at is not None:
                    frac = max(state.step / opts.steps if opts.steps else 0.0,
                               state.elapsed() / opts.time_budget if opts.time_budget else 0.0)
                    for group in opt.param_groups:
                        group["lr"] = opts.lr_at(state.step, frac)
                loss, weight = task.loss(batch)
                loss.backward()
                if opts.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, opts.grad_clip, foreach=True)
                consistent = False
                opt.step()
                state.step += 1
                consistent = True
                opt.zero_grad(set_to_none=True)
                acc += loss.detach() * weight
                reads["acc_n"] += weight
                if opts.log_every and state.step % opts.log_every == 0:
                    read_loss()
                dt = time.perf_counter() - t0
                state.round_steps, state.round_time = state.round_steps + 1, state.round_time + dt
                state.run_steps, state.run_time = state.run_steps + 1, state.run_time + dt
                if state.step % opts.eval_every == 0:
                    if end_round():
                        state.stopped_by = "early_stopping"
                        break
                    model.train()
                if opts.save_every and state.step % opts.save_every == 0:
                    task.save(state)
                task.progress(state)
                if sigint.requested:
                    raise KeyboardInterrupt
        if state.stopped_by != "already_done":
            if not state.rows or state.rows[-1]["step"] != state.step:
                end_round()
            if opts.keep_best and state.best_state is not None:
                model.load_state_dict(state.best_state)
            task.save(state)
    except KeyboardInterrupt:
        if not opts.graceful_stop:
            raise
        how = "terminated" if sigint.signum == signal.SIGTERM else "interrupted"
        if not consistent:  # a second Ctrl-C inside opt.step: the weights are half-updated, keep the last save
            raise TrainingInterrupted(f"{how} inside step {state.step + 1}; nothing saved since the last checkpoint in {opts.out}",
                                      sigint.signum) from None
        task.save(state)
        raise TrainingInterrupted(f"{how} at step {state.step}; checkpoint and training state saved in {opts.out}: "
                                  "continue with --resume", sigint.signum) from None
    model.eval()
    return state


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


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _threads(wanted: int | None) -> int:
    """CPU threads: `wanted`, else torch's default (the core count) capped at the CPU affinity (containers, taskset)."""
    if wanted is not None:
        return wanted
    try:
        return min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return torch.get_num_threads()


class _SigintFlag:
    requested = False
    signum = signal.SIGINT


@contextmanager
def _no_deferral() -> Iterator[_SigintFlag]:
    yield _SigintFlag()


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
