"""Model-level figures from per-site statistics: what the papers' tables report."""

from __future__ import annotations

import math
from typing import Any, Sequence

from outlier_probe.config import SiteKind

DEFINITIONS: dict[str, str] = {
    "paper_kurtosis": "per sequence b: k_b = mean((x_b - mean x_b)^4) / (std(x_b)^4 + 1e-6), std unbiased (n-1), "
    "x_b flattened over tokens and channels; Pearson (Gaussian = 3); the site's value is the mean of k_b over sequences",
    "paper_inf_norm": "per sequence max |x_b|; the site's value is the mean over sequences",
    "kurtosis": "streaming Pearson kurtosis m4 / m2^2 over every value seen (mergeable float64 central moments)",
    "excess_kurtosis": "kurtosis - 3",
    "max_abs": "global max |x| over every value seen",
    "frac_gt_threshold": "fraction of values with |x| > threshold (6.0 = the LLM.int8 outlier threshold)",
    "frac_gt_ksigma": "fraction of values more than k per-sequence standard deviations from the per-sequence mean",
    "avg_kurtosis": "mean of paper_kurtosis over the reported sites",
    "max_kurtosis": "max of paper_kurtosis over the reported sites",
    "max_inf_norm": "max of paper_inf_norm over the reported sites",
    "max_inf_norm_block_output": "max of paper_inf_norm over the block outputs (the papers' 'max inf-norm')",
}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """rows: stats.csv rows (site, kind, layer, paper_kurtosis, paper_inf_norm, max_abs, frac_gt_threshold, ...)."""
    if not rows:
        raise ValueError("no sites to summarise")

    def arg(key: str, pick: Any = max, subset: Sequence[dict[str, Any]] = rows) -> dict[str, Any] | None:
        valid = [r for r in subset if isinstance(r[key], (int, float)) and math.isfinite(r[key])]
        return pick(valid, key=lambda r: r[key]) if valid else None

    kurt = [r["paper_kurtosis"] for r in rows if math.isfinite(r["paper_kurtosis"])]
    worst_k = arg("paper_kurtosis")
    worst_inf = arg("paper_inf_norm")
    blocks = [r for r in rows if r["kind"] == SiteKind.block_output.value]
    worst_block = arg("paper_inf_norm", subset=blocks) if blocks else None
    worst_frac = arg("frac_gt_threshold")
    worst_abs = arg("max_abs")
    layer = worst_inf.get("layer") if worst_inf else None
    return {
        "sites": len(rows),
        "avg_kurtosis": sum(kurt) / len(kurt) if kurt else math.nan,
        "max_kurtosis": worst_k["paper_kurtosis"] if worst_k else math.nan,
        "max_kurtosis_site": worst_k["site"] if worst_k else None,
        "max_inf_norm": worst_inf["paper_inf_norm"] if worst_inf else math.nan,
        "max_inf_norm_site": worst_inf["site"] if worst_inf else None,
        "max_inf_norm_block_output": worst_block["paper_inf_norm"] if worst_block else None,
        "max_abs": worst_abs["max_abs"] if worst_abs else math.nan,
        "max_abs_site": worst_abs["site"] if worst_abs else None,
        "max_outlier_fraction": worst_frac["frac_gt_threshold"] if worst_frac else math.nan,
        "max_outlier_fraction_site": worst_frac["site"] if worst_frac else None,
        "worst_layer": layer if layer is not None and layer == layer else None,
    }
