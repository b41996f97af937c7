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
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(weight)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
        new.register_buffer("input_map", input_map.to(linear.weight.device, linear.weight.dtype))
        return new.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(map_input(x, self.input_map))
