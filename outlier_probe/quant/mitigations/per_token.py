"""Dynamic per-token activation quantization: one asymmetric min-max scale per token (row of the last
dimension), computed at run time, so an outlier token no longer stretches every other token's grid."""

from __future__ import annotations

import torch
from torch import Tensor

from outlier_probe.quant import kernels
from outlier_probe.quant.modules import ActMode, ActQuantizer
from outlier_probe.quant.quantizer import SCALE_EPS, QuantSpec


def per_token_fake_quantize(x: Tensor, spec: QuantSpec) -> Tensor:
    """Fake-quantize each row x[..., :] with its own range (0 included, as the per-tensor grid).

    The same arithmetic as compute_qparams + fake_quantize (multiply by the float32 reciprocal, round
    half to even): this runs at every activation site on every forward, so float32 CPU tensors take the
    fused kernel (quant/kernels.py, bit-identical); elsewhere it is done in place on one buffer.
    """
    if x.numel() == 0:  # no value to quantize (aminmax refuses an empty last dimension)
        return x.detach().clone()
    if kernels.available(x):
        out = kernels.per_token_fused(x, spec.quant_min, spec.quant_max, SCALE_EPS, spec.symmetric)
        if out is not None:
            return out
    xf = x.detach().float() if x.dtype != torch.float32 else x.detach()
    lo, hi = torch.aminmax(xf, dim=-1, keepdim=True)
    qmin, qmax = spec.quant_min, spec.quant_max
    if spec.symmetric:
        scale = torch.maximum(-lo.clamp_(max=0.0), hi.clamp_(min=0.0)).div_(qmax).clamp_(min=SCALE_EPS)
        zp = torch.zeros_like(scale)
    else:
        lo, hi = lo.clamp_(max=0.0), hi.clamp_(min=0.0)
        scale = (hi - lo).div_(qmax - qmin).clamp_(min=SCALE_EPS)
        zp = torch.round(lo / scale).neg_().add_(qmin).clamp_(qmin, qmax)
    q = xf * (1.0 / scale)
    q.round_().add_(zp).clamp_(qmin, qmax)
    return q.sub_(zp).mul_(scale).to(x.dtype)


class TokenActQuantizer(ActQuantizer):
    """ActQuantizer whose frozen mode quantizes per token with dynamic ranges. Calibration still runs
    the estimator, so the per-tensor range it would have used is kept for the report."""

    def forward(self, x: Tensor) -> Tensor:
        if self.mode is ActMode.frozen:
            return per_token_fake_quantize(x, self.spec)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"{self.spec.label('a')} per-token dynamic mode={self.mode.value}"
