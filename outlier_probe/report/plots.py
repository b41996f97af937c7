"""PNG plots of per-layer outlier statistics (matplotlib, Agg backend, atomic writes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from outlier_probe.report.io import write_figure


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def layer_curves(runs: Mapping[str, Sequence[dict[str, Any]]], out: Path, title: str = "") -> Path:
    """Paper kurtosis and inf-norm by layer, one panel pair, one line per (run, site kind)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for run_name, rows in runs.items():
        kinds = sorted({r["kind"] for r in rows if r.get("layer") is not None and r["layer"] == r["layer"]})
        for kind in kinds:
            pts = sorted(((int(r["layer"]), r) for r in rows if r["kind"] == kind and r.get("layer") is not None and r["layer"] == r["layer"]), key=lambda p: p[0])
            label = f"{run_name}: {kind}" if len(runs) > 1 else kind
            for ax, key in zip(axes, ("paper_kurtosis", "paper_inf_norm")):
                # several sites of one kind per layer (e.g. two norms): plot the layer's max
                by_layer: dict[int, float] = {}
                for layer, r in pts:
                    by_layer[layer] = max(by_layer.get(layer, float("-inf")), float(r[key]))
                ax.plot(list(by_layer), list(by_layer.values()), marker="o", label=label)
    for ax, ylabel in zip(axes, ("kurtosis (paper def., Gaussian = 3)", "inf-norm (mean per-sequence max |x|)")):
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    return _finish(plt, fig, out, 110, title=title or "outliers by layer")


def histogram(edges: Sequence[float], counts: Sequence[int], out: Path, title: str) -> Path:
    """|x| histogram on log-spaced bins (underflow and overflow bins drawn at the ends)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    inner = list(counts[1:-1])
    lefts = list(edges[:-1])
    widths = [b - a for a, b in zip(edges[:-1], edges[1:])]
    ax.bar(lefts, inner, width=widths, align="edge", edgecolor="none")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.axvline(6.0, color="red", linestyle="--", linewidth=1, label="|x| = 6 (LLM.int8 threshold)")
    ax.set_xlabel("|x|")
    ax.set_ylabel("count")
    ax.set_title(f"{title}  (below {edges[0]:g}: {counts[0]}, above {edges[-1]:g}: {counts[-1]})", fontsize=9)
    ax.legend(fontsize=8)
    return _finish(plt, fig, out, 110)


def training_curves(rows: Sequence[dict[str, Any]], out: Path, title: str = "outliers during training") -> Path:
    """Loss, average kurtosis and max inf-norm against training tokens, one line per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    runs = sorted({r["run"] for r in rows})
    for run in runs:
        pts = [r for r in rows if r["run"] == run]
        for ax, key in zip(axes, ("eval_loss", "avg_kurtosis", "max_inf_norm")):
            ax.plot([r["tokens"] for r in pts], [r[key] for r in pts], marker=".", label=run)
    for ax, key in zip(axes, ("eval loss", "average kurtosis", "max inf-norm (block outputs)")):
        ax.set_xlabel("training tokens")
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[0].legend()
    return _finish(plt, fig, out, 110, title=title)


RETROFIT_PANELS = (("eval_loss", "held-out objective"), ("avg_kurtosis", "avg kurtosis, all sites"),
                   ("max_inf_norm", "max inf-norm, all sites"), ("max_inf_ffn_output", "max inf-norm, FFN outputs"),
                   ("max_inf_attn_output", "max inf-norm, attention outputs"), ("max_inf_residual", "max inf-norm, residual sums"))


def retrofit_curves(rows: Sequence[dict[str, Any]], out: Path, title: str) -> Path:
    """retrofit's curves against fine-tuning steps: one colour per twin, one line style per seed."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    twins = list(dict.fromkeys(r["twin"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    styles = ("-", "--", ":", "-.")
    for i, twin in enumerate(twins):
        for j, seed in enumerate(seeds):
            pts = [r for r in rows if r["twin"] == twin and r["seed"] == seed]
            for ax, (key, _) in zip(axes.flat, RETROFIT_PANELS):
                ax.plot([r["step"] for r in pts], [r.get(key, float("nan")) for r in pts], color=f"C{i}",
                        linestyle=styles[j % len(styles)], marker=".", label=f"{twin} s{seed}")
    for ax, (_, label) in zip(axes.flat, RETROFIT_PANELS):
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    return _finish(plt, fig, out, 100, title=title)


def _finish(plt: Any, fig: Any, out: Path, dpi: int, title: str | None = None) -> Path:
    """Title, tight layout, atomic write, and the figure closed whatever happens."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return write_figure(out, fig, dpi=dpi)
    finally:
        plt.close(fig)
