"""`compare`: several (checkpoint, attention variant) runs with identical data and settings -> one table.

Each model is loaded once; its `stats` pass (`run_stats`) and, unless switched off, its `quantize`
pass (`run_quantize`) run on that one loaded model with the very same data, seed and recipe. The
first checkpoint is the baseline: every figure of every model also gets its relative change
versus the baseline's figure, (x - x_baseline) / |x_baseline|.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from outlier_probe.compare_types import (  # noqa: F401 - re-exported: the comparison's public types
    DEFINITIONS,
    FIGURES,
    QUANT_FIGURES,
    CompareEntry,
    CompareResult,
    ModelRun,
    _num,
    compare_rows,
    relative_change,
)
from outlier_probe.config import AttentionVariant, DataConfig, LoadConfig, ObserverConfig, SiteSelection, StatsConfig
from outlier_probe.errors import UsageError
from outlier_probe.evaluation import MetricName
from outlier_probe.loading import load_model, model_name, weights_folder
from outlier_probe.quant.keep import KeepFloat
from outlier_probe.quant.mitigations.apply import Mitigation
from outlier_probe.quant.recipes import QuantConfig
from outlier_probe.quant.calibration import check_keep_float
from outlier_probe.quant.run import QuantizeConfig, run_quantize
from outlier_probe.stats.run import run_stats, settings_of
from outlier_probe.stats.heap import collect_if_alive

Progress = Callable[[int, int, str], None]  # (batches done, batches total, what is running)

_NAME = re.compile(r"^[A-Za-z0-9][\w.+\-]*$")  # display names become report sub-folder names
VARIANTS = ", ".join(v.value for v in AttentionVariant)

@dataclass(frozen=True)
class CompareConfig:
    entries: tuple[CompareEntry, ...]  # the first is the baseline
    data: DataConfig = field(default_factory=DataConfig)  # identical for every model
    recipe: QuantConfig = field(default_factory=QuantConfig)  # one recipe for the whole comparison
    quantize: bool = True  # False: stats only, no evaluation
    metric: MetricName | None = None  # None: each model's natural metric
    sites: SiteSelection = field(default_factory=SiteSelection)
    observer: ObserverConfig = field(default_factory=ObserverConfig)
    attention: bool = True  # also the `attention` pass: sink rate, null mass, massive activations
    forecast_samples: int | None = None  # stanhop checkpoints: test windows (None: every one)
    mitigation_table: bool = False  # --mitigations: the first model also runs post-training mitigations
    mitigations: tuple[Mitigation, ...] = ()  # empty with mitigation_table: SmoothQuant 0.5, per-token, rotation if possible
    keep_float: tuple[tuple[str, KeepFloat], ...] = ()  # with mitigation_table: one more row of the first model per (label, set)

    def __post_init__(self) -> None:
        if self.keep_float and not self.mitigation_table:
            raise UsageError("--keep-float in compare needs --mitigations (each value is one more row of the first model)")
        if self.mitigation_table and not self.quantize:
            raise UsageError("--mitigations compares W8A8 losses; it cannot be combined with --no-quantize")
        if len(self.entries) < (1 if self.mitigation_table else 2):
            raise UsageError(f"compare needs at least two checkpoints, got {len(self.entries)}; e.g. compare vanilla/ outeffhop/")
        names = [e.name for e in self.entries]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UsageError(f"display name(s) {', '.join(dupes)} given twice; give each checkpoint its own NAME=PATH")


def parse_spec(spec: str) -> tuple[str | None, str, AttentionVariant | None]:
    """`[NAME=]PATH[@VARIANT]` -> (name or None, source, variant or None).

    A spec that exists as a path as a whole is taken literally (paths may contain `=` or `@`).
    """
    name: str | None = None
    rest = spec
    if "=" in rest and not Path(rest).expanduser().exists():
        left, right = rest.split("=", 1)
        if _NAME.match(left):
            name, rest = left, right
        elif "/" not in left and "\\" not in left:
            raise UsageError(f"display name {left!r} in {spec!r} must be letters, digits, '.', '_', '+' or '-' (NAME=PATH)")
    variant: AttentionVariant | None = None
    if "@" in rest and not Path(rest).expanduser().exists():
        source, value = rest.rsplit("@", 1)
        try:
            variant = AttentionVariant(value)
        except ValueError:
            raise UsageError(f"unknown attention variant {value!r} in {spec!r}; choose from {VARIANTS} (PATH@VARIANT)") from None
        rest = source
    if not rest:
        raise UsageError(f"checkpoint spec {spec!r} has no path; use [NAME=]PATH[@VARIANT]")
    return name, rest, variant


def resolve_entries(specs: Sequence[str], base: LoadConfig) -> tuple[CompareEntry, ...]:
    """Parse specs; load options other than source / attention come from `base`.

    Unnamed entries are named after the checkpoint; when two names collide the variant is appended
    (`tiny-opt-softmax1`), then a counter.
    """
    parsed = [parse_spec(s) for s in specs]
    given = [n for n, _, _ in parsed if n]
    auto = [n or model_name(src) for n, src, _ in parsed]
    names: list[str] = []
    for (name, _src, variant), base_name in zip(parsed, auto):
        if name is None and (auto.count(base_name) > 1 or base_name in given) and variant is not None:
            base_name = f"{base_name}-{variant.value}"
        names.append(base_name)
    final: list[str] = []
    for (name, _src, _v), candidate in zip(parsed, names):
        if name is None:
            k, unique = 2, candidate
            while unique in final or unique in given:
                unique, k = f"{candidate}-{k}", k + 1
            candidate = unique
        final.append(candidate)
    return tuple(
        CompareEntry(name, replace(base, source=src, attention=variant))
        for name, (_n, src, variant) in zip(final, parsed)
    )


def preflight(entries: Sequence[CompareEntry]) -> None:
    """Fail on a missing checkpoint before the first model is measured (cheap: no weights are read)."""
    for entry in entries:
        weights_folder(entry.load.source)


def run_compare(cfg: CompareConfig, progress: Progress | None = None) -> CompareResult:
    """Measure every entry with identical data / seed / recipe; the CLI renders and writes the result."""
    preflight(cfg.entries)
    runs: list[ModelRun] = []
    from outlier_probe.forecast.run import is_forecaster, run_forecast_quantize, run_forecast_stats

    for entry in cfg.entries:
        stats_cfg = StatsConfig(load=entry.load, data=cfg.data, sites=cfg.sites, observer=cfg.observer, plots=False)
        if is_forecaster(entry.load.source):  # a stanhop forecaster: test windows of the --data CSV
            qcfg = QuantizeConfig(load=entry.load, data=cfg.data, recipes=(cfg.recipe,), metric=cfg.metric)
            stats = run_forecast_stats(stats_cfg, cfg.forecast_samples, _labelled(progress, f"{entry.name}: measuring"))
            quant = run_forecast_quantize(qcfg, cfg.forecast_samples) if cfg.quantize else None
            runs.append(ModelRun(entry, stats, quant))
            continue
        loaded = load_model(entry.load)
        kept_sets = cfg.keep_float if cfg.mitigation_table and not runs else ()
        for _label, keep in kept_sets:  # a pattern matching nothing fails before any pass runs
            check_keep_float(loaded, cfg.recipe, keep)
        stats = run_stats(stats_cfg, progress=_labelled(progress, f"{entry.name}: measuring"), loaded=loaded)
        quant = None
        if cfg.quantize:
            mitigations = default_mitigations(loaded.model, cfg) if cfg.mitigation_table and not runs else ()
            qcfg = QuantizeConfig(load=entry.load, data=cfg.data, recipes=(cfg.recipe,), metric=cfg.metric,
                                  mitigations=mitigations, mitigation_stats=bool(mitigations),
                                  score_transformed=bool(mitigations))
            step = None if progress is None else (lambda d, t, label, n=entry.name: progress(d, t, f"{n}: evaluating {label}"))
            quant = run_quantize(qcfg, progress=step, loaded=loaded)
        kept = tuple((label, run_quantize(replace(qcfg, mitigations=(), mitigation_stats=False, keep_float=keep),
                                          progress=step, loaded=loaded)) for label, keep in kept_sets)
        heads = None
        if cfg.attention:
            from outlier_probe.diagnose.attention_run import AttentionConfig, run_attention

            heads = run_attention(AttentionConfig(load=entry.load, data=cfg.data, observer=cfg.observer),
                                  progress=_labelled(progress, f"{entry.name}: attention"), loaded=loaded)
        runs.append(ModelRun(entry, stats, quant, heads, kept))
        dropped = weakref.ref(loaded.model)
        del loaded
        collect_if_alive(dropped)
    return CompareResult(runs, settings_of(cfg), _notes(runs))


def _labelled(progress: Progress | None, label: str) -> Callable[[int, int], None] | None:
    return None if progress is None else (lambda d, t: progress(d, t, label))


def _notes(runs: list[ModelRun]) -> list[str]:
    """Caveats the reader must see: different data (tokenizers) or different metrics across models."""
    notes = []
    base = runs[0]
    for run in runs[1:]:
        if run.stats.data != base.stats.data:
            notes.append(f"{run.entry.name} saw different data than {base.entry.name} (another tokenizer or data source)")
        if run.quant and base.quant and run.quant.rows()[0]["metric"] != base.quant.rows()[0]["metric"]:
            notes.append(f"{run.entry.name} is scored by another metric than {base.entry.name}: its metric changes are NaN")
    return notes


def default_mitigations(model: Any, cfg: CompareConfig) -> tuple[Mitigation, ...]:
    """The mitigations asked for, or SmoothQuant 0.5, per-token activations and (where the family allows) rotation."""
    from outlier_probe import arch
    from outlier_probe.quant.mitigations.apply import AGranularity, Rotation

    if cfg.mitigations:
        return cfg.mitigations
    out = [Mitigation(smoothquant=0.5), Mitigation(a_granularity=AGranularity.per_token)]
    try:
        arch.rotation_layout(model)
        out.append(Mitigation(rotate=Rotation.hadamard))
    except UsageError:
        pass  # the family cannot be rotated: the table notes it
    return tuple(out)


MITIGATION_DEFINITIONS: dict[str, str] = {
    "gap_closed": "(plain W8A8 loss - this row's loss) / plain W8A8 loss of the first (vanilla) model; loss = "
                  "degradation from the row's own float score",
    "avg_kurtosis": "mean paper kurtosis over the sites of the float model the row quantizes (transformed for "
                    "SmoothQuant / rotation)",
    "max_inf_norm": "largest paper inf-norm over every hooked site of that float model",
    "sink_rate": "attention pass of the untransformed model: SmoothQuant, rotation and per-token scales leave "
                 "the float attention probabilities unchanged, so mitigated rows repeat the vanilla figure",
}


def mitigation_rows(result: CompareResult) -> list[dict[str, Any]]:
    """Rows of `compare --mitigations`: the vanilla model plain and with each mitigation, then each other model."""
    from outlier_probe.quant.run import degradation, gap_closed

    first = result.runs[0]
    assert first.quant is not None, "mitigation rows need quantize passes"
    base = first.figures()
    higher = bool(base["higher_is_better"])
    plain_loss = degradation(base["float"], base["quantized"], higher)
    rows = []
    for r in first.quant.runs:
        stats = r.details.get("stats") or {}
        rows.append({
            "row": first.entry.name if r.mitigation == "plain" else f"{first.entry.name}+{r.mitigation}",
            "kind": "vanilla" if r.mitigation == "plain" else "post-training",
            "float": r.transformed_float, "w8a8": r.quant_score.value,
            "gap_closed": gap_closed(plain_loss, degradation(r.float_score.value, r.quant_score.value, higher)),
            "avg_kurtosis": _num(stats.get("avg_kurtosis", base["avg_kurtosis"])),
            "max_inf_norm": _num(stats.get("max_inf_norm", base["max_inf_norm"])),
            "sink_rate": base.get("sink_rate", math.nan),
        })
    for label, kept in first.kept:  # --keep-float: the float model is unchanged, so are its figures
        r = kept.runs[0]
        rows.append({
            "row": f"{first.entry.name}+keep-float {label}", "kind": "post-training",
            "float": r.float_score.value, "w8a8": r.quant_score.value,
            "gap_closed": gap_closed(plain_loss, degradation(r.float_score.value, r.quant_score.value, higher)),
            "avg_kurtosis": base["avg_kurtosis"], "max_inf_norm": base["max_inf_norm"],
            "sink_rate": base.get("sink_rate", math.nan),
        })
    for run in result.runs[1:]:
        f = run.figures()
        same = f["metric"] == base["metric"]
        rows.append({
            "row": run.entry.name, "kind": f"architecture ({f['attention']})", "float": f["float"], "w8a8": f["quantized"],
            "gap_closed": gap_closed(plain_loss, degradation(f["float"], f["quantized"], higher)) if same else math.nan,
            "avg_kurtosis": f["avg_kurtosis"], "max_inf_norm": f["max_inf_norm"], "sink_rate": f.get("sink_rate", math.nan),
        })
    return rows
