"""Metrics against hand-computed values on stub models, and fixed MLM masks."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch
from torch import nn

from outlier_probe.arch import Task
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.evaluation import (
    Evaluator,
    MetricName,
    accuracy,
    causal_perplexity,
    hidden_fidelity,
    hidden_states,
    mask_for_mlm,
    mlm_perplexity,
    require_metric,
)


class Stub(nn.Module):
    """A model whose logits come from a function of the input ids; records every input it sees."""

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # evaluators read the device from parameters()
        self.logits_fn = logits_fn
        self.seen: list[dict[str, torch.Tensor]] = []

    def forward(self, **inputs: torch.Tensor) -> Any:
        self.seen.append({k: v.clone() for k, v in inputs.items()})
        x = inputs.get("input_ids", inputs.get("pixel_values"))
        out = self.logits_fn(x)
        return SimpleNamespace(logits=out, last_hidden_state=out)


class FakeTokenizer:
    """What mask_for_mlm needs: [MASK] id, special ids, vocabulary size."""

    mask_token_id = 4
    all_special_ids = [0, 1, 2, 3, 4]  # pad, unk, cls, sep, mask

    def __len__(self) -> int:
        return 50


def _ids(batch: int, seq: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _bert_batches(n: int = 3, batch: int = 4, seq: int = 32) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        ids = _ids(batch, seq, seed=i)
        ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


@pytest.mark.parametrize("vocab", [7, 320])
def test_uniform_logits_give_the_vocabulary_size_as_causal_perplexity(vocab: int) -> None:
    model = Stub(lambda ids: torch.zeros(*ids.shape, vocab))
    batches = [{"input_ids": _ids(2, 9, vocab=vocab, seed=s) % vocab, "attention_mask": torch.ones(2, 9, dtype=torch.long)}
               for s in range(2)]
    score = causal_perplexity(model, batches)
    assert score.metric is MetricName.perplexity
    assert score.value == pytest.approx(vocab, rel=1e-6)  # float32 cross-entropy
    assert score.extra["tokens"] == 2 * 2 * 8  # the first token of each sequence has no prediction
    assert score.extra["nll"] == pytest.approx(math.log(vocab))


def test_causal_perplexity_hand_computed_with_padding() -> None:
    # vocab 2: logit of token 1 is always log 3, so p(1) = 3/4 and p(0) = 1/4
    model = Stub(lambda ids: torch.stack([torch.zeros(ids.shape), torch.full(ids.shape, math.log(3.0))], dim=-1))
    ids = torch.tensor([[0, 1, 1, 0, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])  # the last position is padding: not scored
    score = causal_perplexity(model, [{"input_ids": ids, "attention_mask": mask}])
    nll = [-math.log(3 / 4), -math.log(3 / 4), -math.log(1 / 4)]  # predicting 1, 1, 0
    assert score.extra["tokens"] == 3
    assert score.value == pytest.approx(math.exp(sum(nll) / 3), rel=1e-6)  # float32 cross-entropy


def test_mlm_perplexity_hand_computed() -> None:
    # vocab 4; at every position the logits are [log 2, 0, 0, log 5]: p = [2, 1, 1, 5] / 9
    model = Stub(lambda ids: torch.log(torch.tensor([2.0, 1.0, 1.0, 5.0])).expand(*ids.shape, 4))
    ids = torch.zeros(1, 6, dtype=torch.long)
    labels = torch.tensor([[-100, 0, -100, 3, 1, -100]])  # three masked positions, labels 0, 3, 1
    score = mlm_perplexity(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}])
    expected = math.exp(-(math.log(2 / 9) + math.log(5 / 9) + math.log(1 / 9)) / 3)
    assert score.metric is MetricName.mlm_perplexity
    assert score.value == pytest.approx(expected, rel=1e-6)  # float32 cross-entropy
    assert score.extra["masked_tokens"] == 3
    assert "labels" not in model.seen[0], "labels are never passed to the model"


def test_mlm_masks_are_identical_across_evaluator_calls_and_instances() -> None:
    batches = _bert_batches()
    originals = [b["input_ids"].clone() for b in batches]
    model = Stub(lambda ids: torch.zeros(*ids.shape, 50))
    evaluator = Evaluator(Task.masked_lm, batches, FakeTokenizer(), seed=3)
    first = evaluator(model)
    second = evaluator(model)
    assert first.value == second.value == pytest.approx(50.0)
    n = len(batches)
    for a, b in zip(model.seen[:n], model.seen[n:]):
        assert torch.equal(a["input_ids"], b["input_ids"])
    # the same seed elsewhere gives the same masks; another seed does not
    again = Evaluator(Task.masked_lm, batches, FakeTokenizer(), seed=3)
    assert all(torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
               for a, b in zip(evaluator.batches, again.batches))
    other = Evaluator(Task.masked_lm, batches, FakeTokenizer(), seed=4)
    assert not all(torch.equal(a["labels"], b["labels"]) for a, b in zip(evaluator.batches, other.batches))
    assert all(torch.equal(b["input_ids"], o) for b, o in zip(batches, originals)), "caller's batches untouched"


def test_mask_for_mlm_follows_bert_masking() -> None:
    batches = _bert_batches(n=4, batch=8, seq=64)
    masked = mask_for_mlm(batches, FakeTokenizer(), seed=0)
    labels = torch.cat([m["labels"] for m in masked])
    ids = torch.cat([b["input_ids"] for b in batches])
    new_ids = torch.cat([m["input_ids"] for m in masked])
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any(), "[CLS] / [SEP] are never masked"
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(new_ids[~chosen], ids[~chosen]), "unmasked positions keep their token"
    eligible = ids.numel() - 2 * ids.shape[0]
    assert chosen.sum() / eligible == pytest.approx(0.15, abs=0.03)
    as_mask = (new_ids[chosen] == FakeTokenizer.mask_token_id).float().mean()
    assert as_mask == pytest.approx(0.8, abs=0.07)


def test_mask_for_mlm_needs_a_mask_token() -> None:
    tok = SimpleNamespace(mask_token_id=None, all_special_ids=[], __len__=lambda: 10)
    with pytest.raises(ProbeError, match=r"\[MASK\]"):
        mask_for_mlm(_bert_batches(1), tok, seed=0)


def test_accuracy_counts_top1() -> None:
    # class = first pixel rounded; labels right for 3 of 4 images
    model = Stub(lambda px: nn.functional.one_hot(px[:, 0, 0, 0].long(), 3).float())
    pixels = torch.zeros(4, 1, 2, 2)
    pixels[:, 0, 0, 0] = torch.tensor([0.0, 1.0, 2.0, 1.0])
    score = accuracy(model, [{"pixel_values": pixels, "labels": torch.tensor([0, 1, 2, 2])}])
    assert score.value == pytest.approx(0.75) and score.metric.higher_is_better


def test_hidden_fidelity_against_a_reference() -> None:
    batches = [{"input_ids": _ids(2, 5, seed=s)} for s in range(2)]
    embed = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    model = Stub(lambda ids: embed[ids])
    ref = hidden_states(model, batches)
    same = hidden_fidelity(model, batches, ref)
    assert same.value == pytest.approx(1.0) and same.extra["relative_error"] == pytest.approx(0.0, abs=1e-7)
    flipped = hidden_fidelity(Stub(lambda ids: -embed[ids]), batches, ref)
    assert flipped.value == pytest.approx(-1.0) and flipped.extra["relative_error"] == pytest.approx(2.0)
    scaled = hidden_fidelity(Stub(lambda ids: 1.1 * embed[ids]), batches, ref)
    assert scaled.value == pytest.approx(1.0) and scaled.extra["relative_error"] == pytest.approx(0.1)
    # the Evaluator takes the first model it scores as the reference
    evaluator = Evaluator(Task.encoder, batches)
    assert evaluator(model).value == pytest.approx(1.0)
    assert evaluator(Stub(lambda ids: 2 * embed[ids] + 0.5)).value < 1.0


def test_metric_must_fit_the_task() -> None:
    assert require_metric(Task.causal_lm, None) is MetricName.perplexity
    assert require_metric(Task.encoder, None) is MetricName.hidden_cosine
    with pytest.raises(UsageError, match="no LM head"):
        require_metric(Task.encoder, MetricName.perplexity)
    with pytest.raises(UsageError, match="does not fit"):
        require_metric(Task.causal_lm, MetricName.accuracy)


def test_no_scored_tokens_is_a_clear_error() -> None:
    model = Stub(lambda ids: torch.zeros(*ids.shape, 5))
    with pytest.raises(ProbeError, match="no tokens were scored"):
        causal_perplexity(model, [{"input_ids": torch.zeros(2, 1, dtype=torch.long)}])
