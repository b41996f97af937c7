"""softpick, sigmoid-gate and sink: closed forms against float64 references, sink 0 == softmax_1 exactly,
the gate's placement (per head and channel, before the output projection), training signal and the
checkpoint round trip through load_model. Dispatch, masks and decoding of every variant are covered by
tests/test_attention.py, which iterates over every AttentionVariant."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

from outlier_probe import arch
from outlier_probe.attention import softmax1
from outlier_probe.attention_2025 import GATE_OUT, SINK, sink_softmax, softpick
from outlier_probe.config import AttentionVariant as V
from outlier_probe.config import LoadConfig
from outlier_probe.loading import load_model, set_attention

MIN = torch.finfo(torch.float32).min


def softpick_reference(x: list[float], eps: float = 1e-6) -> list[float]:
    """The paper's formula, term by term in float64 (math.exp), masked (None) keys left out."""
    terms = [None if v is None else math.exp(v) - 1.0 for v in x]
    den = sum(abs(t) for t in terms if t is not None) + eps
    return [0.0 if t is None else max(t, 0.0) / den for t in terms]


@pytest.mark.parametrize("row", [
    [0.3, -1.2, 2.0, 0.0, -0.5],
    [-3.0, -2.0, -4.0, -1.0, -0.1],  # every logit negative: every weight is 0
    [60.0, 59.0, 10.0, -5.0, 0.0],  # e^60 overflows nothing in float64, and nothing in the stable float32 form
    [80.0, 79.5, 1.0, None, None],  # masked keys (finfo.min) are left out of the sum
    [1e-3, -1e-3, 2e-3, 0.0, 5e-4],  # near 0: e^x - 1 without cancellation trouble at this precision
])
def test_softpick_matches_float64_reference(row: list[float | None]) -> None:
    x = torch.tensor([[MIN if v is None else v for v in row]], dtype=torch.float32)
    got = softpick(x)
    assert torch.isfinite(got).all()
    expected = torch.tensor([softpick_reference(row)], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)


def test_softpick_fully_masked_row_and_gradient_are_finite() -> None:
    x = torch.tensor([[MIN, MIN, MIN], [0.5, MIN, 100.0]], requires_grad=True)
    y = softpick(x)
    assert torch.equal(y[0], torch.zeros(3))
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_softpick_gradient_matches_float64_autograd() -> None:
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 7, generator=gen, dtype=torch.float64)).requires_grad_()
    w = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    naive = (torch.relu(torch.exp(x) - 1) / ((torch.exp(x) - 1).abs().sum(-1, keepdim=True) + 1e-6) * w).sum()
    (g_ref,) = torch.autograd.grad(naive, x)
    x32 = x.detach().float().requires_grad_()
    (softpick(x32) * w.float()).sum().backward()
    torch.testing.assert_close(x32.grad.double(), g_ref, atol=1e-4, rtol=1e-4)


def test_sink_zero_is_softmax1_exactly() -> None:
    gen = torch.Generator().manual_seed(0)
    x = 5 * torch.randn(2, 3, 4, 6, generator=gen)
    x[..., -1] = MIN
    assert torch.equal(sink_softmax(x, torch.zeros(1, 3, 1, 1)), softmax1(x))


def test_sink_matches_float64_reference() -> None:
    gen = torch.Generator().manual_seed(1)
    x = 4 * torch.randn(3, 5, generator=gen, dtype=torch.float64)
    s = torch.tensor([[-1.0], [0.5], [30.0]], dtype=torch.float64)
    expected = torch.exp(x) / (torch.exp(s) + torch.exp(x).sum(-1, keepdim=True))
    torch.testing.assert_close(sink_softmax(x.float(), s.float()).double(), expected, atol=1e-7, rtol=1e-5)


def _model(family: str, variant: V | None, tiny_model: Callable[[str], nn.Module]) -> nn.Module:
    model = tiny_model(family)
    if variant is not None:
        set_attention(model, variant)
    return model


def _ids(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (2, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("family", ["bert", "gpt2", "opt", "llama"])
def test_sink_model_at_zero_equals_softmax1_model(family: str, tiny_model: Callable[[str], nn.Module]) -> None:
    x = _ids()
    with torch.no_grad():
        a = _model(family, V.softmax1, tiny_model)
        b = _model(family, V.sink, tiny_model)
        for _, m in arch.attention_modules(a):  # softmax1's eager path: the same arithmetic as sink's
            m.op_prob_quantizer = nn.Identity()
        torch.testing.assert_close(b(**x).logits, a(**x).logits, atol=0, rtol=0)
        for _, m in arch.attention_modules(b):
            getattr(m, SINK).fill_(3.0)  # a sink logit of 3 takes mass away: the output changes
        assert (b(**x).logits - a(**x).logits).abs().max() > 1e-3


def test_sigmoid_gate_multiplies_each_head_channel_before_the_output_projection(tiny_model: Callable[[str], nn.Module]) -> None:
    base = _model("llama", None, tiny_model)
    gated = _model("llama", V.sigmoid_gate, tiny_model)
    (_, attn0) = arch.attention_modules(gated)[0]
    gate = getattr(attn0, GATE_OUT)
    heads, hidden = gated.config.num_attention_heads, gated.config.hidden_size
    assert gate.weight.shape == (heads * (hidden // heads), hidden) and gate.bias is None
    seen: dict[str, torch.Tensor] = {}
    for tag, model in (("base", base), ("gated", gated)):
        attn = arch.attention_modules(model)[0][1]
        attn.o_proj.register_forward_pre_hook(lambda _m, a, tag=tag: seen.__setitem__(tag, a[0].detach()))
        attn.register_forward_pre_hook(lambda _m, a, k, tag=tag: seen.__setitem__(tag + "_x", k["hidden_states"].detach()),
                                       with_kwargs=True)
    x = _ids()
    with torch.no_grad():
        base(**x), gated(**x)
        expected = seen["base"] * torch.sigmoid(gate(seen["gated_x"]))  # layer 0: identical inputs
    torch.testing.assert_close(seen["gated"], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", [V.softpick, V.sigmoid_gate, V.sink])
def test_new_variants_train_and_round_trip_through_load_model(variant: V, tiny_checkpoint: Callable[..., Path],
                                                              tmp_path: Path) -> None:
    loaded = load_model(LoadConfig(str(tiny_checkpoint("llama"))))
    set_attention(loaded.model, variant)  # what `train --from` does: fresh gate / sink parameters
    model = loaded.model.train()
    x = _ids()
    model(**x, labels=x["input_ids"]).loss.backward()
    params = {n: p for n, p in model.named_parameters() if GATE_OUT in n or SINK in n}
    assert len(params) == {V.softpick: 0, V.sigmoid_gate: 2, V.sink: 2}[variant]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())  # they learn
    with torch.no_grad():
        for p in params.values():
            p.normal_()
    model.eval().save_pretrained(str(tmp_path / "ckpt"))
    loaded.processor.save_pretrained(str(tmp_path / "ckpt"))
    again = load_model(LoadConfig(str(tmp_path / "ckpt")))
    assert again.attention is variant
    with torch.no_grad():
        torch.testing.assert_close(again.model(**x).logits, model(**x).logits, atol=1e-6, rtol=0)


def test_switching_away_removes_the_new_parameters(tiny_model: Callable[[str], nn.Module]) -> None:
    model = _model("opt", V.sigmoid_gate, tiny_model)
    set_attention(model, V.sink)
    assert not any(GATE_OUT in n for n, _ in model.named_parameters())
    set_attention(model, V.softmax1)
    assert not any(SINK in n or GATE_OUT in n for n, _ in model.named_parameters())



@pytest.mark.parametrize("variant", [V.sigmoid_gate, V.sink, V.softpick])
def test_quantized_copy_of_a_new_variant_runs(variant: V, tiny_model: Callable[[str], nn.Module]) -> None:
    """quantize_model applies the variant again on its copy (hookable): the gate must keep its input hook."""
    from outlier_probe.quant.recipes import QuantConfig, quantize_model
    from outlier_probe.quant.calibration import calibrate
    from outlier_probe.data import Batches

    model = _model("opt", variant, tiny_model)
    qmodel, sites = quantize_model(model, QuantConfig(), variant)
    x = _ids()
    calibrate(qmodel, Batches([x], "test"))
    with torch.no_grad():
        out = qmodel(**x).logits
    assert torch.isfinite(out).all() and any(s.kind == "attn_probs" for s in sites)
