"""OutlierObserver against plain numpy computations of the DESIGN.md section 2 definitions.

Every test runs twice: on the fused CPU kernel (the default on CPU) and on the torch path (what runs
on accelerators, and the CPU fallback), selected with OUTLIER_PROBE_KERNEL before the observers exist.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

from outlier_probe.config import ObserverConfig
from outlier_probe.stats.observer import OutlierObserver, SiteStats

OUTLIER_CHANNEL = 5


@pytest.fixture(autouse=True, params=["fused", "torch"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OUTLIER_PROBE_KERNEL", "auto" if request.param == "fused" else "torch")
    return request.param


def _activations(b: int = 6, t: int = 16, d: int = 12, seed: int = 0) -> np.ndarray:
    """(B, T, d) Student-t values with one planted outlier channel."""
    rng = np.random.default_rng(seed)
    x = rng.standard_t(4, (b, t, d))
    x[:, :, OUTLIER_CHANNEL] *= 40.0
    return x


def _feed(obs: OutlierObserver, x: np.ndarray, splits: int) -> None:
    for part in np.array_split(x, splits):
        obs.update(torch.from_numpy(part))


def _paper_reference(x: np.ndarray) -> tuple[float, float]:
    """The reference formula, written plainly: per sequence, flatten, unbiased std, + 1e-6."""
    ks, infs = [], []
    for seq in x:
        v = seq.reshape(-1)
        k = np.mean((v - v.mean()) ** 4) / (np.std(v, ddof=1) ** 4 + 1e-6)
        ks.append(k)
        infs.append(np.max(np.abs(v)))
    return float(np.mean(ks)), float(np.mean(infs))


def _ksigma_reference(x: np.ndarray, k: float) -> float:
    n_out = sum(int(np.sum(np.abs(s - s.mean()) > k * np.std(s, ddof=1))) for s in x)
    return n_out / x.size


def test_paper_metrics_and_global_stats() -> None:
    x = _activations()
    obs = OutlierObserver(ObserverConfig(sigma_k=3.0))
    _feed(obs, x, 3)
    r = obs.result()
    ref_k, ref_inf = _paper_reference(x)
    assert r.n_sequences == x.shape[0] and r.count == x.size
    assert r.paper_kurtosis == pytest.approx(ref_k, rel=1e-9)
    assert r.paper_inf_norm == pytest.approx(ref_inf, rel=1e-12)
    assert r.max_abs == float(np.max(np.abs(x)))
    flat = x.reshape(-1)
    assert r.mean == pytest.approx(np.mean(flat), rel=1e-6)
    assert r.var == pytest.approx(np.var(flat, ddof=1), rel=1e-6)
    assert r.kurtosis == pytest.approx(scipy.stats.kurtosis(flat, fisher=False, bias=True), rel=1e-6)
    assert r.frac_gt_ksigma == pytest.approx(_ksigma_reference(x, 3.0), rel=1e-12)
    assert r.frac_gt_ksigma > 0
    assert r.n_nonfinite == 0


def test_top_channels_find_planted_outlier() -> None:
    x = _activations()
    obs = OutlierObserver(ObserverConfig(top_k=3))
    _feed(obs, x, 2)
    absmax = np.abs(x).reshape(-1, x.shape[-1]).max(axis=0)
    expected_ids = np.argsort(-absmax)[:3]
    r = obs.result()
    assert r.top_channels[0][0] == OUTLIER_CHANNEL
    assert [i for i, _ in r.top_channels] == list(expected_ids)
    assert [v for _, v in r.top_channels] == [float(absmax[i]) for i in expected_ids]
    assert len(obs.result(top_k=50).top_channels) == x.shape[-1]  # clipped to the channel count


def test_fraction_above_threshold_hand_case() -> None:
    x = torch.tensor([[1.0, -7.0, 6.0, 6.5], [0.0, 0.0, 0.0, -6.0001]])  # > 6: -7, 6.5, -6.0001
    obs = OutlierObserver()
    obs.update(x)
    r = obs.result()
    assert r.frac_gt_threshold == 3 / 8
    assert r.max_abs == 7.0
    assert r.paper_inf_norm == pytest.approx((7.0 + 6.0001) / 2, rel=1e-7)


def test_histogram_matches_numpy() -> None:
    obs = OutlierObserver()
    edges = np.array(obs.result().hist_edges)
    x = _activations()
    x[0, 0, :4] = [0.0, edges[0] / 2, edges[10], 5e4]  # zero and below range, exactly on an edge, above
    _feed(obs, x, 2)
    r = obs.result()
    a = np.abs(x).reshape(-1)
    inside, _ = np.histogram(a[(a >= edges[0]) & (a < edges[-1])], bins=edges)
    expected = [int(np.sum(a < edges[0])), *inside.tolist(), int(np.sum(a >= edges[-1]))]
    assert list(r.hist_counts) == expected
    assert sum(r.hist_counts) == r.count
    assert r.hist_counts[0] >= 2 and r.hist_counts[-1] >= 1


def test_custom_edges_and_validation() -> None:
    obs = OutlierObserver(hist_edges=torch.tensor([1.0, 10.0]))
    obs.update(torch.tensor([[0.5, 1.0, 9.0, 10.0, 11.0]]))
    assert obs.result().hist_counts == (1, 2, 2)
    with pytest.raises(ValueError, match="strictly increasing"):
        OutlierObserver(hist_edges=torch.tensor([1.0, 1.0]))


def test_merge_equals_single_observer() -> None:
    x = _activations(b=8)
    a, b, whole = OutlierObserver(), OutlierObserver(), OutlierObserver()
    _feed(a, x[:3], 1)
    _feed(b, x[3:], 2)
    _feed(whole, x, 5)
    before_b = b.result()
    a.merge(b)
    assert b.result() == before_b
    _assert_same_stats(a.result(), whole.result())
    empty = OutlierObserver()
    empty.merge(whole)
    _assert_same_stats(empty.result(), whole.result())


def _assert_same_stats(r: SiteStats, w: SiteStats) -> None:
    for field in ("n_sequences", "count", "max_abs", "top_channels", "hist_counts", "n_nonfinite"):
        assert getattr(r, field) == getattr(w, field), field
    for field in ("mean", "var", "kurtosis", "paper_kurtosis", "paper_inf_norm", "frac_gt_threshold",
                  "frac_gt_ksigma"):
        assert getattr(r, field) == pytest.approx(getattr(w, field), rel=1e-9), field


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_input_untouched_and_low_precision(dtype: torch.dtype) -> None:
    x = torch.from_numpy(_activations()).to(dtype)
    before = x.clone()
    obs = OutlierObserver()
    obs.update(x)
    assert torch.equal(x, before)
    fed = x.double().numpy()  # the values actually seen, exactly upcast
    r = obs.result()
    ref_k, ref_inf = _paper_reference(fed)
    assert r.paper_kurtosis == pytest.approx(ref_k, rel=1e-9)
    assert r.paper_inf_norm == pytest.approx(ref_inf, rel=1e-12)
    assert r.var == pytest.approx(np.var(fed, ddof=1), rel=1e-6)
    assert all(v.dtype in (torch.float64, torch.int64) for v in obs.state_dict().values())


def test_four_dim_input_uses_last_dim_as_channels() -> None:
    x = torch.zeros(2, 3, 4, 5)
    x[1, 2, 3, 4] = -9.0
    obs = OutlierObserver(ObserverConfig(top_k=1))
    obs.update(x)
    r = obs.result()
    assert r.top_channels == ((4, 9.0),) and r.n_sequences == 2
    assert r.paper_inf_norm == 4.5


def test_state_is_constant_size() -> None:
    obs = OutlierObserver()
    obs.update(torch.randn(2, 8, 16))
    shapes = {k: (v.shape, v.dtype) for k, v in obs.state_dict().items()}
    attrs = set(vars(obs))
    for _ in range(49):
        obs.update(torch.randn(2, 8, 16))
    assert {k: (v.shape, v.dtype) for k, v in obs.state_dict().items()} == shapes
    assert set(vars(obs)) == attrs
    assert obs.result().n_sequences == 100


def test_update_never_syncs_the_host(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """CPU proxy for the GPU rule: every host-sync entry point raises during update() on the torch path,
    the one accelerators run (the fused kernel reads CPU memory through zero-copy numpy views)."""
    if path == "fused":
        pytest.skip("the fused kernel is CPU-only: it reads the tensor through .numpy(), which copies nothing")
    obs = OutlierObserver()
    x = torch.from_numpy(_activations()).float()

    def forbidden(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("update() synced the host")

    with monkeypatch.context() as m:
        for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, forbidden)
        obs.update(x)
        obs.update(x)
    assert obs.result().n_sequences == 2 * x.shape[0]


def test_nonfinite_values_are_counted() -> None:
    x = torch.randn(2, 4, 3)
    x[0, 1, 2] = math.nan
    x[1, 0, 0] = math.inf
    obs = OutlierObserver()
    obs.update(x)
    r = obs.result()
    assert r.n_nonfinite == 2
    assert sum(r.hist_counts) == r.count  # NaN / inf land in the overflow bin


def test_empty_and_bad_shapes() -> None:
    r = OutlierObserver().result()
    assert (r.n_sequences, r.count, r.top_channels, r.n_nonfinite) == (0, 0, (), 0)
    assert math.isnan(r.paper_kurtosis) and math.isnan(r.mean)
    assert sum(r.hist_counts) == 0 and len(r.hist_counts) == len(r.hist_edges) + 1
    obs = OutlierObserver()
    with pytest.raises(ValueError, match=">= 2 dims"):
        obs.update(torch.randn(5))
    obs.update(torch.randn(2, 4))
    with pytest.raises(ValueError, match="channel dim changed"):
        obs.update(torch.randn(2, 5))


def test_to_row_has_exactly_the_documented_columns() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "report-format.md").read_text()
    stats_table = doc.split("`stats.csv`: one row per hooked site")[1].split("`summary.json`:")[0]
    columns = [c for line in stats_table.splitlines() if line.startswith("| `")
               for c in re.findall(r"`(\w+)`", line.split("|")[1])]
    expected = columns[columns.index("n_sequences") : columns.index("top_channels") + 1]
    obs = OutlierObserver(ObserverConfig(top_k=2))
    obs.update(torch.tensor([[1.0, -3.0, 2.0]]))
    row = obs.result().to_row()
    assert list(row) == expected
    assert row["top_channels"] == "1:3;2:2"


def test_works_under_inference_mode() -> None:
    """The stats pipeline hooks under torch.inference_mode(); state must stay updatable outside it too."""
    x = torch.from_numpy(_activations())
    obs, ref = OutlierObserver(), OutlierObserver()
    with torch.inference_mode():
        obs.update(x[:3])
    obs.update(x[3:])
    ref.update(x)
    _assert_same_stats(obs.result(), ref.result())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_exponent_histogram_matches_numpy_for_every_dtype(dtype: torch.dtype) -> None:
    """The default power-of-two bins are read from the float exponent: exact on edges, zeros, inf and NaN."""
    torch.manual_seed(0)
    x = (torch.randn(4, 64, 32, dtype=torch.float64) * torch.logspace(-6, 5, 32, dtype=torch.float64)).to(dtype)
    x[0, 0, :6] = torch.tensor([0.0, 2.0**-14, 2.0**14, 8.0, math.inf, math.nan], dtype=torch.float64).to(dtype)
    obs = OutlierObserver()
    obs.update(x)
    r = obs.result()
    a = x.abs().double().numpy().reshape(-1)
    edges = np.array(r.hist_edges)
    finite = np.isfinite(a)
    inside, _ = np.histogram(a[finite & (a >= edges[0]) & (a < edges[-1])], bins=edges)
    expected = [int(np.sum(a[finite] < edges[0])), *inside.tolist(), int(np.sum(a[finite] >= edges[-1]) + np.sum(~finite))]
    assert list(r.hist_counts) == expected
    assert r.n_nonfinite == int(np.sum(~finite))
