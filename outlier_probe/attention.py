"""Attention variants: softmax, softmax_1 (OutEffHop), clipped softmax and gated attention.

Pure math first (`softmax1`, `clipped_softmax`), then transformers attention functions registered in
`AttentionInterface` / `AttentionMaskInterface` under one name per variant, then the model-level verb
`apply_attention_variant`.

Paths inside one registered function:
- fast: softmax and gated use torch's fused scaled_dot_product_attention (through transformers' own
  sdpa function); softmax_1 uses it too, with one extra key slot whose key and value are zero, so its
  logit is exactly 0 and it contributes nothing to the output (the "+1" of the denominator).
- eager: explicit scores -> `op_score_quantizer` -> + mask -> the variant's softmax -> `op_prob_quantizer`
  -> dropout -> @ V. Taken whenever the module carries one of the two quantizer attributes, and always
  for clipped softmax (its clamp has no fused form).

The score quantizer sees the scaled scores *before* the mask is added, as in Bondarenko et al.'s
reference code: a -inf / finfo.min mask inside a min-max range would otherwise wipe out the range.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from outlier_probe.config import AttentionVariant
from outlier_probe.errors import UsageError

DEFAULT_GAMMA = -0.025  # clipped softmax lower clip (Bondarenko et al.'s BERT setting), must be <= 0
DEFAULT_ZETA = 1.0  # clipped softmax upper stretch, must be >= 1
DEFAULT_GATE_INIT = 0.25  # gated attention: sigmoid(G(x)) at initialisation (Bondarenko et al. use ~0.25-0.5)

IMPLEMENTATION_NAMES: dict[AttentionVariant, str] = {
    AttentionVariant.softmax: "op_softmax",
    AttentionVariant.softmax1: "op_softmax1",
    AttentionVariant.clipped: "op_clipped",
    AttentionVariant.gated: "op_gated",
    AttentionVariant.softpick: "op_softpick",
    AttentionVariant.sigmoid_gate: "op_sigmoid_gate",
    AttentionVariant.sink: "op_sink",
}

# Attributes this module sets on (or reads from) attention modules.
SCORE_QUANTIZER = "op_score_quantizer"  # callable on the scaled scores (B, H, Tq, Tk), before the mask
PROB_QUANTIZER = "op_prob_quantizer"  # callable on the probabilities (B, H, Tq, Tk)
GATE = "op_gate"  # nn.Linear(hidden_size -> num_heads), gated variant only
_GATE_INPUT = "_op_gate_input"  # hidden_states stashed by the pre-hook for one forward
_GATE_HOOK = "_op_gate_hook"  # RemovableHandle of that pre-hook
_GAMMA = "op_clip_gamma"
_ZETA = "op_clip_zeta"
_ALPHA = "op_clip_alpha"  # when set: gamma = -alpha / (number of keys), Bondarenko et al.'s form


# --------------------------------------------------------------------------------------------- math


def softmax1(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax_1(x)_i = exp(x_i) / (1 + sum_j exp(x_j)), in the stable form of DESIGN.md section 1.

    m = max(max_j x_j, 0) is detached: the value does not depend on m, so the gradient is exact, and no
    gradient flows through the max (which would be -inf - -inf on fully masked rows).
    """
    m = x.detach().amax(dim=dim, keepdim=True).clamp(min=0.0)
    e = torch.exp(x - m)
    return e / (torch.exp(-m) + e.sum(dim=dim, keepdim=True))


def clipped_softmax(x: torch.Tensor, gamma: float, zeta: float = 1.0, dim: int = -1,
                    alpha: float | None = None) -> torch.Tensor:
    """clamp((zeta - gamma) * softmax(x) + gamma, 0, 1) (Bondarenko et al., 2023).

    alpha, when given, replaces gamma by -alpha / T with T = x.shape[dim] (the number of keys), the
    paper's parametrisation: the clip then scales with the sequence length. A uniform row (1/T each)
    survives the clip only for alpha < T / (T - 1), i.e. about alpha < 1. -inf logits are first raised to finfo.min, so a fully masked row gives a finite (uniform-then-
    clipped) row instead of NaN; finite logits are unchanged.
    """
    if alpha is not None:
        gamma = -alpha / x.shape[dim]
    x = x.clamp(min=torch.finfo(x.dtype).min)
    return torch.clamp((zeta - gamma) * torch.softmax(x, dim=dim) + gamma, 0.0, 1.0)


# ---------------------------------------------------------------------------------- mask handling


def _causal(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)


def _bool_mask(
    attention_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, is_causal: bool
) -> torch.Tensor | None:
    """True = attend. Materialises the causal mask transformers skips for sdpa (upper-left aligned, as
    sdpa's is_causal; transformers only skips it when that alignment is the right one)."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if attention_mask is None:
        if not (is_causal and q_len > 1):
            return None
        return torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()[None, None]
    attention_mask = attention_mask[..., :kv_len]
    if attention_mask.dtype == torch.bool:
        return attention_mask
    return attention_mask > torch.finfo(attention_mask.dtype).min / 2  # additive float mask: 0 / min


def _additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    if mask is None:
        return None
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, hd) -> (B, H_kv * n_rep, T, hd), for grouped-query attention (Llama family)."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


# ------------------------------------------------------------------------------------- the paths


def _eager(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    prob_fn: Callable[[torch.Tensor], torch.Tensor],
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit attention with the quantizer hooks; returns ((B, T, H, hd), probs (B, H, Tq, Tk))."""
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    # scaled in place: the product is fresh and matmul keeps no output for its backward (one buffer fewer)
    scores = torch.matmul(query, key.transpose(-1, -2)).mul_(scaling)  # (B, H, Tq, Tk)
    if (score_q := getattr(module, SCORE_QUANTIZER, None)) is not None:
        scores = _quantize_owned(score_q, scores)
    dtype = torch.promote_types(scores.dtype, torch.float32)  # softmax in (at least) float32, as HF eager
    scores = scores.to(dtype)
    if (mask := _additive_mask(_bool_mask(attention_mask, query, key, _causal(module, kwargs)), dtype)) is not None:
        scores = scores + mask
    probs = prob_fn(scores).to(value.dtype)
    if (prob_q := getattr(module, PROB_QUANTIZER, None)) is not None:
        probs = _quantize_owned(prob_q, probs)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value).transpose(1, 2).contiguous()  # (B, T, H, hd)
    return out, probs


def _quantize_owned(quantizer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """An attached quantizer applied to scores / probabilities _eager made and no longer reads: one
    that can (quant ActQuantizer.quantize_owned) writes into them instead of allocating its output."""
    owned = getattr(quantizer, "quantize_owned", None)
    return quantizer(x) if owned is None else owned(x)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=-1)


def _wants_eager(module: nn.Module) -> bool:
    return getattr(module, SCORE_QUANTIZER, None) is not None or getattr(module, PROB_QUANTIZER, None) is not None


# torch's CPU flash-attention op returns (output, logsumexp); a private op, so its absence is tolerated
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _sdpa_softmax1(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """softmax_1 attention on the fused kernel: a zero key/value slot prepended at position 0.

    Without autograd on the CPU and without a mask tensor, the identity softmax_1-attention =
    softmax-attention * sigmoid(logsumexp of the row's logits) is used instead: torch's CPU flash
    kernel returns that logsumexp, so softmax_1 costs what vanilla costs (the zero slot copies K and V
    and needs a dense mask: ~45% slower attention measured). Training keeps the zero slot, whose
    gradient is exact (the kernel's logsumexp output is not differentiable).
    """
    n_rep = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    q_len = query.shape[-2]
    causal = _causal(module, kwargs) and q_len > 1
    if (attention_mask is None and dropout == 0.0 and query.device.type == "cpu" and _CPU_FLASH is not None
            and not (torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad))
            and (not causal or key.shape[-2] == q_len) and query.dtype == key.dtype == value.dtype):
        out, lse = _CPU_FLASH(query, key, value, 0.0, causal, scale=scaling)[:2]  # (B, H, T, hd), (B, H, T)
        out = out * torch.sigmoid(lse).unsqueeze(-1).to(out.dtype)  # exp(lse) / (1 + exp(lse))
        return out.transpose(1, 2).contiguous()  # (B, T, H, hd)
    mask: torch.Tensor | CausalBias | None
    if attention_mask is None and causal:
        # mask skipped by transformers: sdpa's upper-left causal over the first q_len keys. With the zero
        # slot first, that is lower-right causal over 1 + q_len keys, which torch runs without a dense mask.
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        mask = causal_lower_right(q_len, q_len + 1)
    else:
        mask = _bool_mask(attention_mask, query, key, is_causal=False)
        if mask is not None:  # the zero slot is visible to every query, so no row is ever fully masked
            mask = torch.cat([mask.new_ones(*mask.shape[:-1], 1), mask], dim=-1)
    b, h, _, d = key.shape
    key = torch.cat([key.new_zeros(b, h, 1, d), key], dim=2)  # (B, H, 1 + Tk, hd); q . 0 = exactly 0
    value = torch.cat([value.new_zeros(b, h, 1, value.shape[-1]), value], dim=2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
    return out.transpose(1, 2).contiguous()  # (B, T, H, hd)


def _sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """transformers' own sdpa function (GQA, is_causal skip, kernel choice), output (B, T, H, hd)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    out, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    return out


def _gate(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """out (B, T, H, hd) * sigmoid(G(hidden_states)) (B, T, H, 1)."""
    gate, x = getattr(module, GATE, None), module.__dict__.pop(_GATE_INPUT, None)
    if gate is None or x is None:
        raise RuntimeError(
            f"{type(module).__name__} runs the gated attention implementation but carries no gate; "
            "call apply_attention_variant with every attention module of the model"
        )
    g = torch.sigmoid(gate(x))  # (B, T, H)
    assert g.shape[-1] == out.shape[2], f"gate has {g.shape[-1]} heads, attention output {out.shape[2]}"
    return out * g.unsqueeze(-1).to(out.dtype)


def op_softmax_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, Tq, hd)
    key: torch.Tensor,  # (B, H_kv, Tk, hd)
    value: torch.Tensor,  # (B, H_kv, Tk, hd)
    attention_mask: torch.Tensor | None,  # bool (True = attend) or additive float, (B, 1, Tq, Tk)
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Vanilla softmax: transformers' sdpa function, or the eager path when quantizers are attached."""
    if _wants_eager(module):
        return _eager(module, query, key, value, attention_mask, scaling, dropout, _softmax, kwargs)
    return _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs), None


def op_softmax1_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, Tq, hd)
    key: torch.Tensor,  # (B, H_kv, Tk, hd)
    value: torch.Tensor,  # (B, H_kv, Tk, hd)
    attention_mask: torch.Tensor | None,  # bool (True = attend) or additive float, (B, 1, Tq, Tk)
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """OutEffHop softmax_1 attention."""
    if _wants_eager(module):
        return _eager(module, query, key, value, attention_mask, scaling, dropout, softmax1, kwargs)
    return _sdpa_softmax1(module, query, key, value, attention_mask, scaling, dropout, kwargs), None


def op_clipped_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, Tq, hd)
    key: torch.Tensor,  # (B, H_kv, Tk, hd)
    value: torch.Tensor,  # (B, H_kv, Tk, hd)
    attention_mask: torch.Tensor | None,  # bool (True = attend) or additive float, (B, 1, Tq, Tk)
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Clipped softmax attention (always eager: the clamp has no fused form)."""
    gamma, zeta = getattr(module, _GAMMA, DEFAULT_GAMMA), getattr(module, _ZETA, DEFAULT_ZETA)
    prob_fn = functools.partial(clipped_softmax, gamma=gamma, zeta=zeta, alpha=getattr(module, _ALPHA, None))
    return _eager(module, query, key, value, attention_mask, scaling, dropout, prob_fn, kwargs)


def op_gated_attention(
    module: nn.Module,
    query: torch.Tensor,  # (B, H, Tq, hd)
    key: torch.Tensor,  # (B, H_kv, Tk, hd)
    value: torch.Tensor,  # (B, H_kv, Tk, hd)
    attention_mask: torch.Tensor | None,  # bool (True = attend) or additive float, (B, 1, Tq, Tk)
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated attention: softmax attention times a per-token, per-head sigmoid gate."""
    if _wants_eager(module):
        out, probs = _eager(module, query, key, value, attention_mask, scaling, dropout, _softmax, kwargs)
        return _gate(module, out), probs
    return _gate(module, _sdpa(module, query, key, value, attention_mask, scaling, dropout, kwargs)), None


_FUNCTIONS: dict[AttentionVariant, Callable] = {
    AttentionVariant.softmax: op_softmax_attention,
    AttentionVariant.softmax1: op_softmax1_attention,
    AttentionVariant.clipped: op_clipped_attention,
    AttentionVariant.gated: op_gated_attention,
}


def register_attention_functions() -> dict[AttentionVariant, str]:
    """Register every variant in transformers' AttentionInterface and AttentionMaskInterface (idempotent).

    The mask registration matters: transformers builds no mask at all for an implementation name it does
    not know, which would silently drop the causal and padding masks. Our functions take sdpa's boolean
    masks (and materialise the causal mask sdpa leaves to `is_causal`).
    """
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    from outlier_probe import attention_2025 as a25

    functions = {**_FUNCTIONS, AttentionVariant.softpick: a25.op_softpick_attention,
                 AttentionVariant.sigmoid_gate: a25.op_sigmoid_gate_attention, AttentionVariant.sink: a25.op_sink_attention}
    for variant, name in IMPLEMENTATION_NAMES.items():
        AttentionInterface.register(name, functions[variant])
        AttentionMaskInterface.register(name, sdpa_mask)
    return dict(IMPLEMENTATION_NAMES)


# ------------------------------------------------------------------------------------ model-level


def _stash_gate_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    module.__dict__[_GATE_INPUT] = x  # plain attribute: never a buffer, never saved


def _attach_gate(module: nn.Module, hidden_size: int, num_heads: int, gate_init: float) -> None:
    ref = next(module.parameters())
    gate = nn.Linear(hidden_size, num_heads, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        gate.weight.zero_()  # input-independent at start: sigmoid(bias) = gate_init exactly
        gate.bias.fill_(math.log(gate_init / (1.0 - gate_init)))
    module.add_module(GATE, gate)
    if getattr(module, _GATE_HOOK, None) is None:
        setattr(module, _GATE_HOOK, module.register_forward_pre_hook(_stash_gate_input, with_kwargs=True))


def _detach_gate(module: nn.Module) -> None:
    if (handle := getattr(module, _GATE_HOOK, None)) is not None:
        handle.remove()
        delattr(module, _GATE_HOOK)
    if GATE in module._modules:
        del module._modules[GATE]
    module.__dict__.pop(_GATE_INPUT, None)


def _set_implementation(model: nn.Module, modules: list[tuple[str, nn.Module]], name: str) -> None:
    """Switch the model (every sub-model and sub-config) to `name`, and check each attention module sees it."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    for mod_name, module in modules:
        config = getattr(module, "config", None)
        if config is not None and config._attn_implementation != name:
            config._attn_implementation = name  # a sub-config transformers did not reach
        if config is None or config._attn_implementation != name:
            raise UsageError(
                f"could not switch attention module {mod_name!r} ({type(module).__name__}) to {name!r}: it has no "
                "config._attn_implementation; this model family does not use transformers' AttentionInterface"
            )


def attention_implementation(model: nn.Module) -> str | None:
    """The implementation name the model's top-level config dispatches to."""
    config = getattr(model, "config", None)
    return None if config is None else config._attn_implementation


def is_hookable(model: nn.Module) -> bool:
    """Whether op_score_quantizer / op_prob_quantizer set on the model's attention modules will be used."""
    return attention_implementation(model) in IMPLEMENTATION_NAMES.values()


def apply_attention_variant(
    model: nn.Module,
    variant: AttentionVariant,
    *,
    modules: list[tuple[str, nn.Module]],
    hidden_size: int,
    num_heads: int,
    gamma: float = DEFAULT_GAMMA,
    zeta: float = DEFAULT_ZETA,
    alpha: float | None = None,
    gate_init: float = DEFAULT_GATE_INIT,
    hookable: bool = False,
) -> dict[str, Any]:
    """Make `model` compute attention with `variant`; returns the metadata to record in config.json.

    modules: every self-attention module (the ones calling the AttentionInterface), from arch.py.
    softmax keeps the model's own implementation unless hookable=True, which switches to "op_softmax"
    (same numbers; honours op_score_quantizer / op_prob_quantizer). The other variants always do.
    Gates (gated) are fresh submodules `<attn>.op_gate`, so create them before loading gated weights.
    """
    variant = AttentionVariant(variant)
    if not modules:
        raise UsageError("no attention modules given; arch.attention_modules(model) found none for this model")
    if variant is AttentionVariant.clipped and not (gamma <= 0.0 and zeta >= 1.0):
        raise UsageError(f"clipped softmax needs gamma <= 0 and zeta >= 1 (got gamma={gamma}, zeta={zeta})")
    if variant is AttentionVariant.clipped and alpha is not None and not alpha >= 0.0:
        raise UsageError(f"clipped softmax needs alpha >= 0 (gamma = -alpha / T), got {alpha}")
    if variant is AttentionVariant.gated and not 0.0 < gate_init < 1.0:
        raise UsageError(f"gate_init must be in (0, 1), got {gate_init}")
    names = register_attention_functions()
    from outlier_probe import attention_2025 as a25

    for _, module in modules:
        if variant is AttentionVariant.gated:
            if GATE not in module._modules:
                _attach_gate(module, hidden_size, num_heads, gate_init)
        else:
            _detach_gate(module)
        a25.detach(module, variant.value)
        a25.attach(module, variant.value, hidden_size, num_heads)
        if variant is AttentionVariant.clipped:
            setattr(module, _GAMMA, float(gamma))
            setattr(module, _ZETA, float(zeta))
            if alpha is None:
                module.__dict__.pop(_ALPHA, None)
            else:
                setattr(module, _ALPHA, float(alpha))

    # softmax also switches when hookable, or to leave a variant set earlier on this model
    if variant is not AttentionVariant.softmax or hookable or attention_implementation(model) in names.values():
        _set_implementation(model, modules, names[variant])

    meta: dict[str, Any] = {"attention": variant.value}
    if variant is AttentionVariant.clipped:
        meta.update(gamma=float(gamma), zeta=float(zeta))
        if alpha is not None:
            meta.update(alpha=float(alpha))
    elif variant is AttentionVariant.gated:
        meta.update(gate_init=float(gate_init))
    return meta


def parse_attention_metadata(meta: dict[str, Any] | None) -> tuple[AttentionVariant, dict[str, float]]:
    """Inverse of apply_attention_variant's return value: (variant, keyword arguments). None -> softmax."""
    if not meta:
        return AttentionVariant.softmax, {}
    try:
        variant = AttentionVariant(meta["attention"])
    except (KeyError, ValueError) as e:
        choices = ", ".join(v.value for v in AttentionVariant)
        raise UsageError(f"unknown attention metadata {meta!r}; 'attention' must be one of {choices}") from e
    keys = {"clipped": ("gamma", "zeta", "alpha"), "gated": ("gate_init",)}.get(variant.value, ())
    return variant, {k: float(meta[k]) for k in keys if k in meta}
