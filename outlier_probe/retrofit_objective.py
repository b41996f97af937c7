"""retrofit's objectives: the checkpoint's own LM / MLM loss, or distillation onto the frozen original, and their
held-out metric."""

from __future__ import annotations

import enum
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from outlier_probe import arch
from outlier_probe.errors import UsageError


class Objective(str, enum.Enum):
    auto = "auto"  # the checkpoint's own head: causal LM or masked LM; distill for an encoder without a head
    lm = "lm"  # causal next-token loss (needs an LM head)
    mlm = "mlm"  # masked-LM loss (needs an MLM head)
    distill = "distill"  # match the frozen original's last hidden states and mean-pooled embedding
    mlm_head = "mlm-head"  # masked-LM loss through a head trained first on the frozen backbone (retrofit_head.py)


def resolve_objective(task: arch.Task, wanted: Objective) -> Objective:
    have = {arch.Task.causal_lm: Objective.lm, arch.Task.masked_lm: Objective.mlm}.get(task)
    if wanted is Objective.auto:
        if task is arch.Task.image_classification:
            raise UsageError("retrofit trains on text; image classifiers are not supported")
        return have or Objective.distill
    if wanted is Objective.mlm_head:
        if have is not None:
            raise UsageError(f"--objective mlm-head is for encoders without a head; this checkpoint is a {task.value} model; "
                             f"use --objective {have.value}")
        return wanted
    if wanted is not Objective.distill and wanted is not have:
        raise UsageError(f"--objective {wanted.value} needs a {'causal LM' if wanted is Objective.lm else 'masked-LM'} head; "
                         f"this checkpoint is a {task.value} model; use --objective {(have or Objective.distill).value}")
    return wanted


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, output_hidden_states=True)
    return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]


def objective_loss(model: nn.Module, batch: dict[str, torch.Tensor], objective: Objective,
                   teacher: tuple[torch.Tensor, torch.Tensor] | None = None, head: nn.Module | None = None) -> torch.Tensor:
    """Mean loss of one batch. distill: relative squared error of the last hidden states plus that of the
    mean-pooled sentence embeddings, both against the frozen original's (teacher = (hidden, pooled)).
    mlm-head: masked-LM cross-entropy through `head` on the last hidden state."""
    ids = batch["input_ids"]
    if objective is Objective.distill:
        return distill_loss(_hidden(model, ids), teacher)
    if objective is Objective.mlm_head:
        from outlier_probe.retrofit_head import mlm_head_loss

        return mlm_head_loss(model, head, batch)
    return logits_loss(model(input_ids=ids).logits, batch, objective)


def distill_loss(hidden: torch.Tensor, teacher: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    h = hidden.float()
    th, tp = teacher
    pooled = h.mean(dim=1)
    return (h - th).pow(2).sum() / th.pow(2).sum() + (pooled - tp).pow(2).sum() / tp.pow(2).sum()


def logits_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor], objective: Objective) -> torch.Tensor:
    logits, ids = logits.float(), batch["input_ids"]
    labels = batch["labels"] if objective is Objective.mlm else F.pad(ids[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def teacher_targets(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = _hidden(model, ids).float()
    return h, h.mean(dim=1)



class HeldOut:
    """The objective's held-out metric: perplexity (lm, mlm, mlm-head; fixed masks) or the distillation loss.
    `evaluate(model, head)` runs its own pass; `from_outputs` reads it off the clean pass `measure` already ran
    (lm, distill: the same inputs), so only the masked objectives need a pass of their own."""

    def __init__(self, original: Any, batches: list[dict[str, torch.Tensor]], objective: Objective,
                 targets: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        from outlier_probe.evaluation import mask_for_mlm

        self.objective, self.dev = objective, original.device
        self.masked = objective in (Objective.mlm, Objective.mlm_head)
        self.batches = mask_for_mlm(batches, original.processor, seed=0) if self.masked else batches
        need = objective is Objective.distill
        self.targets = (targets or [teacher_targets(original.model, b["input_ids"].to(self.dev)) for b in batches]) if need else None

    def _finish(self, losses: list[float]) -> float:
        mean = sum(losses) / len(losses)
        return mean if self.objective is Objective.distill else math.exp(min(mean, 700.0))

    @torch.no_grad()
    def __call__(self, model: nn.Module, head: nn.Module | None = None) -> float:
        model.eval()
        losses = [float(objective_loss(model, {k: v.to(self.dev) for k, v in b.items()}, self.objective,
                                       self.targets[i] if self.targets else None, head)) for i, b in enumerate(self.batches)]
        return self._finish(losses)

    def batch_loss(self, output: Any, i: int) -> torch.Tensor:
        """Batch i's loss from the clean pass's model output (lm: its logits; distill: its last hidden state);
        a device tensor, so the pass never syncs the host."""
        if self.objective is Objective.distill:
            hidden = output.last_hidden_state if getattr(output, "last_hidden_state", None) is not None else output.hidden_states[-1]
            return distill_loss(hidden, self.targets[i])
        return logits_loss(output.logits, {k: v.to(self.dev) for k, v in self.batches[i].items()}, self.objective)

    def finish(self, losses: list[torch.Tensor]) -> float:
        return self._finish([float(x) for x in torch.stack(losses).double().cpu()])


def held_out_metric(original: Any, batches: list[dict[str, torch.Tensor]], objective: Objective,
                    targets: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> HeldOut:
    return HeldOut(original, batches, objective, targets)
