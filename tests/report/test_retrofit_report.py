"""retrofit report: the seed spread by hand, and the end-of-run table at 80 columns with no cell cut."""

from __future__ import annotations

import math
from types import SimpleNamespace


from outlier_probe.config import AttentionVariant
from outlier_probe.report.retrofit_report import aggregate, markdown, spread
from outlier_probe.retrofit_measure import Measurement


def measurement(scale: float) -> Measurement:
    return Measurement(avg_kurtosis=3394.97 * scale, max_inf_norm=219.26 * scale, max_inf_norm_site="encoder.layer.0.output.LayerNorm:input",
                       top_channels="99:220.8;267:12.9;63:12.2", block_avg_kurtosis=10.14, block_max_inf_norm=10.51,
                       metric="hidden_cosine", float_score=1.0, w8a8_score=0.7172, w8a8_loss=0.2828 * scale, objective_metric=1.2e-5,
                       hidden_cosine=0.99995, embedding_cosine=0.999921 * scale, sink_rate=0.3627, first_token_mass=0.2689,
                       null_mass=3.7e-9, massive_ratio=519.9)


def result() -> SimpleNamespace:
    twins = [SimpleNamespace(variant=v, seed=s, params={}, before=measurement(1.0), after=measurement(1.0 + 0.001 * (s + 1)),
                             curve=[], step_s=1.5 + s) for s in (0, 1) for v in (AttentionVariant.softmax, AttentionVariant.softmax1)]
    return SimpleNamespace(twins=twins, original=measurement(1.0), objective=SimpleNamespace(value="distill"),
                           model={"name": "all-MiniLM-L6-v2", "family": "bert"}, settings={"batch_size": 8, "seq_len": 64})


def test_spread_is_mean_and_half_range() -> None:
    assert spread([1.0, 3.0]) == "2 ± 1"
    assert spread([2.5]) == "2.5"
    assert spread([math.nan]) == "n/a"
    agg = {a["twin"]: a for a in aggregate(result())}
    assert agg["softmax1"]["step_s"] == "2 ± 0.5"
    mean = 219.26 * (1.001 + 1.002) / 2
    assert agg["softmax"]["max_inf_norm_end"] == f"{mean:.4g} ± {219.26 * 0.0005:.2g}"


def test_table_fits_80_columns_and_markdown_lists_every_twin() -> None:
    from outlier_probe.report.retrofit_report import retrofit_table
    from tests.tablecheck import assert_no_cut

    assert_no_cut(retrofit_table(result()))  # the shared check: no "…", no folded or cropped number at 80 columns
    md = markdown(result(), "outlier-probe retrofit minilm")
    assert md.count("| softmax1 |") == 3  # start, end, attention row and "`outlier-probe retrofit minilm`" in md
