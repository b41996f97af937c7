"""CI gate: resolve thresholds, read report folders, check them (and compare with a baseline).

Layers: `resolve_config` (flags > --config / pyproject.toml > defaults) -> `find_reports` ->
`read_measurements` -> `check_reports`. `gate_checkpoint` only adds `measure` in front of
`check_reports`, so `gate ckpt/` and `gate --report` give the same verdict by construction.
Rendering (table, JUnit, annotations, JSON) lives in `outlier_probe.report.gate_output`.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from outlier_probe.config import AttentionVariant, DataConfig, LoadConfig, Placement, SiteKind, StatsConfig
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.gate_types import (  # noqa: F401 - re-exported: the gate's public types
    CONFIG_KEYS,
    EXIT_FAIL,
    EXIT_PASS,
    EXIT_USAGE,
    ATTENTION_METRICS,
    HIGHER_IS_BETTER,
    QUANT_METRICS,
    STATS_METRICS,
    THRESHOLD_METRICS,
    CheckResult,
    GateConfig,
    GateResult,
    ReportFiles,
    ResolvedGate,
    _number,
    _site_kind,
)

# ppl_increase is left out: a relative tolerance on a difference near 0 is noise.
BASELINE_METRICS = ("avg_kurtosis", "max_kurtosis", "max_inf_norm", "max_outlier_fraction", "ppl_ratio", "recovery")
PPL_METRICS = frozenset({"perplexity", "mlm_perplexity"})

TOML_TABLE = ("tool", "outlier-probe", "gate")
STATS_COLUMNS = ("site", "kind", "paper_kurtosis", "paper_inf_norm", "frac_gt_threshold")
QUANT_COLUMNS = ("run", "metric", "float", "quantized")


# ----------------------------------------------------------------------------- configuration


def normalise_key(key: str) -> str:
    """TOML keys and flags may use dashes or underscores: `max-kurtosis` == `max_kurtosis`."""
    return key.strip().replace("-", "_")


def find_pyproject(start: Path) -> Path | None:
    """Nearest pyproject.toml at or above `start` that has a [tool.outlier-probe.gate] table."""
    for folder in (start.resolve(), *start.resolve().parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file() and _gate_table(_read_toml(candidate)) is not None:
            return candidate
    return None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist; fix --config") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config file {path} is not valid TOML: {err}") from None
    except OSError as err:
        raise UsageError(f"cannot read config file {path}: {err.strerror or err}") from None


def _gate_table(document: Mapping[str, Any]) -> Mapping[str, Any] | None:
    node: Any = document
    for part in TOML_TABLE:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node if isinstance(node, Mapping) else None


def load_config_file(path: Path) -> dict[str, Any]:
    """Gate settings from a TOML file: its [tool.outlier-probe.gate] table, else its top-level keys."""
    document = _read_toml(path)
    table = _gate_table(document)
    if table is None:
        if "tool" in document:
            raise UsageError(f"{path} has no [tool.outlier-probe.gate] table; add one or put the gate keys at top level")
        table = document
    settings: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = normalise_key(raw_key)
        if key not in CONFIG_KEYS:
            valid = ", ".join(k.replace("_", "-") for k in CONFIG_KEYS)
            raise UsageError(f"unknown gate key {raw_key!r} in {path}; valid keys: {valid}")
        if key in settings:
            raise UsageError(f"gate key {key!r} is given twice in {path} (dashes and underscores are the same key)")
        if key == "baseline":
            if not isinstance(value, str):
                raise UsageError(f"gate setting baseline in {path} must be a path string, got {value!r}")
            value = path.parent / value  # relative to the config file, like other pyproject tools
        elif key == "site_kind":
            value = _site_kind(value, f" in {path}")
        else:
            value = _number(key, value, f" in {path}")
        settings[key] = value
    return settings


def resolve_config(
    flags: Mapping[str, Any] | None = None, config_file: Path | None = None, cwd: Path | None = None
) -> ResolvedGate:
    """Flags win over the file, the file over defaults.

    `flags` holds only the options the user gave. The file is `config_file` (--config) if given,
    else the nearest pyproject.toml with a [tool.outlier-probe.gate] table above `cwd`.
    """
    flags = {normalise_key(k): v for k, v in (flags or {}).items() if v is not None}
    unknown = sorted(set(flags) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(f"unknown gate setting(s): {', '.join(unknown)}")
    path = Path(config_file) if config_file is not None else find_pyproject(Path(cwd) if cwd else Path.cwd())
    from_file = load_config_file(path) if path is not None else {}
    merged = {**from_file, **flags}
    sources = {k: ("flag" if k in flags else str(path) if k in from_file else "default") for k in CONFIG_KEYS}
    return ResolvedGate(config=GateConfig(**merged), sources=sources, config_file=path)


# ----------------------------------------------------------------------------- reports


def find_reports(folders: Sequence[Path]) -> ReportFiles:
    """Find stats.csv and quantize.csv in each folder or its `stats/` and `quantize/` subfolders."""
    if not folders:
        raise UsageError("no report folder given; pass --report FOLDER or a checkpoint")
    found: dict[str, list[Path]] = {"stats.csv": [], "quantize.csv": []}
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise UsageError(f"report folder {folder} does not exist; run `outlier-probe stats CKPT --out {folder}` first")
        for name, sub in (("stats.csv", "stats"), ("quantize.csv", "quantize")):
            found[name] += [p for p in (folder / name, folder / sub / name) if p.is_file()]
    for name, paths in found.items():
        if len(paths) > 1:
            raise UsageError(f"several {name} found ({', '.join(map(str, paths))}); give one stats and at most one quantize report")
    stats_csv = found["stats.csv"][0] if found["stats.csv"] else None
    quantize_csv = found["quantize.csv"][0] if found["quantize.csv"] else None
    attention = [p for f in map(Path, folders) for p in (f / "summary.json", f / "attention" / "summary.json")
                 if p.is_file() and (f / "heads.csv" if p.parent == f else p.parent / "heads.csv").is_file()]
    if len(attention) > 1:
        raise UsageError(f"several attention reports found ({', '.join(map(str, attention))}); give at most one")
    if stats_csv is None and quantize_csv is None and attention:
        return ReportFiles(tuple(map(Path, folders)), attention_json=attention[0])
    if stats_csv is None and quantize_csv is None:
        listed = ", ".join(map(str, folders))
        raise UsageError(f"no stats.csv or quantize.csv in {listed}; run `outlier-probe stats` / `quantize` first")
    return ReportFiles(tuple(map(Path, folders)), stats_csv, quantize_csv, _model_name(stats_csv),
                       attention[0] if attention else None)


def _model_name(stats_csv: Path | None) -> str | None:
    if stats_csv is None or not (stats_csv.parent / "summary.json").is_file():
        return None
    try:
        summary = json.loads((stats_csv.parent / "summary.json").read_text(encoding="utf-8"))
        return summary.get("model", {}).get("name") or summary.get("model", {}).get("source")
    except (ValueError, AttributeError, OSError):
        return None  # the name is cosmetic; the checks read stats.csv


@dataclass(frozen=True)
class Measurement:
    value: float
    worst: str | None = None  # site (stats) or run (quantize) holding the value


def _read_csv(path: Path, columns: Sequence[str]):  # noqa: ANN202 - pandas imported lazily
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (ValueError, OSError) as err:
        raise UsageError(f"cannot read {path}: {err}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UsageError(f"{path} lacks column(s) {', '.join(missing)}; was it written by outlier-probe?")
    if frame.empty:
        raise UsageError(f"{path} has no rows; rerun the command that wrote it")
    return frame


def _extreme(frame, column: str, label: str, highest: bool = True) -> Measurement:  # noqa: ANN001
    values = frame[column].astype(float)
    values = values[values.notna()]
    if values.empty:
        return Measurement(math.nan)
    index = values.idxmax() if highest else values.idxmin()
    return Measurement(float(values[index]), str(frame.loc[index, label]))


def read_measurements(reports: ReportFiles, site_kind: SiteKind | None = None) -> dict[str, Measurement]:
    """Every gate metric the report files hold, with the site / run that holds its worst value."""
    out: dict[str, Measurement] = {}
    if reports.stats_csv is not None:
        stats = _read_csv(reports.stats_csv, STATS_COLUMNS)
        kurtosis = stats["paper_kurtosis"].astype(float)
        out["avg_kurtosis"] = Measurement(float(kurtosis[np.isfinite(kurtosis)].mean()))  # as summary.json
        out["max_kurtosis"] = _extreme(stats, "paper_kurtosis", "site")
        sites = stats if site_kind is None else stats[stats["kind"] == site_kind.value]
        if sites.empty:
            raise UsageError(f"{reports.stats_csv} has no {site_kind.value} sites; pick another --site-kind")
        out["max_inf_norm"] = _extreme(sites, "paper_inf_norm", "site")
        out["max_outlier_fraction"] = _extreme(stats, "frac_gt_threshold", "site")
    if reports.quantize_csv is not None:
        runs = _read_csv(reports.quantize_csv, QUANT_COLUMNS)
        runs = runs.assign(increase=runs["quantized"] - runs["float"], ratio=runs["quantized"] / runs["float"])
        ppl = runs[runs["metric"].isin(PPL_METRICS)]
        if not ppl.empty:
            out["ppl_increase"] = _extreme(ppl, "increase", "run")
            out["ppl_ratio"] = _extreme(ppl, "ratio", "run")
        accuracy = runs[runs["metric"] == "accuracy"]
        if not accuracy.empty:
            out["recovery"] = _extreme(accuracy, "ratio", "run", highest=False)
    if reports.attention_json is not None:
        out.update(_attention_measurements(reports.attention_json))
    return out


def _attention_measurements(path: Path) -> dict[str, Measurement]:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))["summary"]
        sink, ratio = float(summary["sink_rate"]), float(summary["massive_ratio"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{path} is not a summary.json written by `outlier-probe attention`") from None
    where = f"layer {summary.get('massive_layer')} {summary.get('massive_token')} ch {summary.get('massive_channel')}"
    return {"sink_rate": Measurement(sink, "mean over heads"), "massive_ratio": Measurement(ratio, where)}


# ----------------------------------------------------------------------------- checks


def _display_name(key: str, config: GateConfig) -> str:
    return f"{key}[{config.site_kind.value}]" if key.endswith("inf_norm") and config.site_kind else key


def threshold_checks(config: GateConfig, measured: Mapping[str, Measurement]) -> list[CheckResult]:
    checks = []
    for key, limit in config.thresholds.items():
        metric = THRESHOLD_METRICS[key]
        if metric not in measured:
            needs = "quantize.csv with accuracy rows" if metric == "recovery" else "quantize.csv with perplexity rows"
            needs = "report of `outlier-probe attention`" if metric in ATTENTION_METRICS else needs
            raise UsageError(f"threshold {key} is set but the reports hold no {metric}; it needs a {needs}")
        m = measured[metric]
        checks.append(CheckResult(_display_name(key, config), metric, ">=" if key.startswith("min_") else "<=", limit, m.value, m.worst))
    return checks


def baseline_checks(
    config: GateConfig, measured: Mapping[str, Measurement], baseline: Mapping[str, Measurement]
) -> list[CheckResult]:
    """Fail a metric that worsens by more than `baseline_tolerance` (relative) against the baseline."""
    common = [m for m in BASELINE_METRICS if m in measured and m in baseline]
    if not common:
        raise UsageError("the baseline and the current reports have no metric in common (stats vs quantize?)")
    checks, tol = [], config.baseline_tolerance
    for metric in common:
        base = baseline[metric].value
        higher = metric in HIGHER_IS_BETTER
        limit = base - tol * abs(base) if higher else base + tol * abs(base)
        detail = f"baseline {base:.4g} {'-' if higher else '+'}{tol:.0%}"
        name = f"baseline:{_display_name(metric, config)}"
        checks.append(CheckResult(name, metric, ">=" if higher else "<=", limit, measured[metric].value, measured[metric].worst, detail))
    return checks


def check_reports(folders: Sequence[Path], resolved: ResolvedGate) -> GateResult:
    """Check report folders written by `stats` / `quantize` (no model is loaded)."""
    config = resolved.config
    if not config.thresholds and config.baseline is None:
        raise UsageError(
            "no thresholds set; pass e.g. --max-kurtosis 10, or set them in [tool.outlier-probe.gate] in pyproject.toml"
        )
    reports = find_reports(folders)
    if config.needs_quantize and reports.quantize_csv is None:
        raise UsageError(f"a quantization threshold is set but there is no quantize.csv in {', '.join(map(str, folders))}")
    if config.needs_attention and reports.attention_json is None:
        raise UsageError(f"an attention threshold is set but there is no attention report in {', '.join(map(str, folders))}; "
                         "run `outlier-probe attention CKPT --out FOLDER/attention` first")
    if any(THRESHOLD_METRICS[k] in STATS_METRICS for k in config.thresholds) and reports.stats_csv is None:
        raise UsageError(f"a stats threshold is set but there is no stats.csv in {', '.join(map(str, folders))}")
    measured = read_measurements(reports, config.site_kind)
    checks = threshold_checks(config, measured)
    baseline_reports = None
    if config.baseline is not None:
        if not config.baseline.is_dir():
            raise UsageError(f"baseline folder {config.baseline} does not exist; fix --baseline")
        baseline_reports = find_reports([config.baseline])
        checks += baseline_checks(config, measured, read_measurements(baseline_reports, config.site_kind))
    return GateResult(resolved, reports, tuple(checks), baseline_reports)


# ----------------------------------------------------------------------------- measuring a checkpoint


@dataclass(frozen=True)
class MeasureSettings:
    """Measurement options of `gate CKPT` (the same meaning as for `stats`)."""

    data: DataConfig = field(default_factory=DataConfig)  # --data, --samples, --seq-len, --batch-size, --seed
    attention: AttentionVariant | None = None  # None: the variant recorded in the checkpoint
    trust_remote_code: bool = False
    quantize: bool = False  # also run `quantize` (set when a quantization threshold is set)
    heads: bool = False  # also run `attention` (set when an attention threshold is set)
    placement: Placement = field(default_factory=Placement)  # --device-map / --max-memory / --offload-folder / --dtype


def measure(checkpoint: str, settings: MeasureSettings, out_dir: Path) -> Path:
    """Run `stats` (and `quantize` if asked) on a checkpoint; write their reports under `out_dir`.

    Layout: out_dir/stats/{stats.csv,summary.json}, out_dir/quantize/{quantize.csv,sites.csv,summary.json};
    `find_reports` reads exactly this, so `gate --report out_dir` checks the same files. The model is
    loaded once for both.
    """
    from outlier_probe import distributed
    from outlier_probe.loading import load_model
    from outlier_probe.report.io import ensure_writable_dir
    from outlier_probe.report.stats_report import write_stats_report
    from outlier_probe.stats.run import run_stats

    out_dir = ensure_writable_dir(Path(out_dir))
    stats_dir = ensure_writable_dir(out_dir / "stats")  # fail before the model loads, not after
    quant_dir = ensure_writable_dir(out_dir / "quantize") if settings.quantize else None
    load = settings.placement.apply(LoadConfig(source=checkpoint, trust_remote_code=settings.trust_remote_code,
                                               attention=settings.attention))
    loaded = load_model(load)
    result = run_stats(StatsConfig(load=load, data=settings.data, out=stats_dir, plots=False), loaded=loaded)
    main = distributed.is_main()  # under torchrun rank 0 alone writes; the others read its reports
    if main:
        write_stats_report(result, stats_dir, plots_on=False)
    if quant_dir is not None:
        from outlier_probe.quant.run import QuantizeConfig, run_quantize
        from outlier_probe.report.quant_report import write_quantize_report

        # the reference ("paper") W8A8 recipe; per-site SQNR statistics are not needed by the gate
        quantized = run_quantize(QuantizeConfig(load=load, data=settings.data, site_stats=False), loaded=loaded)
        if main:
            write_quantize_report(quantized, quant_dir)
    if settings.heads:
        from outlier_probe.diagnose.attention_run import AttentionConfig, run_attention
        from outlier_probe.report.attention_report import write_attention_report

        heads = run_attention(AttentionConfig(load=load, data=settings.data), loaded=loaded)
        if main:
            write_attention_report(heads, out_dir / "attention")
    distributed.barrier()
    return out_dir


def default_out_dir(checkpoint: str) -> Path:
    """reports/gate/<checkpoint name>/ (hub ids `org/name` become `org--name`)."""
    name = checkpoint.rstrip("/\\")
    name = Path(name).name if Path(name).exists() else name.replace("/", "--")
    return Path("reports") / "gate" / (name or "model")


def gate_checkpoint(checkpoint: str, settings: MeasureSettings, resolved: ResolvedGate, out_dir: Path) -> GateResult:
    """Measure a checkpoint, then check the written reports exactly as `check_reports` does."""
    if not resolved.config.thresholds and resolved.config.baseline is None:
        check_reports([], resolved)  # raises the "no thresholds set" usage error before loading a model
    settings = replace(settings, quantize=resolved.config.needs_quantize, heads=resolved.config.needs_attention)
    try:
        folder = measure(checkpoint, settings, out_dir)
    except UsageError:
        raise
    except ProbeError as err:  # exit 1 is kept for "a threshold is exceeded"
        raise UsageError(f"could not measure {checkpoint}: {err}") from None
    return check_reports([folder], resolved)
