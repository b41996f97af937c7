"""retrofit's mlm-head: the loss on masked positions equals full-logit cross-entropy, head training leaves the
backbone bit-identical, every twin starts from the same trained head, and bad uses are usage errors."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from outlier_probe.config import Device, LoadConfig
from outlier_probe.errors import UsageError
from outlier_probe.loading import load_model
from outlier_probe.retrofit import run_retrofit
from outlier_probe.retrofit_config import RetrofitConfig
from outlier_probe.retrofit_head import HEAD_FILE, MLMHead, make_head, masked_loss, train_head
from outlier_probe.retrofit_objective import Objective, resolve_objective


@pytest.fixture(scope="module")
def encoder(tiny_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A headless BERT encoder (as MiniLM) with the tiny BERT's tokenizer."""
    import transformers

    from tests.conftest import make_config

    bert = tiny_checkpoint("bert")
    tok = transformers.AutoTokenizer.from_pretrained(str(bert))
    torch.manual_seed(0)
    model = transformers.BertModel._from_config(copy.deepcopy(make_config("bert", vocab_size=len(tok)))).eval()
    out = tmp_path_factory.mktemp("encoder")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def test_masked_loss_matches_full_logits_and_tied_decoder() -> None:
    torch.manual_seed(0)
    head, emb = MLMHead(8, 11), torch.randn(11, 8)
    hidden = torch.randn(2, 5, 8)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 4], labels[1, 0] = 3, 7, 10
    full = head(hidden, emb)  # (2, 5, 11) over every position
    ref = F.cross_entropy(full.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(masked_loss(hidden, head, emb, labels), ref)
    x = F.layer_norm(F.gelu(hidden @ head.dense.weight.T + head.dense.bias), (8,), eps=1e-12)  # by hand, decoder = emb
    torch.testing.assert_close(full, x @ emb.T + head.bias)
    assert float(masked_loss(hidden, head, emb, torch.full((2, 5), -100)).detach()) == 0.0  # no mask: 0, not NaN


def test_head_training_leaves_the_backbone_bit_identical(encoder: Path) -> None:
    from outlier_probe.retrofit_objective import HeldOut

    loaded = load_model(LoadConfig(source=str(encoder)))
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    grads = [p.requires_grad for p in loaded.model.parameters()]
    head = make_head(loaded.model, loaded.processor)
    assert head.decoder is None  # tied: 32-wide embeddings, hidden 32
    start = {k: v.clone() for k, v in head.state_dict().items()}
    ids = torch.randint(5, 15, (16, 16), generator=torch.Generator().manual_seed(0))  # 10 tokens: the bias can learn them
    scorer = HeldOut(loaded, [{"input_ids": ids[:4]}], Objective.mlm_head)
    info = train_head(loaded.model, head, ids, loaded.processor, steps=20, batch_size=4, evaluate=scorer)
    after = loaded.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # frozen: bit-identical
    assert [p.requires_grad for p in loaded.model.parameters()] == grads  # restored after training
    assert not torch.equal(start["dense.weight"], head.state_dict()["dense.weight"])  # the head did train
    assert info["head_steps"] == 20 and info["mlm_perplexity_trained_head"] == pytest.approx(scorer(loaded.model, head))
    assert info["mlm_perplexity_trained_head"] < info["mlm_perplexity_untrained_head"]


def test_every_twin_starts_from_the_same_trained_head(encoder: Path, text_file: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import outlier_probe.retrofit as rf

    real, starts = rf.fine_tune, []

    def spy(*args: Any, **kwargs: Any) -> Any:
        starts.append({k: v.clone() for k, v in args[-1].state_dict().items()})  # the head argument
        return real(*args, **kwargs)

    monkeypatch.setattr(rf, "fine_tune", spy)
    cfg = RetrofitConfig(source=str(encoder), data=text_file, objective="mlm-head", variants=("softmax1", "gated"), steps=2,
                         head_steps=3, batch_size=2, seq_len=32, eval_every=1, eval_samples=4, threads=1, device=Device.cpu,
                         warmup=0, lr=1e-3, save=tmp_path / "ck")
    result = run_retrofit(cfg)
    assert len(starts) == 3 and all(torch.equal(s[k], starts[0][k]) for s in starts[1:] for k in s)
    assert result.head["head_steps"] == 3
    control = result.twins[0]
    assert control.before.objective_metric == pytest.approx(result.head["mlm_perplexity_trained_head"])
    assert result.original.objective_metric == control.before.objective_metric
    assert math.isfinite(control.after.objective_metric) and control.curve[0]["eval_loss"] == pytest.approx(control.before.objective_metric)
    assert {"max_inf_ffn_output", "max_inf_attn_output", "max_inf_residual"} <= set(control.curve[-1])
    gated = load_model(LoadConfig(source=result.twins[2].saved))  # the saved twin loads as a gated model
    assert gated.attention.value == "gated" and (Path(result.twins[2].saved) / HEAD_FILE).is_file()


def test_mlm_head_needs_a_headless_bidirectional_encoder(tiny_checkpoint: Callable[..., Path]) -> None:
    from outlier_probe import arch

    assert resolve_objective(arch.Task.encoder, Objective.mlm_head) is Objective.mlm_head
    with pytest.raises(UsageError, match="use --objective mlm"):
        resolve_objective(arch.Task.masked_lm, Objective.mlm_head)
    gpt2 = load_model(LoadConfig(source=str(tiny_checkpoint("gpt2"))))
    with pytest.raises(UsageError, match="mlm-head"):
        make_head(gpt2.model, gpt2.processor)
