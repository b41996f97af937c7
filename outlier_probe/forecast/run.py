"""`stats`, `quantize` (and so `compare`) on a stanhop checkpoint: the same result objects as the
transformer families, with test windows of an ETT-shaped CSV as the data and forecast MSE / MAE as the
metric. Evaluation uses every test window unless --samples limits it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from outlier_probe import arch
from outlier_probe.config import DataConfig, StatsConfig
from outlier_probe.data import Batches
from outlier_probe.errors import UsageError
from outlier_probe.evaluation import METRIC_NOTES, MetricName, Score
from outlier_probe.forecast import model as fmodel
from outlier_probe.forecast.data import Series, read_series
from outlier_probe.forecast.metrics import SUMMARY_DEFINITION, PaperSummary, evaluate
from outlier_probe.loading import LoadedModel, model_name

Progress = Callable[[int, int], None]


def is_forecaster(source: str) -> bool:
    return Path(source).is_dir() and fmodel.is_checkpoint(Path(source))


def load_forecaster(source: str, device: str = "cpu", attention: Any = None) -> LoadedModel:
    from outlier_probe.forecast.hopfield import parse_variant

    model = fmodel.load(Path(source), None if attention is None else parse_variant(getattr(attention, "value", attention))).to(device)
    return LoadedModel(model, None, arch.model_info(model), model_name(source), source, model.config.attention, {})


def forecast_data(loaded: LoadedModel, data: DataConfig, samples: int | None) -> tuple[Series, torch.Tensor, torch.Tensor, Batches]:
    cfg = loaded.model.config
    if data.path is None:
        raise UsageError("a stanhop checkpoint needs --data FILE.csv (the series it forecasts, e.g. ETTh1.csv)")
    series = read_series(data.path, cfg.in_len, cfg.horizon)
    if len(series.columns) != cfg.data_dim:
        raise UsageError(f"--data {data.path} has {len(series.columns)} numeric columns; the model forecasts {cfg.data_dim}")
    if samples is not None and samples < 1:
        raise UsageError(f"--samples must be >= 1, got {samples}")
    x, y = series.tensors("test", samples)
    dev = loaded.device
    x, y = x.to(dev), y.to(dev)
    bs = data.batch_size
    batches = Batches([{"x": x[i : i + bs]} for i in range(0, x.shape[0], bs)], f"{data.path}: test windows",
                      {"split": "test", "windows": x.shape[0], "in_len": cfg.in_len, "horizon": cfg.horizon,
                       "split_rows": {k: list(v) for k, v in series.borders.items()}})
    return series, x, y, batches


def score_of(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, summary: PaperSummary | None = None) -> Score:
    s = evaluate(model, x, y, batch_size, summary)
    return Score(MetricName.forecast_mse, s.mse, {"mae": s.mae, "windows": s.windows})


def run_forecast_stats(cfg: StatsConfig, samples: int | None, progress: Progress | None = None) -> Any:
    from outlier_probe.stats.run import StatsResult, measure_sites, settings_of
    from outlier_probe.stats.summary import summarize

    loaded = load_forecaster(cfg.load.source, cfg.load.device.resolve(), cfg.load.attention)
    _, x, y, batches = forecast_data(loaded, cfg.data, samples)
    results = measure_sites(loaded, batches, cfg, progress)
    paper = PaperSummary(loaded.model)
    fp = score_of(loaded.model, x, y, cfg.data.batch_size, paper)
    paper.close()
    summary = {**summarize([r.row() for r in results]), "time_series_avg_kurtosis": paper.summary()["avg_kurtosis"],
               "time_series_max_inf_norm": paper.summary()["max_inf_norm"],
               "time_series_max_inf_norm_module": paper.summary()["max_inf_norm_module"],
               "time_series_modules": paper.summary()["modules"], "time_series_definition": SUMMARY_DEFINITION,
               "forecast_mse": fp.value, "forecast_mae": fp.extra["mae"]}
    return StatsResult(model=loaded.describe(), data=batches.describe(), sites=results, summary=summary, settings=settings_of(cfg))


def run_forecast_quantize(cfg: Any, samples: int | None, progress: Callable[[int, int, str], None] | None = None) -> Any:
    from outlier_probe.forecast.quant import calibrate_forecaster, quantize_forecaster
    from outlier_probe.quant.run import QuantizeResult, RunResult
    from outlier_probe.quant.sqnr import SQNRMeter, sqnr_site_rows
    from outlier_probe.stats.run import settings_of
    from outlier_probe.stats.summary import summarize

    loaded = load_forecaster(cfg.load.source, cfg.load.device.resolve(), cfg.load.attention)
    series, x, y, batches = forecast_data(loaded, cfg.data, samples)
    bs = cfg.data.batch_size
    float_score = score_of(loaded.model, x, y, bs)
    x_tr, _ = series.tensors("train")
    runs, site_stats, calib = [], {}, {}
    for recipe in cfg.recipes:
        qmodel, qsites = quantize_forecaster(loaded.model, recipe)
        n = min(recipe.calib_batches * bs, x_tr.shape[0])
        idx = torch.linspace(0, x_tr.shape[0] - 1, n).long()  # spread over the training split
        calib = calibrate_forecaster(qmodel, x_tr[idx].to(loaded.device), recipe, bs)
        with SQNRMeter(qsites) as meter:
            q_score = score_of(qmodel, x, y, bs)
        rows = sqnr_site_rows(cfg, loaded, batches, qsites, meter, site_stats)
        runs.append(RunResult(recipe.name, float_score, q_score, recipe, rows))
    summary = summarize([{"site": k, "kind": "", "layer": None, **v.to_row()} for k, v in site_stats.items()]) if site_stats else None
    note = METRIC_NOTES[MetricName.forecast_mse] + (
        f"; float MAE {float_score.extra['mae']:.4f}, " + ", ".join(f"{r.run} MAE {r.quant_score.extra['mae']:.4f}" for r in runs))
    return QuantizeResult(model=loaded.describe(), data=batches.describe(), calibration=calib, runs=runs,
                          settings=settings_of(cfg), metric_note=note, site_summary=summary)
