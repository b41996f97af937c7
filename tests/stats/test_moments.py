"""StreamingMoments against numpy / scipy on the concatenated data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from outlier_probe.stats.moments import MomentsResult, StreamingMoments


def _data(kind: str, n: int = 6000) -> np.ndarray:
    rng = np.random.default_rng(0)
    if kind == "normal":
        return rng.standard_normal(n)
    if kind == "offset":  # |mean| >> std: raw power sums would lose every digit here
        return 1e4 + rng.standard_normal(n)
    if kind == "heavy":  # Student t, 3 dof, plus planted huge outliers
        x = rng.standard_t(3, n)
        x[::500] *= 200.0
        return x
    raise AssertionError(kind)


def _reference(x: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(np.mean(x)),
        "var": float(np.var(x, ddof=1)),
        "kurtosis": float(scipy.stats.kurtosis(x, fisher=False, bias=True)),
    }


def _fed(x: np.ndarray, chunks: int) -> MomentsResult:
    m = StreamingMoments()
    for part in np.array_split(x, chunks):
        m.update(torch.from_numpy(part))
    return m.result()


@pytest.mark.parametrize("kind", ["normal", "offset", "heavy"])
def test_matches_scipy(kind: str) -> None:
    x = _data(kind)
    ref = _reference(x)
    r = _fed(x, 7)
    assert r.count == x.size
    assert r.mean == pytest.approx(ref["mean"], rel=1e-6, abs=1e-12)
    assert r.var == pytest.approx(ref["var"], rel=1e-6)
    assert r.std == pytest.approx(math.sqrt(ref["var"]), rel=1e-6)
    assert r.kurtosis == pytest.approx(ref["kurtosis"], rel=1e-6)
    assert r.excess_kurtosis == pytest.approx(ref["kurtosis"] - 3.0, rel=1e-6)


@pytest.mark.parametrize("kind", ["normal", "offset", "heavy"])
def test_independent_of_chunking(kind: str) -> None:
    x = _data(kind)
    results = [_fed(x, c) for c in (1, 3, 17)]
    for r in results[1:]:
        assert r.count == results[0].count
        for field in ("mean", "var", "kurtosis"):
            assert getattr(r, field) == pytest.approx(getattr(results[0], field), rel=1e-9)


def test_uneven_multidim_batches() -> None:
    x = _data("heavy", 2 * 3 * 5 + 7 * 11)
    m = StreamingMoments()
    m.update(torch.from_numpy(x[:30]).reshape(2, 3, 5))
    m.update(torch.from_numpy(x[30:]).reshape(7, 11))
    ref = _reference(x)
    r = m.result()
    assert (r.mean, r.var, r.kurtosis) == pytest.approx((ref["mean"], ref["var"], ref["kurtosis"]), rel=1e-9)


def test_merge_equals_single_accumulator() -> None:
    x = _data("offset")
    a, b, whole = StreamingMoments(), StreamingMoments(), StreamingMoments()
    a.update(torch.from_numpy(x[:1000]))
    b.update(torch.from_numpy(x[1000:3000]))
    b.update(torch.from_numpy(x[3000:]))
    whole.update(torch.from_numpy(x))
    before_b = b.result()
    a.merge(b)
    assert b.result() == before_b  # merge leaves the other accumulator alone
    r, w = a.result(), whole.result()
    assert r.count == w.count
    assert (r.mean, r.var, r.kurtosis) == pytest.approx((w.mean, w.var, w.kurtosis), rel=1e-9)


def test_merge_with_empty_either_side() -> None:
    x = torch.from_numpy(_data("normal", 100))
    full = StreamingMoments()
    full.update(x)
    empty = StreamingMoments()
    empty.merge(full)
    full.merge(StreamingMoments())
    assert empty.result() == full.result()


def test_low_precision_inputs_and_input_untouched() -> None:
    x64 = torch.from_numpy(_data("heavy", 999))
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        x = x64.to(dtype)
        before = x.clone()
        m = StreamingMoments()
        m.update(x)
        assert torch.equal(x, before)
        ref = _reference(x.double().numpy())  # the values actually fed, exactly upcast
        r = m.result()
        assert (r.mean, r.var, r.kurtosis) == pytest.approx((ref["mean"], ref["var"], ref["kurtosis"]), rel=1e-6)
        assert all(t.dtype == torch.float64 and t.dim() == 0 for t in m.state_dict().values())


def test_empty_and_degenerate() -> None:
    r = StreamingMoments().result()
    assert r.count == 0 and all(math.isnan(v) for v in (r.mean, r.var, r.std, r.kurtosis))
    m = StreamingMoments()
    m.update(torch.empty(0, 4))
    assert m.is_empty
    m.update(torch.tensor([2.5]))
    r = m.result()
    assert (r.count, r.mean) == (1, 2.5) and math.isnan(r.var) and math.isnan(r.kurtosis)
    m.update(torch.tensor([2.5, 2.5]))
    r = m.result()
    assert r.var == 0.0 and math.isnan(r.kurtosis)  # constant data: kurtosis undefined, as scipy


def test_state_is_constant_size() -> None:
    m = StreamingMoments()
    m.update(torch.randn(64))
    shapes = {k: (v.shape, v.dtype) for k, v in m.state_dict().items()}
    for _ in range(49):
        m.update(torch.randn(64))
    assert {k: (v.shape, v.dtype) for k, v in m.state_dict().items()} == shapes
