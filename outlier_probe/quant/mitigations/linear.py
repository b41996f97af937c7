"""A Linear whose input goes through a fixed map first: a per-channel scale (online smoothing) or an
orthogonal matrix (online rotation). The fake-quant wrapper keeps the map in front of its input quantizer."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from outlier_probe.quant.modules import map_input


class InputMappedLinear(nn.Linear):
    """y = map(x) W^T + b; built from a Linear whose weight already absorbed the inverse map."""

    input_map: Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight: Tensor, input_map: Tensor) -> InputMappedLinear:
        """`weight` (out, in) is taken over, not copied: pass a fresh tensor (the transforms compute one)."""
        # no nn.Linear.__init__: it would allocate and randomly initialise a matrix overwritten at once
        # (kaiming_uniform and the copy cost more than the rest of the smoothing transform)
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = nn.Parameter(weight.detach().to(linear.weight.device, linear.weight.dtype).contiguous(),
                                  requires_grad=linear.weight.requires_grad)
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                             requires_grad=linear.bias.requires_grad)
        new.register_parameter("bias", bias)
        new.register_buffer("input_map", input_map.to(linear.weight.device, linear.weight.dtype))
        return new.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(map_input(x, self.input_map))
