"""Collects REPORT/runs/seed*/*/quantize.csv into table.csv, table.md and all_runs.csv (mean and spread over seeds).

Used by reports/mitigations-minilm/ and reports/mitigations-cpu-small/ (python3 make_table.py REPORT_FOLDER).
One folder per `quantize` call and seed, named by what it holds:
- `mitigations`:      the vanilla model, plain W8A8 and each post-training mitigation (--smoothquant, per-token, ...)
- `keep-NAME`:        the vanilla model with a --keep-float set (row `keep-float NAME`; only its plain run counts)
- `arch-NAME`:        another checkpoint (an architecture twin; row `NAME`, kind architecture), plain W8A8 only
A trailing `-paper` / `-linear` in NAME is dropped when it equals the run's recipe (one --keep-float per recipe).
Gap closed = (vanilla plain loss - row's loss) / vanilla plain loss on the same seed and recipe; loss = the
row's degradation from its own float score (so architecture twins are measured against their own float model).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ARCH_ORDER = ["control", "softmax", "softmax1", "clipped", "gated", "softpick", "sigmoid-gate", "sink"]
METRIC_LABEL = {"hidden_cosine": "cos", "perplexity": "ppl", "mlm_perplexity": "MLM ppl", "accuracy": "acc"}


def _row_name(kind: str, recipe: str) -> tuple[str, str]:
    """(row name, row kind) for a run folder."""
    if kind == "mitigations":
        return "", "post-training"
    prefix, _, name = kind.partition("-")
    name = name.removesuffix(f"-{recipe}")
    if prefix == "keep":
        return f"keep-float {name}", "post-training"
    if prefix == "arch":
        return name, "architecture"
    raise SystemExit(f"make_table: unknown run folder {kind!r} (expected mitigations, keep-NAME or arch-NAME)")


def collect(out: Path) -> pd.DataFrame:
    rows = []
    for csv in sorted(out.glob("runs/seed*/*/quantize.csv")):
        seed, kind = csv.parent.parent.name, csv.parent.name
        for _, r in pd.read_csv(csv).iterrows():
            recipe = r["run"].split("+")[0]
            name, row_kind = _row_name(kind, recipe)
            if kind != "mitigations" and r["mitigation"] != "plain":
                continue
            higher = bool(r["higher_is_better"])
            loss = (r["float"] - r["quantized"]) if higher else (r["quantized"] - r["float"])
            rows.append({"seed": seed, "recipe": recipe, "mitigation": name or r["mitigation"], "kind": row_kind,
                         "metric": r["metric"], "float": r["float"] if pd.isna(r["transformed_float"]) else r["transformed_float"], "w8a8": r["quantized"], "loss": loss})
    if not rows:
        raise SystemExit(f"make_table: no runs/seed*/*/quantize.csv under {out}")
    df = pd.DataFrame(rows)
    plain = df[df.mitigation == "plain"].set_index(["seed", "recipe"])["loss"]
    df["gap_closed"] = [(plain[(s, rc)] - loss) / plain[(s, rc)] for s, rc, loss in zip(df.seed, df.recipe, df.loss)]
    return df


def _order(name: str, kind: str) -> tuple:
    if kind == "architecture":  # the control first, then the variants in ARCH_ORDER (names may carry a prefix)
        known = [a for a in ARCH_ORDER if name == a or name.endswith("-" + a)]
        return (5, ARCH_ORDER.index(max(known, key=len)) if known else len(ARCH_ORDER), name)
    if name == "plain":
        return (0, 0, "")
    if name.startswith("smoothquant"):
        return (1, float(name.split("-")[1].split("+")[0]), name)
    if name.startswith("keep-float"):
        return (4, name.endswith("control"), name)
    return (2 if name == "per-token" else 3, 0, name)


def table(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    recipes = list(dict.fromkeys(r for r in ["paper", "linear"] + sorted(set(df.recipe)) if r in set(df.recipe)))
    df["_r"] = df.recipe.map({r: i for i, r in enumerate(recipes)})
    df["_m"] = [_order(n, k) for n, k in zip(df.mitigation, df.kind)]
    df = df.sort_values(["_r", "_m", "seed"]).drop(columns=["_r", "_m"])
    g = df.groupby(["recipe", "mitigation"], sort=False)
    return g.agg(kind=("kind", "first"), metric=("metric", "first"), float_metric=("float", "mean"),
                 float_sd=("float", "std"), w8a8=("w8a8", "mean"), w8a8_sd=("w8a8", "std"),
                 loss=("loss", "mean"), loss_sd=("loss", "std"), gap_closed=("gap_closed", "mean"),
                 gap_sd=("gap_closed", "std"), seeds=("seed", "nunique")).reset_index()


def markdown(t: pd.DataFrame) -> list[str]:
    metric = t.metric.iloc[0]
    label = METRIC_LABEL.get(metric, metric)
    cos = metric == "hidden_cosine"
    arch = (t.kind == "architecture").any()
    seeds = t.seeds.nunique() > 1  # some rows measured on fewer seeds: say how many
    head = (f"| recipe | mitigation |{' kind |' if arch else ''} float {label} | W8A8 {label} (sd) | gap closed (sd) |"
            + (" seeds |" if seeds else ""))
    lines = [head, "|---|---|" + ("---|" if arch else "") + "---:|---:|---:|" + ("---:|" if seeds else "")]
    for _, r in t.iterrows():
        if cos:
            f, q = f"{r.float_metric:.6f}", f"{r.w8a8:.4f} ({r.w8a8_sd:.4f})"
        else:
            f, q = f"{r.float_metric:.3f}", f"{r.w8a8:.3f} ({r.w8a8_sd:.3f})"
        kind = f" {r.kind} |" if arch else ""
        sd = "-" if pd.isna(r.gap_sd) else f"{100 * r.gap_sd:.1f}"
        q = q.replace("(nan)", "(-)")
        lines.append(f"| {r.recipe} | {r.mitigation} |{kind} {f} | {q} | {100 * r.gap_closed:+.1f}% ({sd}) |"
                     + (f" {r.seeds} |" if seeds else ""))
    return lines


def main(out: Path) -> None:
    df = collect(out)
    t = table(df)
    t.to_csv(out / "table.csv", index=False)
    df.to_csv(out / "all_runs.csv", index=False)
    lines = markdown(t)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
