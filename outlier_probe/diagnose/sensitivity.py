"""`sensitivity`: which groups W8A8 breaks, and a mixed-precision plan that meets a budget.

Float pass once (it records the reference distribution), the fully quantized model once, then for each
group (a) only this group quantized and (b) everything quantized except this group, every run built,
calibrated and scored exactly as `quantize` does (quant/run.build_calibrated) on the same batches.
"""

from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from outlier_probe import arch
from outlier_probe.config import DataConfig, LoadConfig
from outlier_probe.data import batches_for_model
from outlier_probe.diagnose.divergence import OutputDivergence, divergence_name
from outlier_probe.diagnose.groups import GroupBy, group_points, select_groups
from outlier_probe.diagnose.plan import Budget, Plan, greedy_plan
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.evaluation import METRIC_NOTES, Evaluator, MetricName
from outlier_probe.loading import LoadedModel, load_model
from outlier_probe.quant.keep import KeepFloat, module_of
from outlier_probe.quant.recipes import QuantConfig, quant_points, quantize_model
from outlier_probe.quant.calibration import build_calibrated, calibration_config
from outlier_probe.stats.run import settings_of
from outlier_probe.stats.heap import collect_if_alive

Progress = Callable[[int, int, str], None]  # (runs done, runs planned, what runs now)


@dataclass(frozen=True)
class SensitivityConfig:
    load: LoadConfig
    data: DataConfig = field(default_factory=DataConfig)
    recipe: QuantConfig = field(default_factory=QuantConfig)
    group_by: GroupBy = GroupBy.layer
    groups: tuple[str, ...] = ()  # fnmatch patterns on group names; empty = every group
    budget: Budget | None = None  # None: rank only, no plan
    max_float: int | None = None  # most groups a plan may keep in float (default: all but one)
    metric: MetricName | None = None

    def __post_init__(self) -> None:
        if self.max_float is not None and self.max_float < 0:
            raise UsageError(f"--max-float must be >= 0, got {self.max_float}")


@dataclass(frozen=True)
class Measured:
    value: float  # the metric
    divergence: float  # KL vs float (or 1 - cos)


@dataclass(frozen=True)
class GroupResult:
    name: str
    points: tuple[str, ...]
    only: Measured  # (a) only this group quantized
    all_but: Measured  # (b) everything quantized except this group
    rank: int = 0  # 1 = most damaging (largest divergence when quantized alone)


@dataclass
class SensitivityResult:
    model: dict[str, Any]
    data: dict[str, Any]
    calibration: dict[str, Any]
    settings: dict[str, Any]
    metric: MetricName
    metric_note: str
    divergence: str  # "kl" or "1-cos"
    float_value: float
    quantized: Measured  # everything quantized
    groups: list[GroupResult]  # ranked
    plan: Plan | None
    group_points: dict[str, tuple[str, ...]]  # every group of the model (also the ones not selected)
    runs: int = 0  # quantized evaluations made (build + calibrate + score)
    seconds: float = 0.0
    linear_modules: frozenset[str] = frozenset()  # Linear modules the recipe quantizes
    head_modules: tuple[str, ...] = ()  # Linear modules of the head (float in every recipe)

    @property
    def higher_is_better(self) -> bool:
        return self.metric.higher_is_better

    def keep_points(self, kept: tuple[str, ...]) -> list[str]:
        return sorted(p for g in kept for p in self.group_points[g])

    def ignore_list(self, kept: tuple[str, ...]) -> list[str]:
        """llm-compressor `ignore:` entries: the head and every Linear module of the kept groups."""
        kept_linear = {module_of(p) for p in self.keep_points(kept)} & self.linear_modules
        return [*self.head_modules, *sorted(kept_linear)]


def run_sensitivity(cfg: SensitivityConfig, progress: Progress | None = None,
                    loaded: LoadedModel | None = None) -> SensitivityResult:
    start = time.perf_counter()
    loaded = loaded or load_model(cfg.load)
    full, full_sites = quantize_model(loaded.model, cfg.recipe, loaded.attention, loaded.attention_params)
    points = quant_points(full, full_sites)
    all_groups = group_points(loaded.model, points, cfg.group_by)
    del full, full_sites
    linear, heads = arch.linear_module_names(loaded.model)
    linear_modules = frozenset(m for m in linear if f"{m}:weight" in {p.name for p in points})
    if not all_groups:
        raise UsageError("the recipe quantizes nothing in this model, so there is nothing to rank")
    chosen = select_groups(all_groups, cfg.groups)
    max_float = len(chosen) - 1 if cfg.max_float is None else min(cfg.max_float, len(chosen))

    torch.manual_seed(cfg.data.seed)
    image_size = getattr(loaded.model.config, "image_size", None)
    batches = batches_for_model(loaded.processor, loaded.info, cfg.data, image_size)
    calib = batches_for_model(loaded.processor, loaded.info, calibration_config(cfg.data, cfg.recipe), image_size)
    evaluator = Evaluator(loaded.info.task, batches.batches, loaded.processor, cfg.data.seed, cfg.metric)
    planned = 1 + 2 * len(chosen)
    done = 0

    def tick(label: str) -> None:
        if progress is not None:
            progress(done, planned, label)

    tick("float")
    with OutputDivergence(evaluator, loaded.model) as recorder:
        float_score = evaluator.reference_score(loaded.model)
    if not math.isfinite(float_score.value):
        raise ProbeError(f"the float model's {float_score.metric.value} is not finite; check the checkpoint")
    reference = recorder.reference

    def measure(keep: KeepFloat) -> Measured:
        nonlocal done
        qmodel, _ = build_calibrated(loaded, cfg.recipe, calib, keep)
        with OutputDivergence(evaluator, qmodel, reference) as meter:
            score = evaluator(qmodel)
        dropped = weakref.ref(qmodel)
        del qmodel
        collect_if_alive(dropped)
        done += 1
        return Measured(score.value, meter.divergence(score))

    every = frozenset(p for pts in all_groups.values() for p in pts)
    tick("all quantized")
    quantized = measure(KeepFloat())
    results = []
    for name, pts in chosen.items():
        tick(f"{name}: alone")
        only = measure(KeepFloat(every - frozenset(pts)))
        tick(f"{name}: all but")
        all_but = measure(KeepFloat(frozenset(pts)))
        results.append(GroupResult(name, pts, only, all_but))
    order = sorted(results, key=lambda g: (-_nan_low(g.only.divergence), _worse_first(g.all_but.value, float_score.metric)))
    results = [GroupResult(g.name, g.points, g.only, g.all_but, i + 1) for i, g in enumerate(order)]

    plan = None
    if cfg.budget is not None:
        # runs already made, by the points they kept in float: a plan step that repeats one is not rerun
        cache = {frozenset(): quantized}
        for g in results:
            cache[frozenset(g.points)] = g.all_but
            cache[every - frozenset(g.points)] = g.only

        def evaluate(kept: tuple[str, ...]) -> tuple[float, float]:
            nonlocal planned
            key = frozenset(p for g in kept for p in all_groups[g])
            if key not in cache:
                planned += 1
                tick(f"plan: {len(kept)} in float")
                cache[key] = measure(KeepFloat(key))
            return cache[key].value, cache[key].divergence

        plan = greedy_plan([g.name for g in results], cfg.budget, float_score.value,
                           float_score.metric.higher_is_better, evaluate, max_float)
    tick("done")
    return SensitivityResult(
        model=loaded.describe(), data=batches.describe(),
        calibration={**calib.describe(), "batches": len(calib.batches)},
        settings=settings_of(cfg), metric=float_score.metric, metric_note=METRIC_NOTES[float_score.metric],
        divergence=divergence_name(float_score.metric), float_value=float_score.value, quantized=quantized,
        groups=results, plan=plan, group_points=all_groups, runs=done, seconds=time.perf_counter() - start,
        linear_modules=linear_modules, head_modules=tuple(heads),
    )


def _nan_low(x: float) -> float:
    return -math.inf if math.isnan(x) else x


def _worse_first(value: float, metric: MetricName) -> float:
    """Tie-break: the group whose float-keeping helps most comes first."""
    v = -math.inf if math.isnan(value) else value
    return -v if metric.higher_is_better else v
