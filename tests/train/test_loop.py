"""The shared loop's round logic against hand-computed expectations: a scripted validation curve drives
early stopping, patience, the best checkpoint and lr halving; the train loss is the weighted round mean."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from outlier_probe.train.loop import LoopOptions, LoopState, run


class Scripted:
    """Step s has loss s with weight s + 1 (zero gradients: Adam leaves the weight alone); ending round r
    sets the weight to r, so the kept checkpoint says which round it came from."""

    def __init__(self, curve: list[float]) -> None:
        self.model = nn.Linear(1, 1, bias=False)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1.0)
        self.curve, self.saved, self.progressed = curve, [], 0

    def batch(self, step: int) -> int:
        return step

    def loss(self, step: int) -> tuple[torch.Tensor, int]:
        return self.model.weight.sum() * 0 + float(step), step + 1

    def evaluate(self, state: LoopState) -> dict[str, Any]:
        with torch.no_grad():
            self.model.weight.fill_(state.rounds)
        return {"step": state.step, "lr": self.opt.param_groups[0]["lr"], "train": state.round_loss,
                "val": self.curve[state.rounds - 1]}

    def save(self, state: LoopState) -> None:
        self.saved.append((len(state.rows), self.model.weight.item(), state.stopped_by))

    def progress(self, state: LoopState) -> None:
        self.progressed += 1


CURVE = [5.0, 4.0, 4.5, 3.0, 3.5, 3.2, 3.1, 9.0]


def test_early_stopping_restores_the_best_round_and_halves_the_lr() -> None:
    task = Scripted(CURVE)
    opts = LoopOptions(steps=16, eval_every=2, halve_at=(2, 4), metric="val", patience=3, keep_best=True)
    state = run(task, opts)
    # rounds 5, 6, 7 (3.5, 3.2, 3.1) do not beat round 4's 3.0: patience 3 stops after round 7, at step 14
    assert state.stopped_by == "early_stopping" and state.step == 14 and len(state.rows) == 7
    assert (state.best_round, state.best, state.bad_rounds) == (4, 3.0, 3)
    # halved after rounds 2 and 4 (each row shows the lr its round trained with)
    assert [r["lr"] for r in state.rows] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25, 0.25]
    # round 1: steps 0 and 1, losses 0 and 1, weights 1 and 2 -> 2/3; round 2: (2*3 + 3*4) / 7
    assert state.rows[0]["train"] == pytest.approx(2 / 3) and state.rows[1]["train"] == pytest.approx(18 / 7)
    # the weights of round 4 are restored before the one save at the end
    assert task.saved == [(7, 4.0, "early_stopping")] and task.model.weight.item() == 4.0
    assert not task.model.training and task.progressed == 13  # the stopping step ends the loop before its progress call


def test_without_patience_every_round_runs_and_the_last_best_wins() -> None:
    task = Scripted(CURVE)
    state = run(task, LoopOptions(steps=16, eval_every=2, halve_at=(2, 4, 8), metric="val", keep_best=True))
    assert state.stopped_by == "steps" and state.step == 16 and len(state.rows) == 8
    assert state.best_round == 4 and task.model.weight.item() == 4.0
    assert task.opt.param_groups[0]["lr"] == 0.125  # halved after rounds 2, 4 and 8


def test_a_partial_last_round_is_evaluated_and_nan_stops_with_one_line() -> None:
    task = Scripted(CURVE)
    state = run(task, LoopOptions(steps=5, eval_every=2))  # rounds end at steps 2, 4 and (partial) 5
    assert [r["step"] for r in state.rows] == [2, 4, 5] and state.rows[2]["train"] == pytest.approx(4.0)
    task = Scripted([float("nan")])
    with pytest.raises(Exception, match="training diverged by step 2 \\(val nan\\)"):
        run(task, LoopOptions(steps=4, eval_every=2, metric="val"))
