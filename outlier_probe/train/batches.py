"""Data plumbing shared by the transformer tasks: the held-out split, the deterministic batch sampler,
the loss of one batch (causal LM, masked LM, image classification)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from outlier_probe import arch
from outlier_probe.train.config import EVAL_FRACTION


@dataclass
class _Data:
    task: arch.Task
    train: dict[str, torch.Tensor]  # "input_ids" (N, T) or "pixel_values" (N, C0, H, W) + "labels" (N,)
    eval_batches: list[dict[str, torch.Tensor]]  # fixed (MLM: masked once), with what the loss needs
    probe: dict[str, torch.Tensor]  # unmasked first eval batch: the outlier probe's input
    tokens_per_sample: int
    description: dict[str, Any]
    channels: int = 3  # vit: channels fed to the model (C0 = 1 is expanded to 3 per batch)

    @property
    def n_train(self) -> int:
        return len(next(iter(self.train.values())))


def _split(n: int) -> int:
    """How many of n items are held out for evaluation."""
    return max(1, math.ceil(n * EVAL_FRACTION))


def _eval_batches(items: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    keys = list(items)
    return [dict(zip(keys, parts)) for parts in zip(*(items[k].split(batch_size) for k in keys))]



def _channels(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    return pixels.expand(-1, channels, -1, -1) if pixels.shape[1] != channels else pixels


class _Sampler:
    """Batch of step s: items [s*B, (s+1)*B) of the concatenated per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = pos // self.n
        out = torch.empty_like(pos)
        for epoch in epochs.unique().tolist():
            sel = epochs == epoch
            out[sel] = self._perm(epoch)[pos[sel] % self.n]
        return out


def _train_batch(d: _Data, sampler: _Sampler, step: int, tokenizer: Any, seed: int) -> dict[str, torch.Tensor]:
    idx = sampler.indices(step)
    if d.task is arch.Task.image_classification:
        return {"pixel_values": _channels(d.train["pixel_values"][idx], d.channels), "labels": d.train["labels"][idx]}
    batch = {"input_ids": d.train["input_ids"][idx]}
    if d.task is arch.Task.masked_lm:
        from outlier_probe.evaluation import mask_for_mlm

        batch = mask_for_mlm([batch], tokenizer, seed=(seed + 1) * 2**32 + step)[0]  # a fresh mask every step
    return batch



def _loss(model: nn.Module, batch: dict[str, torch.Tensor], task: arch.Task, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, number of scored targets) for one batch already on the device; both stay on the device."""
    if task is arch.Task.image_classification:
        logits = model(pixel_values=batch["pixel_values"]).logits
        labels = batch["labels"]
    elif task is arch.Task.masked_lm:
        logits = model(input_ids=batch["input_ids"]).logits
        labels = batch["labels"]
    else:
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits  # (B, T, V)
        labels = F.pad(ids[:, 1:], (0, 1), value=-100)  # next token; the last position has none
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    count = (labels != -100).sum()
    if reduction == "sum":
        return total, count
    return total / count.clamp(min=1), count


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":  # pinned host memory: the copy does not wait for the GPU to drain
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch

