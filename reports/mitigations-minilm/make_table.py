"""Collects reports/mitigations-minilm/runs/*/ into table.csv and table.md (mean and spread over seeds)."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def main(out: Path) -> None:
    rows = []
    for csv in sorted(out.glob("runs/seed*/*/quantize.csv")):
        seed, kind = csv.parent.parent.name, csv.parent.name
        df = pd.read_csv(csv)
        for _, r in df.iterrows():
            recipe = r["run"].split("+")[0]
            name = r["mitigation"] if kind == "mitigations" else f"keep-float {kind.removeprefix('keep-')}"
            if kind != "mitigations" and r["mitigation"] != "plain":
                continue
            rows.append({"seed": seed, "recipe": recipe, "mitigation": name, "float": r["transformed_float"],
                         "w8a8": r["quantized"], "loss": r["float"] - r["quantized"]})
    df = pd.DataFrame(rows)
    plain = df[df.mitigation == "plain"].set_index(["seed", "recipe"])["loss"]
    df["gap_closed"] = [(plain[(s, rc)] - loss) / plain[(s, rc)] for s, rc, loss in zip(df.seed, df.recipe, df.loss)]
    order = ["plain", *sorted(m for m in set(df.mitigation) if m.startswith("smoothquant")), "per-token",
             "keep-float ffn-down", "keep-float query-control"]
    df["_r"] = df.recipe.map({"paper": 0, "linear": 1})
    df["_m"] = df.mitigation.map({m: i for i, m in enumerate(order)})
    df = df.sort_values(["_r", "_m", "seed"]).drop(columns=["_r", "_m"])
    g = df.groupby(["recipe", "mitigation"], sort=False)
    table = g.agg(float_cos=("float", "mean"), w8a8_cos=("w8a8", "mean"), w8a8_sd=("w8a8", "std"),
                  gap_closed=("gap_closed", "mean"), gap_sd=("gap_closed", "std"), seeds=("seed", "nunique")).reset_index()
    table.to_csv(out / "table.csv", index=False)
    df.to_csv(out / "all_runs.csv", index=False)
    lines = ["| recipe | mitigation | float cos | W8A8 cos (sd) | gap closed (sd) |", "|---|---|---:|---:|---:|"]
    for _, r in table.iterrows():
        lines.append(f"| {r.recipe} | {r.mitigation} | {r.float_cos:.6f} | {r.w8a8_cos:.4f} ({r.w8a8_sd:.4f}) | "
                     f"{100 * r.gap_closed:+.1f}% ({100 * r.gap_sd:.1f}) |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
