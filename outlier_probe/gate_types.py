"""The gate's plain types: thresholds (GateConfig), where they came from, report files, verdicts.

They live apart from the decisions (`outlier_probe.gate`) so that `outlier_probe.report.gate_output`
renders a verdict without importing the decision layer above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from outlier_probe.config import SiteKind
from outlier_probe.errors import UsageError

EXIT_PASS, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# threshold key -> the measured metric it bounds; "min_" keys are lower bounds, the rest upper bounds.
THRESHOLD_METRICS: dict[str, str] = {
    "max_avg_kurtosis": "avg_kurtosis",
    "max_kurtosis": "max_kurtosis",
    "max_inf_norm": "max_inf_norm",
    "max_outlier_fraction": "max_outlier_fraction",
    "max_ppl_increase": "ppl_increase",
    "max_ppl_ratio": "ppl_ratio",
    "min_recovery": "recovery",
    "max_sink_rate": "sink_rate",
    "max_massive_ratio": "massive_ratio",
}


STATS_METRICS = ("avg_kurtosis", "max_kurtosis", "max_inf_norm", "max_outlier_fraction")
QUANT_METRICS = ("ppl_increase", "ppl_ratio", "recovery")
ATTENTION_METRICS = ("sink_rate", "massive_ratio")  # from `attention`'s summary.json
HIGHER_IS_BETTER = frozenset({"recovery"})


@dataclass(frozen=True)
class GateConfig:
    """Resolved gate thresholds; every one optional. Validated on construction."""

    max_avg_kurtosis: float | None = None  # mean paper kurtosis over sites
    max_kurtosis: float | None = None  # paper kurtosis of any site
    max_inf_norm: float | None = None  # paper inf-norm of any site (of `site_kind` if set)
    site_kind: SiteKind | None = None  # restrict max_inf_norm (and its baseline) to one kind of site
    max_outlier_fraction: float | None = None  # fraction of |x| > 6 at any site
    max_ppl_increase: float | None = None  # quantized - float perplexity, any run
    max_ppl_ratio: float | None = None  # quantized / float perplexity, any run
    min_recovery: float | None = None  # quantized / float accuracy, every run
    max_sink_rate: float | None = None  # mean over heads of the attention sink rate (`attention`)
    max_massive_ratio: float | None = None  # largest top |x| / median |x| of the residual stream (`attention`)
    baseline: Path | None = None  # earlier report folder to compare with
    baseline_tolerance: float = 0.10  # relative worsening allowed against the baseline

    def __post_init__(self) -> None:
        for key in (*THRESHOLD_METRICS, "baseline_tolerance"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, _number(key, value))
        if self.site_kind is not None and not isinstance(self.site_kind, SiteKind):
            object.__setattr__(self, "site_kind", _site_kind(self.site_kind))
        if self.baseline is not None:
            object.__setattr__(self, "baseline", Path(self.baseline))
        if self.max_ppl_ratio is not None and self.max_ppl_ratio <= 0:
            raise UsageError(f"max_ppl_ratio must be > 0, got {self.max_ppl_ratio}")
        if self.site_kind is not None and self.max_inf_norm is None and self.baseline is None:
            raise UsageError("site_kind only applies to max_inf_norm; set max_inf_norm (or a baseline) too")

    @property
    def thresholds(self) -> dict[str, float]:
        """The thresholds that are set, in a fixed order."""
        return {k: getattr(self, k) for k in THRESHOLD_METRICS if getattr(self, k) is not None}

    @property
    def needs_quantize(self) -> bool:
        return any(THRESHOLD_METRICS[k] in QUANT_METRICS for k in self.thresholds)

    @property
    def needs_attention(self) -> bool:
        return any(THRESHOLD_METRICS[k] in ATTENTION_METRICS for k in self.thresholds)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, SiteKind) else str(value) if isinstance(value, Path) else value
        return out


CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in fields(GateConfig))


@dataclass(frozen=True)
class ResolvedGate:
    """A GateConfig plus where each value came from (printed and saved in gate.json)."""

    config: GateConfig
    sources: Mapping[str, str] = field(default_factory=dict)  # key -> "flag", a config file path, or "default"
    config_file: Path | None = None  # the TOML file used, if any


def _number(key: str, value: Any, where: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"gate setting {key}{where} must be a number, got {type(value).__name__} {value!r}")
    if math.isnan(value) or value < 0:
        raise UsageError(f"gate setting {key}{where} must be a number >= 0, got {value}")
    return float(value)


def _site_kind(value: Any, where: str = "") -> SiteKind:
    try:
        return SiteKind(value)
    except ValueError:
        choices = ", ".join(k.value for k in SiteKind)
        raise UsageError(f"gate setting site_kind{where} must be one of {choices}, got {value!r}") from None


@dataclass(frozen=True)
class ReportFiles:
    """The report files found in one or more report folders."""

    folders: tuple[Path, ...]
    stats_csv: Path | None = None
    quantize_csv: Path | None = None
    model: str | None = None  # model name from the stats summary.json, if present
    attention_json: Path | None = None  # `attention`'s summary.json (in the folder or its attention/)


@dataclass(frozen=True)
class CheckResult:
    """One row of the verdict."""

    name: str  # threshold key (e.g. "max_kurtosis") or "baseline:<metric>"
    metric: str  # measured metric (e.g. "max_kurtosis", "ppl_ratio")
    op: str  # "<=" (upper bound) or ">=" (lower bound)
    limit: float  # threshold, or the baseline value widened by the tolerance
    measured: float
    worst: str | None = None  # site or run holding the measured value
    detail: str = ""

    @property
    def passed(self) -> bool:
        if math.isnan(self.measured):  # a NaN never passes a gate
            return False
        return self.measured <= self.limit if self.op == "<=" else self.measured >= self.limit


@dataclass(frozen=True)
class GateResult:
    resolved: ResolvedGate
    reports: ReportFiles
    checks: tuple[CheckResult, ...]
    baseline: ReportFiles | None = None

    @property
    def failed(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if not c.passed)

    @property
    def passed(self) -> bool:
        return not self.failed

    @property
    def exit_code(self) -> int:
        return EXIT_PASS if self.passed else EXIT_FAIL
