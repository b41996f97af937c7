"""Attention variants: the math against references, and tiny BERT / GPT-2 / OPT / Llama / ViT models."""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
from torch import nn

from outlier_probe.attention import (
    IMPLEMENTATION_NAMES,
    apply_attention_variant,
    attention_implementation,
    clipped_softmax,
    is_hookable,
    op_softmax1_attention,
    op_softmax_attention,
    parse_attention_metadata,
    register_attention_functions,
    softmax1,
)
from outlier_probe.config import AttentionVariant
from outlier_probe.errors import UsageError

V = AttentionVariant
VOCAB, T = 64, 8


# ------------------------------------------------------------------------------------------ math


def _reference_softmax1(x: torch.Tensor) -> torch.Tensor:
    """Plain softmax over the logits plus one extra logit fixed at 0, dropped afterwards."""
    padded = torch.cat([x, torch.zeros_like(x[..., :1])], dim=-1)
    return torch.softmax(padded, dim=-1)[..., :-1]


def _wrong_softmax1(x: torch.Tensor) -> torch.Tensor:
    """A classic bug: the '1' put at the row max instead of at logit 0."""
    m = x.amax(dim=-1, keepdim=True)
    e = torch.exp(x - m)
    return e / (1 + e.sum(dim=-1, keepdim=True))


def _agrees_with_reference(fn, x: torch.Tensor) -> bool:  # noqa: ANN001
    return torch.allclose(fn(x), _reference_softmax1(x), atol=1e-6, rtol=0)


LOGITS = {
    "random": lambda: torch.randn(4, 3, 7, generator=torch.Generator().manual_seed(0)) * 3,
    "huge": lambda: torch.tensor([[1e4, 1e4 - 1.0, 0.0, -5.0], [80.0, 90.0, 100.0, 95.0]]),
    "tiny": lambda: torch.tensor([[-1e4, -2e4, -1e4 + 3, -30.0], [-100.0, -90.0, -95.0, -99.0]]),
    "mixed": lambda: torch.tensor([[2.0, -1.0, 0.5, 0.0], [-3.0, -2.0, -4.0, -1.0]]),
}


@pytest.mark.parametrize("kind", list(LOGITS))
def test_softmax1_equals_softmax_with_extra_zero_logit(kind: str) -> None:
    x = LOGITS[kind]()
    assert _agrees_with_reference(softmax1, x)
    x64 = x.double()
    torch.testing.assert_close(softmax1(x64), _reference_softmax1(x64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["random", "huge", "mixed"])
def test_reference_check_rejects_extra_logit_at_row_max(kind: str) -> None:
    x = LOGITS[kind]()
    assert not _agrees_with_reference(_wrong_softmax1, x)


def test_softmax1_known_values() -> None:
    out = softmax1(torch.tensor([0.0, 0.0, 0.0]))
    torch.testing.assert_close(out, torch.full((3,), 0.25))  # e^0 / (1 + 3 e^0)
    out = softmax1(torch.tensor([-1e4, -1e4]))
    assert torch.all(out == 0)  # the head attends to nothing


@pytest.mark.parametrize("fill", [-1e4, torch.finfo(torch.float32).min, float("-inf")])
@pytest.mark.parametrize("fn", ["softmax1", "clipped"])
def test_fully_masked_rows_forward_and_backward_finite(fill: float, fn: str) -> None:
    x = torch.randn(3, 5)
    x[1] = fill  # a fully masked row
    x[2, :3] = fill  # a partly masked row
    x.requires_grad_(True)
    f = softmax1 if fn == "softmax1" else functools.partial(clipped_softmax, gamma=-0.03, zeta=1.0)
    out = f(x)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert torch.all(out[2, :3] == 0)  # masked logits get exactly no weight
    if fn == "softmax1":
        assert torch.all(out[1] == 0)


def test_softmax1_gradient_matches_reference() -> None:
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64)
    (g,) = torch.autograd.grad((softmax1(x) * w).sum(), x)
    (g_ref,) = torch.autograd.grad((_reference_softmax1(x) * w).sum(), x)
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=0)


def test_clipped_softmax_formula() -> None:
    x = torch.tensor([[4.0, 0.0, -3.0, 1.0]])
    p = torch.softmax(x, -1)
    gamma, zeta = -0.05, 1.02
    expected = torch.clamp((zeta - gamma) * p + gamma, 0, 1)
    torch.testing.assert_close(clipped_softmax(x, gamma, zeta), expected)
    out = clipped_softmax(x, gamma, zeta)
    assert out[0, 2] == 0  # small probabilities are clipped to exactly 0
    assert clipped_softmax(torch.tensor([50.0, 0.0]), gamma, zeta)[0] == 1  # and large ones to exactly 1
    torch.testing.assert_close(clipped_softmax(x, 0.0, 1.0), p)  # gamma=0, zeta=1 is plain softmax


def test_clipped_softmax_alpha_scales_gamma_with_the_number_of_keys() -> None:
    x = torch.randn(3, 50, dtype=torch.float64)
    torch.testing.assert_close(clipped_softmax(x, gamma=-9.0, alpha=0.5), clipped_softmax(x, gamma=-0.5 / 50))
    uniform = torch.zeros(1, 50)  # a fresh ViT's CLS row over 49 patches + itself, roughly
    assert clipped_softmax(uniform, gamma=-0.025).sum() == 0  # fixed gamma: the row is clipped away
    assert clipped_softmax(uniform, gamma=0.0, alpha=0.5).sum() == pytest.approx(1.0 - 0.5 + 0.5 / 50)


# ------------------------------------------------------------------- attention functions, directly


class _Attn(nn.Module):
    def __init__(self, is_causal: bool, groups: int = 1) -> None:
        super().__init__()
        self.is_causal = is_causal
        self.num_key_value_groups = groups


def _reference_attention(q, k, v, bool_mask, scaling, prob_fn):  # noqa: ANN001, ANN202
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scaling
    if bool_mask is not None:
        s = s.masked_fill(~bool_mask, torch.finfo(s.dtype).min)
    return (prob_fn(s) @ v).transpose(1, 2)


def _qkv(b=2, h=4, h_kv=2, tq=5, tk=5, d=8):  # noqa: ANN001, ANN202
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, h, tq, d, generator=g), torch.randn(b, h_kv, tk, d, generator=g),
            torch.randn(b, h_kv, tk, d, generator=g))


def _masks(b: int, tq: int, tk: int) -> dict[str, torch.Tensor]:
    causal = torch.ones(tq, tk, dtype=torch.bool).tril(tk - tq)[None, None].expand(b, 1, tq, tk).clone()
    causal[1, :, :, :2] = False  # left padding on the second sequence
    causal[1, :, 0, :] = False  # and a fully masked row
    float_mask = torch.where(causal, 0.0, torch.finfo(torch.float32).min)
    return {"bool": causal, "float": float_mask}


@pytest.mark.parametrize("mask_kind", ["none-causal", "none-bidirectional", "bool", "float"])
@pytest.mark.parametrize(("tq", "tk"), [(5, 5), (1, 5), (5, 7)])
def test_softmax1_fused_and_eager_equal_reference(mask_kind: str, tq: int, tk: int) -> None:
    q, k, v = _qkv(tq=tq, tk=tk)
    is_causal = mask_kind != "none-bidirectional"
    module = _Attn(is_causal=is_causal, groups=2)
    masks = _masks(2, tq, tk)
    mask = masks.get(mask_kind)
    if mask_kind == "none-causal":  # transformers' sdpa semantics: upper-left causal, none for one query
        ref_mask = torch.ones(tq, tk, dtype=torch.bool).tril()[None, None] if tq > 1 else None
    else:
        ref_mask = masks["bool"] if mask is not None else None
    ref = _reference_attention(q, k, v, ref_mask, 0.3, softmax1)

    fast, w = op_softmax1_attention(module, q, k, v, mask, scaling=0.3)
    assert w is None and fast.shape == (2, tq, 4, 8)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=0)

    module.op_prob_quantizer = lambda p: p  # forces the eager path
    eager, probs = op_softmax1_attention(module, q, k, v, mask, scaling=0.3)
    torch.testing.assert_close(eager, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(eager, fast, atol=1e-5, rtol=0)
    if mask_kind in ("bool", "float"):
        assert torch.all(probs[1, :, :, :2] == 0)  # padded keys get no weight
        assert torch.all(fast[1, 0] == 0)  # a fully masked row attends to nothing: output 0


@pytest.mark.parametrize("is_causal", [True, False])
def test_softmax1_inference_route_equals_zero_slot_route(monkeypatch: pytest.MonkeyPatch, is_causal: bool) -> None:
    """Without autograd the CPU path uses out * sigmoid(logsumexp) from torch's flash kernel; with
    autograd the zero key/value slot. Both equal the reference."""
    import outlier_probe.attention as attention_module

    if attention_module._CPU_FLASH is None:
        pytest.skip("this torch has no _scaled_dot_product_flash_attention_for_cpu")
    calls = []
    real = attention_module._CPU_FLASH
    monkeypatch.setattr(attention_module, "_CPU_FLASH", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = _qkv(tq=6, tk=6)
    module = _Attn(is_causal=is_causal, groups=2)
    ref_mask = torch.ones(6, 6, dtype=torch.bool).tril()[None, None] if is_causal else None
    ref = _reference_attention(q, k, v, ref_mask, 0.3, softmax1)
    with torch.no_grad():
        inference, _ = op_softmax1_attention(module, q, k, v, None, scaling=0.3)
    assert calls == [1]
    slot, _ = op_softmax1_attention(module, q, k, v.clone().requires_grad_(True), None, scaling=0.3)
    assert calls == [1]  # autograd: the zero-slot route
    torch.testing.assert_close(inference, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(slot.detach(), ref, atol=1e-5, rtol=0)


def test_softmax1_fused_gradients_equal_eager() -> None:
    q, k, v = (t.double().requires_grad_(True) for t in _qkv())
    mask = _masks(2, 5, 5)["bool"]
    grads = []
    for force_eager in (False, True):
        module = _Attn(is_causal=True, groups=2)
        if force_eager:
            module.op_score_quantizer = lambda s: s
        for m in (None, mask):
            out, _ = op_softmax1_attention(module, q, k, v, m, scaling=0.3)
            grads.append(torch.autograd.grad((out * out).sum(), (q, k, v)))
    for fast, eager in zip(grads[:2], grads[2:]):
        for a, b in zip(fast, eager):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_quantizer_hooks_see_scores_and_probabilities() -> None:
    q, k, v = _qkv(h_kv=4)
    mask = _masks(2, 5, 5)["bool"]
    module = _Attn(is_causal=True)
    seen: dict[str, torch.Tensor] = {}
    module.op_score_quantizer = lambda s: seen.setdefault("scores", s.detach().clone())
    module.op_prob_quantizer = lambda p: seen.setdefault("probs", p.detach().clone())
    out, probs = op_softmax1_attention(module, q, k, v, mask, scaling=0.5)

    scores = q @ k.transpose(-1, -2) * 0.5
    torch.testing.assert_close(seen["scores"], scores)  # scaled, before the mask is added
    expected_probs = softmax1(scores.masked_fill(~mask, torch.finfo(torch.float32).min))
    torch.testing.assert_close(seen["probs"], expected_probs)
    torch.testing.assert_close(probs, expected_probs)

    # what the quantizers return is what the attention uses
    module.op_prob_quantizer = lambda p: torch.zeros_like(p)
    out, _ = op_softmax1_attention(module, q, k, v, mask, scaling=0.5)
    assert torch.all(out == 0)
    module.op_prob_quantizer = None
    module.op_score_quantizer = lambda s: torch.zeros_like(s)  # all logits 0: uniform over the visible keys
    out, probs = op_softmax_attention(module, q, k, v, mask, scaling=0.5)
    visible = mask.float()
    torch.testing.assert_close(probs[0], (visible / visible.sum(-1, keepdim=True))[0].expand(4, 5, 5))


def test_register_is_idempotent() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    first = register_attention_functions()
    second = register_attention_functions()
    assert first == second == IMPLEMENTATION_NAMES
    for name in IMPLEMENTATION_NAMES.values():
        assert name in ALL_ATTENTION_FUNCTIONS.valid_keys()
        assert name in ALL_MASK_ATTENTION_FUNCTIONS  # without it the causal mask would be silently dropped


# ------------------------------------------------------------------------------------ tiny models


def _bert():  # noqa: ANN202
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    return BertForMaskedLM, cfg


def _gpt2():  # noqa: ANN202
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32, bos_token_id=1, eos_token_id=1,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel, cfg


def _opt():  # noqa: ANN202
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                    max_position_embeddings=32, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0,
                    pad_token_id=0)
    return OPTForCausalLM, cfg


def _llama():  # noqa: ANN202
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # GQA
    return LlamaForCausalLM, cfg


def _vit():  # noqa: ANN202
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTForImageClassification, cfg


FAMILIES = {"bert": _bert, "gpt2": _gpt2, "opt": _opt, "llama": _llama, "vit": _vit}
CAUSAL = ("gpt2", "opt", "llama")
TEXT = ("bert", "gpt2", "opt", "llama")


@functools.lru_cache(maxsize=None)
def _calls_attention_interface(cls: type) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Stand-in for arch.attention_modules: modules whose forward dispatches through the interface."""
    return [(n, m) for n, m in model.named_modules() if _calls_attention_interface(type(m))]


def _build(family: str, variant: AttentionVariant | None = None, seed: int = 0, **kw):  # noqa: ANN003, ANN202
    cls, cfg = FAMILIES[family]()
    torch.manual_seed(seed)
    model = cls._from_config(copy.deepcopy(cfg)).eval()
    meta = None
    if variant is not None:
        meta = _apply(model, variant, **kw)
    return model, meta


def _apply(model: nn.Module, variant: AttentionVariant, **kw) -> dict:  # noqa: ANN003
    cfg = model.config
    return apply_attention_variant(model, variant, modules=_attention_modules(model), hidden_size=cfg.hidden_size,
                                   num_heads=cfg.num_attention_heads, **kw)


def _inputs(family: str, seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g)}
    ids = torch.randint(1, VOCAB, (batch, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _labels(family: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    if family == "vit":
        return torch.arange(inputs["pixel_values"].shape[0]) % 3
    return inputs["input_ids"].clone()


def _out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits


def _set_quantizers(model: nn.Module, score=None, prob=None) -> None:  # noqa: ANN001
    for _, m in _attention_modules(model):
        m.op_score_quantizer, m.op_prob_quantizer = score, prob


ALL = [(f, v) for f in FAMILIES for v in V]


def test_test_helper_finds_one_attention_module_per_layer() -> None:
    for family in FAMILIES:
        model, _ = _build(family)
        assert len(_attention_modules(model)) == 2, family


@pytest.mark.parametrize(("family", "variant"), ALL)
def test_variant_dispatches_in_every_layer_and_is_finite(family: str, variant: AttentionVariant) -> None:
    model, meta = _build(family, variant, hookable=True)
    name = IMPLEMENTATION_NAMES[variant]
    assert attention_implementation(model) == name
    assert all(m.config._attn_implementation == name for _, m in _attention_modules(model))
    calls: list[tuple[int, ...]] = []
    _set_quantizers(model, score=lambda s: (calls.append(tuple(s.shape)), s)[1])
    inputs = _inputs(family)
    out = _out(model, inputs)
    assert torch.isfinite(out).all()
    n_tokens = 5 if family == "vit" else T  # 4 patches + CLS
    heads = model.config.num_attention_heads
    assert calls == [(2, heads, n_tokens, n_tokens)] * 2  # our function ran once in each of the 2 layers
    assert meta["attention"] == variant.value


@pytest.mark.parametrize(("family", "variant"), [a for a in ALL if a[1] is not V.softmax])
def test_variant_changes_outputs(family: str, variant: AttentionVariant) -> None:
    inputs = _inputs(family)
    base, _ = _build(family)
    model, _ = _build(family, variant)
    assert (_out(model, inputs) - _out(base, inputs)).abs().max() > 1e-4


@pytest.mark.parametrize("family", list(FAMILIES))
def test_softmax_keeps_fast_path_unless_hookable(family: str) -> None:
    inputs = _inputs(family)
    base, _ = _build(family)
    before = attention_implementation(base)
    model, meta = _build(family, V.softmax)
    assert meta == {"attention": "softmax"}
    assert attention_implementation(model) == before == "sdpa"
    assert not is_hookable(model)
    hooked, _ = _build(family, V.softmax, hookable=True)
    assert attention_implementation(hooked) == "op_softmax" and is_hookable(hooked)
    torch.testing.assert_close(_out(hooked, inputs), _out(base, inputs), atol=1e-6, rtol=0)
    _set_quantizers(hooked, prob=lambda p: p)  # eager path, same numbers
    torch.testing.assert_close(_out(hooked, inputs), _out(base, inputs), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_softmax1_fused_path_equals_eager_path(family: str) -> None:
    model, _ = _build(family, V.softmax1)
    inputs = _inputs(family)
    if family in TEXT:
        inputs["attention_mask"][1, :3] = 0  # padding (left), keeps the mask materialised
    fast = _out(model, inputs)
    _set_quantizers(model, score=lambda s: s, prob=lambda p: p)
    eager = _out(model, inputs)
    torch.testing.assert_close(fast, eager, atol=1e-5, rtol=0)
    assert fast.abs().max() > 1e-3  # not a vacuous comparison of zeros


@pytest.mark.parametrize("eager", [False, True])
@pytest.mark.parametrize("variant", list(V))
@pytest.mark.parametrize("family", CAUSAL)
def test_causal_mask_holds(family: str, variant: AttentionVariant, eager: bool) -> None:
    model, _ = _build(family, variant, hookable=True)
    if eager:
        _set_quantizers(model, prob=lambda p: p)
    inputs = _inputs(family)
    out = _out(model, inputs)
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][:, -1] = torch.where(inputs["input_ids"][:, -1] == 5, 6, 5)
    out2 = _out(model, changed)
    torch.testing.assert_close(out2[:, :-1], out[:, :-1], atol=1e-6, rtol=0)  # the future is invisible
    assert (out2[:, -1] - out[:, -1]).abs().max() > 1e-4  # but the token itself did change
    first = {k: v.clone() for k, v in inputs.items()}
    first["input_ids"][:, 0] = torch.where(inputs["input_ids"][:, 0] == 5, 6, 5)
    assert (_out(model, first)[:, -1] - out[:, -1]).abs().max() > 1e-5  # and the past is visible


@pytest.mark.parametrize("variant", list(V))
@pytest.mark.parametrize("family", TEXT)
def test_padded_keys_get_no_weight(family: str, variant: AttentionVariant) -> None:
    model, _ = _build(family, variant, hookable=True)
    inputs = _inputs(family)
    pad = slice(0, 3) if family in CAUSAL else slice(T - 3, T)  # left padding for decoders, right for BERT
    real = slice(3, T) if family in CAUSAL else slice(0, T - 3)
    inputs["attention_mask"][1, pad] = 0
    out = _out(model, inputs)
    other = {k: v.clone() for k, v in inputs.items()}
    other["input_ids"][1, pad] = torch.where(inputs["input_ids"][1, pad] == 5, 6, 5)
    out2 = _out(model, other)  # fast path: padded tokens' content cannot reach the real tokens
    torch.testing.assert_close(out2[1, real], out[1, real], atol=1e-6, rtol=0)
    torch.testing.assert_close(out2[0], out[0], atol=1e-6, rtol=0)

    probs: list[torch.Tensor] = []
    _set_quantizers(model, prob=lambda p: (probs.append(p.detach()), p)[1])
    _out(model, inputs)
    assert len(probs) == 2
    for p in probs:
        assert torch.all(p[1, :, real, pad] == 0)
        assert p[0, :, real, pad].abs().sum() > 0  # the unpadded sequence does attend there


@pytest.mark.parametrize(("family", "variant"), ALL)
def test_few_steps_decrease_loss(family: str, variant: AttentionVariant) -> None:
    model, _ = _build(family, variant, hookable=True)
    inputs = _inputs(family, batch=4)
    labels = _labels(family, inputs)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        loss = model(**inputs, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gates_start_at_gate_init_train_and_round_trip(family: str) -> None:
    model, meta = _build(family, V.gated, gate_init=0.3)
    assert meta == {"attention": "gated", "gate_init": 0.3}
    modules = _attention_modules(model)
    gate_keys = [k for k in model.state_dict() if ".op_gate." in k]
    assert len(gate_keys) == 4  # weight + bias in each of the 2 layers
    assert all(any(k.startswith(n + ".op_gate.") for k in gate_keys) for n, _ in modules)
    x = torch.randn(2, 3, model.config.hidden_size)
    for _, m in modules:
        torch.testing.assert_close(torch.sigmoid(m.op_gate(x)), torch.full((2, 3, m.op_gate.out_features), 0.3))

    inputs = _inputs(family)
    model(**inputs, labels=_labels(family, inputs)).loss.backward()
    assert all(m.op_gate.weight.grad.abs().sum() > 0 for _, m in modules)  # the gates train

    with torch.no_grad():
        for _, m in modules:
            m.op_gate.weight.normal_()
    fresh, _ = _build(family, seed=1)
    _apply(fresh, V.gated, gate_init=0.3)
    fresh.load_state_dict(model.state_dict())  # strict: the gate keys match
    torch.testing.assert_close(_out(fresh, inputs), _out(model, inputs), atol=1e-6, rtol=0)


def test_gate_scales_each_head_output() -> None:
    model, _ = _build("llama")
    inputs = _inputs("llama")
    contexts: list[torch.Tensor] = []  # input of layer 0's o_proj: the per-head attention output
    o_proj = _attention_modules(model)[0][1].o_proj
    o_proj.register_forward_pre_hook(lambda mod, args: contexts.append(args[0].detach()))
    _out(model, inputs)
    _apply(model, V.gated, gate_init=0.25)
    _out(model, inputs)
    # layer 0 sees identical inputs, so its context is exactly gate_init times the softmax context
    torch.testing.assert_close(contexts[1], 0.25 * contexts[0], atol=1e-6, rtol=0)


def test_switching_variants_removes_gates_and_restores_dispatch() -> None:
    model, _ = _build("opt", V.gated)
    _apply(model, V.softmax1)
    assert not any(".op_gate." in k for k in model.state_dict())
    assert attention_implementation(model) == "op_softmax1"
    _apply(model, V.softmax)  # leaves no stale variant behind
    assert attention_implementation(model) == "op_softmax"
    base, _ = _build("opt")
    inputs = _inputs("opt")
    torch.testing.assert_close(_out(model, inputs), _out(base, inputs), atol=1e-6, rtol=0)


def test_clipped_parameters_are_stored_and_validated() -> None:
    model, meta = _build("bert", V.clipped, gamma=-0.1, zeta=1.05)
    assert meta == {"attention": "clipped", "gamma": -0.1, "zeta": 1.05}
    assert all(m.op_clip_gamma == -0.1 and m.op_clip_zeta == 1.05 for _, m in _attention_modules(model))
    with pytest.raises(UsageError, match="gamma <= 0"):
        _build("bert", V.clipped, gamma=0.1)
    model, meta = _build("vit", V.clipped, alpha=0.5)
    assert meta["alpha"] == 0.5 and all(m.op_clip_alpha == 0.5 for _, m in _attention_modules(model))
    with pytest.raises(UsageError, match="alpha >= 0"):
        _build("bert", V.clipped, alpha=-1.0)
    with pytest.raises(UsageError, match="gate_init"):
        _build("bert", V.gated, gate_init=1.0)


def test_metadata_round_trip() -> None:
    for variant, kw in [(V.softmax, {}), (V.softmax1, {}), (V.clipped, {"gamma": -0.02, "zeta": 1.0}),
                        (V.clipped, {"gamma": -0.025, "zeta": 1.0, "alpha": 0.5}),
                        (V.gated, {"gate_init": 0.4})]:
        model, meta = _build("gpt2", variant, **kw)
        assert parse_attention_metadata(meta) == (variant, kw)
    assert parse_attention_metadata(None) == (V.softmax, {})
    with pytest.raises(UsageError, match="one of"):
        parse_attention_metadata({"attention": "softmax2"})


def _more_families():  # noqa: ANN202
    from transformers import (DistilBertConfig, DistilBertForMaskedLM, MistralConfig, MistralForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM, RobertaConfig, RobertaForMaskedLM)

    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return {
        "distilbert": (DistilBertForMaskedLM, DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2,
                                                               hidden_dim=64, max_position_embeddings=32)),
        "roberta": (RobertaForMaskedLM, RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                      num_attention_heads=2, intermediate_size=64,
                                                      max_position_embeddings=40, pad_token_id=0)),
        "mistral": (MistralForCausalLM, MistralConfig(**small)),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**small)),
    }


@pytest.mark.parametrize("variant", list(V))
@pytest.mark.parametrize("family", ["distilbert", "roberta", "mistral", "qwen2"])
def test_other_families_dispatch(family: str, variant: AttentionVariant) -> None:
    cls, cfg = _more_families()[family]
    torch.manual_seed(0)
    model = cls._from_config(copy.deepcopy(cfg)).eval()
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_heads
    hidden = getattr(cfg, "hidden_size", None) or cfg.dim
    modules = _attention_modules(model)
    assert len(modules) == 2
    apply_attention_variant(model, variant, modules=modules, hidden_size=hidden, num_heads=heads, hookable=True)
    calls: list[tuple[int, ...]] = []
    _set_quantizers(model, score=lambda s: (calls.append(tuple(s.shape)), s)[1])
    inputs = _inputs(family)
    inputs["attention_mask"][1, -2:] = 0
    out = _out(model, inputs)
    assert torch.isfinite(out).all()
    assert calls == [(2, heads, T, T)] * 2


@pytest.mark.parametrize("variant", list(V))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_incremental_decoding_matches_full_forward(family: str, variant: AttentionVariant) -> None:
    model, _ = _build(family, variant, hookable=True)
    ids = _inputs(family)["input_ids"]
    full = model(input_ids=ids).logits
    out = model(input_ids=ids[:, :5], use_cache=True)
    steps = [out.logits]
    cache = out.cache
    for t in range(5, T):  # one query token at a time against the cache (q_len == 1)
        out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
        cache = out.cache
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", list(V))
def test_attention_dropout_in_training_mode(variant: AttentionVariant) -> None:
    cls, cfg = _opt()
    cfg.attention_dropout = 0.5
    torch.manual_seed(0)
    model = cls._from_config(copy.deepcopy(cfg))
    _apply(model, variant, hookable=True)
    inputs = _inputs("opt")
    model.train()
    a, b = _out(model, inputs), _out(model, inputs)
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4  # dropout is live
    model.eval()
    torch.testing.assert_close(_out(model, inputs), _out(model, inputs))
