"""TokenActQuantizer.quantize_owned: writing into a tensor its caller drops gives the bits self(x) gives,
and is not done where a hook or autograd could still see the input."""

from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch import nn

from outlier_probe.quant import kernels
from outlier_probe.quant.modules import ActMode, freeze_all, iter_act_quantizers
from outlier_probe.quant.mitigations.per_token import TokenActQuantizer
from outlier_probe.quant.quantizer import QuantSpec
from outlier_probe.quant.recipes import QuantConfig, Recipe, quantize_model

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not kernels.available(torch.zeros(1)), reason="numba is not importable here")]


def _frozen() -> TokenActQuantizer:
    q = TokenActQuantizer(QuantSpec(8, symmetric=False))
    q.mode = ActMode.frozen
    return q


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) ** 3


def test_quantize_owned_writes_into_its_input_the_bits_of_a_call() -> None:
    q, x = _frozen(), _x()
    ref = q(x)
    y = x.clone()
    got = q.quantize_owned(y)
    assert got.data_ptr() == y.data_ptr() and torch.equal(got.view(torch.int32), ref.view(torch.int32))
    assert not torch.equal(ref, x)  # the values did change: the test sees a real overwrite


def test_a_forward_hook_still_sees_the_float_input() -> None:
    q, x = _frozen(), _x()
    seen: list[torch.Tensor] = []
    q.register_forward_hook(lambda _m, args, _out: seen.append(args[0].clone()))
    y = x.clone()
    got = q.quantize_owned(y)
    assert torch.equal(y, x) and torch.equal(seen[0], x) and torch.equal(got, q(x))


@pytest.mark.parametrize("register", ["forward", "forward_pre"])
def test_a_global_hook_keeps_the_input_too(register: str) -> None:
    q, x = _frozen(), _x()
    hook = (lambda _m, _a, _o: None) if register == "forward" else (lambda _m, _a: None)
    handle = getattr(nn.modules.module, f"register_module_{register}_hook")(hook)
    try:
        y = x.clone()
        q.quantize_owned(y)
        assert torch.equal(y, x)
    finally:
        handle.remove()


def test_a_tensor_in_an_autograd_graph_is_not_overwritten() -> None:
    q, x = _frozen(), _x()
    w = torch.ones((), requires_grad=True)
    y = torch.softmax(x * w, dim=-1)  # softmax saves y for its backward
    before = y.detach().clone()
    q.quantize_owned(y)
    assert torch.equal(y.detach(), before)


def test_a_pre_hook_that_replaces_the_input_is_honoured() -> None:
    q, x = _frozen(), _x()
    q.register_forward_pre_hook(lambda _m, args: (args[0] * 2,))
    y = x.clone()
    got = q.quantize_owned(y)
    assert torch.equal(y, x) and torch.equal(got, q(x))  # q(x) runs the hook too: both quantize 2x


def test_calibration_is_unchanged() -> None:
    q, x = TokenActQuantizer(QuantSpec(8, symmetric=False)), _x()
    assert q.quantize_owned(x) is x and torch.equal(q.estimator.range()[1], x.max())


@pytest.mark.parametrize(("family", "recipe"), [("bert", Recipe.paper), ("opt", Recipe.paper), ("llama", Recipe.linear)])
def test_a_per_token_model_gives_the_same_bits_with_and_without_overwriting(
    family: str, recipe: Recipe, tiny_model: Callable[[str], nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linear outputs and attention scores / probabilities are quantized in place; a global forward hook
    (nothing may be overwritten then) gives the reference: the logits must agree bit for bit."""
    model = tiny_model(family)
    x = {"input_ids": torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))}
    qmodel, _ = quantize_model(model, QuantConfig(recipe=recipe, per_token=True))
    with torch.inference_mode():
        qmodel(**x)
    freeze_all(qmodel)
    assert all(isinstance(q, TokenActQuantizer) for _, q in iter_act_quantizers(qmodel))
    calls: list[bool] = []
    fused = kernels.per_token_fused
    monkeypatch.setattr(kernels, "per_token_fused", lambda *a, **k: calls.append(k.get("in_place", False)) or fused(*a, **k))
    with torch.inference_mode():
        fast = qmodel(**x).logits.clone()
        n_in_place = sum(calls)
        handle = nn.modules.module.register_module_forward_hook(lambda _m, _a, _o: None)
        try:
            ref = qmodel(**x).logits.clone()
        finally:
            handle.remove()
    # paper: per layer the 6 linear layers' outputs, then scores and probabilities (2 layers); linear: inputs only
    assert n_in_place == (2 * (6 + 2) if recipe is Recipe.paper else 0)
    assert sum(calls) == n_in_place  # the hooked forward overwrote nothing
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))
