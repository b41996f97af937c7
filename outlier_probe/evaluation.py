"""Perplexity, accuracy and hidden-state fidelity: the metric a quantized model is judged by.

The float and the quantized model are always scored on the very same batches (masks included).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from outlier_probe.arch import Task
from outlier_probe.offload import execution_device
from outlier_probe.errors import ProbeError, UsageError

Batch = dict[str, torch.Tensor]
Progress = Callable[[int, int], None]

MLM_PROBABILITY = 0.15


class MetricName(str, enum.Enum):
    perplexity = "perplexity"  # causal LM, token level
    mlm_perplexity = "mlm_perplexity"  # masked LM, over masked positions
    accuracy = "accuracy"  # image classification, top-1
    hidden_cosine = "hidden_cosine"  # encoder without a head: fidelity of the last hidden state vs float
    forecast_mse = "forecast_mse"  # forecaster: MSE on the standardised test windows (MAE in extra)

    @property
    def higher_is_better(self) -> bool:
        return self in (MetricName.accuracy, MetricName.hidden_cosine)


METRIC_NOTES = {
    MetricName.perplexity: "token-level perplexity exp(mean NLL of next-token predictions) over non-overlapping "
    "sequences; not lm-eval's word-level document perplexity",
    MetricName.mlm_perplexity: "exp(mean NLL over masked positions); 15% of non-special tokens masked "
    "(80% [MASK], 10% random, 10% kept), fixed seed, identical masks for float and quantized",
    MetricName.accuracy: "top-1 accuracy",
    MetricName.forecast_mse: "MSE (and MAE) over every test window, step and column of the standardised series "
    "(scaler fitted on the training rows); lower is better",
    MetricName.hidden_cosine: "no head to score: mean cosine similarity of the last hidden state per token vs the "
    "float model (relative error reported too)",
}


@dataclass(frozen=True)
class Score:
    metric: MetricName
    value: float
    extra: dict[str, float] | None = None


def metric_for(task: Task) -> MetricName:
    return {
        Task.causal_lm: MetricName.perplexity,
        Task.masked_lm: MetricName.mlm_perplexity,
        Task.image_classification: MetricName.accuracy,
        Task.encoder: MetricName.hidden_cosine,
    }[task]


def require_metric(task: Task, wanted: MetricName | None) -> MetricName:
    """The metric for a task; asking for one the model cannot give is a usage error."""
    metric = metric_for(task)
    if wanted is not None and wanted is not metric:
        if wanted in (MetricName.perplexity, MetricName.mlm_perplexity) and task is Task.encoder:
            raise UsageError(
                "this checkpoint has no LM head, so it has no perplexity; drop --metric to get hidden-state fidelity instead"
            )
        raise UsageError(f"--metric {wanted.value} does not fit a {task.value} model; it gives {metric.value}")
    return metric


def mask_for_mlm(batches: Sequence[Batch], tokenizer: Any, seed: int) -> list[Batch]:
    """BERT-style 15% masking with a fixed seed; returns new batches with `labels` (-100 where unmasked)."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ProbeError("the tokenizer has no [MASK] token, so masked-LM perplexity cannot be measured")
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    vocab = len(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch in batches:
        ids = batch["input_ids"]
        probs = torch.full(ids.shape, MLM_PROBABILITY)
        probs[torch.isin(ids, special)] = 0.0
        masked = torch.bernoulli(probs, generator=gen).bool()
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        replace = torch.bernoulli(torch.full(ids.shape, 0.8), generator=gen).bool() & masked
        randomize = torch.bernoulli(torch.full(ids.shape, 0.5), generator=gen).bool() & masked & ~replace
        new_ids = ids.clone()
        new_ids[replace] = mask_id
        new_ids[randomize] = torch.randint(vocab, ids.shape, generator=gen)[randomize]
        out.append({**batch, "input_ids": new_ids, "labels": labels})
    return out


def _inputs(batch: Batch, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items() if k != "labels"}


@torch.inference_mode()
def causal_perplexity(model: nn.Module, batches: Sequence[Batch], progress: Progress | None = None) -> Score:
    device = execution_device(model)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i, batch in enumerate(batches):
        logits = model(**_inputs(batch, device)).logits.float()  # (B, T, V)
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).to(device)
        shift_logits, shift_ids = logits[:, :-1], ids[:, 1:]
        keep = mask[:, 1:].bool()
        losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_ids.reshape(-1), reduction="none")
        nll += losses[keep.reshape(-1)].double().sum()
        count += int(keep.sum())
        if progress:
            progress(i + 1, len(batches))
    return Score(MetricName.perplexity, _exp_mean(nll, count), {"tokens": float(count), "nll": float(nll) / max(count, 1), "nll_sum": float(nll)})


@torch.inference_mode()
def mlm_perplexity(model: nn.Module, masked_batches: Sequence[Batch], progress: Progress | None = None) -> Score:
    device = execution_device(model)
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for i, batch in enumerate(masked_batches):
        logits = model(**_inputs(batch, device)).logits.float()
        labels = batch["labels"].to(device)
        keep = labels != -100
        nll += F.cross_entropy(logits[keep], labels[keep], reduction="sum").double()
        count += int(keep.sum())
        if progress:
            progress(i + 1, len(masked_batches))
    return Score(MetricName.mlm_perplexity, _exp_mean(nll, count), {"masked_tokens": float(count), "nll_sum": float(nll)})


@torch.inference_mode()
def accuracy(model: nn.Module, batches: Sequence[Batch], progress: Progress | None = None) -> Score:
    device = execution_device(model)
    correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    for i, batch in enumerate(batches):
        logits = model(**_inputs(batch, device)).logits
        correct += (logits.argmax(-1) == batch["labels"].to(device)).sum()
        total += len(batch["labels"])
        if progress:
            progress(i + 1, len(batches))
    return Score(MetricName.accuracy, int(correct) / max(total, 1), {"images": float(total), "correct": float(correct)})


def _last_hidden(output: Any) -> torch.Tensor:
    if hasattr(output, "last_hidden_state") and output.last_hidden_state is not None:
        return output.last_hidden_state
    if hasattr(output, "hidden_states") and output.hidden_states:
        return output.hidden_states[-1]
    return output[0]


@torch.inference_mode()
def hidden_states(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    device = execution_device(model)
    return [_last_hidden(model(**_inputs(b, device))).float().cpu() for b in batches]


@torch.inference_mode()
def hidden_fidelity(model: nn.Module, batches: Sequence[Batch], reference: Sequence[torch.Tensor],
                    progress: Progress | None = None) -> Score:
    """Mean per-token cosine similarity and relative L2 error of the last hidden state vs `reference`."""
    device = execution_device(model)
    cos_sum, err_num, err_den, tokens = 0.0, 0.0, 0.0, 0
    for i, (batch, ref) in enumerate(zip(batches, reference)):
        out = _last_hidden(model(**_inputs(batch, device))).float().cpu()
        cos_sum += float(F.cosine_similarity(out, ref, dim=-1).double().sum())
        err_num += float((out - ref).double().pow(2).sum())
        err_den += float(ref.double().pow(2).sum())
        tokens += out.shape[0] * out.shape[1]
        if progress:
            progress(i + 1, len(batches))
    return Score(MetricName.hidden_cosine, cos_sum / max(tokens, 1), {"relative_error": math.sqrt(err_num / max(err_den, 1e-30)),
                 "cos_sum": cos_sum, "err_num": err_num, "err_den": err_den, "tokens": float(tokens)})


def merge_score(score: Score) -> Score:
    """The score of all ranks' batches in a data-parallel run, from the SUM of its raw sums (identity
    in a single process). Each rank passes the score of its own shard."""
    from outlier_probe import distributed

    if not distributed.is_active():
        return score
    extra = dict(score.extra or {})
    m = score.metric
    keys = {MetricName.perplexity: ("nll_sum", "tokens"), MetricName.mlm_perplexity: ("nll_sum", "masked_tokens"),
            MetricName.accuracy: ("correct", "images"), MetricName.hidden_cosine: ("cos_sum", "err_num", "err_den", "tokens")}[m]
    extra.update(zip(keys, distributed.all_sum([extra[k] for k in keys])))
    if m is MetricName.perplexity:
        extra["nll"] = extra["nll_sum"] / max(extra["tokens"], 1)
        value = _exp_mean(torch.tensor(extra["nll_sum"], dtype=torch.float64), int(extra["tokens"]))
    elif m is MetricName.mlm_perplexity:
        value = _exp_mean(torch.tensor(extra["nll_sum"], dtype=torch.float64), int(extra["masked_tokens"]))
    elif m is MetricName.accuracy:
        value = extra["correct"] / max(extra["images"], 1)
    else:
        value = extra["cos_sum"] / max(extra["tokens"], 1)
        extra["relative_error"] = math.sqrt(extra["err_num"] / max(extra["err_den"], 1e-30))
    return Score(m, value, extra)


def scored_logits(metric: MetricName, logits: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """The (N, V) rows of `logits` that `metric` scores in `batch` (None: the metric reads no logits).

    The same positions the scorers above use: next-token predictions on attended tokens, masked
    positions, or every image.
    """
    if metric is MetricName.perplexity:
        mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))[:, 1:].to(logits.device).bool()
        return logits[:, :-1][mask]
    if metric is MetricName.mlm_perplexity:
        return logits[batch["labels"].to(logits.device) != -100]
    if metric is MetricName.accuracy:
        return logits
    return None


def _exp_mean(nll: torch.Tensor, count: int) -> float:
    if count == 0:
        raise ProbeError("no tokens were scored; use longer sequences or more samples")
    mean = float(nll) / count
    return math.exp(mean) if mean < 700 else math.inf


class Evaluator:
    """Scores models on fixed batches; prepares masks / float references once so every model sees the same."""

    def __init__(self, task: Task, batches: Sequence[Batch], tokenizer: Any = None, seed: int = 0,
                 metric: MetricName | None = None) -> None:
        self.metric = require_metric(task, metric)
        self.batches = batches if isinstance(batches, Sequence) else list(batches)  # lazy batches stay lazy
        if self.metric is MetricName.mlm_perplexity:
            self.batches = mask_for_mlm(self.batches, tokenizer, seed)  # all of them: the masks do not depend on ranks
        from outlier_probe import distributed

        self.batches = distributed.shard(self.batches)  # this rank's batches; merge_score sums the ranks
        self.reference: list[torch.Tensor] | None = None

    def reference_score(self, model: nn.Module, progress: Progress | None = None) -> Score:
        """Score the float model in one pass; for hidden-state fidelity that pass records the reference
        (the float model's fidelity to itself is 1 by definition, no second pass)."""
        if self.metric is MetricName.hidden_cosine:
            self.reference = hidden_states(model, self.batches)
            return Score(self.metric, 1.0, {"relative_error": 0.0})
        return self(model, progress)

    def __call__(self, model: nn.Module, progress: Progress | None = None) -> Score:
        return merge_score(self._score(model, progress))

    def _score(self, model: nn.Module, progress: Progress | None) -> Score:
        if self.metric is MetricName.perplexity:
            return causal_perplexity(model, self.batches, progress)
        if self.metric is MetricName.mlm_perplexity:
            return mlm_perplexity(model, self.batches, progress)
        if self.metric is MetricName.accuracy:
            return accuracy(model, self.batches, progress)
        if self.reference is None:  # the first model scored (the float one) is the reference
            self.reference = hidden_states(model, self.batches)
        return hidden_fidelity(model, self.batches, self.reference, progress)
