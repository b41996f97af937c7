"""The comparison's plain types: entries, one model's runs, the result and its figures.

They live apart from the decisions (`outlier_probe.compare`) so that `outlier_probe.report.compare_report`
renders a comparison without importing the decision layer above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from outlier_probe.config import LoadConfig

if TYPE_CHECKING:
    from outlier_probe.quant.run import QuantizeResult
    from outlier_probe.stats.run import StatsResult

# Figures of the comparison table, in column order; each also gets `<figure>_vs_baseline`.
FIGURES: tuple[str, ...] = (
    "float",  # metric of the float model (quantize.csv `float`)
    "quantized",  # metric of the W8A8 model (quantize.csv `quantized`)
    "degradation",  # quantized - float (quantize.csv `abs_change`)
    "degradation_rel",  # (quantized - float) / float (quantize.csv `rel_change`)
    "avg_kurtosis",  # mean paper kurtosis over the sites (summary.json)
    "max_kurtosis",
    "max_inf_norm_block_output",  # the papers' "max inf-norm"
    "max_inf_norm",  # over every hooked site
)
ATTENTION_FIGURES: tuple[str, ...] = (  # from the `attention` pass (its summary.json), after FIGURES in the table
    "sink_rate",  # mean over heads of the fraction of queries with first-token mass > 0.3
    "null_mass",  # mean over heads of 1 - sum p (softmax_1)
    "massive_ratio",  # largest top |x| / median |x| of the residual stream over layers
)
QUANT_FIGURES = FIGURES[:4]

DEFINITIONS: dict[str, str] = {
    "baseline": "the first checkpoint given",
    "vs_baseline": "relative change versus the baseline: (x - x_baseline) / |x_baseline|; NaN when the baseline "
    "figure is 0 or missing, or when the metrics differ",
    "degradation": "W8A8 metric - float metric (quantize.csv abs_change); for accuracy / hidden_cosine a negative "
    "value is a loss",
    "degradation_rel": "(W8A8 - float) / float (quantize.csv rel_change)",
    "sink_rate": "attention: mean over heads of the fraction of queries whose first-token mass > 0.3",
    "null_mass": "attention: mean over heads of 1 - sum p (the mass softmax_1 sends nowhere; ~0 for softmax)",
    "massive_ratio": "attention: largest top |x| / median |x| of the residual stream over layers (Sun et al. 2024)",
    "no_quantize": "with --no-quantize no model is evaluated: float, quantized and degradation are NaN (empty in CSV, null in JSON) and left out of the tables",
}


@dataclass(frozen=True)
class CompareEntry:
    """One column of the comparison: a display name and how to load the checkpoint (variant included)."""

    name: str
    load: LoadConfig

    @property
    def spec(self) -> str:
        """The `NAME=PATH[@VARIANT]` that reproduces this entry."""
        variant = f"@{self.load.attention.value}" if self.load.attention else ""
        return f"{self.name}={self.load.source}{variant}"


@dataclass
class ModelRun:
    """One model's stats pass and (optional) quantize pass."""

    entry: CompareEntry
    stats: StatsResult
    quant: QuantizeResult | None
    attention: Any = None  # diagnose.attention_run.AttentionResult, unless switched off
    kept: tuple[tuple[str, QuantizeResult], ...] = ()  # compare --mitigations --keep-float: (label, plain W8A8 run)

    def figures(self) -> dict[str, Any]:
        s = self.stats.summary
        a = self.attention.summary() if self.attention is not None else {}
        out: dict[str, Any] = {
            "name": self.entry.name,
            "source": self.entry.load.source,
            "attention": self.stats.model["attention"],
            "family": self.stats.model["family"],
            "metric": None,
            "higher_is_better": None,
            **{key: math.nan for key in QUANT_FIGURES},
            "avg_kurtosis": _num(s.get("avg_kurtosis")),
            "max_kurtosis": _num(s.get("max_kurtosis")),
            "max_inf_norm_block_output": _num(s.get("max_inf_norm_block_output")),
            "max_inf_norm": _num(s.get("max_inf_norm")),
            **{key: _num(a.get(key)) for key in ATTENTION_FIGURES},
        }
        if self.quant is not None:
            row = self.quant.rows()[0]
            out.update(metric=row["metric"], higher_is_better=row["higher_is_better"], float=row["float"],
                       quantized=row["quantized"], degradation=row["abs_change"], degradation_rel=row["rel_change"])
        return out


@dataclass
class CompareResult:
    runs: list[ModelRun]
    settings: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        return compare_rows([r.figures() for r in self.runs])


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan  # None (no block outputs) -> NaN


def relative_change(value: float, baseline: float) -> float:
    """(value - baseline) / |baseline|; NaN when either is not finite or the baseline is 0."""
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
        return math.nan
    return (value - baseline) / abs(baseline)


def compare_rows(figures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add `<figure>_vs_baseline` to each row; the first row is the baseline. Metrics of another kind get NaN."""
    base = figures[0]
    rows = []
    for row in figures:
        same_metric = row.get("metric") == base.get("metric")
        extra = {
            f"{key}_vs_baseline": relative_change(row[key], base[key]) if same_metric or key not in QUANT_FIGURES else math.nan
            for key in (*FIGURES, *ATTENTION_FIGURES) if key in row
        }
        rows.append({**row, **extra})
    return rows
