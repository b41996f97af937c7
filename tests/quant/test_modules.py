"""Fake-quant wrappers: reference outputs, 16-bit transparency, calibration state, purity, repr."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.quant.modules import (
    ActMode,
    ActQuantizer,
    OutputQuantized,
    QuantEmbedding,
    QuantLinear,
    QuantNorm,
    calibrating,
    freeze_all,
    iter_act_quantizers,
    set_mode,
)
from outlier_probe.quant.quantizer import Estimator, PerChannel, QuantSpec, compute_qparams, fake_quantize

A8 = QuantSpec(8, symmetric=False)
W8 = QuantSpec(8, symmetric=True)
W16 = QuantSpec(16, symmetric=True)
A16 = QuantSpec(16, symmetric=False)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _linear(seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(8, 6)


def _rel_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3) -> bool:
    return (a - b).abs().max().item() <= rel * b.abs().max().item()


class RMSNorm(nn.Module):
    """A norm class the wrappers have never seen (LlamaRMSNorm-like)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def _calibrated(spec: QuantSpec = A8, *batches: torch.Tensor) -> ActQuantizer:
    q = ActQuantizer(spec)
    for b in batches or (_x(4, 8),):
        q(b)
    q.freeze()
    return q


def test_quant_linear_matches_pure_functions() -> None:
    lin = _linear()
    x = _x(3, 8)
    in_q, out_q = _calibrated(A8, x), _calibrated(A8, lin(x))
    ql = QuantLinear.from_module(lin, w_spec=W8, input_quantizer=in_q, output_quantizer=out_q)
    w_s, w_z = compute_qparams(lin.weight.min(), lin.weight.max(), W8)
    wq = fake_quantize(lin.weight.detach(), w_s, w_z, W8)
    xq = fake_quantize(x, in_q.scale, in_q.zero_point, A8)
    ref = fake_quantize(F.linear(xq, wq, lin.bias), out_q.scale, out_q.zero_point, A8)
    assert torch.equal(ql(x), ref)
    assert torch.equal(ql.bias, lin.bias)


def test_quant_linear_per_channel_weight() -> None:
    lin = _linear()
    spec = QuantSpec(4, True, PerChannel(0))
    ql = QuantLinear.from_module(lin, w_spec=spec)
    assert ql.w_scale.shape == (6,)
    s, z = compute_qparams(lin.weight.amin(1), lin.weight.amax(1), spec)
    assert torch.equal(ql.weight, fake_quantize(lin.weight.detach(), s, z, spec))


def test_original_weights_untouched() -> None:
    lin, emb, norm = _linear(), nn.Embedding(10, 8), nn.LayerNorm(8)
    before = [m.weight.detach().clone() for m in (lin, emb, norm)]
    QuantLinear.from_module(lin, w_spec=QuantSpec(2, True))
    QuantEmbedding.from_module(emb, w_spec=QuantSpec(2, True))
    QuantNorm.from_module(norm, w_spec=QuantSpec(2, True))
    for m, w in zip((lin, emb, norm), before, strict=True):
        assert torch.equal(m.weight, w)


def test_16_bit_wrappers_match_float() -> None:
    x = _x(2, 5, 8)
    lin = _linear()
    ql = QuantLinear.from_module(lin, w_spec=W16, input_quantizer=_calibrated(A16, x),
                                 output_quantizer=_calibrated(A16, lin(x)))
    assert _rel_close(ql(x), lin(x))
    for norm in (nn.LayerNorm(8), RMSNorm(8)):
        qn = QuantNorm.from_module(norm, w_spec=W16, output_quantizer=_calibrated(A16, norm(x)))
        assert _rel_close(qn(x), norm(x))
    emb = nn.Embedding(12, 8, padding_idx=0)
    ids = torch.tensor([[0, 3, 11], [5, 5, 1]])
    qe = QuantEmbedding.from_module(emb, w_spec=W16, output_quantizer=_calibrated(A16, emb(ids)))
    assert _rel_close(qe(ids), emb(ids))


def test_conv1d_matches_linear_semantics() -> None:
    torch.manual_seed(0)
    conv = Conv1D(6, 8)  # nf=6 outputs, nx=8 inputs; weight (8, 6)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    x = _x(3, 8)
    q16 = QuantLinear.from_module(conv, w_spec=W16)
    assert q16.weight.shape == (6, 8)
    assert _rel_close(q16(x), conv(x))
    spec = QuantSpec(4, True, PerChannel(0))  # per output channel = Conv1D's axis 1
    q4 = QuantLinear.from_module(conv, w_spec=spec)
    assert q4.w_scale.shape == (6,)
    s, z = compute_qparams(conv.weight.amin(0), conv.weight.amax(0), QuantSpec(4, True, PerChannel(1)))
    wq = fake_quantize(conv.weight.detach(), s, z, QuantSpec(4, True, PerChannel(1)))
    assert torch.allclose(q4(x), x @ wq + conv.bias, atol=1e-5)


def test_quant_linear_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_module(nn.Conv2d(1, 1, 1), w_spec=W8)


def test_norm_wrapper_keeps_attributes_and_handles_no_weight() -> None:
    norm = RMSNorm(8)
    qn = QuantNorm.from_module(norm, w_spec=W8)
    assert qn.eps == norm.eps  # read through to the wrapped copy
    assert not torch.equal(qn.weight, norm.weight)  # the copy's weight is quantized
    plain = QuantNorm.from_module(nn.LayerNorm(8, elementwise_affine=False), w_spec=W8)
    x = _x(2, 8)
    assert torch.equal(plain(x), F.layer_norm(x, (8,)))
    with pytest.raises(UsageError, match="OutputQuantized"):
        QuantNorm.from_module(nn.ReLU(), w_spec=W8)


def test_ranges_change_on_calibration_not_on_evaluation() -> None:
    q = ActQuantizer(A8, Estimator.running_minmax)
    init = (q.min_val.clone(), q.max_val.clone(), q.scale.clone(), q.zero_point.clone())
    x = _x(4, 8)
    assert q(x) is x  # calibrating returns the input itself
    q.freeze()
    assert q.mode is ActMode.frozen
    frozen = (q.min_val.clone(), q.max_val.clone(), q.scale.clone(), q.zero_point.clone())
    assert all(not torch.equal(a, b) for a, b in zip(init, frozen, strict=True))
    assert q.min_val.item() == pytest.approx(x.min().item())
    q(_x(4, 8, seed=1) * 50)  # frozen: no estimator update, same buffers
    assert q.estimator.num_batches == 1
    after = (q.min_val, q.max_val, q.scale, q.zero_point)
    assert all(torch.equal(a, b) for a, b in zip(frozen, after, strict=True))


def test_frozen_without_calibration_raises() -> None:
    q = ActQuantizer(A8, mode=ActMode.frozen)
    with pytest.raises(ProbeError, match="freeze"):
        q(_x(2, 2))
    with pytest.raises(ProbeError, match="saw no data"):
        q.freeze()


def test_modes_off_and_frozen_behaviour() -> None:
    q = _calibrated(QuantSpec(4, False))
    x = _x(4, 8)
    before = x.clone()
    y = q(x)
    assert not torch.equal(y, x) and torch.equal(x, before)
    q.mode = ActMode.off
    assert q(x) is x


def test_per_channel_act_quantizer() -> None:
    q = ActQuantizer(QuantSpec(8, False, PerChannel(-1)))
    q(_x(2, 3, 5))
    q.freeze()
    assert q.scale.shape == (5,)
    assert q(_x(2, 3, 5)).shape == (2, 3, 5)
    assert "over 5 channels" in repr(q)


def test_mismatched_estimator_granularity_raises() -> None:
    from outlier_probe.quant.estimators import RunningMinMax

    with pytest.raises(UsageError, match="granularity"):
        ActQuantizer(A8, RunningMinMax(axis=-1))


def test_state_dict_roundtrip_per_channel() -> None:
    q = ActQuantizer(QuantSpec(8, False, PerChannel(-1)))
    q(_x(3, 4))
    q.freeze()
    fresh = ActQuantizer(QuantSpec(8, False, PerChannel(-1)), mode=ActMode.frozen)
    fresh.load_state_dict(q.state_dict())
    x = _x(3, 4, seed=5)
    assert torch.equal(fresh(x), q(x))


def test_output_quantized_tensor_and_tuple() -> None:
    class Pair(nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 2, x

    x = _x(3, 4)
    wrapped = OutputQuantized(Pair(), _calibrated(QuantSpec(4, False), x * 2))
    first, rest = wrapped(x)
    assert torch.equal(rest, x)
    q = wrapped.output_quantizer
    assert torch.equal(first, fake_quantize(x * 2, q.scale, q.zero_point, q.spec))
    lin = _linear()
    wrapped_lin = OutputQuantized(lin, _calibrated(A8, lin(_x(2, 8))))
    assert wrapped_lin.in_features == 8  # attributes read through to the wrapped module
    assert wrapped_lin(_x(2, 8)).shape == (2, 6)


def _toy_model() -> nn.Sequential:
    torch.manual_seed(0)
    lin = nn.Linear(8, 8)
    return nn.Sequential(
        QuantLinear.from_module(lin, w_spec=W8, input_quantizer=ActQuantizer(A8), output_quantizer=ActQuantizer(A8)),
        QuantNorm.from_module(nn.LayerNorm(8), w_spec=W8, output_quantizer=ActQuantizer(A8)),
        OutputQuantized(nn.GELU(), ActQuantizer(A8, Estimator.percentile)),
    )


def test_model_helpers() -> None:
    model = _toy_model()
    names = [n for n, _ in iter_act_quantizers(model)]
    assert names == ["0.input_quantizer", "0.output_quantizer", "1.output_quantizer", "2.output_quantizer"]
    with pytest.raises(ProbeError, match="4 activation quantizer"):
        freeze_all(model)
    model(_x(4, 8))
    freeze_all(model)
    assert all(q.mode is ActMode.frozen for _, q in iter_act_quantizers(model))
    set_mode(model, "off")
    assert all(q.mode is ActMode.off for _, q in iter_act_quantizers(model))
    with pytest.raises(UsageError, match="mode"):
        set_mode(model, "train")


def test_calibrating_context_manager() -> None:
    model = _toy_model()
    set_mode(model, ActMode.off)
    with pytest.raises(RuntimeError):
        with calibrating(model):
            raise RuntimeError("boom")
    assert all(q.mode is ActMode.off for _, q in iter_act_quantizers(model))
    with calibrating(model):
        model(_x(4, 8))
    assert all(q.mode is ActMode.frozen and q.has_qparams for _, q in iter_act_quantizers(model))


def test_reprs_show_bits_and_range() -> None:
    q = ActQuantizer(A8)
    assert "a8 asym per-tensor running_minmax range=uncalibrated" in repr(q)
    q(torch.tensor([-3.21, 0.0, 7.88]))
    q.freeze()
    assert "ActQuantizer(a8 asym per-tensor running_minmax range=[-3.2100, 7.8800]" in repr(q)
    model = _toy_model()
    model(_x(4, 8))
    freeze_all(model)
    text = repr(model)
    assert "w8 sym per-tensor minmax" in text
    assert "QuantLinear(" in text and "QuantNorm(" in text and "OutputQuantized(" in text
    assert "percentile(99.999)" in text and "range=[" in text
