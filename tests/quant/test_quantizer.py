"""Pure quantizer math against torch's own fake_quantize ops."""

from __future__ import annotations

import pytest
import torch

from outlier_probe.errors import UsageError
from outlier_probe.quant.quantizer import (
    PerChannel,
    PerTensor,
    QuantSpec,
    compute_qparams,
    fake_quantize,
    quantize_dequantize,
)

BITS = (2, 4, 8, 16)


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(16, 24, generator=g) * 3 + 0.5  # (rows, channels), mixed signs


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_tensor_matches_torch(bits: int, symmetric: bool) -> None:
    x = _data()
    spec = QuantSpec(bits, symmetric)
    scale, zp = compute_qparams(x.min(), x.max(), spec)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zp, spec.quant_min, spec.quant_max)
    assert torch.equal(fake_quantize(x, scale, zp, spec), ref)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_matches_torch(bits: int, symmetric: bool, axis: int) -> None:
    x = _data()
    spec = QuantSpec(bits, symmetric, PerChannel(axis))
    other = 1 - (axis % 2)
    scale, zp = compute_qparams(x.amin(other), x.amax(other), spec)
    assert scale.shape == zp.shape == (x.shape[axis],)
    ref = torch.fake_quantize_per_channel_affine(x, scale, zp, axis % 2, spec.quant_min, spec.quant_max)
    assert torch.equal(fake_quantize(x, scale, zp, spec), ref)


def test_paper_weight_scale_is_absmax_over_127() -> None:
    w = torch.tensor([-0.5, 0.1, 0.25])
    scale, zp = compute_qparams(w.min(), w.max(), QuantSpec(8, True))
    assert scale.item() == pytest.approx(0.5 / 127)
    assert zp.item() == 0


def test_asymmetric_qparams_and_zero_included() -> None:
    spec = QuantSpec(8, False)
    scale, zp = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), spec)
    assert scale.item() == pytest.approx(4.0 / 255)
    assert zp.item() == round(1.0 / (4.0 / 255))
    # A strictly positive range is extended down to 0: zero point 0, 0 exactly representable.
    scale, zp = compute_qparams(torch.tensor(2.0), torch.tensor(5.1), spec)
    assert zp.item() == 0 and scale.item() == pytest.approx(5.1 / 255)
    assert fake_quantize(torch.zeros(3), scale, zp, spec).eq(0).all()


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_range_has_positive_scale(symmetric: bool) -> None:
    spec = QuantSpec(8, symmetric)
    scale, zp = compute_qparams(torch.tensor(0.0), torch.tensor(0.0), spec)
    assert scale.item() > 0
    assert torch.isfinite(fake_quantize(torch.zeros(4), scale, zp, spec)).all()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_at_most_half_a_step_inside_range(bits: int, symmetric: bool) -> None:
    x = _data()
    spec = QuantSpec(bits, symmetric)
    scale, zp = compute_qparams(x.min(), x.max(), spec)
    err = (fake_quantize(x, scale, zp, spec) - x).abs()
    assert err.max().item() <= scale.item() / 2 * (1 + 1e-4) + 1e-7


def test_values_outside_range_are_clamped() -> None:
    spec = QuantSpec(8, True)
    out = quantize_dequantize(torch.tensor([-10.0, 10.0]), -1.0, 1.0, spec)
    assert torch.allclose(out, torch.tensor([-1.0, 1.0]))


@pytest.mark.parametrize("granularity", [PerTensor(), PerChannel(0)])
def test_input_not_modified(granularity: PerTensor | PerChannel) -> None:
    x = _data()
    before = x.clone()
    spec = QuantSpec(4, False, granularity)
    lo, hi = (x.min(), x.max()) if granularity == PerTensor() else (x.amin(1), x.amax(1))
    scale, zp = compute_qparams(lo, hi, spec)
    out = fake_quantize(x, scale, zp, spec)
    assert torch.equal(x, before)
    assert out.data_ptr() != x.data_ptr()


def test_dtype_preserved() -> None:
    x = _data().to(torch.bfloat16)
    spec = QuantSpec(8, True)
    scale, zp = compute_qparams(x.min(), x.max(), spec)
    assert fake_quantize(x, scale, zp, spec).dtype == torch.bfloat16


def test_straight_through_gradient() -> None:
    x = torch.tensor([-5.0, -0.3, 0.2, 0.7, 5.0], requires_grad=True)
    spec = QuantSpec(8, True)
    scale, zp = compute_qparams(-1.0, 1.0, spec)
    fake_quantize(x, scale, zp, spec).sum().backward()
    assert x.grad is not None
    assert torch.allclose(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))


@pytest.mark.parametrize("bits", [0, 1, 17, 40])
def test_invalid_bits_raise(bits: int) -> None:
    with pytest.raises(UsageError, match="2 to 16"):
        QuantSpec(bits)


def test_invalid_granularity_raises() -> None:
    with pytest.raises(UsageError):
        QuantSpec(8, True, "per-tensor")  # type: ignore[arg-type]


def test_per_channel_axis_out_of_range_raises() -> None:
    spec = QuantSpec(8, True, PerChannel(3))
    with pytest.raises(UsageError, match="out of range"):
        fake_quantize(torch.zeros(2, 2), torch.ones(2), torch.zeros(2, dtype=torch.int32), spec)


def test_label() -> None:
    assert QuantSpec(8, False).label("a") == "a8 asym per-tensor"
    assert QuantSpec(4, True, PerChannel(0)).label("w") == "w4 sym per-channel(0)"
