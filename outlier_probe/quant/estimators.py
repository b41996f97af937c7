"""Range estimators: small stateful objects that turn a stream of batches into a (min, max) range.

State is O(1) per tensor (or per channel). `update()` runs on the tensor's device and never calls
`.item()` / `.cpu()`, so calibration does not force a host sync per batch; it never writes into
its input. Per-tensor by default; with `axis` the range is per index along that axis (every other
dimension is reduced).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.quant.quantizer import (
    Estimator,
    PerChannel,
    QuantSpec,
    _normalize_axis,
    compute_qparams,
    fake_quantize,
)


def _rows(x: Tensor, axis: int | None) -> Tensor:
    """View x as float32 (C, N): one row per channel, or a single row when per-tensor."""
    x = x.detach().to(torch.float32)
    if axis is None:
        return x.reshape(1, -1)
    ax = _normalize_axis(axis, x.ndim)
    return x.movedim(ax, 0).reshape(x.shape[ax], -1)  # (C, N)


def _minmax(x: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    """Min and max of x: 0-d per-tensor, (C,) per-channel. Reduces in place of copying to rows."""
    x = x.detach()
    if axis is None:
        lo, hi = torch.aminmax(x)
    else:
        ax = _normalize_axis(axis, x.ndim)
        dims = tuple(d for d in range(x.ndim) if d != ax)
        lo, hi = (x.amin(dim=dims), x.amax(dim=dims)) if dims else (x, x)
    return lo.to(torch.float32), hi.to(torch.float32)


class RangeEstimator(ABC):
    """Base: per-batch range from `_batch_range`, combined across batches by EMA (or replaced)."""

    kind: Estimator

    def __init__(self, *, axis: int | None = None, momentum: float | None = 0.9) -> None:
        # momentum None: every batch replaces the range (current min-max).
        if momentum is not None and not 0.0 <= momentum < 1.0:
            raise UsageError(f"EMA momentum must be in [0, 1), got {momentum}; 0.9 is the paper's value")
        self.axis = axis
        self.momentum = momentum
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self._min: Tensor | None = None
        self._max: Tensor | None = None
        self.num_batches = 0
        # (min, max) of each batch seen, in order: O(calibration batches), so that a data-parallel run
        # can replay all ranks' batches in the global order (distributed_merge.merge_calibration)
        self.history: list[tuple[Tensor, Tensor]] = []

    @property
    def initialized(self) -> bool:
        """True once at least one non-empty batch has been seen."""
        return self._min is not None

    @abstractmethod
    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The (min, max) estimate from one batch alone, float32 on x's device."""

    def update(self, x: Tensor) -> None:
        """Fold one batch into the range. No host sync, input untouched."""
        if x.numel() == 0:
            return
        self.fold(*self._batch_range(x))

    def fold(self, lo: Tensor, hi: Tensor) -> None:
        """Fold one batch's (min, max) into the range (replace, or EMA)."""
        self.history.append((lo, hi))
        if self._min is None or self._max is None or self.momentum is None:
            self._min, self._max = lo, hi
        else:
            # Same EMA as Bondarenko et al.'s estimators: r = m * r + (1 - m) * new.
            m = self.momentum
            self._min = m * self._min + (1.0 - m) * lo
            self._max = m * self._max + (1.0 - m) * hi
        self.num_batches += 1

    def range(self) -> tuple[Tensor, Tensor]:
        """Current (min, max): 0-d tensors, or (C,) when per-channel."""
        if self._min is None or self._max is None:
            raise ProbeError(f"{self.describe()} estimator has seen no data; run calibration batches first")
        return self._min.clone(), self._max.clone()

    def describe(self) -> str:
        return self.kind.value

    def __repr__(self) -> str:
        axis = "" if self.axis is None else f", axis={self.axis}"
        return f"{type(self).__name__}({self.describe()}{axis}, batches={self.num_batches})"


class CurrentMinMax(RangeEstimator):
    """Min and max of the last batch."""

    kind = Estimator.minmax

    def __init__(self, *, axis: int | None = None) -> None:
        super().__init__(axis=axis, momentum=None)

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return _minmax(x, self.axis)


class RunningMinMax(RangeEstimator):
    """The first batch's min / max, then an EMA with `momentum` of each batch's min / max."""

    kind = Estimator.running_minmax

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return _minmax(x, self.axis)


def _kth(rows: Tensor, k: int) -> Tensor:
    """k-th smallest (1-based) of each row."""
    return torch.kthvalue(rows, k, dim=1).values


def _quantile_rows(rows: Tensor, q: float) -> Tensor:
    """numpy's default ('linear') percentile of each row, for any row length.

    kthvalue instead of torch.quantile: quantile refuses inputs above 16M elements and sorts,
    kthvalue selects in linear time. Ranks come from the shape, so no host sync.
    """
    n = rows.shape[1]
    pos = q * (n - 1)  # numpy's virtual index
    lo_idx = math.floor(pos)
    t = pos - lo_idx
    a = _kth(rows, lo_idx + 1)
    if t == 0.0 or lo_idx + 1 >= n:
        return a
    b = _kth(rows, lo_idx + 2)
    diff = b - a
    # numpy's _lerp: interpolate from the nearer end for accuracy.
    return a + diff * t if t < 0.5 else b - diff * (1.0 - t)


class Percentile(RangeEstimator):
    """Per batch the (100-p) and p percentiles (numpy's linear interpolation), combined by EMA."""

    kind = Estimator.percentile

    def __init__(self, p: float = 99.999, *, axis: int | None = None, momentum: float = 0.9) -> None:
        if not 0.0 < p <= 100.0:
            raise UsageError(f"percentile must be in (0, 100], got {p}; e.g. 99.999 clips 0.001% at each end")
        self.p = p
        super().__init__(axis=axis, momentum=momentum)

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        rows = _rows(x, self.axis)
        lo_q, hi_q = sorted((1.0 - self.p / 100.0, self.p / 100.0))
        lo, hi = _quantile_rows(rows, lo_q), _quantile_rows(rows, hi_q)
        return (lo[0], hi[0]) if self.axis is None else (lo, hi)

    def describe(self) -> str:
        return f"percentile({self.p:g})"


class MSE(RangeEstimator):
    """Per batch, the shrunken min-max range that minimises the MSE of fake-quantized vs float data.

    Candidates are `num_candidates` fractions f in (0, 1] of the batch's min-max range, both ends
    scaled by the same f (per channel when per-channel); batches are combined by EMA. Batches with
    more than `max_samples` values per row are scored on a fixed random subset of columns (the
    min-max itself always uses every value) to bound the cost of the search.
    """

    kind = Estimator.mse

    def __init__(
        self,
        spec: QuantSpec,
        *,
        axis: int | None = None,
        momentum: float = 0.9,
        num_candidates: int = 100,
        max_samples: int = 1 << 20,
    ) -> None:
        if num_candidates < 1 or max_samples < 1:
            raise UsageError("MSE estimator needs num_candidates >= 1 and max_samples >= 1")
        # Score the rows layout (C, N): per-channel along axis 0 of it, or one row per-tensor.
        self.spec = spec
        self._row_spec = QuantSpec(spec.bits, spec.symmetric, PerChannel(0))
        self.num_candidates = num_candidates
        self.max_samples = max_samples
        super().__init__(axis=axis, momentum=momentum)

    def _batch_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        lo, hi = _minmax(x, self.axis)
        rows = _rows(x, self.axis)
        if rows.shape[1] > self.max_samples:
            # Fixed-seed column subset: deterministic, and unlike a stride it cannot alias with
            # the hidden size (which would score a single channel).
            gen = torch.Generator(device=rows.device).manual_seed(0)
            idx = torch.randint(0, rows.shape[1], (self.max_samples,), generator=gen, device=rows.device)
            rows = rows[:, idx]
        lo_r, hi_r = lo.reshape(-1), hi.reshape(-1)  # (C,)
        best_loss = torch.full_like(lo_r, math.inf)
        best_frac = torch.ones_like(lo_r)
        for i in range(1, self.num_candidates + 1):
            f = i / self.num_candidates
            scale, zp = compute_qparams(lo_r * f, hi_r * f, self._row_spec)
            loss = (fake_quantize(rows, scale, zp, self._row_spec) - rows).square().mean(dim=1)
            better = loss < best_loss  # strict: ties keep the smaller range found first
            best_loss = torch.where(better, loss, best_loss)
            best_frac = torch.where(better, torch.full_like(best_frac, f), best_frac)
        return (lo_r * best_frac).reshape(lo.shape), (hi_r * best_frac).reshape(hi.shape)


def make_estimator(
    kind: Estimator | str,
    *,
    spec: QuantSpec,
    momentum: float = 0.9,
    percentile: float = 99.999,
    axis: int | None = None,
) -> RangeEstimator:
    """Build the estimator for `kind`; the axis defaults to the spec's per-channel axis.

    An explicit `axis` overrides the spec's (e.g. a weight stored transposed); a per-tensor spec
    cannot take one.
    """
    try:
        kind = Estimator(kind)
    except ValueError:
        choices = ", ".join(e.value for e in Estimator)
        raise UsageError(f"unknown range estimator {kind!r}; choose one of {choices}") from None
    if not 0.0 <= momentum < 1.0:
        raise UsageError(f"EMA momentum must be in [0, 1), got {momentum}; 0.9 is the paper's value")
    if not 0.0 < percentile <= 100.0:
        raise UsageError(f"percentile must be in (0, 100], got {percentile}; e.g. 99.999")
    if axis is None:
        axis = spec.axis
    elif spec.axis is None:
        raise UsageError(f"axis={axis} given for a per-tensor spec; use PerChannel({axis}) granularity instead")
    if kind is Estimator.minmax:
        return CurrentMinMax(axis=axis)
    if kind is Estimator.running_minmax:
        return RunningMinMax(axis=axis, momentum=momentum)
    if kind is Estimator.percentile:
        return Percentile(percentile, axis=axis, momentum=momentum)
    return MSE(spec, axis=axis, momentum=momentum)


def fresh_copy(estimator: RangeEstimator) -> RangeEstimator:
    """An independent, empty estimator with the same settings (the caller's object is untouched)."""
    new = copy.copy(estimator)
    new.reset()
    return new
