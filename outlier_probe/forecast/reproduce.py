"""`reproduce --preset stanhop-cpu | stanhop-paper`: the OutEffHop paper's Table 1 on ETTh1, horizon 24.

Six variants (vanilla, OutEffHop, clipped, clipped+OutEffHop, gated, gated+OutEffHop) x seeds; per
run: train (best validation checkpoint), float forecast on every test window with the paper's
outlier summary, W8A8 (paper recipe, ranges from training windows), and the forecast again.
Finished runs (result.json in the work folder) are reused, so an interrupted reproduction resumes.
`jobs` > 1 trains the runs in that many worker processes (one torch thread each); every run seeds itself,
so the results are the same for any `jobs`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from outlier_probe.errors import UsageError
from outlier_probe.forecast.hopfield import HopfieldVariant as V
from outlier_probe.forecast.model import StanhopConfig
from outlier_probe.train.forecasting import ForecastTrainConfig

TABLE1_VARIANTS = (V.softmax, V.softmax1, V.clipped, V.clipped_softmax1, V.gated, V.gated_softmax1)
# Paper Table 1 (ETTh1, horizon 24): avg kurtosis, max inf-norm, FP MSE, W8A8 MSE
PAPER_TABLE1: dict[V, tuple[float, float, float, float]] = {
    V.softmax: (2.954, 5.048, 0.360, 0.362), V.softmax1: (2.897, 4.565, 0.360, 0.355),
    V.clipped: (2.995, 4.890, 0.553, 0.591), V.clipped_softmax1: (2.864, 4.145, 0.506, 0.517),
    V.gated: (2.487, 4.277, 0.380, 0.375), V.gated_softmax1: (2.459, 4.240, 0.376, 0.367),
}
ETTH1 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "ett" / "ETTh1.csv"


@dataclass(frozen=True)
class Preset:
    name: str
    model: StanhopConfig
    train: dict[str, Any]  # ForecastTrainConfig fields besides data / model / seed / out
    seeds: tuple[int, ...]
    calib_windows: int
    note: str


PRESETS: dict[str, Preset] = {
    # sized on 1 CPU thread: ~0.18 s per step of 32 windows, ~2.2 min per run with its evaluation; bounded by
    # epochs only (no time budget), so that a loaded machine cannot stop a run early and change its result
    "stanhop-cpu": Preset("stanhop-cpu", StanhopConfig(in_len=168, horizon=24, seg_len=6, win=1, factor=10, d_model=32,
                                                       d_ff=64, n_heads=4, e_layers=2, dropout=0.1),
                          dict(lr=1e-3, batch_size=32, epochs=5, patience=3, halve_at=(2, 4), grad_clip=5.0,
                               train_windows=3072, val_windows=512, threads=1),
                          seeds=(0, 1, 2), calib_windows=256,
                          note="d_model 32, 2 encoder blocks, 5 epochs of 3,072 random training windows, lr 1e-3"),
    # the paper's recipe (GPU scale): ETTh1 horizon 24, in_len 168, seg_len 6, lr 1e-4
    "stanhop-paper": Preset("stanhop-paper", StanhopConfig(in_len=168, horizon=24, seg_len=6, win=1, factor=10, d_model=256,
                                                           d_ff=512, n_heads=4, e_layers=11, dropout=0.5),
                            dict(lr=1e-4, batch_size=128, epochs=100, patience=5, halve_at=(2, 4, 6, 8, 10), grad_clip=5.0),
                            seeds=(0, 1, 2), calib_windows=512, note="the paper's configuration"),
}


@dataclass(frozen=True)
class ForecastReproduceConfig:
    preset: str = "stanhop-cpu"
    data: Path | None = None  # default: ../shared/data/ett/ETTh1.csv
    out: Path = Path("reports/reproduction-stanhop-cpu")
    work: Path | None = None  # checkpoints; default runs/<out name>/
    variants: tuple[V, ...] | None = None
    seeds: tuple[int, ...] | None = None
    device: str = "cpu"
    jobs: int = 1  # worker processes for the runs (one torch thread each); results do not depend on it
    shrink: bool = False  # tests: the preset's recipe at toy size (1 block, d 8, one short epoch, 128 test windows)
    report_only: bool = False  # write the report from the runs already finished in `work`; train nothing

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UsageError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.variants is not None and V.softmax not in self.variants:
            raise UsageError("the reproduction needs the vanilla softmax model as the baseline")
        if self.jobs < 1:
            raise UsageError(f"--jobs must be >= 1, got {self.jobs}")


def resolved(cfg: ForecastReproduceConfig) -> tuple[Preset, Path]:
    preset = PRESETS[cfg.preset]
    data = Path(cfg.data) if cfg.data is not None else ETTH1.resolve()
    if not data.is_file():
        raise UsageError(f"ETTh1 not found at {data}: pass --data ETTh1.csv")
    if cfg.shrink:
        preset = replace(preset, model=replace(preset.model, d_model=8, d_ff=16, n_heads=2, e_layers=1, factor=2),
                         train={**preset.train, "epochs": 1, "train_windows": 64, "val_windows": 32, "batch_size": 16},
                         calib_windows=32)
    return preset, data


def run_one(preset: Preset, data: Path, variant: V, seed: int, work: Path, device: str,
            log: Callable[[str], None], test_windows: int | None = None) -> dict[str, Any]:
    from outlier_probe.forecast.data import read_series
    from outlier_probe.forecast.metrics import PaperSummary, evaluate
    from outlier_probe.forecast.quant import calibrate_forecaster, quantize_forecaster
    from outlier_probe.train.forecasting import train_forecaster
    from outlier_probe.quant.recipes import QuantConfig
    from outlier_probe.report.io import write_json

    cpu0 = time.process_time()
    run_dir = work / f"{variant.value.replace('+', '-')}-seed{seed}"
    tcfg = ForecastTrainConfig(data=data, model=replace(preset.model, attention=variant), seed=seed, out=run_dir,
                               device=device, **preset.train)
    res = train_forecaster(tcfg, log=lambda m: log(f"  {variant.value} seed {seed}: {m}"))
    model = res.model
    series = read_series(data, preset.model.in_len, preset.model.horizon)
    x_te, y_te = (t.to(device) for t in series.tensors("test", test_windows))
    x_tr, _ = series.tensors("train")
    t0 = time.perf_counter()
    summary = PaperSummary(model)
    fp = evaluate(model, x_te, y_te, summary=summary)
    summary.close()
    stats = summary.summary()
    qcfg = QuantConfig(calib_batches=max(1, preset.calib_windows // 64))
    qmodel, qsites = quantize_forecaster(model, qcfg)
    idx = torch.linspace(0, x_tr.shape[0] - 1, preset.calib_windows).long()  # spread over the training split
    calibrate_forecaster(qmodel, x_tr[idx].to(device), qcfg, 64)
    w8 = evaluate(qmodel, x_te, y_te)
    result = {"variant": variant.value, "seed": seed, "avg_kurtosis": stats["avg_kurtosis"], "max_inf_norm": stats["max_inf_norm"],
              "max_inf_norm_module": stats["max_inf_norm_module"], "modules": stats["modules"],
              "fp_mse": fp.mse, "fp_mae": fp.mae, "w8a8_mse": w8.mse, "w8a8_mae": w8.mae, "test_windows": fp.windows,
              "best_epoch": res.best_epoch, "best_val_mse": res.best_val_mse, "epochs_run": len(res.rows),
              "stopped_by": res.stopped_by, "train_s": round(res.seconds, 1), "eval_s": round(time.perf_counter() - t0, 1),
              "cpu_s": round(time.process_time() - cpu0, 1), "quant_sites": len(qsites), "recipe": qcfg.describe(),
              "curve": [r["val_mse"] for r in res.rows]}
    write_json(run_dir / "result.json", result)
    return result


def run_forecast_reproduction(cfg: ForecastReproduceConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    import resource

    from outlier_probe.report.io import check_out_dir, ensure_writable_dir, no_empty_folders_on_error

    start, cpu0 = time.perf_counter(), _cpu_s(resource)
    preset, data = resolved(cfg)
    out = check_out_dir(cfg.out)
    work = cfg.work or Path("runs") / out.name
    with no_empty_folders_on_error(work):  # a failed start leaves no empty work folder; finished runs stay
        return _reproduce(cfg, preset, data, out, ensure_writable_dir(work), log, start, cpu0)


def _reproduce(cfg: ForecastReproduceConfig, preset: Preset, data: Path, out: Path, work: Path,
               log: Callable[[str], None], start: float, cpu0: float) -> dict[str, Any]:
    import json
    import resource

    from outlier_probe.forecast.data import read_series
    from outlier_probe.forecast.metrics import fit_linear, linear_forecast, persistence, score
    from outlier_probe.forecast.pool import run_calls, stderr_log
    from outlier_probe.report.forecast_report import write_forecast_report
    from outlier_probe.report.io import all_or_nothing, ensure_writable_dir

    threads = preset.train.get("threads") or torch.get_num_threads()
    torch.set_num_threads(threads)
    series = read_series(data, preset.model.in_len, preset.model.horizon)
    x_tr, y_tr = series.tensors("train")
    test_windows = 128 if cfg.shrink else None
    x_te, y_te = series.tensors("test", test_windows)
    w, b = fit_linear(x_tr, y_tr)
    baselines = {"persistence": score(persistence(x_te, series.horizon), y_te),
                 "linear (least squares, in_len -> horizon shared over columns)": score(linear_forecast(x_te, w, b), y_te)}
    runs = [(variant, seed) for variant in cfg.variants or TABLE1_VARIANTS for seed in cfg.seeds or preset.seeds]
    found: dict[tuple[V, int], dict[str, Any]] = {}
    todo: list[tuple[V, int]] = []
    missing: list[str] = []
    for variant, seed in runs:
        done = work / f"{variant.value.replace('+', '-')}-seed{seed}" / "result.json"
        if done.is_file():
            found[variant, seed] = json.loads(done.read_text())
            log(f"{variant.value} seed {seed}: reused {done}")
        elif cfg.report_only:
            missing.append(f"{variant.value} seed {seed}")
        else:
            todo.append((variant, seed))
    jobs = min(cfg.jobs, max(1, len(todo)))
    if todo:
        log(f"training {len(todo)} run(s) in {jobs} process(es), {threads} thread(s) each")
    worker_log = log if jobs == 1 else stderr_log
    calls = [(run_one, (preset, data, v, s, work, cfg.device, worker_log, test_windows)) for v, s in todo]
    for (variant, seed), r in zip(todo, run_calls(calls, jobs, [f"{v.value} seed {s}" for v, s in todo], threads)):
        log(f"{variant.value} seed {seed}: FP MSE {r['fp_mse']:.4f}, W8A8 MSE {r['w8a8_mse']:.4f}, "
            f"avg kurtosis {r['avg_kurtosis']:.3f}, max inf-norm {r['max_inf_norm']:.2f} ({r['train_s'] + r['eval_s']:.0f} s)")
        found[variant, seed] = r
    results = [found[k] for k in runs if k in found]
    command = f"outlier-probe reproduce --preset {cfg.preset} --jobs {cfg.jobs} --out {cfg.out}"
    with all_or_nothing():  # every report file or none (errors, Ctrl-C, SIGTERM)
        ensure_writable_dir(out)
        write_forecast_report(out, preset=preset, data_desc=series.describe(), results=results, baselines=baselines,
                              paper=PAPER_TABLE1, command=command, missing=missing,
                              invocation={"wall_s": time.perf_counter() - start, "cpu_s": _cpu_s(resource) - cpu0,
                                          "jobs": jobs, "trained": len(todo), "reused": len(runs) - len(todo) - len(missing)})
    return {"results": results, "baselines": {k: vars(v) for k, v in baselines.items()}}


def _cpu_s(resource: Any) -> float:
    """User + system CPU seconds of this process and of its finished child processes (the --jobs workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def recipe_for(size: str | None, horizon: int) -> tuple[StanhopConfig, dict[str, Any]]:
    """`train --arch stanhop --size paper|cpu|micro`: model and training recipe; paper: by horizon (ETTh1 settings)."""
    size = size or "paper"
    if size == "micro":  # unit tests
        return (StanhopConfig(in_len=48, horizon=horizon, seg_len=6, factor=2, d_model=16, d_ff=32, n_heads=2, e_layers=1, dropout=0.0),
                dict(lr=3e-3, batch_size=32, epochs=3, patience=3, halve_at=(), grad_clip=5.0))
    if size == "cpu":
        p = PRESETS["stanhop-cpu"]
        return replace(p.model, horizon=horizon), dict(p.train)
    if size != "paper":
        raise UsageError(f"unknown --size {size!r} for --arch stanhop; choose paper, cpu or micro")
    p = PRESETS["stanhop-paper"]
    if horizon >= 168:  # horizons 168 / 336 / 720: in_len 720, seg_len 24, lr 1e-5
        return replace(p.model, horizon=horizon, in_len=720, seg_len=24), {**p.train, "lr": 1e-5}
    return replace(p.model, horizon=horizon), dict(p.train)
