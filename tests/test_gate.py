"""Gate logic: config resolution and precedence, report discovery, threshold and baseline checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from outlier_probe import gate
from outlier_probe.config import SiteKind
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.gate import GateConfig, check_reports, find_pyproject, find_reports, read_measurements, resolve_config

# ----------------------------------------------------------------------------- report folders written by hand
# (column names and summary keys as in docs/report-format.md)

SITES = [  # site, kind, layer, paper_kurtosis, paper_inf_norm, frac_gt_threshold
    ("model.decoder.layers.0", "block_output", 0, 3.2, 4.0, 0.0),
    ("model.decoder.layers.0.fc2", "ffn_output", 0, 5.0, 9.0, 0.001),
    ("model.decoder.layers.1", "block_output", 1, 4.1, 7.5, 0.0005),
    ("model.decoder.final_layer_norm", "norm", "", 3.7, 2.0, 0.0),
]


def write_stats(folder: Path, kurtosis_scale: float = 1.0, inf_scale: float = 1.0, model: str = "tiny-opt") -> Path:
    """A stats report folder: stats.csv + summary.json (values scaled to make a model 'worse')."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "site": site, "kind": kind, "layer": layer, "n_sequences": 4, "count": 4096, "mean": 0.0, "var": 1.0,
            "std": 1.0, "kurtosis": k * kurtosis_scale, "excess_kurtosis": k * kurtosis_scale - 3,
            "paper_kurtosis": k * kurtosis_scale, "paper_inf_norm": inf * inf_scale, "max_abs": inf * inf_scale,
            "frac_gt_threshold": frac, "frac_gt_ksigma": frac, "top_channels": "1:2.0;7:1.5",
        }
        for site, kind, layer, k, inf, frac in SITES
    ]  # fmt: skip
    frame = pd.DataFrame(rows)
    frame.to_csv(folder / "stats.csv", index=False)
    summary = {
        "tool": "outlier-probe", "command": "stats", "created": "2025-01-01T00:00:00+00:00",
        "model": {"source": f"ckpt/{model}", "name": model, "family": "opt", "attention": "softmax", "parameters": 1},
        "summary": {
            "avg_kurtosis": float(frame["paper_kurtosis"].mean()), "max_kurtosis": float(frame["paper_kurtosis"].max()),
            "max_inf_norm": float(frame["paper_inf_norm"].max()),
        },
    }  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


def write_quantize(folder: Path, ppl_float: float = 20.0, ppl_quant: float = 22.0, acc: tuple[float, float] | None = None) -> Path:
    """A quantize report folder: quantize.csv with a perplexity run (and an accuracy run)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"run": "paper", "metric": "perplexity", "higher_is_better": False, "float": ppl_float, "quantized": ppl_quant}]
    rows.append({"run": "linear", "metric": "perplexity", "higher_is_better": False, "float": ppl_float, "quantized": ppl_float * 1.01})
    if acc is not None:
        rows.append({"run": "paper", "metric": "accuracy", "higher_is_better": True, "float": acc[0], "quantized": acc[1]})
    frame = pd.DataFrame(rows).assign(w_bits=8, a_bits=8, per_channel=False, w_estimator="minmax", a_estimator="ema")
    frame["abs_change"] = frame["quantized"] - frame["float"]
    frame["rel_change"] = frame["abs_change"] / frame["float"]
    frame.to_csv(folder / "quantize.csv", index=False)
    return folder


def cfg(**kwargs: object) -> gate.ResolvedGate:
    return gate.ResolvedGate(GateConfig(**kwargs))


# ----------------------------------------------------------------------------- configuration


def test_defaults_when_no_file_and_no_flags(tmp_path: Path) -> None:
    resolved = resolve_config({}, cwd=tmp_path)
    assert resolved.config == GateConfig()
    assert resolved.config_file is None
    assert set(resolved.sources.values()) == {"default"}
    assert resolved.config.baseline_tolerance == pytest.approx(0.10)


def test_pyproject_found_by_walking_up(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.outlier-probe.gate]\nmax-kurtosis = 10\nmax_avg_kurtosis = 4.5\n')
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    resolved = resolve_config({}, cwd=nested)
    assert resolved.config_file == (tmp_path / "pyproject.toml").resolve()
    assert resolved.config.max_kurtosis == 10.0 and resolved.config.max_avg_kurtosis == 4.5
    assert resolved.sources["max_kurtosis"] == str(resolved.config_file)
    assert resolved.sources["max_inf_norm"] == "default"


def test_nearer_pyproject_without_gate_table_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.outlier-probe.gate]\nmax-kurtosis = 7\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "pyproject.toml").write_text('[project]\nname = "pkg"\n')
    assert find_pyproject(tmp_path / "pkg") == (tmp_path / "pyproject.toml").resolve()


def test_config_file_replaces_pyproject_and_flags_win(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.outlier-probe.gate]\nmax-kurtosis = 7\nmax-inf-norm = 50\n")
    other = tmp_path / "gate.toml"
    other.write_text("max-kurtosis = 12\nmax-outlier-fraction = 0.01\n")  # top-level keys
    resolved = resolve_config({"max_outlier_fraction": 0.5}, config_file=other, cwd=tmp_path)
    assert resolved.config.max_kurtosis == 12.0  # from --config
    assert resolved.config.max_inf_norm is None  # pyproject not read when --config is given
    assert resolved.config.max_outlier_fraction == 0.5  # flag wins over the file
    assert resolved.sources["max_outlier_fraction"] == "flag"
    assert resolved.sources["max_kurtosis"] == str(other)


def test_config_file_may_be_a_pyproject(tmp_path: Path) -> None:
    other = tmp_path / "ci.toml"
    other.write_text('[tool.outlier-probe.gate]\nmin-recovery = 0.95\nsite-kind = "block_output"\nmax-inf-norm = 20\n')
    config = resolve_config({}, config_file=other, cwd=tmp_path).config
    assert config.min_recovery == 0.95 and config.site_kind is SiteKind.block_output


def test_flags_win_over_pyproject(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.outlier-probe.gate]\nmax-kurtosis = 7\n")
    resolved = resolve_config({"max_kurtosis": 99.0, "max_inf_norm": None}, cwd=tmp_path)
    assert resolved.config.max_kurtosis == 99.0 and resolved.sources["max_kurtosis"] == "flag"
    assert resolved.config.max_inf_norm is None  # None flags mean "not given"


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ("max-kurtossis = 10\n", "max-kurtossis"),  # unknown key
        ('max-kurtosis = "ten"\n', "max_kurtosis"),  # wrong type
        ("max-kurtosis = true\n", "max_kurtosis"),  # a bool is not a number
        ("max-inf-norm = -1\n", "max_inf_norm"),  # negative
        ('site-kind = "everywhere"\nmax-inf-norm = 1\n', "site_kind"),
        ("max-kurtosis = 1\nmax_kurtosis = 2\n", "max_kurtosis"),  # same key twice
        ("baseline = 3\n", "baseline"),
        ("max-kurtosis = \n", "not valid TOML"),
    ],
)
def test_bad_config_is_a_usage_error_naming_the_key(tmp_path: Path, toml: str, needle: str) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.outlier-probe.gate]\n" + toml)
    with pytest.raises(UsageError, match=needle) as info:
        resolve_config({}, cwd=tmp_path)
    assert info.value.exit_code == 2


def test_config_file_with_tool_table_but_no_gate_table(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[tool.ruff]\nline-length = 100\n")
    with pytest.raises(UsageError, match=r"tool\.outlier-probe\.gate"):
        resolve_config({}, config_file=path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        resolve_config({}, config_file=tmp_path / "nope.toml")


def test_baseline_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.outlier-probe.gate]\nbaseline = "reports/main"\n')
    (tmp_path / "sub").mkdir()
    config = resolve_config({}, cwd=tmp_path / "sub").config
    assert config.baseline == (tmp_path / "reports" / "main").resolve()


def test_site_kind_alone_is_rejected() -> None:
    with pytest.raises(UsageError, match="site_kind only applies to max_inf_norm"):
        GateConfig(site_kind=SiteKind.norm)


# ----------------------------------------------------------------------------- reports and measurements


def test_find_reports_missing_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        find_reports([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="no stats.csv or quantize.csv"):
        find_reports([tmp_path / "empty"])


def test_find_reports_in_subfolders_and_ambiguity(tmp_path: Path) -> None:
    write_stats(tmp_path / "run" / "stats")
    write_quantize(tmp_path / "run" / "quantize")
    found = find_reports([tmp_path / "run"])
    assert found.stats_csv == tmp_path / "run" / "stats" / "stats.csv"
    assert found.quantize_csv == tmp_path / "run" / "quantize" / "quantize.csv"
    assert found.model == "tiny-opt"
    write_stats(tmp_path / "other")
    with pytest.raises(UsageError, match="several stats.csv"):
        find_reports([tmp_path / "run", tmp_path / "other"])


def test_measurements_match_the_rows(tmp_path: Path) -> None:
    write_stats(tmp_path / "r")
    write_quantize(tmp_path / "r", ppl_float=20.0, ppl_quant=25.0, acc=(0.80, 0.76))
    m = read_measurements(find_reports([tmp_path / "r"]))
    assert m["avg_kurtosis"].value == pytest.approx((3.2 + 5.0 + 4.1 + 3.7) / 4)
    assert (m["max_kurtosis"].value, m["max_kurtosis"].worst) == (5.0, "model.decoder.layers.0.fc2")
    assert (m["max_inf_norm"].value, m["max_inf_norm"].worst) == (9.0, "model.decoder.layers.0.fc2")
    assert m["max_outlier_fraction"].value == pytest.approx(0.001)
    assert (m["ppl_increase"].value, m["ppl_increase"].worst) == (pytest.approx(5.0), "paper")
    assert m["ppl_ratio"].value == pytest.approx(1.25)
    assert m["recovery"].value == pytest.approx(0.95)
    block = read_measurements(find_reports([tmp_path / "r"]), SiteKind.block_output)["max_inf_norm"]
    assert (block.value, block.worst) == (7.5, "model.decoder.layers.1")


def test_site_kind_without_such_sites(tmp_path: Path) -> None:
    write_stats(tmp_path / "r")
    with pytest.raises(UsageError, match="no linear_input sites"):
        read_measurements(find_reports([tmp_path / "r"]), SiteKind.linear_input)


def test_report_missing_columns(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    pd.DataFrame({"site": ["a"], "kind": ["norm"]}).to_csv(tmp_path / "r" / "stats.csv", index=False)
    with pytest.raises(UsageError, match="paper_kurtosis"):
        check_reports([tmp_path / "r"], cfg(max_kurtosis=1.0))


# ----------------------------------------------------------------------------- checks


def test_kurtosis_threshold_pass_and_fail(tmp_path: Path) -> None:
    write_stats(tmp_path / "ok")
    write_stats(tmp_path / "bad", kurtosis_scale=10.0)
    ok = check_reports([tmp_path / "ok"], cfg(max_kurtosis=10.0, max_avg_kurtosis=5.0))
    assert ok.passed and ok.exit_code == 0 and len(ok.checks) == 2
    bad = check_reports([tmp_path / "bad"], cfg(max_kurtosis=10.0, max_avg_kurtosis=5.0))
    assert not bad.passed and bad.exit_code == 1
    assert [c.name for c in bad.failed] == ["max_avg_kurtosis", "max_kurtosis"]
    assert bad.failed[1].worst == "model.decoder.layers.0.fc2" and bad.failed[1].measured == pytest.approx(50.0)


def test_threshold_is_inclusive_and_nan_never_passes() -> None:
    assert gate.CheckResult("max_kurtosis", "max_kurtosis", "<=", 5.0, 5.0).passed
    assert not gate.CheckResult("max_kurtosis", "max_kurtosis", "<=", 5.0, math.nan).passed
    assert gate.CheckResult("min_recovery", "recovery", ">=", 0.9, 0.95).passed
    assert not gate.CheckResult("min_recovery", "recovery", ">=", 0.99, 0.95).passed


def test_inf_norm_per_site_kind(tmp_path: Path) -> None:
    write_stats(tmp_path / "r")
    result = check_reports([tmp_path / "r"], cfg(max_inf_norm=8.0, site_kind="block_output"))
    (check,) = result.checks
    assert check.name == "max_inf_norm[block_output]" and check.passed and check.measured == 7.5
    assert not check_reports([tmp_path / "r"], cfg(max_inf_norm=8.0)).passed  # fc2 holds 9.0


def test_quantization_thresholds(tmp_path: Path) -> None:
    write_quantize(tmp_path / "q", ppl_float=20.0, ppl_quant=23.0, acc=(0.8, 0.76))
    result = check_reports([tmp_path / "q"], cfg(max_ppl_increase=2.0, max_ppl_ratio=1.2, min_recovery=0.9))
    verdict = {c.name: c.passed for c in result.checks}
    assert verdict == {"max_ppl_increase": False, "max_ppl_ratio": True, "min_recovery": True}
    assert result.failed[0].worst == "paper"


def test_threshold_without_the_report_it_needs(tmp_path: Path) -> None:
    write_stats(tmp_path / "s")
    with pytest.raises(UsageError, match="no quantize.csv"):
        check_reports([tmp_path / "s"], cfg(max_ppl_ratio=1.1))
    write_quantize(tmp_path / "q")  # perplexity rows only
    with pytest.raises(UsageError, match="min_recovery.*accuracy"):
        check_reports([tmp_path / "q"], cfg(min_recovery=0.9))
    with pytest.raises(UsageError, match="no stats.csv"):
        check_reports([tmp_path / "q"], cfg(max_kurtosis=1.0))


def test_no_thresholds_is_a_usage_error(tmp_path: Path) -> None:
    write_stats(tmp_path / "r")
    with pytest.raises(UsageError, match="no thresholds set"):
        check_reports([tmp_path / "r"], cfg())


def test_baseline_tolerance(tmp_path: Path) -> None:
    write_stats(tmp_path / "base")
    write_stats(tmp_path / "slightly", kurtosis_scale=1.05)
    write_stats(tmp_path / "worse", kurtosis_scale=1.2)
    base = tmp_path / "base"
    assert check_reports([tmp_path / "slightly"], cfg(baseline=base, baseline_tolerance=0.10)).passed
    worse = check_reports([tmp_path / "worse"], cfg(baseline=base, baseline_tolerance=0.10))
    assert {c.name for c in worse.failed} == {"baseline:avg_kurtosis", "baseline:max_kurtosis"}
    assert worse.failed[1].limit == pytest.approx(5.5) and "baseline 5 +10%" in worse.failed[1].detail
    assert check_reports([tmp_path / "worse"], cfg(baseline=base, baseline_tolerance=0.25)).passed
    with pytest.raises(UsageError, match="baseline folder"):
        check_reports([tmp_path / "worse"], cfg(baseline=tmp_path / "nope"))


def test_baseline_recovery_is_higher_is_better(tmp_path: Path) -> None:
    write_quantize(tmp_path / "base", acc=(0.8, 0.78))
    write_quantize(tmp_path / "now", acc=(0.8, 0.60))
    result = check_reports([tmp_path / "now"], cfg(baseline=tmp_path / "base"))
    failed = {c.name: c for c in result.failed}
    assert set(failed) == {"baseline:recovery"} and failed["baseline:recovery"].op == ">="


def test_gate_checkpoint_checks_what_measure_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_measure(checkpoint: str, settings: gate.MeasureSettings, out_dir: Path) -> Path:
        calls.append(settings)
        return write_stats(Path(out_dir) / "stats", kurtosis_scale=10.0).parent

    monkeypatch.setattr(gate, "measure", fake_measure)
    result = gate.gate_checkpoint("ckpt", gate.MeasureSettings(), cfg(max_kurtosis=10.0), tmp_path / "out")
    assert result.exit_code == 1 and calls[0].quantize is False
    same = check_reports([tmp_path / "out"], cfg(max_kurtosis=10.0))
    assert [(c.name, c.measured, c.passed) for c in same.checks] == [(c.name, c.measured, c.passed) for c in result.checks]

    def broken_measure(*_args: object) -> Path:
        raise ProbeError("cannot load ckpt: no config.json")

    monkeypatch.setattr(gate, "measure", broken_measure)
    with pytest.raises(UsageError, match="could not measure ckpt"):
        gate.gate_checkpoint("ckpt", gate.MeasureSettings(), cfg(max_ppl_ratio=1.1), tmp_path / "out2")


def test_default_out_dir() -> None:
    assert gate.default_out_dir("facebook/opt-125m") == Path("reports/gate/facebook--opt-125m")
