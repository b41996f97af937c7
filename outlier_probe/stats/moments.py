"""Mergeable streaming moments (count, mean, central power sums M2..M4) in float64.

Batches are reduced to their own central moments and combined with the pairwise update of
Chan et al. / Pebay (2008). Raw power sums (sum x, sum x^2, ...) would cancel catastrophically
when |mean| >> std; central sums only ever add deviations from a mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

_F64 = torch.float64

# (count, mean, M2, M3, M4); Mp = sum((x - mean)^p). All 0-d float64 tensors on one device.
Moments = tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


@dataclass(frozen=True)
class MomentsResult:
    """Summary of every value seen. Float fields are NaN where undefined (see `moments_result`)."""

    count: int
    mean: float
    var: float  # unbiased, n - 1
    std: float  # sqrt(var)
    kurtosis: float  # Pearson, population: scipy.stats.kurtosis(x, fisher=False, bias=True)
    excess_kurtosis: float  # kurtosis - 3


def row_central_moments(rows: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row mean and central power sums M2, M3, M4 of a (R, n) float64 tensor; each (R,)."""
    mean = rows.mean(dim=1)  # (R,)
    dev = rows - mean.unsqueeze(1)  # (R, n)
    dev2 = dev * dev
    return mean, dev2.sum(dim=1), (dev2 * dev).sum(dim=1), (dev2 * dev2).sum(dim=1)


def pool_central_moments(n: int, mean: Tensor, m2: Tensor, m3: Tensor, m4: Tensor) -> Moments:
    """Pool R groups of n values each, given per-group (R,) mean/M2/M3/M4, into one group.

    Exact shift of origin: with e = x - mean_g and d = mean_g - mean, sum(e) = 0 per group, so
    sum((e + d)^p) expands into the group sums below.
    """
    total = mean.new_tensor(float(n * mean.numel()))
    pooled = mean.mean()
    d = mean - pooled
    d2 = d * d
    M2 = (m2 + n * d2).sum()
    M3 = (m3 + 3 * d * m2 + n * d2 * d).sum()
    M4 = (m4 + 4 * d * m3 + 6 * d2 * m2 + n * d2 * d2).sum()
    return total, pooled, M2, M3, M4


def combine_moments(a: Moments, b: Moments) -> Moments:
    """Pebay's pairwise update of (count, mean, M2, M3, M4); both counts must be > 0."""
    na, ma, m2a, m3a, m4a = a
    nb, mb, m2b, m3b, m4b = b
    n = na + nb
    delta = mb - ma
    d_n = delta / n
    d_n2 = d_n * d_n
    term1 = delta * d_n * na * nb  # delta^2 * na * nb / n
    mean = ma + d_n * nb
    m2 = m2a + m2b + term1
    m3 = m3a + m3b + term1 * d_n * (na - nb) + 3 * d_n * (na * m2b - nb * m2a)
    m4 = (
        m4a
        + m4b
        + term1 * d_n2 * (na * na - na * nb + nb * nb)
        + 6 * d_n2 * (na * na * m2b + nb * nb * m2a)
        + 4 * d_n * (na * m3b - nb * m3a)
    )
    return n, mean, m2, m3, m4


def moments_result(count: float, mean: float, m2: float, m3: float, m4: float) -> MomentsResult:
    """Derived statistics from host floats. count 0: NaN everywhere; count 1: var/std NaN;
    zero variance: kurtosis NaN (as scipy)."""
    del m3  # skewness is not reported; M3 is only kept so M4 merges exactly
    n = int(count)
    nan = math.nan
    if n == 0:
        return MomentsResult(0, nan, nan, nan, nan, nan)
    var = m2 / (n - 1) if n > 1 else nan
    kurt = n * m4 / (m2 * m2) if m2 > 0 else nan
    return MomentsResult(n, mean, var, math.sqrt(var), kurt, kurt - 3.0)


class StreamingMoments:
    """Count, mean, M2, M3, M4 of every value seen; O(1) state, merges exactly.

    State is allocated on the first update, on the input's device, and stays there; update()
    never syncs the host. result() on an empty accumulator returns count 0 and NaN fields.
    """

    def __init__(self) -> None:
        self._state: Moments | None = None

    @property
    def is_empty(self) -> bool:
        return self._state is None

    def state_dict(self) -> dict[str, Tensor]:
        """The state tensors (empty dict before the first update)."""
        if self._state is None:
            return {}
        return dict(zip(("count", "mean", "m2", "m3", "m4"), self._state))

    def set_state(self, state: Moments | None) -> None:
        """Replace the state (e.g. by the merge of every process's state; None: empty)."""
        self._state = None if state is None else tuple(t.clone() for t in state)  # type: ignore[assignment]

    def update(self, x: Tensor) -> None:
        """Add every element of x (any shape and float dtype); x is not modified."""
        if x.numel() == 0:
            return
        rows = x.detach().reshape(1, -1).to(_F64)  # (1, n); a view of x when x is float64
        self.add_central(rows.shape[1], *row_central_moments(rows))

    def add_central(self, n: int, mean: Tensor, m2: Tensor, m3: Tensor, m4: Tensor) -> None:
        """Add R groups of n values each, given their (R,) float64 means and central sums."""
        if n == 0 or mean.numel() == 0:
            return
        self._add(pool_central_moments(n, mean, m2, m3, m4))

    def merge(self, other: StreamingMoments) -> None:
        """Fold in another accumulator (e.g. from another process); `other` is not modified."""
        if other._state is None:
            return
        device = other._state[0].device if self._state is None else self._state[0].device
        self._add(tuple(t.to(device) for t in other._state))  # type: ignore[arg-type]

    def _add(self, block: Moments) -> None:
        # Adopting the first block as is keeps a single-batch result bit-identical to the batch.
        if self._state is None:
            self._state = tuple(t.clone() for t in block)  # type: ignore[assignment]
        else:
            self._state = combine_moments(self._state, block)

    def result(self) -> MomentsResult:
        """Host-side summary; the one place this class syncs with the device."""
        if self._state is None:
            return moments_result(0, 0.0, 0.0, 0.0, 0.0)
        return moments_result(*torch.stack(self._state).cpu().tolist())
