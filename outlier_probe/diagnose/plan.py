"""Mixed-precision plans: keep the most damaging groups in float until the whole model meets a budget.

Per-group effects do not add up, so every step is a real whole-model run (`evaluate` below), never a sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from outlier_probe.errors import UsageError


@dataclass(frozen=True)
class Budget:
    """Allowed loss of the quantized model vs float: relative (`1%`) or absolute (`0.5`) in metric units."""

    value: float
    relative: bool

    @classmethod
    def parse(cls, text: str) -> Budget:
        raw = text.strip()
        relative = raw.endswith("%")
        try:
            value = float(raw.rstrip("%"))
        except ValueError:
            raise UsageError(f"--budget {text!r} is not a number; use e.g. 1% (relative) or 0.02 (absolute)") from None
        if not math.isfinite(value) or value < 0:
            raise UsageError(f"--budget must be a finite number >= 0, got {text!r}")
        return cls(value / 100.0 if relative else value, relative)

    def loss(self, float_value: float, quant_value: float, higher_is_better: bool) -> float:
        """The quantity the budget bounds: how much worse the quantized value is (relative or absolute)."""
        worse = (float_value - quant_value) if higher_is_better else (quant_value - float_value)
        if self.relative:
            return worse / abs(float_value) if float_value else math.inf
        return worse

    def allows(self, float_value: float, quant_value: float, higher_is_better: bool) -> bool:
        loss = self.loss(float_value, quant_value, higher_is_better)
        return math.isfinite(quant_value) and loss <= self.value

    def describe(self) -> str:
        return f"{100 * self.value:g}% relative" if self.relative else f"{self.value:g} absolute"


@dataclass(frozen=True)
class PlanStep:
    step: int  # 0: everything quantized
    kept: tuple[str, ...]  # groups in float after this step
    value: float  # whole-model metric, measured
    divergence: float  # KL (or 1 - cos) vs float, measured
    loss: float  # what the budget bounds
    meets: bool


@dataclass(frozen=True)
class Plan:
    budget: Budget
    steps: tuple[PlanStep, ...]
    met: bool
    chosen: int  # index of the step the plan recommends: the first that meets, else the best one

    @property
    def final(self) -> PlanStep:
        return self.steps[self.chosen]


Evaluate = Callable[[tuple[str, ...]], tuple[float, float]]  # kept groups -> (metric, divergence)


def greedy_plan(order: list[str], budget: Budget, float_value: float, higher_is_better: bool,
                evaluate: Evaluate, max_float: int) -> Plan:
    """Keep groups in float in `order` (most damaging first), one more per step, until the budget holds.

    Step 0 is the fully quantized model. Stops at the first step that meets the budget, or after
    `max_float` groups; then the plan is the step with the smallest loss (and `met` is False).
    """
    steps: list[PlanStep] = []
    for k in range(0, min(max_float, len(order)) + 1):
        kept = tuple(order[:k])
        value, div = evaluate(kept)
        loss = budget.loss(float_value, value, higher_is_better)
        step = PlanStep(k, kept, value, div, loss, budget.allows(float_value, value, higher_is_better))
        steps.append(step)
        if step.meets:
            return Plan(budget, tuple(steps), True, k)
    best = min(range(len(steps)), key=lambda i: (steps[i].loss if math.isfinite(steps[i].loss) else math.inf, i))
    return Plan(budget, tuple(steps), False, best)
