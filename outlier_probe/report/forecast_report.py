"""The stanhop reproduction's report: results.csv (one row per variant and seed), README.md with
mean +- std over seeds next to the paper's Table 1, control baselines, plots and a reading."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from outlier_probe.report.io import write_csv, write_figure, write_json, write_text
from outlier_probe.report.meta import versions

CSV_COLUMNS = ("variant", "seed", "avg_kurtosis", "max_inf_norm", "fp_mse", "fp_mae", "w8a8_mse", "w8a8_mae")
_METRICS = (("avg_kurtosis", "avg kurtosis", 0), ("max_inf_norm", "max inf-norm", 1), ("fp_mse", "FP MSE", 2),
            ("w8a8_mse", "W8A8 MSE", 3))
_NAMES = {"softmax": "vanilla", "softmax1": "OutEffHop", "clipped": "clipped", "clipped+softmax1": "clipped+OutEffHop",
          "gated": "gated", "gated+softmax1": "gated+OutEffHop"}


def _stats(results: Sequence[dict[str, Any]], variant: str, key: str) -> tuple[float, float, int]:
    vals = [float(r[key]) for r in results if r["variant"] == variant]
    if not vals:
        return math.nan, math.nan, 0
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else math.nan, len(vals)


def _pm(mean: float, std: float, digits: int = 3) -> str:
    return f"{mean:.{digits}f}" if not math.isfinite(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _claim(results: Sequence[dict[str, Any]], a: str, b: str, key: str, lower: bool, text: str) -> str:
    """Does variant a have a lower (or higher) `key` than b? held / direction only / did not hold."""
    ma, sa, _ = _stats(results, a, key)
    mb, sb, _ = _stats(results, b, key)
    if not (math.isfinite(ma) and math.isfinite(mb)):
        return f"- {text}: not measured"
    diff = ma - mb
    spread = max(s for s in (sa, sb, 0.0) if math.isfinite(s))
    right = diff < 0 if lower else diff > 0
    verdict = ("**held**" if abs(diff) > spread else "direction only, within the seed spread") if right else "**did not hold**"
    return f"- {text}: {_pm(ma, sa)} vs {_pm(mb, sb)} (difference {diff:+.3f}, largest seed std {spread:.3f}): {verdict}"


def _plots(out: Path, results: Sequence[dict[str, Any]], variants: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, label, _) in zip(axes, _METRICS):
        stats = [_stats(results, v, key) for v in variants]
        ax.bar(range(len(variants)), [s[0] for s in stats], yerr=[0 if not math.isfinite(s[1]) else s[1] for s in stats],
               capsize=3, color="tab:blue")
        for i, v in enumerate(variants):
            pts = [r[key] for r in results if r["variant"] == v]
            ax.plot([i] * len(pts), pts, "k.", ms=4)
        ax.set_xticks(range(len(variants)), [_NAMES.get(v, v) for v in variants], rotation=35, ha="right", fontsize=8)
        ax.set_title(label)
        if key.endswith("mse"):
            ax.set_ylim(bottom=min(r[key] for r in results) * 0.9)
    fig.tight_layout()
    write_figure(out / "table1.png", fig)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for v in variants:
        for r in results:
            if r["variant"] == v and r.get("curve"):
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], color=f"C{variants.index(v)}", alpha=0.7,
                        label=_NAMES.get(v, v) if r["seed"] == min(x["seed"] for x in results if x["variant"] == v) else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MSE")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    write_figure(out / "training.png", fig)
    plt.close(fig)
    return ["![Table 1 metrics, mean ± std over seeds, dots = seeds](table1.png)",
            "![validation MSE by epoch, one line per seed](training.png)"]


def _model_text(model: Any) -> str:
    d = model.to_dict()
    keys = ("in_len", "horizon", "seg_len", "win", "factor", "d_model", "d_ff", "n_heads", "e_layers", "dropout")
    return ", ".join(f"{k} {d[k]}" for k in keys)


def _train_text(train: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in train.items())


def _invocation_text(inv: Mapping[str, Any]) -> str:
    reused = f", {inv['reused']} finished run(s) reused" if inv.get("reused") else ""
    return (f"This invocation: {inv['trained']} run(s) trained in {inv['jobs']} process(es){reused}; wall time "
            f"{inv['wall_s'] / 60:.1f} min, CPU {inv['cpu_s'] / 60:.1f} core-min (user + system, all processes).")


def write_forecast_report(out: Path, *, preset: Any, data_desc: dict[str, Any], results: Sequence[dict[str, Any]],
                          baselines: Mapping[str, Any], paper: Mapping[Any, tuple[float, ...]], command: str,
                          invocation: Mapping[str, Any], missing: Sequence[str] = ()) -> None:
    """`invocation`: wall_s and cpu_s of this command (CPU of the process and its workers), jobs, trained, reused."""
    import pandas as pd

    variants = list(dict.fromkeys(r["variant"] for r in results))
    write_csv(out / "results.csv", pd.DataFrame([{k: r[k] for k in CSV_COLUMNS} for r in results]))
    write_json(out / "results.json", {"preset": preset.name, "data": data_desc, "results": list(results),
                                      "baselines": {k: vars(v) for k, v in baselines.items()},
                                      "invocation": dict(invocation), "versions": versions()})
    paper_by = {getattr(k, "value", k): v for k, v in paper.items()}
    seeds = sorted({r["seed"] for r in results})
    compute_s = sum(float(r.get("train_s", 0)) + float(r.get("eval_s", 0)) for r in results)
    run_cpu_s = sum(float(r["cpu_s"]) for r in results) if all("cpu_s" in r for r in results) else 0.0
    test_windows = sorted({int(r.get("test_windows", 0)) for r in results})
    lines = [f"# Reproduction: STanHop-Net on ETTh1 (OutEffHop paper, Table 1), preset `{preset.name}`", "",
             "Regenerate with:", "", f"    {command}", "",
             f"Model: {preset.note}; {_model_text(preset.model)}. Training: {_train_text(preset.train)}. Seeds {seeds}. "
             f"Compute: {compute_s / 60:.1f} min summed over the {len(results)} runs (training + evaluation, one thread each"
             + (f", {run_cpu_s / 60:.1f} CPU core-min)" if run_cpu_s else ")") + ". " + _invocation_text(invocation),
             f"Data: {data_desc['data']}, columns {', '.join(data_desc['columns'])}; in_len {data_desc['in_len']}, horizon "
             f"{data_desc['horizon']}; split rows {data_desc['split_rows']}; windows {data_desc['windows']} (stride 1); "
             "values standardised with the training rows' mean and std.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".", "",
             *([f"**Incomplete**: {len(missing)} run(s) had not finished when this report was written and are missing: "
                f"{', '.join(missing)}. Means and spreads use the seeds present.", ""] if missing else []),
             "## Definitions", "",
             f"- FP / W8A8 MSE and MAE: mean over every test window ({', '.join(map(str, test_windows))} windows), step and "
             "column of the standardised values; the best-validation checkpoint of each run.",
             "- W8A8: the paper recipe (weights symmetric per-tensor min-max 8 bit; activations asymmetric per-tensor "
             "running min-max 8 bit at every Linear and LayerNorm output, every norm input (residual sums), the "
             "retrieved patterns, the attention scores and probabilities; prediction heads in float), ranges from "
             "training windows spread over the training split.",
             "- avg kurtosis / max inf-norm (the paper's time-series summary): every module output flattened per "
             "sample b; k_b = mean((x_b - mean)^4) / (std(x_b)^4 + 1e-6), std unbiased; inf_b = max|x_b|; each averaged "
             "over the test samples; average kurtosis = mean over modules, max inf-norm = max over modules.", "",
             "## Table 1: mean ± std over seeds (this run) next to the paper", "",
             "| variant | avg kurtosis | paper | max inf-norm | paper | FP MSE | paper | W8A8 MSE | paper | FP MAE | W8A8 MAE |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for v in variants:
        cells = [_NAMES.get(v, v)]
        for key, _, i in _METRICS:
            m, s, _ = _stats(results, v, key)
            cells += [_pm(m, s, 2 if key == "max_inf_norm" else 3), f"{paper_by[v][i]:.3f}" if v in paper_by else "-"]
        for key in ("fp_mae", "w8a8_mae"):
            m, s, _ = _stats(results, v, key)
            cells.append(_pm(m, s))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Training per run (best epoch by validation MSE / epochs run, seconds):", ""]
    for v in variants:
        runs = sorted((r for r in results if r["variant"] == v), key=lambda r: r["seed"])
        lines.append(f"- {_NAMES.get(v, v)}: " + "; ".join(
            f"seed {r['seed']}: {r.get('best_epoch')}/{r.get('epochs_run')}, val MSE {float(r.get('best_val_mse', math.nan)):.3f}, "
            f"{float(r.get('train_s', math.nan)):.0f} s + {float(r.get('eval_s', math.nan)):.0f} s eval" for r in runs))
    lines += ["", "## Control baselines on the same test windows", "", "| forecast | MSE | MAE |", "| --- | ---: | ---: |"]
    for name, sc in baselines.items():
        lines.append(f"| {name} | {sc.mse:.3f} | {sc.mae:.3f} |")
    lines += ["", "## Plots", "", *_plots(out, results, variants), "",
              "## Reading (computed from the numbers above)", "",
              "A claim *held* when the mean difference over seeds has the paper's sign and exceeds the largest "
              "per-variant seed standard deviation; *direction only* when the sign is right but the difference is "
              "inside the seed spread.", ""]
    claims = [("softmax1", "softmax", "avg_kurtosis", True, "OutEffHop lowers the average kurtosis of vanilla"),
              ("softmax1", "softmax", "max_inf_norm", True, "OutEffHop lowers the max inf-norm of vanilla"),
              ("softmax1", "softmax", "w8a8_mse", True, "OutEffHop's W8A8 MSE is below vanilla's"),
              ("clipped+softmax1", "clipped", "max_inf_norm", True, "clipped+OutEffHop lowers the max inf-norm of clipped"),
              ("gated+softmax1", "gated", "avg_kurtosis", True, "gated+OutEffHop lowers the average kurtosis of gated"),
              ("gated", "softmax", "avg_kurtosis", True, "gated attention lowers the average kurtosis of vanilla"),
              ("clipped", "softmax", "fp_mse", False, "clipped softmax forecasts worse than vanilla (higher FP MSE)")]
    lines += [_claim(results, *c) for c in claims if c[0] in variants and c[1] in variants]
    best_base = min(sc.mse for sc in baselines.values())
    for v in variants:
        m, _, _ = _stats(results, v, "fp_mse")
        lines.append(f"- {_NAMES.get(v, v)} beats persistence: {'yes' if m < baselines['persistence'].mse else 'no'}; "
                     f"beats the best baseline ({best_base:.3f}): {'yes' if m < best_base else 'no'} (FP MSE {m:.3f})")
    deg = [(v, _stats(results, v, "w8a8_mse")[0] - _stats(results, v, "fp_mse")[0]) for v in variants]
    lines += ["- W8A8 minus FP MSE per variant (mean over seeds): " + ", ".join(f"{_NAMES.get(v, v)} {d:+.4f}" for v, d in deg), ""]
    if preset.name != "stanhop-paper":
        lines += ["Scale: the paper trains d_model 256 x 11 blocks for up to 100 epochs on a GPU; this preset trains a few "
                  "epochs of a narrow model, so outliers have little training to form. Seed spread is the sample std over "
                  "seeds; three seeds resolve differences of about one std at best.", ""]
    write_text(out / "README.md", "\n".join(lines) + "\n")
