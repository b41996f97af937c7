"""attention: hand-built probabilities and attention layers with known mass on known tokens."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from outlier_probe import arch
from outlier_probe.attention_capture import capture_attention
from outlier_probe.config import AttentionVariant, DataConfig, LoadConfig
from outlier_probe.data import text_batches
from outlier_probe.diagnose.attention_run import AttentionConfig, run_attention, token_classes
from outlier_probe.diagnose.attention_stats import AttentionObserver, BatchContext
from outlier_probe.diagnose.massive import MassiveObserver, is_massive
from outlier_probe.loading import LoadedModel, set_attention
from tests.conftest import HEADS, LAYERS, make_model, tokenizer_kind

SMALL = dict(samples=4, seq_len=16, batch_size=2)


def test_observer_gives_exactly_the_hand_built_figures() -> None:
    # one sequence of 4 tokens: [special, delimiter, word, pad]; the padding query must not count
    rows = torch.tensor([[0.5, 0.2, 0.3, 0.0],  # head 0: every query
                         [0.6, 0.1, 0.3, 0.0]])  # head 1: every query
    probs = rows[None, :, None, :].expand(1, 2, 4, 4).clone()  # (B, H, Tq, Tk)
    probs[0, :, 3] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # the padding query
    ids = torch.tensor([[5, 7, 9, 0]])
    ctx = BatchContext(ids, special=torch.tensor([[True, False, False, False]]),
                       delimiter=torch.tensor([[False, True, False, False]]), valid=torch.tensor([[True, True, True, False]]))
    obs = AttentionObserver(layers=1, vocab_size=10)
    obs.context = ctx
    obs.update(0, probs)
    h0, h1 = obs.result()
    exact = lambda v: pytest.approx(v, rel=1e-6)  # noqa: E731 - float32 probabilities
    assert (h0.queries, h0.first, h0.special, h0.delimiter, h0.sink) == (3, exact(0.5), exact(0.5), exact(0.2), 1.0)
    assert (h1.first, h1.special, h1.delimiter, h1.sink) == (exact(0.6), exact(0.6), exact(0.1), 1.0)
    assert h0.entropy == pytest.approx(-sum(p * math.log(p) for p in (0.5, 0.2, 0.3)), rel=1e-6)
    assert h0.null == pytest.approx(0.0, abs=1e-7) and math.isnan(h0.gate_closed)
    # token 5 receives (0.5 + 0.6) from each of 3 queries: 0.55 per query and head; token 9 only 0.3
    (token, mass), = obs.sink_tokens(min_occurrences=1)
    assert token == 5 and mass == pytest.approx(0.55, rel=1e-6)
    probs[0, 1, :3] = torch.tensor([0.2, 0.1, 0.3, 0.0])  # head 1 now sends 0.4 of each row nowhere
    obs2 = AttentionObserver(layers=1, vocab_size=10)
    obs2.context = ctx
    obs2.update(0, probs)
    assert obs2.result()[1].null == exact(0.4) and obs2.result()[1].sink == 0.0


def _uniform_bert(tok, variant: AttentionVariant) -> LoadedModel:  # noqa: ANN001
    """A BERT whose query and key projections are zero: every score is 0, so attention is uniform."""
    model = make_model("bert", vocab_size=len(tok))
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            for lin in (layer.attention.self.query, layer.attention.self.key):
                lin.weight.zero_()
                lin.bias.zero_()
    params = set_attention(model, variant) if variant is not AttentionVariant.softmax else {}
    return LoadedModel(model, tok, arch.model_info(model), "uniform", "uniform", variant, params)


@pytest.mark.parametrize("variant", [AttentionVariant.softmax, AttentionVariant.softmax1, AttentionVariant.gated])
def test_uniform_attention_layer_gives_the_closed_forms(variant: AttentionVariant, tiny_tokenizer, text_file: Path,
                                                        one_thread: None) -> None:  # noqa: ANN001
    tok = tiny_tokenizer("bert")
    loaded = _uniform_bert(tok, variant)
    data = DataConfig(path=text_file, **SMALL)
    result = run_attention(AttentionConfig(load=LoadConfig(source="uniform"), data=data), loaded=loaded)
    T = SMALL["seq_len"]
    slots = T + 1 if variant is AttentionVariant.softmax1 else T  # softmax_1: the "+1" is one more slot
    p = 1.0 / slots
    special, delimiter = token_classes(tok, len(tok))
    ids = torch.cat([b["input_ids"] for b in text_batches(tok, data).batches])
    n_delim = delimiter[ids].sum(dim=1).double().mean().item()
    n_special = special[ids].sum(dim=1).double().mean().item()
    assert n_special == 2  # [CLS] and [SEP] in every sequence
    assert len(result.heads) == LAYERS * HEADS and result.variant == variant.value
    for h in result.heads:
        assert h.first == pytest.approx(p, rel=1e-5)
        assert h.special == pytest.approx(n_special * p, rel=1e-5)
        assert h.delimiter == pytest.approx(n_delim * p, rel=1e-5)
        assert h.entropy == pytest.approx(-T * p * math.log(p), rel=1e-5)
        assert h.sink == 0.0
        assert h.null == pytest.approx(1.0 - T * p, abs=1e-6)  # softmax_1: 1 / (T + 1) goes nowhere
        if variant is AttentionVariant.gated:
            assert h.gate_closed == pytest.approx(0.75, rel=1e-6)  # gate initialised at sigmoid = 0.25
        else:
            assert math.isnan(h.gate_closed)
    assert loaded.model.config._attn_implementation in ("sdpa", "op_softmax1", "op_gated")  # restored after the run


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "opt", "llama", "qwen2", "vit"])
def test_capture_keeps_the_output_and_matches_eager_attention(family: str, tiny_tokenizer, one_thread: None) -> None:  # noqa: ANN001
    model = make_model(family)
    if family == "vit":
        inputs = {"pixel_values": torch.randn(2, 3, 16, 16)}
    else:
        inputs = {"input_ids": torch.randint(5, 300, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
        inputs["attention_mask"][1, -3:] = 0  # padding in the second sequence
    modules = arch.attention_modules(model)
    with torch.no_grad():
        plain = model(**inputs)[0]
        seen: dict[int, torch.Tensor] = {}
        with capture_attention(model, modules, lambda layer, p: seen.__setitem__(layer, p)):
            captured = model(**inputs)[0]
        assert torch.equal(plain, captured)  # the model's own kernel still computes the output
        assert sorted(seen) == list(range(len(modules)))
        model.set_attn_implementation("eager")
        reference = model(**inputs, output_attentions=True).attentions
        with capture_attention(model, modules, lambda layer, p: seen.__setitem__(layer, p)):
            eager_out = model(**inputs)[0]
    assert torch.equal(eager_out, model(**inputs)[0])
    for layer, ref in enumerate(reference):
        valid = slice(None) if family == "vit" else (0,)  # padded rows differ only in where masked mass goes
        assert torch.allclose(seen[layer][valid], ref[valid].float(), atol=1e-6), family


def test_massive_observer_finds_the_planted_value() -> None:
    obs = MassiveObserver(layer=3)
    gen = torch.Generator().manual_seed(0)
    x1 = torch.randn(2, 6, 8, generator=gen) * 0.1
    x2 = torch.randn(2, 6, 8, generator=gen) * 0.1
    x2[1, 4, 5] = -500.0
    ids = torch.arange(12).reshape(2, 6)
    obs.update(x1, ids)
    obs.update(x2, ids + 100)
    r = obs.result()
    assert (r.layer, r.top_abs, r.sequence, r.position, r.channel, r.token_id) == (3, 500.0, 3, 4, 5, 110)
    median = (x1.abs().median() + x2.abs().median()).item() / 2
    assert r.median_abs == pytest.approx(median) and r.ratio == pytest.approx(500.0 / median)
    assert is_massive(r, 100.0, 1000.0) == (r.ratio > 1000.0)


def test_softmax1_null_mass_is_the_closed_form() -> None:
    """1 - sum softmax_1(x) = 1 / (1 + sum exp(x)) = sigmoid(-logsumexp(x)), for every row, masked keys excluded."""
    from outlier_probe import attention as att
    from outlier_probe.attention_capture import probabilities

    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4, generator=gen) * 2, torch.randn(2, 3, 5, 4, generator=gen) * 2
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, ..., -2:] = False  # two padded keys in the second sequence
    module = torch.nn.Module()
    module.is_causal = False
    p = probabilities(module, q, k, mask, None, att.softmax1, {})
    scores = (q @ k.transpose(-1, -2)) / 2.0  # scaling 1 / sqrt(4)
    scores = scores.masked_fill(~mask, float("-inf"))
    closed = torch.sigmoid(-torch.logsumexp(scores, dim=-1))
    assert torch.allclose(1.0 - p.sum(-1), closed, atol=1e-6)
    assert float(p[1, ..., -2:].abs().max()) == 0.0
