"""Recipes: where `paper` and `linear` put quantizers on tiny models of every family (DESIGN.md section 3),
that the float model is left alone, and that the attention quantizers run on the eager path."""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

import pytest
import torch
from torch import nn

from outlier_probe import arch, attention
from outlier_probe.config import AttentionVariant, SiteKind, SiteSelection
from outlier_probe.errors import UsageError
from outlier_probe.loading import set_attention
from outlier_probe.quant.modules import (
    ActMode,
    ActQuantizer,
    QuantEmbedding,
    QuantLinear,
    QuantNorm,
    freeze_all,
    iter_act_quantizers,
    set_mode,
)
from outlier_probe.quant.recipes import QuantConfig, Recipe, quantize_model

FAMILIES = ("opt", "bert", "gpt2", "llama", "vit")
# Backbone Linear / Conv1D layers of the 2-layer fixtures, counted by hand from the model code:
# opt q,k,v,out_proj,fc1,fc2; bert query,key,value,attention.output.dense,intermediate.dense,output.dense;
# gpt2 c_attn,attn.c_proj,c_fc,mlp.c_proj (Conv1D); llama q,k,v,o,gate,up,down; vit q,k,v,o,fc1,fc2.
LINEARS_PER_LAYER = {"opt": 6, "bert": 6, "gpt2": 4, "llama": 7, "vit": 6}
# Norms: two per block plus the final / embedding norm. Embedding modules (vit: the patch Conv2d).
NORMS = {"opt": 5, "bert": 5, "gpt2": 5, "llama": 5, "vit": 5}
EMBEDDINGS = {"opt": 2, "bert": 3, "gpt2": 2, "llama": 1, "vit": 1}
LAYERS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs(family: str, batch: int = 2, seq: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if family == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=gen)}
    return {"input_ids": torch.randint(0, 320, (batch, seq), generator=gen)}


def _logits(model: nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**x).logits.clone()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _backbone(model: nn.Module, test: Callable[[nn.Module], bool]) -> list[str]:
    heads = arch.head_module_names(model)
    return [n for n, m in model.named_modules() if n and not _under(n, heads) and test(m)]


def _on_grid(w: torch.Tensor, scale: torch.Tensor) -> bool:
    """Every value an integer multiple of its scale (per tensor, or per row when scale is 1-D)."""
    s = scale.reshape(-1, *([1] * (w.ndim - 1))) if scale.ndim == 1 else scale
    q = w / s
    return bool(torch.allclose(q, q.round(), atol=1e-3))


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: SLF001


@pytest.mark.parametrize("family", FAMILIES)
def test_paper_recipe_places_every_quantizer(family: str, tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model(family)
    x = _inputs(family)
    state_before, out_before = _snapshot(model), _logits(model, x)
    impl_before, hooks_before = model.config._attn_implementation, _hooks(model)
    heads = arch.head_module_names(model)
    assert heads, "every fixture has a head that must stay float"

    qmodel, sites = quantize_model(model, QuantConfig())

    # --- weights: every backbone Linear / Conv1D, norm and embedding; heads untouched
    linears = _backbone(model, arch._is_linear)  # noqa: SLF001
    assert len(linears) == LINEARS_PER_LAYER[family] * LAYERS
    for name in linears:
        ql, fl = qmodel.get_submodule(name), model.get_submodule(name)
        assert isinstance(ql, QuantLinear), name
        fw = fl.weight.t() if type(fl).__name__ == "Conv1D" else fl.weight  # QuantLinear stores (out, in)
        assert _on_grid(ql.weight, ql.w_scale) and ql.w_scale.ndim == 0
        assert (ql.weight - fw).abs().max() <= ql.w_scale / 2 + 1e-7  # round to nearest
        assert (ql.bias is None and fl.bias is None) or torch.equal(ql.bias, fl.bias), "biases stay float"
        assert ql.output_quantizer is not None
    norms = _backbone(model, arch._is_norm)  # noqa: SLF001
    assert len(norms) == NORMS[family]
    for name in norms:
        qn = qmodel.get_submodule(name)
        assert isinstance(qn, QuantNorm) and isinstance(qn.output_quantizer, ActQuantizer), name
        assert _on_grid(qn.module.weight, qn.w_scale)
    embeddings = _backbone(model, lambda m: isinstance(m, (nn.Embedding, nn.Conv2d)))
    assert len(embeddings) == EMBEDDINGS[family]
    for name in embeddings:
        qe = qmodel.get_submodule(name)
        assert isinstance(qe, QuantEmbedding), name
        assert _on_grid(qe.module.weight, qe.w_scale)
        assert not torch.equal(qe.module.weight, model.get_submodule(name).weight), "embedding weights are quantized"
    for head in heads:
        for rel, module in qmodel.get_submodule(head).named_modules():
            assert not isinstance(module, (QuantLinear, QuantNorm, QuantEmbedding, ActQuantizer)), f"{head}.{rel}"
    head_params = {k: v for k, v in qmodel.state_dict().items() if _under(k.rsplit(".", 1)[0], heads)}
    assert head_params and all(torch.equal(v, state_before[k]) for k, v in head_params.items())

    # --- activation sites
    kinds = Counter(s.kind for s in sites)
    assert kinds == {
        "linear_output": len(linears),
        "norm": len(norms),
        "context": LAYERS,  # input of the attention output projection
        "attn_scores": LAYERS,
        "attn_probs": LAYERS,
        "residual": LAYERS * (2 if family == "bert" else 1),  # post-LN: both sums; pre-LN: the mid-block sum
        "block_output": LAYERS,  # pre-LN: the second residual sum
        "embedding_sum": 1,
    }
    attn_out = {s.module_name for s in arch.find_sites(model, SiteSelection(kinds=(SiteKind.attn_output,)))}
    assert {n for n in linears if qmodel.get_submodule(n).input_quantizer is not None} == attn_out
    # every ActQuantizer in the model is reported exactly once
    assert sorted(id(q) for _, q in iter_act_quantizers(qmodel)) == sorted(id(s.quantizer) for s in sites)
    assert len({s.name for s in sites}) == len(sites)
    for name, module in arch.attention_modules(qmodel):
        assert isinstance(getattr(module, attention.SCORE_QUANTIZER), ActQuantizer), name
        assert isinstance(getattr(module, attention.PROB_QUANTIZER), ActQuantizer), name
    assert qmodel.config._attn_implementation == "op_softmax"

    # --- one calibration batch reaches every quantizer (scores / probs: the eager path ran)
    with torch.inference_mode():
        qmodel(**x)
    unreached = [n for n, q in iter_act_quantizers(qmodel) if q.estimator.num_batches != 1]
    assert not unreached
    by_kind = {s.kind: s.quantizer for s in sites}
    lo, hi = by_kind["attn_probs"].estimator.range()
    assert 0.0 <= lo and hi <= 1.0 + 1e-6
    lo, hi = by_kind["attn_scores"].estimator.range()
    assert lo > -1e3, "scores are observed before the mask is added"
    freeze_all(qmodel)
    out_q = _logits(qmodel, x)
    assert torch.isfinite(out_q).all() and not torch.equal(out_q, out_before)
    # W8A8 of a random model: close, not equal (vit's 3 tiny logits amplify the noise most: ~8% in norm)
    assert torch.cosine_similarity(out_q.flatten(), out_before.flatten(), dim=0) > 0.99

    # --- the float model is untouched: weights, outputs, attention implementation, hooks
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())
    assert model.state_dict().keys() == state_before.keys()
    assert torch.equal(_logits(model, x), out_before)
    assert model.config._attn_implementation == impl_before and _hooks(model) == hooks_before
    assert not list(iter_act_quantizers(model))


@pytest.fixture(scope="module")
def minilm(minilm_path: Any) -> tuple[nn.Module, nn.Module, list[Any]]:
    from transformers import BertModel

    model = BertModel.from_pretrained(str(minilm_path)).eval()
    qmodel, sites = quantize_model(model, QuantConfig())
    return model, qmodel, sites


def test_paper_recipe_on_the_real_minilm_quantizes_every_linear(minilm: tuple[nn.Module, nn.Module, list[Any]]) -> None:
    model, qmodel, sites = minilm
    linears = [n for n, m in model.named_modules() if arch._is_linear(m) and n.startswith("encoder.")]  # noqa: SLF001
    assert len(linears) == 6 * 6
    assert all(isinstance(qmodel.get_submodule(n), QuantLinear) for n in linears)
    assert type(qmodel.pooler.dense) is nn.Linear  # the pooler is a head: float
    kinds = Counter(s.kind for s in sites)
    assert kinds["attn_scores"] == kinds["attn_probs"] == kinds["block_output"] == 6 and kinds["embedding_sum"] == 1


def test_paper_recipe_on_the_real_minilm_quantizes_its_embeddings(minilm: tuple[nn.Module, nn.Module, list[Any]]) -> None:
    _, qmodel, sites = minilm
    assert isinstance(qmodel.embeddings.word_embeddings, QuantEmbedding)
    assert isinstance(qmodel.embeddings.LayerNorm, QuantNorm)


@pytest.mark.parametrize("family", ["opt", "bert"])
def test_linear_recipe_only_quantizes_linear_weights_and_inputs(family: str, tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model(family)
    impl = model.config._attn_implementation
    qmodel, sites = quantize_model(model, QuantConfig(recipe=Recipe.linear))
    linears = _backbone(model, arch._is_linear)  # noqa: SLF001
    for name in linears:
        ql = qmodel.get_submodule(name)
        assert isinstance(ql, QuantLinear) and ql.input_quantizer is not None and ql.output_quantizer is None
    assert [s.kind for s in sites] == ["linear_input"] * len(linears)
    assert {s.name for s in sites} == {f"{n}:in" for n in linears}
    assert not any(isinstance(m, (QuantNorm, QuantEmbedding)) for m in qmodel.modules())
    assert len(list(iter_act_quantizers(qmodel))) == len(linears)
    for _, module in arch.attention_modules(qmodel):
        assert getattr(module, attention.SCORE_QUANTIZER, None) is None
    assert qmodel.config._attn_implementation == impl  # no eager switch needed
    assert _hooks(qmodel) == _hooks(model)  # no residual / embedding hooks
    head = arch.head_module_names(model)[0]
    assert not any(isinstance(m, QuantLinear) for m in qmodel.get_submodule(head).modules())


def test_gates_of_gated_attention_stay_float(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("opt")
    set_attention(model, AttentionVariant.gated)
    with torch.no_grad():  # input-dependent gates, so a quantized gate would change the output
        for name, module in model.named_modules():
            if name.endswith(attention.GATE):
                module.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    gates = {n: m.weight.clone() for n, m in model.named_modules() if n.endswith(attention.GATE)}
    assert len(gates) == LAYERS
    x = _inputs("opt")
    out_before = _logits(model, x)
    qmodel, sites = quantize_model(model, QuantConfig(), AttentionVariant.gated)
    for name, weight in gates.items():
        gate = qmodel.get_submodule(name)
        assert type(gate) is nn.Linear and torch.equal(gate.weight, weight), name
    assert not any(attention.GATE in s.name for s in sites)
    assert qmodel.config._attn_implementation == "op_gated"
    with torch.inference_mode():
        qmodel(**x)
    assert all(q.estimator.num_batches == 1 for _, q in iter_act_quantizers(qmodel)), "eager gated path quantizes"
    freeze_all(qmodel)
    assert torch.isfinite(_logits(qmodel, x)).all()
    assert torch.equal(_logits(model, x), out_before)


@pytest.mark.parametrize("family", ["opt", "gpt2"])
def test_sixteen_bit_recipe_is_transparent(family: str, tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model(family)
    x = _inputs(family)
    ref = _logits(model, x)
    qmodel, _ = quantize_model(model, QuantConfig(w_bits=16, a_bits=16))
    with torch.inference_mode():
        qmodel(**x)  # calibrate on the same batch
    freeze_all(qmodel)
    out = _logits(qmodel, x)
    assert (out - ref).abs().max() <= 1e-3 * ref.abs().max()
    set_mode(qmodel, ActMode.off)  # weights alone, 16 bit
    assert (_logits(qmodel, x) - ref).abs().max() <= 1e-3 * ref.abs().max()


def test_per_channel_weights_have_one_scale_per_output_channel(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("opt")
    qmodel, _ = quantize_model(model, QuantConfig(per_channel=True))
    fc1 = qmodel.get_submodule("model.decoder.layers.0.fc1")
    assert fc1.w_scale.shape == (fc1.out_features,) and _on_grid(fc1.weight, fc1.w_scale)
    emb = qmodel.get_submodule("model.decoder.embed_tokens")
    assert emb.w_scale.shape == (320,)  # one scale per token row
    per_tensor, _ = quantize_model(model, QuantConfig())
    err_pc = (fc1.weight - model.get_submodule("model.decoder.layers.0.fc1").weight).abs().mean()
    err_pt = (per_tensor.get_submodule("model.decoder.layers.0.fc1").weight
              - model.get_submodule("model.decoder.layers.0.fc1").weight).abs().mean()
    assert err_pc < err_pt


def test_paper_recipe_on_an_unknown_family_says_to_use_linear(tiny_model: Callable[[str], nn.Module]) -> None:
    model = tiny_model("generic")
    with pytest.raises(UsageError, match="--recipe linear"):
        quantize_model(model, QuantConfig())
    qmodel, sites = quantize_model(model, QuantConfig(recipe=Recipe.linear))
    assert sites and all(s.kind == "linear_input" for s in sites)
