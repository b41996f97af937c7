"""Dynamic per-token activation quantization: one asymmetric min-max scale per token (row of the last
dimension), computed at run time, so an outlier token no longer stretches every other token's grid."""

from __future__ import annotations

import torch
from torch import Tensor

from outlier_probe.quant.modules import ActMode, ActQuantizer
from outlier_probe.quant.quantizer import PerChannel, QuantSpec, compute_qparams, fake_quantize


def per_token_fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """Fake-quantize each row x[..., :] with its own range (0 included, as the per-tensor grid)."""
    rows = x.reshape(-1, x.shape[-1])
    lo, hi = torch.aminmax(rows.detach().float(), dim=1)
    row_spec = QuantSpec(spec.bits, spec.symmetric, PerChannel(0))
    scale, zero_point = compute_qparams(lo, hi, row_spec)
    return fake_quantize(rows, scale, zero_point, row_spec).reshape(x.shape)


class TokenActQuantizer(ActQuantizer):
    """ActQuantizer whose frozen mode quantizes per token with dynamic ranges. Calibration still runs
    the estimator, so the per-tensor range it would have used is kept for the report."""

    def forward(self, x: Tensor) -> Tensor:
        if self.mode is ActMode.frozen:
            return per_token_fake_quantize(x, self.spec)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{self.spec.label('a')} per-token dynamic mode={self.mode.value}"
