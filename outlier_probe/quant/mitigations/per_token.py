"""Dynamic per-token activation quantization: one asymmetric min-max scale per token (row of the last
dimension), computed at run time, so an outlier token no longer stretches every other token's grid."""

from __future__ import annotations

import torch
from torch import Tensor

from outlier_probe.quant import kernels
from outlier_probe.quant.modules import ActMode, ActQuantizer, add_noise_power
from outlier_probe.quant.quantizer import SCALE_EPS, QuantSpec


def per_token_fake_quantize(x: Tensor, spec: QuantSpec, *, in_place: bool = False,
                            sums: Tensor | None = None) -> Tensor:
    """Fake-quantize each row x[..., :] with its own range (0 included, as the per-tensor grid).

    The same arithmetic as compute_qparams + fake_quantize (multiply by the float32 reciprocal, round
    half to even): this runs at every activation site on every forward, so float32 CPU tensors take the
    fused kernel (quant/kernels.py, bit-identical), rows holding an inf or NaN the torch path; elsewhere
    it is done in place on one buffer. in_place: x may be overwritten (the caller owns it and drops it),
    which spares the output's allocation (fresh pages: ~0.8 ms of page faults per 6 MB) on the kernel path.
    sums: (signal, noise, calls) of an SQNR meter (ActQuantizer.sqnr), added to: the kernel sums each row
    in float64 while it quantizes it (so in place too), other paths through add_noise_power.
    """
    if x.numel() == 0 or not kernels.available(x) or (sums is not None and sums.device.type != "cpu"):
        # no value to quantize (aminmax refuses an empty last dimension), or not a float32 CPU tensor
        out = x.detach().clone() if x.numel() == 0 else _torch_path(x, spec)
        if sums is not None:
            add_noise_power(sums, x, out)
        return out
    out, bad = kernels.per_token_fused(x, spec.quant_min, spec.quant_max, SCALE_EPS, spec.symmetric,
                                       in_place=in_place, sums=sums)
    if bad.numel():  # each row has its own range, so these rows alone give what the whole tensor would
        rows = x.detach().reshape(-1, x.shape[-1])[bad]  # still unwritten, also in place
        qrows = _torch_path(rows, spec)
        out.view(-1, x.shape[-1])[bad] = qrows
        if sums is not None:  # inf / NaN rows: their inf or NaN power, as a float64 sum
            sums[:2] += torch.stack((rows.double().square().sum(), (rows.double() - qrows.double()).square().sum()))
    return out


def _torch_path(x: Tensor, spec: QuantSpec) -> Tensor:
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
            return self._fake_quantize(x, in_place=False)
        return super().forward(x)

    def _fake_quantize(self, x: Tensor, *, in_place: bool) -> Tensor:
        return per_token_fake_quantize(x, self.spec, in_place=in_place, sums=self.sqnr)

    def quantize_owned(self, x: Tensor) -> Tensor:
        if self.mode is ActMode.frozen and self._may_overwrite(x):
            return self._fake_quantize(x, in_place=True)
        return self(x)

    def extra_repr(self) -> str:
        return f"{self.spec.label('a')} per-token dynamic mode={self.mode.value}"
