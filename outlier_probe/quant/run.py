"""`quantize`: load -> fake-quant copy -> calibrate ranges -> evaluate -> compare with float."""

from __future__ import annotations

import gc
import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from outlier_probe import arch, distributed, distributed_merge
from outlier_probe.config import DataConfig, LoadConfig, ObserverConfig, SiteKind, StatsConfig
from outlier_probe.data import Batches, batches_for_model
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.evaluation import METRIC_NOTES, Evaluator, MetricName, Score
from outlier_probe.loading import LoadedModel, load_model
from outlier_probe.offload import execution_device
from outlier_probe.quant.keep import KeepFloat
from outlier_probe.quant.modules import ActMode, ActQuantizer, freeze_all, iter_act_quantizers, set_mode
from outlier_probe.quant.mitigations.apply import AGranularity, Mitigation, apply_mitigation, transform_error
from outlier_probe.quant.recipes import Backend, QuantConfig, QuantSite, quant_points, quantize_model
from outlier_probe.stats.hooks import observe
from outlier_probe.stats.observer import OutlierObserver
from outlier_probe.stats.run import forward, measure_sites, settings_of
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


def calibration_config(data: DataConfig, recipe: QuantConfig) -> DataConfig:
    """Calibration sequences come from the same source, after the evaluation sequences (disjoint)."""
    return replace(data, samples=recipe.calib_batches * data.batch_size, offset=data.offset + data.samples)


@torch.inference_mode()
def calibrate(qmodel: nn.Module, batches: Batches) -> None:
    """Feed calibration batches through the quantizers in calibrating mode, then freeze every range."""
    set_mode(qmodel, ActMode.calibrating)
    device = execution_device(qmodel)
    quantizers = [q for _name, q in iter_act_quantizers(qmodel)]
    mine = distributed.shard(batches.batches)
    marks = []  # estimator history lengths after each batch: the per-batch ranges to merge
    # The heads stay in float (no quantizer there), so the backbone alone gives every range: an LM head
    # over a 50k vocabulary is a fifth of a small model's forward.
    backbone = getattr(qmodel, "base_model", qmodel)
    for batch in mine:
        forward(backbone, batch, device)
        marks.append([len(q.estimator.history) for q in quantizers])
    distributed_merge.merge_calibration(quantizers, distributed.global_indices(mine), marks, len(batches.batches))
    freeze_all(qmodel)


def build_calibrated(loaded: LoadedModel, recipe: QuantConfig, calib: Batches,
                     keep_float: KeepFloat | None = None, in_place: bool = False) -> tuple[nn.Module, list[QuantSite]]:
    """A quantized copy of the loaded model (points in `keep_float` left in float), ranges calibrated and frozen.

    quantize and sensitivity both build every quantized model they score through here, so a plan step
    and `quantize --keep-float PLAN` are the very same computation. in_place: the model is a throwaway
    copy (a mitigation's transform), quantized without copying it again.
    """
    qmodel, qsites = quantize_model(loaded.model, recipe, loaded.attention, loaded.attention_params, keep_float,
                                    in_place=in_place)
    if qsites:
        calibrate(qmodel, calib)
    return qmodel, qsites


def check_keep_float(loaded: LoadedModel, recipe: QuantConfig, keep_float: KeepFloat) -> None:
    """Every pattern / point of --keep-float must name a quantization point of this model and recipe."""
    full, sites = quantize_model(loaded.model, recipe, loaded.attention, loaded.attention_params)
    names = [p.name for p in quant_points(full, sites)]
    del full
    missing = keep_float.unmatched(names)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UsageError(f"--keep-float matches no quantization point of this model: {shown} "
                         f"(points look like {names[0]!r}; patterns match module names)")


class SQNRMeter:
    """Signal-to-quantization-noise ratio of each activation quantizer during evaluation (no host sync)."""

    def __init__(self, sites: list[QuantSite]) -> None:
        self.sites = sites
        self.signal: dict[str, torch.Tensor] = {}
        self.noise: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []

    def __enter__(self) -> SQNRMeter:
        for site in self.sites:
            self.handles.append(site.quantizer.register_forward_hook(self._hook(site.name)))
        return self

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_m: ActQuantizer, args: tuple, out: torch.Tensor) -> None:
            # One fused norm pass in float32 per tensor (decibels need ~5 digits), float64 across batches:
            # float64 copies of every activation cost more than the quantized forward itself on a CPU.
            x = args[0].float()
            s = torch.linalg.vector_norm(x).double().square()
            n = torch.linalg.vector_norm(x - out.float()).double().square()
            self.signal[name] = self.signal[name] + s if name in self.signal else s
            self.noise[name] = self.noise[name] + n if name in self.noise else n

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def merge(self) -> None:
        """Sum signal and noise power over the ranks of a data-parallel run (a no-op otherwise)."""
        if not distributed.is_active():
            return
        names = [s.name for s in self.sites]
        zero = torch.zeros((), dtype=torch.float64)
        signal = distributed.all_sum([float(self.signal.get(n, zero)) for n in names])
        noise = distributed.all_sum([float(self.noise.get(n, zero)) for n in names])
        seen = distributed.all_sum([float(n in self.signal) for n in names])
        for n, s, e, k in zip(names, signal, noise, seen):
            if k:
                self.signal[n], self.noise[n] = torch.tensor(s, dtype=torch.float64), torch.tensor(e, dtype=torch.float64)

    def sqnr_db(self, name: str) -> float:
        if name not in self.signal:
            return math.nan
        s, n = float(self.signal[name]), float(self.noise[name])
        return math.inf if n == 0 else 10.0 * math.log10(max(s, 1e-300) / n)


def _stats_sites(model: nn.Module, qsites: list[QuantSite]) -> list[arch.Site]:
    """Float-model sites matching the quantizers that have a stats counterpart."""
    out, seen = [], set()
    for q in qsites:
        if not q.stats_site or q.stats_site in seen:
            continue
        seen.add(q.stats_site)
        capture = "input" if q.stats_site.endswith(":input") else "output"
        module_name = q.stats_site.removesuffix(":input")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            continue
        # the kind is not read downstream: these sites are looked up by name for the SQNR table
        out.append(arch.Site(q.stats_site, SiteKind.linear_output, q.layer, module, capture, module_name))
    return out


def sqnr_site_rows(cfg: QuantizeConfig, loaded: LoadedModel, batches: Batches, qsites: list[QuantSite],
                   meter: SQNRMeter, site_stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per quantized site, lowest SQNR first, next to the float statistics of its activation.

    `site_stats` (site name -> observer result) is completed in place with the sites it lacks.
    """
    missing = [s for s in _stats_sites(loaded.model, qsites) if s.name not in site_stats]
    if cfg.site_stats and missing:
        found = measure_sites(loaded, batches, StatsConfig(load=cfg.load, observer=ObserverConfig()), sites=missing)
        site_stats.update({r.site.name: r.stats for r in found})
    rows = []
    for q in qsites:
        st = site_stats.get(q.stats_site or "")
        rows.append({
            "site": q.name, "kind": q.kind, "layer": q.layer, "sqnr_db": meter.sqnr_db(q.name),
            "paper_kurtosis": st.paper_kurtosis if st else math.nan,
            "paper_inf_norm": st.paper_inf_norm if st else math.nan,
            "range_min": float(q.quantizer.min_val), "range_max": float(q.quantizer.max_val),
        })
    rows.sort(key=lambda r: (math.inf if math.isnan(r["sqnr_db"]) else r["sqnr_db"]))
    return rows


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
    sites = _stats_sites(loaded.model, first[1]) if first is not None and cfg.site_stats else []
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
        del qmodel
        runs += _mitigated_runs(cfg, loaded, recipe, calib, evaluator, float_score, q_score, step,
                                absmax_caches.setdefault(calib_cfg, dict(preloaded)))
        plain_index = len(runs) - len(cfg.mitigations)
        site_rows = sqnr_site_rows(cfg, loaded, batches, qsites, meter, site_stats)
        runs.insert(plain_index, RunResult(_run_name(recipe, cfg.recipes), float_score, q_score, recipe, site_rows,
                                           transformed_float=float_score.value, gap_closed=0.0))
        gc.collect()
    for backend in cfg.backends:
        if backend is Backend.bnb_int8:
            from outlier_probe.quant.bnb import load_int8

            qmodel = load_int8(cfg.load, loaded)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q_score = evaluator(qmodel, step(backend.value))
            runs.append(RunResult(backend.value, float_score, q_score, None))
            del qmodel
            gc.collect()
    used = next((c for c in absmax_caches.values() if c), {})  # the first recipe's calibration set
    if used:
        source = (f"loaded from {cfg.act_scales}" if preloaded else
                  f"measured on the calibration batches ({calib_sets[next(k for k, c in absmax_caches.items() if c)].description})")
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
        del qmodel, model
        gc.collect()
    return runs


def _run_name(recipe: QuantConfig, all_recipes: tuple[QuantConfig, ...]) -> str:
    same = [r for r in all_recipes if r.recipe is recipe.recipe]
    if len(same) == 1:
        return recipe.name
    gran = "pc" if recipe.per_channel else "pt"
    return f"{recipe.name}-w{recipe.w_bits}a{recipe.a_bits}-{gran}-{recipe.a_estimator.value}"
