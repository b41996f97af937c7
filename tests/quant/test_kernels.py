"""The fused per-token kernel against the torch path of per_token_fake_quantize, the per-tensor kernel
against fake_quantize: bit for bit; their signal / noise power sums against float64 numpy."""

from __future__ import annotations

import math

import pytest
import torch

from outlier_probe.quant import kernels
from outlier_probe.quant.mitigations.per_token import per_token_fake_quantize
from outlier_probe.quant.quantizer import SCALE_EPS, QuantSpec, compute_qparams, fake_quantize

pytestmark = pytest.mark.skipif(not kernels.available(torch.zeros(1)), reason="numba is not importable here")

SPECS = (QuantSpec(8, symmetric=False), QuantSpec(8, symmetric=True), QuantSpec(4, symmetric=False))


def _torch_path(x: torch.Tensor, spec: QuantSpec, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setenv("OUTLIER_PROBE_KERNEL", "torch")
        assert not kernels.available(x)
        return per_token_fake_quantize(x, spec)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _cases(shape: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(shape, generator=g) ** 3
    heavy[..., -1] *= 50.0  # an outlier channel
    ties = torch.randint(-600, 600, shape, generator=g).float() / 20  # many values on rounding ties
    pos = torch.rand(shape, generator=g)  # the range must still include 0
    signed_zero = torch.where(torch.rand(shape, generator=g) < 0.5, -0.0, 0.0)
    return [heavy, ties, pos, -pos, signed_zero, torch.full(shape, 1e-30)]


@pytest.mark.parametrize("shape", [(3, 7), (2, 5, 16), (2, 3, 9, 128), (1, 1, 1)])
def test_fused_kernel_is_bit_identical_to_the_torch_path(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    for x in _cases(shape):
        for spec in SPECS:
            got = per_token_fake_quantize(x, spec)
            ref = _torch_path(x, spec, monkeypatch)
            assert got.shape == x.shape and got.dtype == x.dtype
            assert torch.equal(got.view(torch.int32), ref.view(torch.int32)), (shape, spec)  # bits, zero signs too


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 9, 128), (1, 1, 1)])
def test_in_place_writes_the_same_bits_into_the_input(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    for x in _cases(shape):
        for spec in SPECS:
            ref = _torch_path(x, spec, monkeypatch)
            y = x.clone()
            got = per_token_fake_quantize(y, spec, in_place=True)
            assert got.data_ptr() == y.data_ptr() and _bits_equal(y, ref), (shape, spec)


def test_in_place_on_a_non_contiguous_input_returns_a_quantized_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 6, 10).transpose(0, 1)
    before = x.clone()
    got = per_token_fake_quantize(x, SPECS[0], in_place=True)
    assert _bits_equal(got, _torch_path(before, SPECS[0], monkeypatch)) and got.is_contiguous()


def test_non_contiguous_input_and_the_input_left_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 6, 10).transpose(0, 1)  # rows not contiguous in memory
    before = x.clone()
    got = per_token_fake_quantize(x, SPECS[0])
    assert torch.equal(x, before)
    assert torch.equal(got, _torch_path(x, SPECS[0], monkeypatch))


@pytest.mark.parametrize("in_place", [False, True])
def test_rows_with_inf_or_nan_take_the_torch_path(in_place: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    x[1, 3], x[2, 2] = float("nan"), float("inf")
    x[3, 0] = 3.4e38  # finite, but its range overflows: a NaN row from the kernel, not a row for the torch path
    x[3, 1] = -3.4e38
    ref = _torch_path(x, SPECS[0], monkeypatch)
    _, bad = kernels.per_token_fused(x.clone(), 0, 255, SCALE_EPS, False, in_place=in_place)
    assert bad.tolist() == [1, 2]
    got = per_token_fake_quantize(x.clone(), SPECS[0], in_place=in_place)
    assert got[1].isnan().all() and got[2].isnan().all() and got[3].isnan().all() and not got[0].isnan().any()
    assert _bits_equal(got, ref)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("col", [0, 5, 127])
def test_any_non_finite_value_of_a_row_is_seen(bad: float, col: int) -> None:
    """The kernel's range pass on integer keys must see an inf / NaN wherever it sits in a row (the
    vectorised loop's lanes and its scalar tail), also among the row's extremes."""
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1))
    x[1, 7] = 3.4e38  # the largest finite magnitudes stay in the kernel
    x[1, 9] = -3.4e38
    assert kernels.per_token_fused(x, 0, 255, SCALE_EPS, False)[1].tolist() == []
    x[2, col] = bad
    assert kernels.per_token_fused(x, 0, 255, SCALE_EPS, False)[1].tolist() == [2]


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("width", [5, 128, 1000])
def test_non_finite_rows_across_the_kernels_row_blocks(width: int, in_place: bool,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel works on blocks of rows (32 rows of 128, 4 of 1000): bad rows at a block's first and last
    row, next to each other, and the last row of a partial block are all reported, the others written."""
    x = torch.randn(101, width, generator=torch.Generator().manual_seed(4)) ** 3
    rows = [0, 3, 4, 31, 32, 63, 100]
    for i, r in enumerate(rows):
        x[r, (7 * i) % width] = (float("nan"), float("inf"), -float("inf"))[i % 3]
    ref = _torch_path(x, SPECS[0], monkeypatch)
    _, bad = kernels.per_token_fused(x.clone(), 0, 255, SCALE_EPS, False, in_place=in_place)
    assert bad.tolist() == rows
    assert _bits_equal(per_token_fake_quantize(x.clone(), SPECS[0], in_place=in_place), ref)


@pytest.mark.parametrize("spec", SPECS)
def test_extreme_finite_rows_match_the_torch_path(spec: QuantSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """Largest finite floats (the range overflows to inf: NaN output), subnormals, signed zeros."""
    tiny = torch.finfo(torch.float32).tiny
    rows = [
        [3.4028235e38, -3.4028235e38, 1.0, 0.0],
        [3.4028235e38, 3.0e38, 2.0, -1.0],
        [tiny / 8, -tiny / 4, tiny / 2, 0.0],  # subnormals
        [-0.0, -0.0, -0.0, -0.0],
        [0.0, -0.0, 0.0, -0.0],
        [-1e-45, 1e-45, 0.0, 5.0],
    ]
    x = torch.tensor(rows, dtype=torch.float32)
    assert kernels.per_token_fused(x, spec.quant_min, spec.quant_max, SCALE_EPS, spec.symmetric)[1].numel() == 0
    got = per_token_fake_quantize(x, spec)
    assert _bits_equal(got, _torch_path(x, spec, monkeypatch))


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (2, 0, 4), (4, 1), (1,)])
def test_empty_and_one_element_rows(shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=g) * 5
    for spec in SPECS:
        got = per_token_fake_quantize(x, spec)
        assert _bits_equal(got, _torch_path(x, spec, monkeypatch)), (shape, spec)
        if x.numel():  # a one-value row: its range is [min(v, 0), max(v, 0)], so v is on the grid up to rounding
            assert torch.allclose(got, x, rtol=1e-6, atol=1e-30)


def test_other_dtypes_use_the_torch_path() -> None:
    assert not kernels.available(torch.zeros(2, 2, dtype=torch.bfloat16))
    assert not kernels.available(torch.zeros(2, 2, dtype=torch.float64))


def _per_tensor_cases(shape: tuple[int, ...]) -> list[torch.Tensor]:
    specials = torch.tensor([math.inf, -math.inf, math.nan, 3e38, -3e38, 1e-40, -0.0, 0.0, 2.5, -2.5])
    mixed = torch.randn(shape, generator=torch.Generator().manual_seed(1)).reshape(-1)
    mixed[: min(mixed.numel(), specials.numel())] = specials[: mixed.numel()]
    return [*_cases(shape), mixed.reshape(shape)]


@pytest.mark.parametrize("shape", [(3, 7), (2, 3, 9, 128), (5000,), (1,)])  # 5000: across 4096-value blocks
@pytest.mark.parametrize("in_place", [False, True])
def test_per_tensor_kernel_gives_fake_quantizes_bits(shape: tuple[int, ...], in_place: bool) -> None:
    for spec in SPECS:
        scale, zp = compute_qparams(torch.tensor(-2.0), torch.tensor(5.0), spec)  # values beyond it clamp
        for x in _per_tensor_cases(shape):
            ref = fake_quantize(x, scale, zp, spec)
            y = x.clone()
            got = kernels.per_tensor_fused(y, scale, zp, spec.quant_min, spec.quant_max, in_place=in_place)
            assert _bits_equal(got, ref), (shape, spec)  # NaN, inf and zero signs as torch's chain gives them
            assert (got.data_ptr() == y.data_ptr()) == in_place and (in_place or _bits_equal(y, x))


def test_per_tensor_kernel_leaves_a_non_contiguous_input_alone() -> None:
    spec = SPECS[0]
    scale, zp = compute_qparams(torch.tensor(-1.0), torch.tensor(1.0), spec)
    x = torch.randn(4, 6, 10).transpose(0, 1)
    before = x.clone()
    got = kernels.per_tensor_fused(x, scale, zp, spec.quant_min, spec.quant_max, in_place=True)
    assert torch.equal(x, before) and _bits_equal(got, fake_quantize(x, scale, zp, spec))


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("per_token", [False, True])
def test_kernels_sum_signal_and_noise_power_in_float64(in_place: bool, per_token: bool) -> None:
    spec = SPECS[0]
    scale, zp = compute_qparams(torch.tensor(-2.0), torch.tensor(5.0), spec)
    x = torch.randn(7, 1000, generator=torch.Generator().manual_seed(2)) ** 3
    sums = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # added to, not overwritten
    for _ in range(2):
        y = x.clone()
        if per_token:
            got, _ = kernels.per_token_fused(y, spec.quant_min, spec.quant_max, SCALE_EPS, spec.symmetric,
                                             in_place=in_place, sums=sums)
        else:
            got = kernels.per_tensor_fused(y, scale, zp, spec.quant_min, spec.quant_max, in_place=in_place, sums=sums)
    xd, qd = x.double().numpy(), got.double().numpy()
    signal, noise = 2 * (xd**2).sum() + 1.0, 2 * ((xd - qd) ** 2).sum() + 2.0
    assert sums[0].item() == pytest.approx(signal, rel=1e-12) and sums[1].item() == pytest.approx(noise, rel=1e-12)
    assert sums[2].item() == 5.0


def test_per_tensor_kernel_takes_one_element_qparams_of_any_shape() -> None:
    spec = SPECS[0]
    scale, zp = compute_qparams(torch.tensor(-1.0), torch.tensor(3.0), spec)
    x = torch.randn(3, 50)
    got = kernels.per_tensor_fused(x, scale.reshape(1), zp.reshape(1, 1), spec.quant_min, spec.quant_max)
    assert _bits_equal(got, fake_quantize(x, scale, zp, spec))
