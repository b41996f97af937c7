"""Which quantization points stay in float: exact point names (from a plan) and fnmatch patterns.

A *quantization point* is one place a recipe rounds something, named after its module:
``<module>:weight`` (a fake-quantized weight), ``<module>:in`` / ``<module>:out`` (an activation
quantizer on a module's input / output), ``<attention>:scores`` / ``<attention>:probs``.
A pattern matches a point when it matches the point's name, its module's name, or the name of any
module above it (so ``bert.encoder.layer.3`` keeps that whole block in float).
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path

from outlier_probe.errors import UsageError

PLAN_KIND = "outlier-probe mixed-precision plan"


def module_of(point: str) -> str:
    """`a.b.c:out` -> `a.b.c`."""
    return point.rsplit(":", 1)[0]


@dataclass(frozen=True)
class KeepFloat:
    """Points kept in float: exactly `points`, plus every point a pattern of `patterns` matches."""

    points: frozenset[str] = frozenset()
    patterns: tuple[str, ...] = ()
    source: str = ""  # where it came from (plan file or the patterns as typed), for reports

    def __bool__(self) -> bool:
        return bool(self.points or self.patterns)

    def keeps(self, point: str) -> bool:
        if point in self.points:
            return True
        if not self.patterns:
            return False
        names = [point, *_ancestors(module_of(point))]
        return any(fnmatch.fnmatchcase(n, p) for n in names for p in self.patterns)

    def unmatched(self, points: list[str]) -> list[str]:
        """Patterns and exact points that match none of `points` (a typo, or another model's plan)."""
        known = set(points)
        missing = sorted(p for p in self.points if p not in known)
        for pattern in self.patterns:
            probe = KeepFloat(patterns=(pattern,))
            if not any(probe.keeps(p) for p in points):
                missing.append(pattern)
        return missing


def _ancestors(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def parse_keep_float(values: list[str] | None) -> KeepFloat | None:
    """`--keep-float` values: a plan.json path, or comma-separated fnmatch patterns (repeatable)."""
    if not values:
        return None
    points: set[str] = set()
    patterns: list[str] = []
    plans = 0
    for value in values:
        path = Path(value)
        if value.endswith(".json") or path.is_file():
            points |= _plan_points(path)
            plans += 1
            continue
        patterns += [p.strip() for p in value.split(",") if p.strip()]
    if not plans and not patterns:
        raise UsageError("--keep-float is empty; give a plan.json or module patterns such as 'bert.encoder.layer.0'")
    return KeepFloat(frozenset(points), tuple(dict.fromkeys(patterns)), source=", ".join(values))


def _plan_points(path: Path) -> set[str]:
    if not path.is_file():
        raise UsageError(f"--keep-float {path}: no such plan file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        points = doc["keep_float_points"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"--keep-float {path} is not a plan.json written by `outlier-probe sensitivity`") from None
    if not isinstance(points, list) or not all(isinstance(p, str) for p in points):
        raise UsageError(f"--keep-float {path}: keep_float_points must be a list of point names")
    return set(points)
