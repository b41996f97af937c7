"""--keep-float: plan files and fnmatch patterns -> the quantization points left in float."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from outlier_probe.errors import UsageError
from outlier_probe.quant.keep import KeepFloat, module_of, parse_keep_float


def test_patterns_match_points_modules_and_enclosing_modules() -> None:
    keep = KeepFloat(patterns=("model.layers.1", "*:probs", "*.fc2"))
    assert keep.keeps("model.layers.1:out") and keep.keeps("model.layers.1.mlp.down_proj:weight")
    assert keep.keeps("model.layers.0.self_attn:probs") and keep.keeps("model.layers.0.fc2:in")
    assert not keep.keeps("model.layers.10.mlp.down_proj:weight")  # layers.1 is not a prefix of layers.10
    assert not keep.keeps("model.layers.0.self_attn:scores")
    assert module_of("a.b:weight") == "a.b"


def test_parse_plan_files_and_patterns(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"keep_float_points": ["a.b:weight", "a.b:out"]}))
    keep = parse_keep_float([str(plan), "x.*,y"])
    assert keep.points == {"a.b:weight", "a.b:out"} and keep.patterns == ("x.*", "y")
    assert keep.unmatched(["a.b:weight", "a.b:out", "x.z:in"]) == ["y"]
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"keep_float_points": []}))  # a plan met with everything quantized
    parsed = parse_keep_float([str(empty)])
    assert parsed is not None and not parsed
    assert parse_keep_float(None) is None
    (tmp_path / "bad.json").write_text("{}")
    for values, message in (([","], "is empty"), ([str(tmp_path / "bad.json")], "not a plan.json"),
                            ([str(tmp_path / "none.json")], "no such plan file")):
        with pytest.raises(UsageError, match=message):
            parse_keep_float(values)
