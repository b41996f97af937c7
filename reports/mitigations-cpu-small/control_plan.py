"""The control for a `sensitivity` float plan: as many blocks kept in float, taken from the LEAST sensitive end.

python3 control_plan.py SENSITIVITY_FOLDER -> comma-separated --keep-float module patterns on stdout.
Reads plan.json (the kept `layer.<i>` groups and their point names) and summary.json (the groups ranked by the
divergence each causes when quantized alone; rank 1 = most damaging)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def control_patterns(folder: Path) -> list[str]:
    plan = json.loads((folder / "plan.json").read_text())
    groups = json.loads((folder / "summary.json").read_text())["groups"]
    kept = plan["kept_groups"]
    if not kept or not all(g.startswith("layer.") for g in kept):
        raise SystemExit(f"control_plan: the plan in {folder} keeps {kept or 'nothing'}; need one or more layer.<i> groups")
    index = kept[0].split(".")[1]
    stack = next(m.group(1) for p in plan["keep_float_points"] if (m := re.match(rf"^(.*?\.){index}\.", p)))
    least = [g["group"] for g in sorted(groups, key=lambda g: -g["rank"]) if g["group"] not in kept]
    return [stack + g.split(".")[1] for g in least[:len(kept)]]


if __name__ == "__main__":
    print(",".join(control_patterns(Path(sys.argv[1]))))
