"""Every table of every command is readable at 80 columns: no cell cut, no number folded.

Worst cases are built by hand (the largest figures real checkpoints give, long site names, every
site kind, several runs and models) and each table goes through `tests.tablecheck.assert_no_cut`.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.table import Table

from outlier_probe.compare_types import CompareEntry, CompareResult, ModelRun
from outlier_probe.config import LoadConfig
from outlier_probe.gate_types import CheckResult, GateConfig, GateResult, ReportFiles, ResolvedGate
from outlier_probe.report import compare_report, gate_output, quant_report, stats_report, train_report
from outlier_probe.report.numbers import compact, percent
from tests.tablecheck import assert_no_cut, cut_words, render

KINDS = ("block_output", "attn_output", "ffn_output", "norm", "residual", "linear_input", "linear_output")
LONG_SITE = "model.language_model.layers.31.self_attn.o_proj.lora_wrapped:input"


def _stats_result() -> SimpleNamespace:
    rows = []
    for layer in [*range(12), None]:
        for j, kind in enumerate(KINDS):
            big = 40284.26 * (j + 1) * 10 ** (layer or 0)  # up to 1.1e16: every magnitude
            rows.append({"site": f"{LONG_SITE}.{layer}.{kind}", "kind": kind, "layer": layer,
                         "paper_kurtosis": big, "paper_inf_norm": big / 7.0})
    summary = {"avg_kurtosis": 3213.94, "sites": len(rows), "max_kurtosis": 1.23e16, "max_kurtosis_site": LONG_SITE,
               "max_inf_norm": 218.29, "max_inf_norm_site": LONG_SITE, "max_inf_norm_block_output": None,
               "max_abs": 220.37, "max_abs_site": LONG_SITE, "max_outlier_fraction": 0.006721,
               "max_outlier_fraction_site": LONG_SITE}
    data = {"description": "built-in: Python language reference (pydoc_data.topics, 465,126 characters)",
            "sequences": 1024, "tokens": 1_048_576}
    return SimpleNamespace(rows=lambda: rows, summary=summary, model={"name": "all-MiniLM-L6-v2-finetuned-on-something"},
                           data=data)


def _quant_result(mitigated: bool = False) -> SimpleNamespace:
    rows = [
        {"run": "paper", "metric": "perplexity", "higher_is_better": False, "float": 19234.567, "quantized": 1.2345e7,
         "abs_change": 1.2345e7 - 19234.567, "rel_change": 640.8, "mitigation": "plain", "transformed_float": 19234.567,
         "gap_closed": 0.0, "description": "paper: W8 sym per-channel minmax, A8 asym per-tensor running_minmax"},
        {"run": "linear-percentile", "metric": "perplexity", "higher_is_better": False, "float": 15.93, "quantized": 15.87,
         "abs_change": -0.06, "rel_change": -0.0037, "mitigation": "plain", "transformed_float": 15.93, "gap_closed": 0.0,
         "description": "linear: W4 sym per-tensor mse, A16 percentile"},
    ]
    if mitigated:  # quantize --smoothquant / --a-granularity: the runs table becomes the mitigation table
        rows += [{**rows[0], "run": f"paper+smoothquant-{a}", "mitigation": f"smoothquant-{a}", "quantized": 1.2345e7 / (i + 2),
                  "transformed_float": 19234.5671234, "gap_closed": -4.153 + i} for i, a in enumerate((0.3, 0.85))]
        rows.append({**rows[0], "run": "paper+per-token-with-a-long-name", "mitigation": "per-token", "gap_closed": 0.81234567})
    sites = [{"site": f"{LONG_SITE}.{i}", "kind": KINDS[i % len(KINDS)], "sqnr_db": -123.456 + 10 * i,
              "paper_kurtosis": 40284.26 * 10**i, "paper_inf_norm": 218.29 * 10**i} for i in range(15)]
    runs = [SimpleNamespace(run=r["run"], sites=sites) for r in rows]
    return SimpleNamespace(rows=lambda: rows, runs=runs, model={"name": "opt-125m"},
                           metric_note="token-level perplexity: exp(mean NLL) over non-overlapping 128-token chunks")


def _compare_result(n: int, quantized: bool = True, heads: bool = False) -> CompareResult:
    runs = []
    for i in range(n):
        summary = {"avg_kurtosis": 3213.94 * 10**i, "max_kurtosis": 40284.26 * 10**i,
                   "max_inf_norm_block_output": 92.8 / (i + 1), "max_inf_norm": 218.29 * 10**i}
        stats = SimpleNamespace(summary=summary, model={"attention": ("softmax", "softmax1", "clipped", "gated")[i % 4],
                                                        "family": "opt"})
        quant = None
        if quantized:
            row = {"metric": "mlm_perplexity", "higher_is_better": False, "float": 15.93 * 10**i,
                   "quantized": 1294.1 * 100**i, "abs_change": 1294.1 * 100**i - 15.93 * 10**i, "rel_change": 80.2 * 10**i}
            quant = SimpleNamespace(rows=lambda row=row: [row])
        entry = CompareEntry(f"model-{i}-with-a-rather-long-display-name", LoadConfig(source=f"ckpt/{i}"))
        attention = None
        if heads:  # the `attention` pass's figures: sink rate, null mass, massive-activation ratio
            figures = {"sink_rate": 0.123456 * (i + 1), "null_mass": 0.98765 / (i + 1), "massive_ratio": 1234.5678 * 10**i}
            attention = SimpleNamespace(summary=lambda figures=figures: figures)
        runs.append(ModelRun(entry, stats, quant, attention))
    return CompareResult(runs, settings={}, notes=[])


def _gate_result() -> GateResult:
    config = GateConfig(max_kurtosis=10.0, max_inf_norm=50.0, baseline=Path("reports/base"))
    reports = ReportFiles((Path("reports/x"),), Path("reports/x/stats.csv"), None, "tiny-opt")
    checks = (
        CheckResult("max_kurtosis", "max_kurtosis", "<=", 10.0, 40284.26, LONG_SITE),
        CheckResult("max_inf_norm[block_output]", "max_inf_norm", "<=", 123456.0, 1.234e-5, LONG_SITE),
        CheckResult("baseline:max_outlier_fraction", "max_outlier_fraction", "<=", 0.0011, math.nan, None, "baseline"),
        CheckResult("min_recovery", "recovery", ">=", 0.99, 0.98765, "paper-per-channel-run"),
    )
    return GateResult(ResolvedGate(config, {"max_kurtosis": "flag"}, Path("/a/long/path/to/the/repo/pyproject.toml")),
                      reports, checks)


def _tables() -> dict[str, Table]:
    stats, quant = _stats_result(), _quant_result()
    kurt, inf = stats_report.layer_tables(stats)
    site_tables = quant_report.sites_tables(quant)
    train_summary = {"out": "runs/opt-tiny-softmax1-seed0-a-long-run-name-for-a-long-folder", "steps": 100000,
                     "tokens": 131_072_000, "stopped_by": "time_budget", "final_eval_loss": 2.3456789,
                     "avg_kurtosis": 40284.26, "max_inf_norm": 1.5e-5, "tokens_per_s": 123456.7}
    return {
        "stats: kurtosis per layer": kurt,
        "stats: inf-norm per layer": inf,
        "stats: summary": stats_report.summary_table(stats),
        "quantize: runs": quant_report.runs_table(quant),
        "quantize: runs with mitigations": quant_report.runs_table(_quant_result(mitigated=True)),
        "quantize: sites (first run)": site_tables[0],
        "quantize: sites (second run)": site_tables[1],
        **{f"compare: {n} models": compare_report.compare_table(_compare_result(n), width=80) for n in (2, 3, 5)},
        "compare: --no-quantize": compare_report.compare_table(_compare_result(4, quantized=False), width=80),
        **{f"compare: {n} models with attention figures": compare_report.compare_table(_compare_result(n, heads=True), width=80)
           for n in (2, 5)},
        "gate": gate_output.gate_table(_gate_result()),
        "train": train_report.train_table("opt-tiny-softmax1", train_summary),
    }


@pytest.mark.parametrize("name", list(_tables()))
def test_no_cell_is_cut_at_80_columns(name: str) -> None:
    assert_no_cut(_tables()[name])


def test_stats_tables_show_the_largest_values_compactly() -> None:
    kurt, _inf = stats_report.layer_tables(_stats_result())
    text = assert_no_cut(kurt)
    assert "4.03e4" in text and "2.82e16" in text  # layer 0 block output; layer 11 linear output (7 x 4.03e4 x 1e11)


def test_the_checker_catches_a_cut_number_a_cut_header_and_a_cropped_column() -> None:
    ellipsis = Table()
    for head in ("residual kurtosis", "inf", "a", "b", "c", "d", "e", "f", "g", "h", "i", "j"):
        ellipsis.add_column(head, justify="right")
    ellipsis.add_row(*["19,234.5678"] * 12)
    with pytest.raises(AssertionError, match="cut"):
        assert_no_cut(ellipsis)
    folded = Table()
    folded.add_column("site", overflow="fold")
    folded.add_column("value", overflow="fold", justify="right")
    folded.add_row("x" * 40, "1" * 60)  # a number folded over two lines is cut too
    assert cut_words(folded, render(folded)) == ["value: '" + "1" * 60 + "'"]
    cropped = Table()  # the old quantize sites table: too many minimum widths, so Rich crops the right edge
    for head in ("run", "site", "kind", "SQNR dB", "kurtosis", "inf-norm"):
        cropped.add_column(head, overflow="fold", min_width=28 if head == "site" else None)
    cropped.add_row("linear", LONG_SITE, "linear_output", "12.9", "40207.1", "218.29")
    with pytest.raises(AssertionError):
        assert_no_cut(cropped)


@pytest.mark.parametrize(("value", "text"), [
    (40284.26, "4.03e4"), (19234.0, "1.92e4"), (218.29, "218.3"), (68.0, "68.00"), (6.69, "6.690"), (0.0, "0"),
    (0.006721, "0.006721"), (0.00042, "4.2e-4"), (-1e-7, "-1e-7"), (9999.7, "1e4"), (1.23e16, "1.23e16"),
    (math.nan, "-"), (math.inf, "inf"), (None, "-"), (12, "12"),
])
def test_compact_numbers(value: object, text: str) -> None:
    assert compact(value) == text
    if isinstance(value, float) and math.isfinite(value) and value:
        assert math.isclose(float(text), value, rel_tol=5e-3)  # what is shown is the value, rounded


def test_compact_signed_and_percent() -> None:
    assert compact(0.5, signed=True) == "+0.5000" and compact(-40284.26, signed=True) == "-4.03e4"
    assert percent(0.3145) == "+31.45%" and percent(640.8) == "+6.41e4%" and percent(math.nan) == "-"
