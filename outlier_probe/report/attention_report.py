"""Rendering and writing of `attention` results: heads.csv, layers.csv, summary.json, heatmap.png, tables."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from rich.table import Table

from outlier_probe.diagnose.attention_stats import SINK_THRESHOLD
from outlier_probe.report.io import ensure_writable_dir, write_csv, write_figure, write_json
from outlier_probe.report.meta import header
from outlier_probe.report.sensitivity_report import num

HEAD_COLUMNS = ["layer", "head", "queries", "first", "special", "delimiter", "entropy", "sink", "null", "gate_closed"]
LAYER_COLUMNS = ["layer", "top_abs", "median_abs", "ratio", "massive", "sequence", "position", "token", "category",
                 "channel", "in_top_channels", "top_channels", "sink_token", "sink_token_mass", "on_sink"]
DEFINITIONS = {
    "first": "mean attention mass on the first token (per query; padding queries excluded)",
    "special": "mean mass on the tokenizer's special tokens (BOS/[CLS]/[SEP]/...)",
    "delimiter": "mean mass on tokens that decode to '.', ',' or a newline",
    "entropy": "mean -sum p log p of a query's attention row (nats)",
    "sink": f"sink rate: fraction of queries whose first-token mass > {SINK_THRESHOLD}",
    "null": "mean 1 - sum p (mass that goes nowhere: softmax_1; ~0 for softmax)",
    "gate_closed": "gated attention: mean 1 - sigmoid(G(x)) per token (NaN for other variants)",
    "massive": "Sun et al. 2024: top |x| of the residual stream leaving the block (pre-norm: block output; "
               "post-norm: the residual sum entering the block's last norm) > massive_abs and > massive_ratio x the median |x| "
               "(median: mean of per-batch medians)",
    "on_sink": "the massive token is the token later layers' heads give the most mass per occurrence, or the "
               f"first token while those heads' mean first-token mass > {SINK_THRESHOLD}",
    "in_top_channels": "the massive channel is among `stats`' top outlier channels (per-channel absmax) of that block output",
}


def head_rows(result: Any) -> list[dict[str, Any]]:
    return [dataclasses.asdict(h) for h in result.heads]


def layer_rows(result: Any) -> list[dict[str, Any]]:
    rows = []
    for f in result.layers:
        m = f.massive
        rows.append({"layer": m.layer, "top_abs": m.top_abs, "median_abs": m.median_abs, "ratio": m.ratio,
                     "massive": f.is_massive, "sequence": m.sequence, "position": m.position, "token": f.token,
                     "category": f.category, "channel": m.channel, "in_top_channels": f.in_top_channels,
                     "top_channels": ";".join(map(str, f.top_channels)), "sink_token": f.sink_token,
                     "sink_token_mass": f.sink_token_mass, "on_sink": f.on_sink})
    return rows


def attention_document(result: Any) -> dict[str, Any]:
    return {**header("attention"), "model": result.model, "data": result.data, "settings": result.settings,
            "definitions": DEFINITIONS, "summary": result.summary(), "layers": layer_rows(result)}


NULL_VARIANTS = ("softmax1", "clipped", "softpick", "sink")  # rows may sum to less than 1
GATE_VARIANTS = ("gated", "sigmoid-gate")


def heatmap(result: Any, out: Path) -> Path:
    import numpy as np

    from outlier_probe.report.plots import _pyplot

    plt = _pyplot()
    layers = 1 + max(h.layer for h in result.heads)
    n_heads = 1 + max(h.head for h in result.heads)
    panels = [("first", "sink mass (first token)")]
    if result.variant in NULL_VARIANTS:
        panels.append(("null", "null mass 1 - sum p"))
    if result.variant in GATE_VARIANTS:
        panels.append(("gate_closed", "closed gate 1 - sigmoid(G)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 0.35 * n_heads * len(panels), 1.5 + 0.35 * layers), squeeze=False)
    for ax, (field, title) in zip(axes[0], panels):
        grid = np.full((layers, n_heads), np.nan)
        for h in result.heads:
            grid[h.layer, h.head] = getattr(h, field)
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f"{result.model['name']} ({result.variant})")
    fig.tight_layout()
    try:
        return write_figure(out, fig, dpi=110)
    finally:
        plt.close(fig)


def write_attention_report(result: Any, out: Path) -> dict[str, Path]:
    import pandas as pd

    out = ensure_writable_dir(out)
    return {
        "heads.csv": write_csv(out / "heads.csv", pd.DataFrame(head_rows(result), columns=HEAD_COLUMNS)),
        "layers.csv": write_csv(out / "layers.csv", pd.DataFrame(layer_rows(result), columns=LAYER_COLUMNS)),
        "heatmap.png": heatmap(result, out / "heatmap.png"),
        "summary.json": write_json(out / "summary.json", attention_document(result)),
    }


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def heads_table(result: Any) -> Table:
    """One row per layer: means over its heads, and its most sink-prone head."""
    extra = "null" if result.variant in NULL_VARIANTS else "gate_closed" if result.variant in GATE_VARIANTS else None
    # collapsed padding: eight 8-character numbers (0.008583) must still fit 80 columns
    table = Table(title=f"{result.model['name']}: attention per layer ({result.variant}; means over heads)",
                  collapse_padding=True, pad_edge=False)
    cols = ["layer", "first", "special", "delim", "entropy", "sink", "top head"] + ([extra.replace("_closed", "")] if extra else [])
    for c in cols:
        table.add_column(c, justify="right", no_wrap=True)
    for layer in sorted({h.layer for h in result.heads}):
        hs = [h for h in result.heads if h.layer == layer]
        top = max(hs, key=lambda h: h.sink)
        row = [str(layer), *(num(_mean([getattr(h, f) for h in hs])) for f in ("first", "special", "delimiter", "entropy", "sink")),
               f"{top.head}:{num(top.sink)}"]
        if extra:
            row.append(num(_mean([getattr(h, extra) for h in hs])))
        table.add_row(*row)
    return table


def massive_table(result: Any) -> Table:
    table = Table(title="massive activations per layer (residual stream)")
    for c, j in (("layer", "right"), ("top |x|", "right"), ("x median", "right"), ("pos", "right"),
                 ("token", "left"), ("ch", "right"), ("massive", "left"), ("sink", "left"), ("top ch", "left")):
        table.add_column(c, justify=j, overflow="fold", no_wrap=c != "token")
    for f in result.layers:
        m = f.massive
        table.add_row(str(m.layer), num(m.top_abs), num(m.ratio), str(m.position), f.token, str(m.channel),
                      "yes" if f.is_massive else "no", "yes" if f.on_sink else "no", "yes" if f.in_top_channels else "no")
    return table
