"""How far a quantized model's output distribution is from the float model's: KL(float || quantized).

The float pass records the log-probabilities of the positions the metric scores (evaluation.scored_logits);
every later pass through the same Evaluator is compared position by position. Encoders without a head
have no distribution: their divergence is 1 - mean cosine of the last hidden state (the metric itself).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from outlier_probe.evaluation import Evaluator, MetricName, Score, scored_logits

DIVERGENCE_NOTES = {
    "kl": "KL(float || quantized) of the output distribution, mean over the scored positions (nats)",
    "1-cos": "1 - mean cosine similarity of the last hidden state vs float (no head: no distribution)",
}


class OutputDivergence:
    """Context manager: while it is open, each forward of `model` (batch i of the evaluator) is either
    recorded as the float reference or compared with it. Sums stay on the device (no host sync per batch)."""

    def __init__(self, evaluator: Evaluator, model: nn.Module, reference: list[torch.Tensor] | None = None) -> None:
        self.evaluator, self.model = evaluator, model
        self.recording = reference is None
        self.reference: list[torch.Tensor] = [] if reference is None else reference
        self.kl_sum: torch.Tensor | None = None
        self.positions = 0
        self._batch = 0
        self._handle: Any = None

    def __enter__(self) -> OutputDivergence:
        if self.evaluator.metric is not MetricName.hidden_cosine:  # the metric is its own divergence there
            self._handle = self.model.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()

    def _hook(self, _m: nn.Module, _args: tuple, output: Any) -> None:
        logits = getattr(output, "logits", None)
        batch = self.evaluator.batches[self._batch]
        self._batch += 1
        if logits is None:
            return
        rows = scored_logits(self.evaluator.metric, logits.detach(), batch)
        if rows is None:
            return
        logq = F.log_softmax(rows.float(), dim=-1)
        if self.recording:
            self.reference.append(logq.cpu())
            return
        logp = self.reference[self._batch - 1].to(logq.device)
        kl = (logp.exp() * (logp - logq)).sum().double()  # sum over positions and classes
        self.kl_sum = kl if self.kl_sum is None else self.kl_sum + kl
        self.positions += logq.shape[0]

    def divergence(self, score: Score) -> float:
        """KL in nats per scored position, or 1 - cosine for headless encoders."""
        if score.metric is MetricName.hidden_cosine:
            return 1.0 - score.value
        if self.kl_sum is None or not self.positions:
            return math.nan
        return max(float(self.kl_sum) / self.positions, 0.0)  # rounding can give -1e-9 for identical outputs


def divergence_name(metric: MetricName) -> str:
    return "1-cos" if metric is MetricName.hidden_cosine else "kl"
