"""Mitigations: SmoothQuant scales against an independent implementation of the paper's formula, float
outputs unchanged by smoothing and rotation (1e-5), rotation matrices orthogonal, per-token quantization
against torch's own per-channel kernel, and the families that cannot be rotated say why."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from outlier_probe import arch
from outlier_probe.errors import UsageError
from outlier_probe.quant.mitigations.apply import Mitigation, Rotation, apply_mitigation, transform_error
from outlier_probe.quant.mitigations.per_token import per_token_fake_quantize
from outlier_probe.quant.mitigations.rotation import orthogonal_matrix
from outlier_probe.quant.mitigations.smoothing import smoothing_scales
from outlier_probe.quant.quantizer import QuantSpec
from outlier_probe.quant.run import gap_closed


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _batches(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 320, (2, 16), generator=gen)} for _ in range(n)]


def _run(model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
    return model(**batch)


def _out(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _with_outliers(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random norm scales / biases (a fresh model's are 1 / 0, which would hide a wrong fold) and a few
    outlier channels in the embeddings, so smoothing and rotation have something to move."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if arch._is_norm(m) and isinstance(getattr(m, "weight", None), torch.Tensor):  # noqa: SLF001
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=gen))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, nn.Embedding) and "word" in name or name.endswith("embed_tokens") or name.endswith("wte"):
                m.weight[:, :2] *= 20.0
    return model


def test_smoothing_scales_match_an_independent_implementation() -> None:
    """mit-han-lab/smoothquant's smooth_ln_fcs: (act^a / max over fcs of max|W| per column^(1-a)).clamp(1e-5)."""
    rng = np.random.default_rng(0)
    act = np.abs(rng.normal(size=16)) * np.array([50.0] + [1.0] * 15)
    weights = [rng.normal(size=(8, 16)), rng.normal(size=(4, 16))]
    for alpha in (0.0, 0.3, 0.5, 0.85, 1.0):
        w_scales = np.maximum(np.concatenate([np.abs(w) for w in weights], axis=0).max(axis=0), 1e-5)
        expected = np.maximum(act**alpha / w_scales ** (1 - alpha), 1e-5)
        got = smoothing_scales(torch.tensor(act), [torch.tensor(w) for w in weights], alpha)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    # the outlier channel gets the largest scale at alpha 0.5
    assert int(smoothing_scales(torch.tensor(act), [torch.tensor(w) for w in weights], 0.5).argmax()) == 0


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "opt", "llama", "mistral"])
def test_smoothquant_preserves_the_float_model(family: str, tiny_model: Callable[[str], nn.Module]) -> None:
    model = _with_outliers(tiny_model(family))
    batches = _batches()
    before = [_out(model, b) for b in batches]
    smoothed, done = apply_mitigation(model, Mitigation(smoothquant=0.5), batches, _run)
    assert smoothed is not model and done["smoothquant"]["groups"] >= 2 * arch.model_info(model).num_layers
    assert done["smoothquant"]["max_scale"] > 1.5 * done["smoothquant"]["min_scale"]  # scales really vary
    for b, ref in zip(batches, before):
        torch.testing.assert_close(_out(smoothed, b), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(_out(model, b), ref, atol=0, rtol=0)  # the original is untouched


def test_transform_error_is_rounding_for_an_exact_transform_and_large_for_a_broken_one(
        tiny_model: Callable[[str], nn.Module]) -> None:
    model = _with_outliers(tiny_model("opt"))
    batch = _batches(1)[0]
    smoothed, _ = apply_mitigation(model, Mitigation(smoothquant=0.5), [batch], _run)
    error = transform_error(model, smoothed, batch, _run)
    ref, got = _out(model, {"input_ids": batch["input_ids"][:1]}), _out(smoothed, {"input_ids": batch["input_ids"][:1]})
    assert error == pytest.approx(float((got - ref).abs().max() / ref.abs().max()), rel=1e-6)  # first sequence only
    assert 0 < error < 1e-5
    assert transform_error(model, model, batch, _run) == 0.0
    with torch.no_grad():  # a fold that forgets the consumers: the norm divided, q/k/v not multiplied
        smoothed.get_submodule("model.decoder.layers.0.self_attn_layer_norm").weight.mul_(2.0)
    assert transform_error(model, smoothed, batch, _run) > 1e-2


def test_smoothquant_divides_the_norm_and_multiplies_the_consumers(tiny_model: Callable[[str], nn.Module]) -> None:
    model = _with_outliers(tiny_model("opt"))
    smoothed, _ = apply_mitigation(model, Mitigation(smoothquant=0.5), _batches(), _run)
    ln0 = "model.decoder.layers.0.self_attn_layer_norm"
    q0 = "model.decoder.layers.0.self_attn.q_proj"
    s = model.get_submodule(ln0).weight / smoothed.get_submodule(ln0).weight
    torch.testing.assert_close(smoothed.get_submodule(q0).weight, model.get_submodule(q0).weight * s)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_rotation_preserves_the_float_model(family: str, tiny_model: Callable[[str], nn.Module]) -> None:
    model = _with_outliers(tiny_model(family))
    batches = _batches()
    before = [_out(model, b) for b in batches]
    rotated, done = apply_mitigation(model, Mitigation(rotate=Rotation.hadamard), batches, _run)
    d_ff = model.config.intermediate_size  # 85 for the tiny llama (odd: a seeded random orthogonal matrix)
    assert done["rotation"]["residual"] == "Hadamard 32"
    assert done["rotation"]["down_input"] == ("Hadamard 64" if d_ff == 64 else f"kron(Hadamard 1, random orthogonal {d_ff})")
    for b, ref in zip(batches, before):
        torch.testing.assert_close(_out(rotated, b), ref, atol=1e-5, rtol=0)
    emb = "model.embed_tokens"
    # the two outlier channels are spread over all 32: the largest |value| per row shrinks
    assert rotated.get_submodule(emb).weight.abs().amax() < 0.5 * model.get_submodule(emb).weight.abs().amax()


def test_rotation_of_sizes_that_are_not_powers_of_two(tiny_config: Callable[[str], Any]) -> None:
    import copy

    from outlier_probe.models import build_model

    cfg = copy.deepcopy(tiny_config("llama"))
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = 48, 80, 24
    model = _with_outliers(build_model(cfg, seed=0).eval())
    batches = _batches(1)
    ref = _out(model, batches[0])
    rotated, done = apply_mitigation(model, Mitigation(rotate=Rotation.hadamard), batches, _run)
    assert done["rotation"] == {"residual": "kron(Hadamard 16, random orthogonal 3)",
                                "down_input": "kron(Hadamard 16, random orthogonal 5)"}
    torch.testing.assert_close(_out(rotated, batches[0]), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("d", [1, 7, 12, 32, 48, 96])
def test_rotation_matrices_are_orthogonal(d: int) -> None:
    from scipy.linalg import hadamard

    q = orthogonal_matrix(d).numpy()
    np.testing.assert_allclose(q @ q.T, np.eye(d), atol=1e-12)
    if d & (d - 1) == 0:
        np.testing.assert_array_equal(q, hadamard(d) / np.sqrt(d))
    else:
        assert np.count_nonzero(np.abs(q) > 1e-12) > d * d // 2 or d < 4  # mixes channels, not a permutation


@pytest.mark.parametrize(("family", "why"), [
    ("bert", "post-norm blocks put the LayerNorm's scale on the residual stream"),
    ("opt", "LayerNorm subtracts the mean"),
    ("gpt2", "LayerNorm subtracts the mean"),
])
def test_rotation_refuses_families_whose_norms_cannot_be_folded(family: str, why: str,
                                                                tiny_model: Callable[[str], nn.Module]) -> None:
    with pytest.raises(UsageError, match=why):
        arch.rotation_layout(tiny_model(family))


def test_per_token_quantization_matches_torch_per_channel_kernel() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=gen)
    x[0, 2] *= 100.0  # one outlier token
    got = per_token_fake_quantize(x, QuantSpec(8, symmetric=False))
    rows = x.reshape(-1, 16)
    lo, hi = rows.amin(1).clamp(max=0), rows.amax(1).clamp(min=0)
    scale = ((hi - lo) / 255).clamp(min=torch.finfo(torch.float32).eps)
    zp = (-torch.round(lo / scale)).clamp(0, 255).to(torch.int32)
    ref = torch.fake_quantize_per_channel_affine(rows, scale, zp, 0, 0, 255).reshape(x.shape)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    # the other tokens keep a fine grid: their error is far below the outlier token's step
    err = (got - x).abs()
    assert err[1].max() < 0.02 and err[0, 2].max() > 0.1


def test_gap_closed() -> None:
    assert gap_closed(0.3, 0.06) == pytest.approx(0.8)
    assert gap_closed(0.3, 0.3) == 0.0
    assert gap_closed(0.3, 0.45) == pytest.approx(-0.5)
    assert np.isnan(gap_closed(0.0, 0.1))


def test_alpha_outside_the_unit_interval_is_refused() -> None:
    with pytest.raises(UsageError, match=r"--smoothquant alpha must be in \[0, 1\], got 1.5"):
        Mitigation(smoothquant=1.5)
