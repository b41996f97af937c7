"""Pure fake-quantization math: specs, quantization parameters, quantize-dequantize.

Nothing here modifies its input or keeps state. The rounding follows torch's own
fake_quantize_* kernels (multiply by 1/scale, round half to even, clamp, dequantize), so results
match them bit for bit given the same scale and zero point.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import Tensor

from outlier_probe.errors import UsageError

# Smallest scale allowed: an all-zero range would otherwise divide by zero (torch observers use
# the same float32 machine epsilon).
SCALE_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class PerTensor:
    """One scale / zero point for the whole tensor."""

    def __str__(self) -> str:
        return "per-tensor"


@dataclass(frozen=True)
class PerChannel:
    """One scale / zero point per index along `axis` (0 = output channels of a Linear weight)."""

    axis: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise UsageError(f"per-channel axis must be an int, got {self.axis!r}")

    def __str__(self) -> str:
        return f"per-channel({self.axis})"


Granularity = PerTensor | PerChannel


class Estimator(str, enum.Enum):
    """How a quantization range is estimated from data."""

    minmax = "minmax"  # min / max of the current (last) batch
    running_minmax = "running_minmax"  # EMA of per-batch min / max (Bondarenko et al.)
    percentile = "percentile"  # EMA of per-batch (100-p) / p percentiles
    mse = "mse"  # EMA of per-batch clipping range minimising fake-quantization MSE


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid: bit width, symmetric or asymmetric, and granularity."""

    bits: int = 8  # 2..16
    symmetric: bool = True  # True: [-(2^(b-1)-1), 2^(b-1)-1], zero point 0; False: [0, 2^b-1]
    granularity: Granularity = field(default_factory=PerTensor)

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise UsageError(f"bit width must be an integer from 2 to 16, got {self.bits!r}")
        if not isinstance(self.symmetric, bool):
            raise UsageError(f"symmetric must be True or False, got {self.symmetric!r}")
        if not isinstance(self.granularity, (PerTensor, PerChannel)):
            raise UsageError(
                f"granularity must be PerTensor() or PerChannel(axis), got {self.granularity!r}"
            )

    @property
    def quant_min(self) -> int:
        # Symmetric drops -2^(b-1) so the grid is symmetric around 0 (max|x| / 127 at 8 bits).
        return -(2 ** (self.bits - 1) - 1) if self.symmetric else 0

    @property
    def quant_max(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def axis(self) -> int | None:
        """The per-channel axis, or None when per-tensor."""
        return self.granularity.axis if isinstance(self.granularity, PerChannel) else None

    def label(self, prefix: str = "") -> str:
        """Short description, e.g. `a8 asym per-tensor` for prefix `a`."""
        return f"{prefix}{self.bits} {'sym' if self.symmetric else 'asym'} {self.granularity}"


def _normalize_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise UsageError(f"per-channel axis {axis} is out of range for a {ndim}-d tensor; use -{ndim}..{ndim - 1}")
    return axis % ndim


def compute_qparams(min_val: Tensor | float, max_val: Tensor | float, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale (float32) and zero point (int32) for a range; per-channel ranges give 1-D results.

    The range is first extended to include 0, as torch observers do, so 0 is exactly representable
    (padding and ReLU zeros stay zero).
    """
    min_t = torch.as_tensor(min_val, dtype=torch.float32)
    max_t = torch.as_tensor(max_val, dtype=torch.float32, device=min_t.device)
    min_neg = torch.clamp(min_t, max=0.0)
    max_pos = torch.clamp(max_t, min=0.0)
    qmin, qmax = spec.quant_min, spec.quant_max
    if spec.symmetric:
        scale = torch.maximum(-min_neg, max_pos) / qmax
        scale = torch.clamp(scale, min=SCALE_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((max_pos - min_neg) / (qmax - qmin), min=SCALE_EPS)
        zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


class _RoundSTE(torch.autograd.Function):
    """Round in forward, identity in backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, t: Tensor) -> Tensor:  # noqa: ARG004
        return torch.round(t)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # noqa: ARG004
        return grad


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> Tensor:
    """Quantize to the integer grid of `spec` and dequantize; returns a new tensor of x's dtype.

    Per-channel: `scale` / `zero_point` are 1-D with one entry per index along `spec.axis` of x.
    Gradients pass straight through inside the range and are zero where values were clamped.
    """
    orig_dtype = x.dtype
    xf = x.to(torch.float32)  # a no-op for float32 input; we never write into it
    scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
    zp = torch.as_tensor(zero_point, device=x.device).to(torch.float32)
    if spec.axis is not None:
        axis = _normalize_axis(spec.axis, x.ndim)
        if scale.numel() != x.shape[axis] or zp.numel() != x.shape[axis]:
            raise ValueError(
                f"per-channel qparams have {scale.numel()} entries but axis {axis} of x has {x.shape[axis]}"
            )
        shape = [1] * x.ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    elif scale.numel() != 1 or zp.numel() != 1:
        raise ValueError(f"per-tensor qparams must have one element, got scale of shape {tuple(scale.shape)}")
    else:
        scale, zp = scale.reshape(()), zp.reshape(())
    # Multiply by the float32 reciprocal, exactly like torch's kernels, so ties round identically.
    inv_scale = 1.0 / scale
    scaled = xf * inv_scale
    if not scaled.requires_grad:
        # no autograd: finish in place on the one new buffer (4x faster on CPU than a chain of
        # temporaries, and than torch.fake_quantize_*, which also builds a mask); same values
        q = scaled.round_().add_(zp).clamp_(spec.quant_min, spec.quant_max)
        return q.sub_(zp).mul_(scale).to(orig_dtype)
    q = torch.clamp(_RoundSTE.apply(scaled) + zp, spec.quant_min, spec.quant_max)
    return ((q - zp) * scale).to(orig_dtype)


def quantize_dequantize(x: Tensor, min_val: Tensor | float, max_val: Tensor | float, spec: QuantSpec) -> Tensor:
    """Fake-quantize x with qparams derived from the range [min_val, max_val]."""
    scale, zero_point = compute_qparams(min_val, max_val, spec)
    return fake_quantize(x, scale, zero_point, spec)
