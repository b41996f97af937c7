"""The 2025 attention variants: softpick, the sigmoid output gate (Qwen3-Next) and a learned sink logit
(gpt-oss). Math first, then the functions attention.py registers in transformers' AttentionInterface.

- softpick(x)_i = ReLU(e^{x_i} - 1) / (sum_j |e^{x_j} - 1| + eps) (Zuhri et al., 2025): rows need not sum to 1
  and a head can output exactly 0, so no sink token is needed. Masked keys are left out of the sum.
- sigmoid gate: Y * sigmoid(X W_g), one gate per head and channel, on the attention output before the
  output projection (Qwen3-Next's `gate` from q_proj: elementwise, no bias).
- sink: exp(x_i) / (exp(s_h) + sum_j exp(x_j)) with a learned logit s_h per head; s_h = 0 is softmax_1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from outlier_probe import attention as att

SOFTPICK_EPS = 1e-6
GATE_OUT = "op_gate_out"  # nn.Linear(hidden -> heads * head_dim, bias=False), sigmoid-gate only
SINK = "op_sink"  # nn.Parameter (num_heads,), sink variant only


def softpick(x: torch.Tensor, dim: int = -1, eps: float = SOFTPICK_EPS) -> torch.Tensor:
    """ReLU(e^x - 1) / (sum |e^x - 1| + eps), stable: numerator and denominator are both multiplied by
    e^{-m}, m = max(max_j x_j, 0) (detached), so nothing overflows and e^{-m} <= 1. Logits at or below
    half of the dtype's lowest value are masked: they add nothing to the sum (a masked key is not a
    key whose e^x - 1 = -1)."""
    valid = x > torch.finfo(x.dtype).min / 2
    m = torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device)).detach().amax(dim=dim, keepdim=True).clamp(min=0.0)
    e_m = torch.exp(-m)
    shifted = torch.exp(torch.where(valid, x, m) - m) - e_m  # e^{-m} (e^x - 1); masked entries give 1 - e^{-m}, dropped below
    num = torch.where(valid, torch.relu(shifted), torch.zeros((), dtype=x.dtype, device=x.device))
    den = torch.where(valid, shifted.abs(), torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim=dim, keepdim=True)
    return num / (den + eps * e_m)


def sink_softmax(x: torch.Tensor, sink: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(x_i) / (exp(sink) + sum_j exp(x_j)); sink broadcasts against x with the key dim reduced.
    m = max(max_j x_j, sink) is detached (the value does not depend on it), so the form is stable and,
    for sink = 0, the very computation of attention.softmax1."""
    m = torch.maximum(x.detach().amax(dim=dim, keepdim=True), sink.detach())
    e = torch.exp(x - m)
    return e / (torch.exp(sink - m) + e.sum(dim=dim, keepdim=True))


def _sink_of(module: nn.Module, x_heads: int) -> torch.Tensor:
    sink = getattr(module, SINK, None)
    if sink is None:
        raise RuntimeError(f"{type(module).__name__} runs the sink implementation but has no {SINK}; "
                           "call apply_attention_variant with every attention module of the model")
    assert sink.shape[0] == x_heads, f"{sink.shape[0]} sink logits for {x_heads} heads"
    return sink.view(1, -1, 1, 1).float()


def op_softpick_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softpick attention (eager: no fused kernel computes it)."""
    return att._eager(module, query, key, value, attention_mask, scaling, dropout, softpick, kwargs)  # noqa: SLF001


def op_sink_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax with a learned per-head sink logit in the denominator (eager)."""
    sink = _sink_of(module, query.shape[1])
    return att._eager(module, query, key, value, attention_mask, scaling, dropout,  # noqa: SLF001
                      lambda s: sink_softmax(s, sink.to(s.dtype)), kwargs)


def _out_gate(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """out (B, T, H, hd) * sigmoid(X W_g) viewed as (B, T, H, hd)."""
    gate, x = getattr(module, GATE_OUT, None), module.__dict__.pop(att._GATE_INPUT, None)  # noqa: SLF001
    if gate is None or x is None:
        raise RuntimeError(f"{type(module).__name__} runs the sigmoid-gate implementation but carries no gate; "
                           "call apply_attention_variant with every attention module of the model")
    g = torch.sigmoid(gate(x)).view(*out.shape)  # (B, T, H, hd)
    return out * g.to(out.dtype)


def op_sigmoid_gate_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                              **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Softmax attention whose output is gated per head and channel by sigmoid(X W_g) (Qwen3-Next)."""
    if att._wants_eager(module):  # noqa: SLF001
        out, probs = att._eager(module, query, key, value, attention_mask, scaling, dropout, att._softmax, kwargs)  # noqa: SLF001
        return _out_gate(module, out), probs
    return _out_gate(module, att._sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs)), None  # noqa: SLF001


def head_dim_of(module: nn.Module, hidden_size: int, num_heads: int) -> int:
    return int(getattr(module, "head_dim", None) or getattr(module, "attention_head_size", None) or hidden_size // num_heads)


def attach(module: nn.Module, variant_value: str, hidden_size: int, num_heads: int) -> None:
    """Create this variant's parameters on one attention module (before gated weights are loaded)."""
    ref = next(module.parameters())
    if variant_value == "sigmoid-gate" and GATE_OUT not in module._modules:
        hd = head_dim_of(module, hidden_size, num_heads)
        gate = nn.Linear(hidden_size, num_heads * hd, bias=False, device=ref.device, dtype=ref.dtype)
        nn.init.normal_(gate.weight, std=0.02)  # sigmoid ~ 0.5 at initialisation, as a fresh Qwen3-Next q_proj gate
        module.add_module(GATE_OUT, gate)
    if variant_value == "sigmoid-gate" and getattr(module, att._GATE_HOOK, None) is None:  # noqa: SLF001
        # also when the gate exists already (a variant applied again, e.g. by quantize_model on a copy)
        setattr(module, att._GATE_HOOK, module.register_forward_pre_hook(att._stash_gate_input, with_kwargs=True))  # noqa: SLF001
    if variant_value == "sink" and SINK not in module._parameters:
        module.register_parameter(SINK, nn.Parameter(torch.zeros(num_heads, device=ref.device, dtype=ref.dtype)))


def detach(module: nn.Module, variant_value: str) -> None:
    """Remove parameters of the 2025 variants that `variant_value` does not use."""
    if variant_value != "sigmoid-gate" and GATE_OUT in module._modules:
        del module._modules[GATE_OUT]
    if variant_value != "sink" and SINK in module._parameters:
        del module._parameters[SINK]
