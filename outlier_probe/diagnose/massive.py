"""Massive activations (Sun et al., 2024): per layer, the largest |x| of the residual stream and where it is.

Streamed per block output: the running top |x| with its (sequence, position, channel, token id), kept on
the device with torch.where (no host sync), and the median |x| as the mean of the per-batch medians.
An activation is *massive* when |x| > `min_abs` (100) and |x| / median > `min_ratio` (1000), the paper's
"above 100 and about 1,000x the median".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_ABS, MIN_RATIO = 100.0, 1000.0


@dataclass(frozen=True)
class MassiveStats:
    layer: int
    top_abs: float
    median_abs: float
    ratio: float
    sequence: int  # index among the evaluated sequences
    position: int
    channel: int
    token_id: int


class MassiveObserver:
    """One block output's top |x| and its location; `update(x, input_ids)` with x (B, T, d)."""

    def __init__(self, layer: int) -> None:
        self.layer = layer
        self.best: torch.Tensor | None = None  # (5,) float64: value, sequence, position, channel, token id
        self.median_sum: torch.Tensor | None = None
        self.batches = 0
        self.seen = 0  # sequences before the batch in flight (host count)

    @torch.no_grad()
    def update(self, x: torch.Tensor, input_ids: torch.Tensor) -> None:
        a = x.detach().abs().float()  # (B, T, d)
        b, t, d = a.shape
        flat = a.reshape(-1)
        idx = flat.argmax()
        seq, pos, ch = idx // (t * d), (idx // d) % t, idx % d
        token = input_ids.to(a.device)[seq, pos]
        cand = torch.stack([flat[idx].double(), (seq + self.seen).double(), pos.double(), ch.double(), token.double()])
        self.best = cand if self.best is None else torch.where(cand[0] > self.best[0], cand, self.best)
        med = flat.median().double()
        self.median_sum = med if self.median_sum is None else self.median_sum + med
        self.batches += 1
        self.seen += b

    def result(self) -> MassiveStats | None:
        if self.best is None:
            return None
        v, s, p, c, tok = (float(x) for x in self.best.cpu())
        median = float(self.median_sum) / self.batches
        return MassiveStats(self.layer, v, median, v / median if median > 0 else float("inf"), int(s), int(p), int(c), int(tok))


def is_massive(stats: MassiveStats, min_abs: float = MIN_ABS, min_ratio: float = MIN_RATIO) -> bool:
    return stats.top_abs > min_abs and stats.ratio > min_ratio
