"""retrofit's objectives: the checkpoint's own LM / MLM loss, or distillation onto the frozen original, and their
held-out metric."""

from __future__ import annotations

import enum
import math
from typing import Any, Callable

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


def resolve_objective(task: arch.Task, wanted: Objective) -> Objective:
    have = {arch.Task.causal_lm: Objective.lm, arch.Task.masked_lm: Objective.mlm}.get(task)
    if wanted is Objective.auto:
        if task is arch.Task.image_classification:
            raise UsageError("retrofit trains on text; image classifiers are not supported")
        return have or Objective.distill
    if wanted is not Objective.distill and wanted is not have:
        raise UsageError(f"--objective {wanted.value} needs a {'causal LM' if wanted is Objective.lm else 'masked-LM'} head; "
                         f"this checkpoint is a {task.value} model; use --objective {(have or Objective.distill).value}")
    return wanted


def _hidden(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, output_hidden_states=True)
    return out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]


def objective_loss(model: nn.Module, batch: dict[str, torch.Tensor], objective: Objective,
                   teacher: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean loss of one batch. distill: relative squared error of the last hidden states plus that of the
    mean-pooled sentence embeddings, both against the frozen original's (teacher = (hidden, pooled))."""
    ids = batch["input_ids"]
    if objective is Objective.distill:
        h = _hidden(model, ids).float()
        th, tp = teacher
        pooled = h.mean(dim=1)
        return (h - th).pow(2).sum() / th.pow(2).sum() + (pooled - tp).pow(2).sum() / tp.pow(2).sum()
    logits = model(input_ids=ids).logits.float()
    labels = batch["labels"] if objective is Objective.mlm else F.pad(ids[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def teacher_targets(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = _hidden(model, ids).float()
    return h, h.mean(dim=1)



def held_out_metric(original: Any, batches: list[dict[str, torch.Tensor]], objective: Objective) -> Callable[[nn.Module], float]:
    """The objective's held-out metric: perplexity (lm, mlm; fixed masks) or the distillation loss."""
    from outlier_probe.evaluation import mask_for_mlm

    dev = original.device
    if objective is Objective.mlm:
        batches = mask_for_mlm(batches, original.processor, seed=0)
    targets = [teacher_targets(original.model, b["input_ids"].to(dev)) for b in batches] if objective is Objective.distill else None

    @torch.no_grad()
    def evaluate(model: nn.Module) -> float:
        model.eval()
        losses = [float(objective_loss(model, {k: v.to(dev) for k, v in b.items()}, objective, targets[i] if targets else None))
                  for i, b in enumerate(batches)]
        mean = sum(losses) / len(losses)
        return mean if objective is Objective.distill else math.exp(min(mean, 700.0))

    return evaluate
