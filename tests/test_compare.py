"""The `compare` library: checkpoint specs, names, relative changes, and one stats-only run on a tiny OPT."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest

from outlier_probe.compare import (
    CompareConfig,
    CompareEntry,
    compare_rows,
    parse_spec,
    relative_change,
    resolve_entries,
    run_compare,
)
from outlier_probe.config import AttentionVariant, DataConfig, LoadConfig
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.report.compare_report import cell, write_compare_report
from outlier_probe.report.io import check_out_dir

BASE = LoadConfig(source="")
SM, SM1 = AttentionVariant.softmax, AttentionVariant.softmax1


@pytest.mark.parametrize(("spec", "expected"), [
    ("ckpt/", (None, "ckpt/", None)),
    ("ckpt/@softmax1", (None, "ckpt/", SM1)),
    ("vanilla=ckpt", ("vanilla", "ckpt", None)),
    ("ours=runs/a@b/ckpt@gated", ("ours", "runs/a@b/ckpt", AttentionVariant.gated)),  # the last @ names the variant
    ("facebook/opt-125m@clipped", (None, "facebook/opt-125m", AttentionVariant.clipped)),
    ("./a=b/ckpt", (None, "./a=b/ckpt", None)),  # `=` inside a path is not a name
])
def test_parse_spec(spec: str, expected: tuple) -> None:
    assert parse_spec(spec) == expected


@pytest.mark.parametrize(("spec", "needle"), [
    ("ckpt@softmax2", "unknown attention variant 'softmax2'"),
    ("@softmax1", "has no path"),
    ("my model=ckpt", "display name"),
])
def test_parse_spec_rejects(spec: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_spec(spec)


def test_a_path_that_exists_is_taken_literally(tmp_path: Path) -> None:
    odd = tmp_path / "run=1@softmax1"
    odd.mkdir()
    assert parse_spec(str(odd)) == (None, str(odd), None)


def test_names_are_made_unique_with_the_variant_then_a_counter(tmp_path: Path) -> None:
    for sub in ("x/ckpt", "y/other", "b/ckpt"):
        (tmp_path / sub).mkdir(parents=True)
    x, y, b = (str(tmp_path / s) for s in ("x/ckpt", "y/other", "b/ckpt"))
    entries = resolve_entries([f"{x}@softmax", f"{x}@softmax1", y, y], BASE)
    assert [e.name for e in entries] == ["ckpt-softmax", "ckpt-softmax1", "other", "other-2"]
    assert [e.load.attention for e in entries] == [SM, SM1, None, None]
    assert entries[1].spec == f"ckpt-softmax1={x}@softmax1"
    # a checkpoint next to its own override keeps its name; the twin gets the suffix
    assert [e.name for e in resolve_entries([x, f"{x}@softmax1"], BASE)] == ["ckpt", "ckpt-softmax1"]
    assert [e.name for e in resolve_entries([f"ckpt={y}", b], BASE)] == ["ckpt", "ckpt-2"]
    assert [e.name for e in resolve_entries(["org/model", "org/model@softmax1"], BASE)] == ["org--model", "org--model-softmax1"]


def test_config_needs_two_entries_with_distinct_names() -> None:
    one = CompareEntry("a", LoadConfig(source="a"))
    with pytest.raises(UsageError, match="at least two"):
        CompareConfig(entries=(one,))
    with pytest.raises(UsageError, match="given twice"):
        CompareConfig(entries=resolve_entries(["a=x", "a=y"], BASE))


def test_relative_change_and_rows_vs_the_first() -> None:
    assert relative_change(13.3, 92.8) == pytest.approx(-0.8567, abs=1e-4)
    assert relative_change(-1.0, -2.0) == pytest.approx(0.5)  # divided by |baseline|: up is up
    assert math.isnan(relative_change(1.0, 0.0)) and math.isnan(relative_change(math.nan, 1.0))
    fig = {"float": 15.93, "quantized": 21.2, "degradation": 5.27, "degradation_rel": 5.27 / 15.93,
           "avg_kurtosis": 10.0, "max_kurtosis": 100.0, "max_inf_norm_block_output": 92.8, "max_inf_norm": 100.0}
    rows = compare_rows([
        {"name": "vanilla", "metric": "perplexity", **fig},
        {"name": "ours", "metric": "perplexity", **fig, "max_inf_norm_block_output": 13.3},
        {"name": "vit", "metric": "accuracy", **fig},
    ])
    assert rows[0]["max_inf_norm_block_output_vs_baseline"] == 0.0
    assert cell(rows[1], "max_inf_norm_block_output", baseline=False) == "13.3 (-85.7%)"
    assert cell(rows[0], "max_inf_norm_block_output", baseline=True) == "92.8"
    assert math.isnan(rows[2]["float_vs_baseline"])  # another metric: no metric change
    assert rows[2]["avg_kurtosis_vs_baseline"] == 0.0  # outlier figures still compare


def test_out_dir_is_checked_without_being_created(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    assert check_out_dir(target) == target and not target.exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProbeError, match="is a file"):
        check_out_dir(tmp_path / "file")


def test_stats_only_run_applies_each_variant_to_the_same_weights(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = str(tiny_checkpoint("opt"))
    cfg = CompareConfig(entries=resolve_entries([f"{ckpt}@softmax", f"{ckpt}@softmax1"], BASE),
                        data=DataConfig(samples=2, seq_len=16, batch_size=2), quantize=False)
    seen: list[str] = []
    result = run_compare(cfg, progress=lambda d, t, label: seen.append(label))
    a, b = result.rows()
    assert (a["attention"], b["attention"]) == ("softmax", "softmax1")
    assert a["avg_kurtosis"] != pytest.approx(b["avg_kurtosis"], rel=1e-6)
    assert all(math.isnan(r[k]) for r in (a, b) for k in ("float", "quantized", "degradation", "degradation_rel"))
    assert result.runs[0].stats.data == result.runs[1].stats.data and not result.notes  # identical data
    assert any(label.endswith("softmax1: measuring") for label in seen)
    written = write_compare_report(result, tmp_path / "out", plots_on=False)
    assert {"compare.csv", "compare.json", "compare.md"} <= set(written)
    assert (tmp_path / "out" / a["name"] / "stats" / "stats.csv").is_file()
    assert not (tmp_path / "out" / a["name"] / "quantize").exists()
