"""`quantize`: load -> fake-quant copy -> calibrate ranges -> evaluate -> compare with float."""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from outlier_probe import arch, distributed_merge
from outlier_probe.config import DataConfig, LoadConfig, ObserverConfig, StatsConfig
from outlier_probe.data import Batches, batches_for_model
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.evaluation import METRIC_NOTES, Evaluator, MetricName, Score
from outlier_probe.loading import LoadedModel, load_model
from outlier_probe.quant.calibration import build_calibrated, calibrate, calibration_config, check_keep_float
from outlier_probe.quant.keep import KeepFloat
from outlier_probe.quant.mitigations.apply import AGranularity, Mitigation, apply_mitigation, transform_error
from outlier_probe.quant.recipes import Backend, QuantConfig, quantize_model
from outlier_probe.quant.sqnr import SQNRMeter, sqnr_site_rows, stats_sites
from outlier_probe.stats.heap import collect_if_alive
from outlier_probe.stats.hooks import observe
from outlier_probe.stats.observer import OutlierObserver
from outlier_probe.stats.run import forward, settings_of
from outlier_probe.stats.summary import summarize

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class QuantizeConfig:
    load: LoadConfig
    data: DataConfig = field(default_factory=DataConfig)
    recipes: tuple[QuantConfig, ...] = (QuantConfig(),)
    backends: tuple[Backend, ...] = ()  # real backends run next to the simulated recipes
    metric: MetricName | None = None
    site_stats: bool = True  # kurtosis / inf-norm next to each site's SQNR
    keep_float: KeepFloat | None = None  # quantization points left in float (a sensitivity plan or patterns)
    mitigations: tuple[Mitigation, ...] = ()  # runs next to each recipe's plain W8A8 (always run: the baseline)
    mitigation_stats: bool = False  # also measure outlier statistics of each transformed float model (compare)
    # also score each transformed float model on the evaluation data: one more float pass per run, that only
    # confirms what transform_error (always measured, on one calibration sequence) already shows
    score_transformed: bool = False
    act_scales: Path | None = None  # SmoothQuant input maxima from an earlier run (skips their float pass)


@dataclass
class RunResult:
    run: str
    float_score: Score
    quant_score: Score
    recipe: QuantConfig | None
    sites: list[dict[str, Any]] = field(default_factory=list)
    mitigation: str = "plain"
    transformed_float: float = math.nan  # the mitigated float model's score (NaN: not scored, see score_transformed)
    transform_error: float = 0.0  # max |y' - y| / max |y| of the transformed float model on one calibration sequence
    gap_closed: float = math.nan  # (plain gap - this gap) / plain gap, gaps = degradation from float
    details: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        f, q = self.float_score.value, self.quant_score.value
        r = self.recipe
        return {
            "run": self.run,
            "metric": self.float_score.metric.value,
            "higher_is_better": self.float_score.metric.higher_is_better,
            "float": f,
            "quantized": q,
            "abs_change": q - f,
            "rel_change": (q - f) / f if f else math.nan,
            "w_bits": r.w_bits if r else 8,
            "a_bits": r.a_bits if r else 8,
            "per_channel": r.per_channel if r else False,
            "w_estimator": r.w_estimator.value if r else "llm.int8",
            "a_estimator": r.a_estimator.value if r else "dynamic (threshold 6.0)",
            "description": r.describe() if r else "bitsandbytes LLM.int8: Linear8bitLt, threshold 6.0, fp16 outlier columns",
            "mitigation": self.mitigation,
            "transformed_float": self.transformed_float,
            "transform_error": self.transform_error,
            "gap_closed": self.gap_closed,
        }


@dataclass
class QuantizeResult:
    model: dict[str, Any]
    data: dict[str, Any]
    calibration: dict[str, Any]
    runs: list[RunResult]
    settings: dict[str, Any]
    metric_note: str
    site_summary: dict[str, Any] | None = None
    act_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # SmoothQuant input maxima used (if any)
    act_scales_source: str = ""  # where they came from: the calibration batches measured, or a file

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.runs]

    def site_rows(self) -> list[dict[str, Any]]:
        return [{"run": r.run, **s} for r in self.runs for s in r.sites]


def run_quantize(cfg: QuantizeConfig, progress: Progress | None = None, loaded: LoadedModel | None = None) -> QuantizeResult:
    """The whole `quantize` job: float score, then for each recipe / backend a calibrated quantized score."""
    loaded = loaded or load_model(cfg.load)
    if loaded.info.family is arch.Family.stanhop:
        from outlier_probe.forecast.run import run_forecast_quantize

        return run_forecast_quantize(cfg, None, progress)  # every test window of the --data CSV
    for recipe in cfg.recipes if cfg.keep_float else ():
        check_keep_float(loaded, recipe, cfg.keep_float)
    check_mitigations(loaded.model, cfg.mitigations)
    preloaded = _preloaded_act_scales(cfg, loaded.model)
    torch.manual_seed(cfg.data.seed)
    image_size = getattr(loaded.model.config, "image_size", None)
    batches = batches_for_model(loaded.processor, loaded.info, cfg.data, image_size)
    evaluator = Evaluator(loaded.info.task, batches.batches, loaded.processor, cfg.data.seed, cfg.metric)

    def step(label: str) -> Callable[[int, int], None] | None:
        return None if progress is None else (lambda d, t: progress(d, t, label))

    # The first recipe's quantized copy is built before the float evaluation, so that the statistics of
    # the float activations at its sites are measured during that evaluation (no second float pass).
    first = (quantize_model(loaded.model, cfg.recipes[0], loaded.attention, loaded.attention_params, cfg.keep_float)
             if cfg.recipes else None)
    sites = stats_sites(loaded.model, first[1]) if first is not None and cfg.site_stats else []
    with observe(sites, lambda _s: OutlierObserver(ObserverConfig()), root=loaded.model) as observers:
        float_score = evaluator(loaded.model, step("float"))
    distributed_merge.merge_observers(observers)
    site_stats: dict[str, Any] = {s.name: observers[s.name].result() for s in sites}
    site_stats = {k: v for k, v in site_stats.items() if v.count > 0}
    if not math.isfinite(float_score.value):
        raise ProbeError(f"the float model's {float_score.metric.value} is not finite; check the checkpoint")
    runs: list[RunResult] = []
    calib_desc: dict[str, Any] = {}
    # recipes with the same calibration sequences share their tokenisation and SmoothQuant's input maxima
    calib_sets: dict[DataConfig, Batches] = {}
    absmax_caches: dict[DataConfig, dict[str, torch.Tensor]] = {}
    for i, recipe in enumerate(cfg.recipes):
        calib_cfg = calibration_config(cfg.data, recipe)
        if calib_cfg not in calib_sets:
            calib_sets[calib_cfg] = batches_for_model(loaded.processor, loaded.info, calib_cfg, image_size)
        calib = calib_sets[calib_cfg]
        calib_desc = {**calib.describe(), "batches": len(calib.batches)}
        qmodel, qsites = first if i == 0 and first is not None else quantize_model(
            loaded.model, recipe, loaded.attention, loaded.attention_params, cfg.keep_float)
        first = None  # the loop owns it now (freed with qmodel)
        if qsites:  # as build_calibrated does: `--keep-float PLAN` is the very computation of the plan's step
            calibrate(qmodel, calib)
        with SQNRMeter(qsites) as meter:
            q_score = evaluator(qmodel, step(recipe.name))
        meter.merge()
        dropped = weakref.ref(qmodel)
        del qmodel
        runs += _mitigated_runs(cfg, loaded, recipe, calib, evaluator, float_score, q_score, step,
                                absmax_caches.setdefault(calib_cfg, dict(preloaded)))
        plain_index = len(runs) - len(cfg.mitigations)
        site_rows = sqnr_site_rows(cfg, loaded, batches, qsites, meter, site_stats)
        runs.insert(plain_index, RunResult(_run_name(recipe, cfg.recipes), float_score, q_score, recipe, site_rows,
                                           transformed_float=float_score.value, gap_closed=0.0))
        del qsites, meter
        collect_if_alive(dropped)
    for backend in cfg.backends:
        if backend is Backend.bnb_int8:
            from outlier_probe.quant.bnb import load_int8

            qmodel = load_int8(cfg.load, loaded)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q_score = evaluator(qmodel, step(backend.value))
            runs.append(RunResult(backend.value, float_score, q_score, None))
            dropped = weakref.ref(qmodel)
            del qmodel
            collect_if_alive(dropped)
    calib_used = next((k for k, c in absmax_caches.items() if c), None)  # the first recipe's calibration set
    used = absmax_caches[calib_used] if calib_used is not None else {}
    if used:
        source = (f"loaded from {cfg.act_scales}" if preloaded else
                  f"measured on the calibration batches ({calib_sets[calib_used].description})")
    summary = None
    if site_stats:
        summary = summarize([{"site": k, "kind": "", "layer": None, **v.to_row()} for k, v in site_stats.items()])
    return QuantizeResult(
        model=loaded.describe(),
        data=batches.describe(),
        calibration=calib_desc,
        runs=runs,
        settings=settings_of(cfg),
        metric_note=METRIC_NOTES[float_score.metric],
        site_summary=summary,
        act_scales=used,
        act_scales_source=source if used else "",
    )


def check_mitigations(model: nn.Module, mitigations: tuple[Mitigation, ...]) -> None:
    """Fail before any work when a mitigation cannot be applied to this model's family (the error says why)."""
    if any(m.rotate is not None for m in mitigations):
        arch.rotation_layout(model)
    if any(m.smoothquant is not None for m in mitigations):
        arch.smoothing_groups(model)


def _preloaded_act_scales(cfg: QuantizeConfig, model: nn.Module) -> dict[str, torch.Tensor]:
    """--act-scales, read and checked against the model before any work ({} without it)."""
    if cfg.act_scales is None:
        return {}
    if not any(m.smoothquant is not None for m in cfg.mitigations):
        raise UsageError("--act-scales holds SmoothQuant's input maxima: give it with --smoothquant")
    from outlier_probe.quant.mitigations.smoothing import load_act_scales

    return load_act_scales(cfg.act_scales, model)


def degradation(float_value: float, quant_value: float, higher_is_better: bool) -> float:
    """How much quantization lost: float - quantized when higher is better, else quantized - float."""
    return float_value - quant_value if higher_is_better else quant_value - float_value


def gap_closed(plain_loss: float, mitigated_loss: float) -> float:
    """(plain W8A8 loss - mitigated loss) / plain W8A8 loss: 1 = the float model's score, 0 = no help."""
    return (plain_loss - mitigated_loss) / plain_loss if plain_loss else math.nan


def _mitigated_runs(cfg: QuantizeConfig, loaded: LoadedModel, recipe: QuantConfig, calib: Batches,
                    evaluator: Evaluator, float_score: Score, plain: Score, step: Callable,
                    cache: dict[str, torch.Tensor]) -> list[RunResult]:
    """One run per mitigation: transform a copy of the float model, check it against the original on one
    calibration sequence (and score it in float with score_transformed), quantize, calibrate, score.

    cache: SmoothQuant's input maxima of the float model on `calib`, measured once for every alpha.
    """
    device = next(loaded.model.parameters()).device
    higher = float_score.metric.higher_is_better
    plain_loss = degradation(float_score.value, plain.value, higher)
    runs = []
    for mit in cfg.mitigations:
        model, details = apply_mitigation(loaded.model, mit, calib.batches, lambda m, b: forward(m, b, device),
                                          cfg.data.seed, cache)
        mit_recipe = replace(recipe, per_token=mit.a_granularity is AGranularity.per_token)
        label = f"{_run_name(recipe, cfg.recipes)}+{mit.name}"
        transformed, error = float_score.value, 0.0  # the same model when nothing transforms the weights
        if mit.transforms_weights:
            error = transform_error(loaded.model, model, calib.batches[0], lambda m, b: forward(m, b, device))
            transformed = math.nan
            if cfg.score_transformed:
                with torch.inference_mode():
                    transformed = evaluator(model, step(f"{label} float")).value
        if cfg.mitigation_stats and mit.transforms_weights:
            from outlier_probe.stats.run import run_stats

            summary = run_stats(StatsConfig(load=cfg.load, data=cfg.data, plots=False), loaded=replace(loaded, model=model)).summary
            details["stats"] = {k: summary.get(k) for k in ("avg_kurtosis", "max_inf_norm", "max_inf_norm_block_output")}
        # the transformed copy is not needed after this: quantized in place (no second copy of every weight)
        qmodel, _ = build_calibrated(replace(loaded, model=model), mit_recipe, calib, cfg.keep_float,
                                     in_place=mit.transforms_weights)
        q_score = evaluator(qmodel, step(label))
        loss = degradation(float_score.value, q_score.value, higher)
        runs.append(RunResult(label, float_score, q_score, mit_recipe, mitigation=mit.name, transformed_float=transformed,
                              transform_error=error,
                              gap_closed=gap_closed(plain_loss, loss), details=details))
        dropped = [weakref.ref(qmodel), weakref.ref(model)]
        del qmodel, model
        collect_if_alive(*dropped)
    return runs


def _run_name(recipe: QuantConfig, all_recipes: tuple[QuantConfig, ...]) -> str:
    same = [r for r in all_recipes if r.recipe is recipe.recipe]
    if len(same) == 1:
        return recipe.name
    gran = "pc" if recipe.per_channel else "pt"
    return f"{recipe.name}-w{recipe.w_bits}a{recipe.a_bits}-{gran}-{recipe.a_estimator.value}"
