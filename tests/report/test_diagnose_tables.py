"""The sensitivity and attention tables stay readable at 80 columns with worst-case cells (no "…")."""

from __future__ import annotations

from types import SimpleNamespace

from outlier_probe.diagnose.attention_stats import HeadStats
from outlier_probe.diagnose.attention_run import LayerFinding
from outlier_probe.diagnose.massive import MassiveStats
from outlier_probe.diagnose.plan import Budget, Plan, PlanStep
from outlier_probe.diagnose.sensitivity import GroupResult, Measured
from outlier_probe.evaluation import MetricName
from outlier_probe.report.attention_report import heads_table, massive_table
from outlier_probe.report.sensitivity_report import groups_table, num, plan_table
from tests.tablecheck import assert_no_cut


def _render(table) -> str:  # noqa: ANN001
    return assert_no_cut(table)  # the shared check: no "…", no folded or cropped number at 80 columns


def test_num_is_compact() -> None:
    assert [num(v) for v in (1.0, 0.08682, 123456.0, -1.234e-7, float("nan"), float("inf"), 0.0)] == \
        ["1", "0.08682", "1.23e5", "-1.23e-7", "-", "inf", "0"]


def test_sensitivity_tables_fit_80_columns() -> None:
    name = "model.decoder.layers.11.self_attn.out_proj:weight"
    worst = Measured(-1.2345e-7, 12345678.9)
    groups = [GroupResult(f"{name}{i}", (name,), worst, worst, i + 1) for i in range(3)]
    steps = tuple(PlanStep(i, tuple(g.name for g in groups[:i]), 12345678.9, 1.23e-5, 123.4, False) for i in range(4))
    result = SimpleNamespace(model={"name": "facebook/opt-125m-with-a-long-name"}, metric=MetricName.mlm_perplexity,
                             float_value=15.87, quantized=worst, groups=groups, divergence="kl",
                             plan=Plan(Budget(0.01, True), steps, False, 3))
    text = _render(groups_table(result))
    assert "12345678" not in text and "1.23e7" in text  # numbers are never wrapped or cut
    assert "1.234e4%" in _render(plan_table(result))  # relative loss, compact


def test_attention_tables_fit_80_columns() -> None:
    heads = [HeadStats(layer, head, 4096, 0.123456, 0.123456, 0.123456, 3.87654, 0.888916, -4.5e-10, 0.123456)
             for layer in range(2) for head in range(32)]
    stats = MassiveStats(31, 12345.678, 0.0012345, 1.234e7, 1023, 4095, 4095, 50000)
    finding = LayerFinding(stats, "Ġsupercalifragilisticexpialidocious", "other", True, "[CLS]", 0.5, True,
                           (1, 2, 3), True)
    for variant in ("softmax", "softmax1", "gated"):
        result = SimpleNamespace(model={"name": "m"}, variant=variant, heads=heads, layers=[finding])
        _render(heads_table(result))
        _render(massive_table(result))


def test_heads_table_fits_80_columns_with_long_small_numbers() -> None:
    """Real means such as 0.008583 take 8 characters; softpick / sink / sigmoid-gate add a ninth column."""
    heads = [HeadStats(layer, head, 4096, 0.008583, 0.001225, 0.009624, 1.18432, 0.03125, 0.004738, 0.004738)
             for layer in range(12) for head in range(12)]
    for variant in ("softpick", "sink", "sigmoid-gate", "softmax1"):
        result = SimpleNamespace(model={"name": "opt-softpick"}, variant=variant, heads=heads, layers=[])
        text = _render(heads_table(result))
        assert "0.008583" in text and "0.004738" in text
