"""Range estimators: EMA arithmetic, numpy percentiles, MSE search, shapes, purity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.quant.estimators import (
    MSE,
    CurrentMinMax,
    Percentile,
    RunningMinMax,
    fresh_copy,
    make_estimator,
)
from outlier_probe.quant.quantizer import Estimator, PerChannel, QuantSpec, quantize_dequantize


def _batches(n: int = 3, shape: tuple[int, ...] = (4, 6, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=g) * (i + 1) for i in range(n)]


def test_current_minmax_keeps_last_batch() -> None:
    est = CurrentMinMax()
    for b in _batches():
        est.update(b)
    lo, hi = est.range()
    assert lo.item() == b.min().item() and hi.item() == b.max().item()


def test_running_minmax_matches_hand_ema() -> None:
    batches = _batches()
    est = RunningMinMax(momentum=0.9)
    for b in batches:
        est.update(b)
    lo_ref, hi_ref = batches[0].min().item(), batches[0].max().item()
    for b in batches[1:]:
        lo_ref = 0.9 * lo_ref + 0.1 * b.min().item()
        hi_ref = 0.9 * hi_ref + 0.1 * b.max().item()
    lo, hi = est.range()
    assert lo.item() == pytest.approx(lo_ref, rel=1e-6)
    assert hi.item() == pytest.approx(hi_ref, rel=1e-6)
    assert est.num_batches == 3


@pytest.mark.parametrize("p", [99.999, 99.0, 90.0, 100.0])
def test_percentile_matches_numpy(p: float) -> None:
    x = _batches(1, (5, 7, 11))[0]
    est = Percentile(p)
    est.update(x)
    lo, hi = est.range()
    arr = x.numpy().astype(np.float64)
    assert lo.item() == pytest.approx(np.percentile(arr, 100 - p), rel=1e-5, abs=1e-6)
    assert hi.item() == pytest.approx(np.percentile(arr, p), rel=1e-5, abs=1e-6)


def test_percentile_per_channel_and_ema_match_numpy() -> None:
    batches = _batches(2, (3, 5, 4))
    est = Percentile(95.0, axis=-1, momentum=0.5)
    for b in batches:
        est.update(b)
    lo, hi = est.range()
    assert lo.shape == hi.shape == (4,)
    per_batch = [np.percentile(b.numpy().reshape(-1, 4), [5.0, 95.0], axis=0) for b in batches]
    ref = 0.5 * per_batch[0] + 0.5 * per_batch[1]
    np.testing.assert_allclose(lo.numpy(), ref[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(hi.numpy(), ref[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_beats_minmax_on_heavy_tails(symmetric: bool) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20_000, generator=g)
    x[:2] = 100.0  # a few huge outliers waste the min-max range
    spec = QuantSpec(4, symmetric)
    mse_est, mm_est = make_estimator(Estimator.mse, spec=spec), make_estimator(Estimator.minmax, spec=spec)
    mse_est.update(x)
    mm_est.update(x)

    def err(est: object) -> float:
        lo, hi = est.range()  # type: ignore[attr-defined]
        return (quantize_dequantize(x, lo, hi, spec) - x).square().mean().item()

    assert err(mse_est) < err(mm_est)
    assert mse_est.range()[1].item() < 100.0


def test_mse_per_channel_is_never_worse_than_minmax() -> None:
    x = _batches(1, (32, 6))[0]
    spec = QuantSpec(4, True, PerChannel(1))
    est = make_estimator(Estimator.mse, spec=spec)
    est.update(x)
    lo, hi = est.range()
    assert lo.shape == hi.shape == (6,)
    mm = (x.amin(0), x.amax(0))
    per_ch = lambda lo_, hi_: (quantize_dequantize(x, lo_, hi_, spec) - x).square().mean(0)  # noqa: E731
    assert (per_ch(lo, hi) <= per_ch(*mm) + 1e-7).all()


def test_mse_subsampling_is_deterministic() -> None:
    x = _batches(1, (64, 64))[0]
    spec = QuantSpec(4, False)
    a, b = MSE(spec, max_samples=500), MSE(spec, max_samples=500)
    a.update(x)
    b.update(x)
    assert torch.equal(a.range()[0], b.range()[0]) and torch.equal(a.range()[1], b.range()[1])


@pytest.mark.parametrize("kind", list(Estimator))
def test_per_channel_shapes_and_no_input_modification(kind: Estimator) -> None:
    spec = QuantSpec(8, False, PerChannel(-1))
    est = make_estimator(kind, spec=spec)
    for b in _batches(2, (2, 3, 5)):
        before = b.clone()
        est.update(b)
        assert torch.equal(b, before)
    lo, hi = est.range()
    assert lo.shape == hi.shape == (5,)
    assert (lo <= hi).all()


@pytest.mark.parametrize("kind", list(Estimator))
def test_per_tensor_shapes(kind: Estimator) -> None:
    est = make_estimator(kind, spec=QuantSpec(8, True))
    est.update(_batches(1)[0])
    lo, hi = est.range()
    assert lo.shape == hi.shape == ()


def test_explicit_axis_overrides_spec_axis() -> None:
    est = make_estimator(Estimator.minmax, spec=QuantSpec(8, True, PerChannel(0)), axis=1)
    est.update(torch.zeros(2, 7))
    assert est.range()[0].shape == (7,)


def test_reset_and_range_before_update() -> None:
    est = RunningMinMax()
    with pytest.raises(ProbeError, match="no data"):
        est.range()
    est.update(torch.ones(3))
    est.reset()
    assert not est.initialized
    est.update(torch.empty(0))  # empty batches are skipped
    assert not est.initialized


def test_fresh_copy_leaves_original() -> None:
    est = RunningMinMax()
    est.update(torch.ones(3))
    new = fresh_copy(est)
    assert est.initialized and not new.initialized


@pytest.mark.parametrize("p", [0.0, -1.0, 100.5])
def test_invalid_percentile_raises(p: float) -> None:
    with pytest.raises(UsageError, match="percentile"):
        make_estimator(Estimator.percentile, spec=QuantSpec(), percentile=p)


@pytest.mark.parametrize("m", [-0.1, 1.0, 1.5])
def test_invalid_momentum_raises(m: float) -> None:
    with pytest.raises(UsageError, match="momentum"):
        make_estimator(Estimator.running_minmax, spec=QuantSpec(), momentum=m)


def test_invalid_kind_and_axis_raise() -> None:
    with pytest.raises(UsageError, match="choose one of"):
        make_estimator("absmax", spec=QuantSpec())
    with pytest.raises(UsageError, match="per-tensor"):
        make_estimator(Estimator.minmax, spec=QuantSpec(), axis=0)
