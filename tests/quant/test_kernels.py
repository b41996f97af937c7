"""The fused per-token kernel against the torch path of per_token_fake_quantize: bit for bit."""

from __future__ import annotations

import pytest
import torch

from outlier_probe.quant import kernels
from outlier_probe.quant.mitigations.per_token import per_token_fake_quantize
from outlier_probe.quant.quantizer import QuantSpec

pytestmark = pytest.mark.skipif(not kernels.available(torch.zeros(1)), reason="numba is not importable here")

SPECS = (QuantSpec(8, symmetric=False), QuantSpec(8, symmetric=True), QuantSpec(4, symmetric=False))


def _torch_path(x: torch.Tensor, spec: QuantSpec, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    with monkeypatch.context() as m:
        m.setenv("OUTLIER_PROBE_KERNEL", "torch")
        assert not kernels.available(x)
        return per_token_fake_quantize(x, spec)


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


def test_non_contiguous_input_and_the_input_left_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 6, 10).transpose(0, 1)  # rows not contiguous in memory
    before = x.clone()
    got = per_token_fake_quantize(x, SPECS[0])
    assert torch.equal(x, before)
    assert torch.equal(got, _torch_path(x, SPECS[0], monkeypatch))


def test_rows_with_inf_or_nan_take_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(4, 8)
    x[1, 3], x[2, 2] = float("nan"), float("inf")
    assert kernels.per_token_fused(x, 0, 255, 1e-7, False) is None
    got, ref = per_token_fake_quantize(x, SPECS[0]), _torch_path(x, SPECS[0], monkeypatch)
    assert torch.equal(got.isnan(), ref.isnan()) and got[1].isnan().all() and got[2].isnan().all()
    assert torch.equal(got[[0, 3]], ref[[0, 3]])


def test_other_dtypes_use_the_torch_path() -> None:
    assert not kernels.available(torch.zeros(2, 2, dtype=torch.bfloat16))
    assert not kernels.available(torch.zeros(2, 2, dtype=torch.float64))
