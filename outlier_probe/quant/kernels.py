"""Fused CPU fake-quantization: one read and one write per value instead of six passes.

torch's chain (x * (1 / s), round, + zp, clamp, - zp, * s; done in place on one new buffer) reads and
writes each activation six times; on a CPU that costs more than the layer around it for large tensors
(a Llama MLP activation, attention scores). This numba kernel performs the very same float32 operations
in the same order, value by value, so its output is bit-identical to the torch path (tests/quant/
test_kernels.py checks it, ties and clamping included): no fastmath, so no reassociation or fused
multiply-add; np.rint rounds half to even as torch.round does; NaN stays NaN through the clamp.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

try:
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is unavailable
    njit = None

MIN_VALUES = 1 << 14  # below this the call overhead outweighs the passes saved: the torch path


if njit is not None:

    @njit(cache=True, boundscheck=False, nogil=True)
    def _fake_quant(x, out, inv_scale, zero_point, qmin, qmax, scale):  # pragma: no cover - compiled
        for i in range(x.size):
            q = np.rint(x[i] * inv_scale) + zero_point
            if q < qmin:
                q = qmin
            elif q > qmax:
                q = qmax
            out[i] = (q - zero_point) * scale


def usable(x: Tensor) -> bool:
    """True when the fused kernel takes x: CPU float32, contiguous, no autograd, large enough."""
    return (njit is not None and x.device.type == "cpu" and x.dtype is torch.float32 and x.is_contiguous()
            and not x.requires_grad and x.numel() >= MIN_VALUES
            and os.environ.get("OUTLIER_PROBE_KERNEL", "auto") != "torch")


def fake_quantize_per_tensor(x: Tensor, inv_scale: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """A new tensor: (clamp(round(x * inv_scale) + zp, qmin, qmax) - zp) * scale, all in float32; 0-d qparams."""
    out = torch.empty_like(x)
    f32 = np.float32
    # CPU tensors only (usable()): .item() reads host memory, no device sync
    _fake_quant(x.numpy().reshape(-1), out.numpy().reshape(-1), f32(inv_scale.item()), f32(zero_point.item()),
                f32(qmin), f32(qmax), f32(scale.item()))
    return out
