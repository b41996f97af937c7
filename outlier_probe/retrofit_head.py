"""retrofit's `mlm-head` objective: a BERT-style masked-LM head for an encoder checkpoint that has none (MiniLM).

The head (dense -> GELU -> LayerNorm -> decoder tied to the word embeddings, plus a bias) is trained once on the
frozen backbone, then copied to every twin and the control, which fine-tune backbone and head with the masked-LM
loss. Logits are computed at the masked positions only (the same loss as full logits with ignore_index -100,
at ~15% of the decoder's cost).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from outlier_probe.errors import UsageError

HEAD_FILE = "mlm_head.safetensors"  # saved next to a twin's checkpoint
HEAD_LR = 1e-3  # the head starts from scratch: a larger step than the fine-tuning's
HEAD_SEED = 0  # one head for every seed: trained once


class MLMHead(nn.Module):
    """BERT's LM prediction head. `tied`: the decoder is the encoder's word-embedding matrix (vocab x hidden)."""

    def __init__(self, hidden: int, vocab: int, eps: float = 1e-12, tied: bool = True) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.decoder = None if tied else nn.Linear(hidden, vocab, bias=False)
        self.bias = nn.Parameter(torch.zeros(vocab))
        nn.init.normal_(self.dense.weight, std=0.02)  # BERT's initializer_range
        nn.init.zeros_(self.dense.bias)
        if self.decoder is not None:
            nn.init.normal_(self.decoder.weight, std=0.02)

    def forward(self, hidden: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(hidden)))
        return F.linear(x, embedding if self.decoder is None else self.decoder.weight, self.bias)


def word_embeddings(model: nn.Module) -> torch.Tensor:
    return model.get_input_embeddings().weight


def make_head(model: nn.Module, processor: Any, seed: int = HEAD_SEED) -> MLMHead:
    """A fresh head for `model` (seeded); tied when the word embeddings are vocab x hidden. Usage errors when the
    model already has a head or the tokenizer has no [MASK]."""
    from outlier_probe import arch

    info = arch.model_info(model)
    if info.task is not arch.Task.encoder:
        raise UsageError(f"--objective mlm-head is for encoders without a head; this checkpoint is a {info.task.value} model "
                         f"(use --objective {'lm' if info.task is arch.Task.causal_lm else 'mlm'})")
    if info.is_causal:
        raise UsageError(f"--objective mlm-head needs a bidirectional encoder; {info.model_type!r} is causal (use --objective distill)")
    if getattr(processor, "mask_token_id", None) is None:
        raise UsageError("--objective mlm-head needs a tokenizer with a [MASK] token")
    emb = word_embeddings(model)
    hidden = info.hidden_size or emb.shape[1]
    eps = float(getattr(model.config, "layer_norm_eps", 1e-12))
    torch.manual_seed(seed)
    head = MLMHead(hidden, emb.shape[0], eps=eps, tied=emb.shape[1] == hidden)
    return head.to(emb.device)


def mlm_head_loss(model: nn.Module, head: MLMHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the masked positions (labels != -100); no host sync (0 for a batch without masks)."""
    out = model(input_ids=batch["input_ids"])
    return masked_loss(out.last_hidden_state, head, word_embeddings(model), batch["labels"])


def masked_loss(hidden: torch.Tensor, head: MLMHead, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    sel = labels != -100
    logits = head(hidden[sel], embedding).float()
    return F.cross_entropy(logits, labels[sel], reduction="sum") / sel.sum().clamp(min=1)


def train_head(model: nn.Module, head: MLMHead, train_ids: torch.Tensor, processor: Any, steps: int, batch_size: int,
               evaluate: Callable[[nn.Module, MLMHead], float], log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """AdamW on the head alone, the backbone frozen (no grad, eval mode, weights untouched); cosine lr from HEAD_LR.
    -> {steps, held-out MLM perplexity before / after, mean training loss of the last 10% of steps}."""
    from outlier_probe.evaluation import mask_for_mlm

    was = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    model.eval()
    dev = word_embeddings(model).device
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=HEAD_LR, weight_decay=0.01)
    gen = torch.Generator().manual_seed(HEAD_SEED)
    order = torch.cat([torch.randperm(len(train_ids), generator=gen) for _ in range(math.ceil(steps * batch_size / len(train_ids)))])
    before = evaluate(model, head)
    tail, n_tail = torch.zeros((), device=dev), 0
    try:
        for step in range(steps):
            batch = {"input_ids": train_ids[order[step * batch_size : (step + 1) * batch_size]]}
            batch = {k: v.to(dev) for k, v in mask_for_mlm([batch], processor, seed=2**40 + step)[0].items()}
            for g in opt.param_groups:
                g["lr"] = HEAD_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
            with torch.no_grad():
                hidden = model(input_ids=batch["input_ids"]).last_hidden_state
            loss = masked_loss(hidden, head, word_embeddings(model), batch["labels"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= steps - max(1, steps // 10):
                tail, n_tail = tail + loss.detach(), n_tail + 1
            if log and (step + 1) % max(1, steps // 5) == 0:
                log(f"  head step {step + 1:>5}  loss {float(loss.detach()):.4g}")
    finally:
        for p, r in zip(model.parameters(), was):
            p.requires_grad_(r)
    head.eval()
    return {"head_steps": steps, "head_lr": HEAD_LR, "mlm_perplexity_untrained_head": before,
            "mlm_perplexity_trained_head": evaluate(model, head), "head_train_loss_end": float(tail) / max(n_tail, 1)}


def save_head(head: MLMHead, folder: Path) -> Path:
    """The head's tensors (safetensors) next to a twin's checkpoint; the tied decoder is the checkpoint's embeddings."""
    from safetensors.torch import save

    from outlier_probe.report.io import atomic_open

    path = Path(folder) / HEAD_FILE
    with atomic_open(path, "wb") as handle:
        handle.write(save({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}))
    return path


def shared_head_for(steps: int, batch_size: int, original: Any, objective: Any, train_ids: torch.Tensor, evaluate: Any,
                    log: Callable[[str], None] | None) -> tuple[MLMHead | None, dict[str, Any]]:
    """mlm-head: the head every twin starts from, trained once on the frozen original; (None, {}) otherwise."""
    from outlier_probe.retrofit_objective import Objective

    if objective is not Objective.mlm_head:
        return None, {}
    head = make_head(original.model, original.processor)
    if log:
        log(f"mlm-head: {steps} steps on the frozen backbone")
    info = train_head(original.model, head, train_ids, original.processor, steps, batch_size, evaluate, log)
    head.requires_grad_(False)
    return head, info


def save_twin(twin: Any, head: nn.Module | None, folder: Path) -> Path:
    """The twin's checkpoint (weights, tokenizer, variant metadata; any command loads it) and its mlm-head, written
    to a temporary folder and moved into place whole."""
    import shutil

    from outlier_probe.loading import save_checkpoint

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(twin.model, tmp, twin.processor)
    if head is not None:
        save_head(head, tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder.resolve()
