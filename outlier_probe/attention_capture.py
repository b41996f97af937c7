"""Read the attention probabilities of a running model through transformers' AttentionInterface.

`capture_attention(model, modules, on_probs)` switches the model to a registered wrapper implementation
`op_capture_<original>`: the model's own implementation (sdpa, eager, flash, or one of attention.py's
variants) still computes the output, unchanged, and the wrapper recomputes the probabilities of that
batch with the variant's formula (softmax, softmax_1, clipped) and hands them to `on_probs(layer,
probs)`; nothing is kept. Gated attention's gate is read by a hook on its gate Linear (`on_gate`).
On exit the original implementation is restored and the hooks are removed, also after an exception.
"""

from __future__ import annotations

import functools
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from outlier_probe import attention as att
from outlier_probe.config import AttentionVariant

_STATE = "_op_capture"  # per attention module: (layer index, inner function, prob function, callback)
ProbsCallback = Callable[[int, torch.Tensor], None]  # (layer, probs (B, H, Tq, Tk))
GateCallback = Callable[[int, torch.Tensor], None]  # (layer, gate (B, T, H) in [0, 1])


def _prob_fn(variant: AttentionVariant, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if variant is AttentionVariant.softmax1:
        return att.softmax1
    if variant in (AttentionVariant.softpick, AttentionVariant.sink):
        from outlier_probe import attention_2025 as a25

        if variant is AttentionVariant.softpick:
            return a25.softpick
        sink = getattr(module, a25.SINK).detach().view(1, -1, 1, 1).float()
        return lambda s: a25.sink_softmax(s, sink)
    if variant is AttentionVariant.clipped:
        return functools.partial(att.clipped_softmax, gamma=getattr(module, att._GAMMA, att.DEFAULT_GAMMA),  # noqa: SLF001
                                 zeta=getattr(module, att._ZETA, att.DEFAULT_ZETA), alpha=getattr(module, att._ALPHA, None))  # noqa: SLF001
    return att._softmax  # noqa: SLF001 - softmax and gated


def _heads_of(module: nn.Module) -> int:
    cfg = getattr(module, "config", None)
    heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None) or getattr(
        cfg, "num_attention_heads", None) or getattr(cfg, "n_heads", None)
    assert heads, f"cannot tell the number of heads of {type(module).__name__}"
    return int(heads)


def probabilities(module: nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                  scaling: float | None, prob_fn: Callable[[torch.Tensor], torch.Tensor], kwargs: dict[str, Any]) -> torch.Tensor:
    """The (B, H, Tq, Tk) probabilities the eager path would compute, in float32 (no quantizers)."""
    n_rep = query.shape[1] // key.shape[1]
    key = att._repeat_kv(key, n_rep)  # noqa: SLF001
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling  # (B, H, Tq, Tk)
    causal = att._causal(module, kwargs)  # noqa: SLF001
    if attention_mask is not None and attention_mask.dim() == 2:  # flash-style (B, Tk) padding mask
        attention_mask = attention_mask[:, None, None, :].bool()
        if causal and query.shape[-2] > 1:
            attention_mask = attention_mask & torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool,
                                                         device=key.device).tril(key.shape[-2] - query.shape[-2])
    mask = att._bool_mask(attention_mask, query, key, causal)  # noqa: SLF001
    if mask is not None:
        scores = scores + att._additive_mask(mask, scores.dtype)  # noqa: SLF001
    return prob_fn(scores)


def op_capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own attention, plus the probabilities of this call handed to the capture callback."""
    layer, inner, prob_fn, callback = module.__dict__[_STATE]
    out = inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    with torch.no_grad():
        callback(layer, probabilities(module, query.detach(), key.detach(), attention_mask, scaling, prob_fn, kwargs))
    return out


def _inner_function(module: nn.Module, name: str) -> Callable[..., Any]:
    from transformers.modeling_utils import AttentionInterface

    if name == "eager":  # every transformers model file defines its own eager function
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is not None:
            return fn
        name = "sdpa"
    return AttentionInterface._global_mapping[name]  # noqa: SLF001 - the registry's own lookup table


def _register(original: str) -> str:
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    att.register_attention_functions()
    name = f"op_capture_{original}"
    AttentionInterface.register(name, op_capture_attention)
    masks = AttentionMaskInterface._global_mapping  # noqa: SLF001
    AttentionMaskInterface.register(name, masks.get(original, sdpa_mask))
    return name


def variant_of(model: nn.Module) -> AttentionVariant:
    """The variant an implementation name stands for (anything not ours is vanilla softmax)."""
    name = att.attention_implementation(model)
    return next((v for v, n in att.IMPLEMENTATION_NAMES.items() if n == name), AttentionVariant.softmax)


@contextmanager
def capture_attention(model: nn.Module, modules: list[tuple[str, nn.Module]], on_probs: ProbsCallback,
                      on_gate: GateCallback | None = None) -> Iterator[AttentionVariant]:
    """While open, every forward of `model` reports each layer's attention probabilities (and gates)."""
    original = att.attention_implementation(model) or "eager"
    variant = variant_of(model)
    handles = []
    try:
        for i, (_, module) in enumerate(modules):
            module.__dict__[_STATE] = (i, _inner_function(module, original), _prob_fn(variant, module), on_probs)
            gate = getattr(module, att.GATE, None)
            if gate is not None and on_gate is not None:
                handles.append(gate.register_forward_hook(
                    lambda _m, _a, out, _i=i: on_gate(_i, torch.sigmoid(out.detach().float()))))
            out_gate = getattr(module, "op_gate_out", None)  # sigmoid-gate: per head and channel -> mean per head
            if out_gate is not None and on_gate is not None:
                handles.append(out_gate.register_forward_hook(
                    lambda _m, _a, out, _i=i, _h=_heads_of(module): on_gate(
                        _i, torch.sigmoid(out.detach().float()).unflatten(-1, (_h, -1)).mean(-1))))
        att._set_implementation(model, modules, _register(original))  # noqa: SLF001
        yield variant
    finally:
        for handle in handles:
            handle.remove()
        for _, module in modules:
            module.__dict__.pop(_STATE, None)
        att._set_implementation(model, modules, original)  # noqa: SLF001
