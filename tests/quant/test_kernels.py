"""The fused fake-quantization kernel gives bit-for-bit the values of the torch path it replaces."""

from __future__ import annotations

import pytest
import torch

from outlier_probe.quant import kernels
from outlier_probe.quant.quantizer import PerTensor, QuantSpec, compute_qparams, fake_quantize

pytestmark = pytest.mark.skipif(kernels.njit is None, reason="numba is not importable here")


def _both(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, spec: QuantSpec,
          monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, torch.Tensor]:
    assert kernels.usable(x)
    fused = fake_quantize(x, scale, zp, spec)
    monkeypatch.setenv("OUTLIER_PROBE_KERNEL", "torch")
    assert not kernels.usable(x)
    reference = fake_quantize(x, scale, zp, spec)
    monkeypatch.delenv("OUTLIER_PROBE_KERNEL")
    return fused, reference


@pytest.mark.parametrize("bits,symmetric", [(8, False), (8, True), (4, False), (2, True)])
def test_fused_equals_torch_bit_for_bit(bits: int, symmetric: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(8, 64, 96, generator=g) ** 3  # heavy tails: both clamps are hit
    spec = QuantSpec(bits, symmetric=symmetric, granularity=PerTensor())
    scale, zp = compute_qparams(torch.tensor(-1.5), torch.tensor(2.0), spec)
    flat = x.view(-1)
    flat[:64] = (torch.arange(64, dtype=torch.float32) - 32.0 + 0.5) * scale  # exact ties: round half to even
    flat[64:68] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0])
    fused, reference = _both(x, scale, zp, spec, monkeypatch)
    assert fused.dtype is torch.float32 and fused.shape == x.shape
    assert torch.equal(fused.isnan(), reference.isnan())
    ok = ~reference.isnan()
    assert torch.equal(fused[ok].view(torch.int32), reference[ok].view(torch.int32))  # the same bits (-0.0 included)
    assert fused.unique().numel() <= 2**bits + 1  # on the grid (NaN aside)
    assert torch.equal(x.view(-1)[:64], (torch.arange(64, dtype=torch.float32) - 32.0 + 0.5) * scale)  # input untouched


def test_small_strided_or_autograd_inputs_keep_the_torch_path() -> None:
    assert not kernels.usable(torch.randn(8, 8))  # too small to pay for the call
    assert not kernels.usable(torch.randn(64, 512).t())  # not contiguous
    assert not kernels.usable(torch.randn(64, 512, requires_grad=True))
    assert not kernels.usable(torch.randn(64, 512, dtype=torch.float64))
