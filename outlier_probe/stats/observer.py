"""Per-site outlier observer: O(1) streaming state, updated on the model's device without host syncs.

Input layout: the FIRST dim indexes sequences (batch), the LAST dim indexes channels; everything in
between is flattened into the sequence: (B, T, d), (B, d), (B, C, H, W) -> sequence b = x[b].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from outlier_probe.config import ObserverConfig
from outlier_probe.stats import kernels
from outlier_probe.stats.moments import StreamingMoments, moments_result

_F64 = torch.float64
PAPER_EPS = 1e-6  # added to std^4 in the reference code of Bondarenko et al. and OutEffHop
# Upper bound on float64 elements processed at once, so temporaries stay bounded for huge
# activations; whole sequences are never split, so this only groups sequences.
_CHUNK_ELEMENTS = 1 << 23
# Per-sequence results (mean, M2, M3, M4, std, max|x|) wait in a fixed buffer of this many rows and
# are folded in with one vectorised pooling when it fills: the exact merge of central moments costs
# dozens of tiny tensor ops, too many to pay per batch. The buffer is preallocated, so an update
# leaves no new allocation behind: small long-lived allocations between a model's large temporaries
# were measured to make glibc return and re-fault the heap, slowing the next matmul by ~40%.
_PENDING_ROWS = 256

METRIC_DEFINITIONS: dict[str, str] = {
    "paper_kurtosis": "mean over sequences b of mean((x_b - mean(x_b))^4) / (std(x_b)^4 + 1e-6), "
    "x_b = all values of sequence b, std unbiased (n-1); Pearson (Gaussian = 3)",
    "paper_inf_norm": "mean over sequences b of max |x_b|",
    "max_abs": "max |x| over every value seen",
    "mean/var/std": "over every value seen; var unbiased (n-1); merged central moments in float64",
    "kurtosis": "Pearson population kurtosis over every value seen, n*M4/M2^2 (Gaussian = 3)",
    "frac_gt_threshold": "fraction of values with |x| > threshold",
    "frac_gt_ksigma": "fraction of values with |x_b - mean(x_b)| > k * std(x_b), "
    "per-sequence mean and unbiased std (exactly mergeable, unlike a global sigma)",
    "top_channels": "channels (last dim) with the largest max |x|, largest first",
    "hist_counts": "counts of |x|: [< edge0 (incl. 0), [edge_i, edge_i+1) ..., >= last edge (incl. NaN/inf)]",
}


_POW2_LO, _POW2_HI = -14, 14  # default edges 2^-14 (6.1e-5) .. 2^14 (16384), one bin per octave


def default_hist_edges() -> Tensor:
    """Powers of two, 2^-14 .. 2^14 (29 edges, one bin per octave ~ 3.3 per decade).

    Power-of-two edges let the bin of |x| be read off its floating-point exponent (exact, and ~20x
    cheaper than a binary search over the edges); any other edges fall back to torch.bucketize.
    """
    return torch.tensor([2.0**k for k in range(_POW2_LO, _POW2_HI + 1)], dtype=_F64)


def _is_default_pow2(edges: tuple[float, ...]) -> bool:
    return edges == tuple(2.0**k for k in range(_POW2_LO, _POW2_HI + 1))


def _octave_bins(absx: Tensor) -> Tensor:
    """Histogram bin of each |x| for the default power-of-two edges, from the exponent alone.

    Returns int64 indices in [0, n_edges + 1]: 0 = below 2^-14 (incl. 0), i = [2^(lo+i-1), 2^(lo+i)),
    n_edges = at or above 2^14, n_edges + 1 = NaN / inf (split off so non-finite values cost no extra pass).
    """
    n_edges = _POW2_HI - _POW2_LO + 1
    if absx.dtype == _F64:
        mantissa, exponent = torch.frexp(absx)  # |x| = m * 2^e, m in [0.5, 1): floor(log2|x|) = e - 1
        bins = (exponent.to(torch.int64) - _POW2_LO).clamp_(0, n_edges).masked_fill_(mantissa == 0, 0)  # frexp(0) = (0, 0)
        return bins.masked_fill_(~torch.isfinite(mantissa), n_edges + 1)
    bits = absx.float().view(torch.int32)  # exact for float32 / bfloat16 / float16 inputs
    exponent = (bits >> 23) - 127  # floor(log2|x|) for normal numbers; -127 for zero / subnormals
    bins = (exponent - _POW2_LO + 1).clamp_(0, n_edges).to(torch.int64)
    return bins.masked_fill_(exponent == 128, n_edges + 1)  # exponent field 255: inf / NaN


@dataclass(frozen=True)
class SiteStats:
    """Everything measured at one site (host values; NaN where undefined, e.g. nothing seen)."""

    n_sequences: int
    count: int
    mean: float
    var: float  # unbiased
    std: float
    kurtosis: float  # Pearson
    excess_kurtosis: float
    paper_kurtosis: float
    paper_inf_norm: float
    max_abs: float
    frac_gt_threshold: float
    frac_gt_ksigma: float
    top_channels: tuple[tuple[int, float], ...]  # (channel id, absmax), largest first
    hist_edges: tuple[float, ...]
    hist_counts: tuple[int, ...]  # len(hist_edges) + 1: underflow, bins, overflow
    n_nonfinite: int

    def to_row(self) -> dict[str, int | float | str]:
        """The stats.csv columns n_sequences .. top_channels (docs/report-format.md)."""
        return {
            "n_sequences": self.n_sequences,
            "count": self.count,
            "mean": self.mean,
            "var": self.var,
            "std": self.std,
            "kurtosis": self.kurtosis,
            "excess_kurtosis": self.excess_kurtosis,
            "paper_kurtosis": self.paper_kurtosis,
            "paper_inf_norm": self.paper_inf_norm,
            "max_abs": self.max_abs,
            "frac_gt_threshold": self.frac_gt_threshold,
            "frac_gt_ksigma": self.frac_gt_ksigma,
            "top_channels": ";".join(f"{i}:{v:.6g}" for i, v in self.top_channels),
        }


class OutlierObserver:
    """Streaming outlier statistics of one hooked activation.

    State is allocated on the first update on the input's device and never grows with tokens.
    update() never syncs the host; result() syncs once. Every update (the fused CPU kernel of
    kernels.py, or the torch path elsewhere) writes into the state tensors in place; they are
    allocated as normal (not inference-mode) tensors, so that works in and out of torch.inference_mode().
    Sequences with a single value have NaN std, so their paper kurtosis is NaN (as the reference)
    and they never count as k-sigma outliers.
    """

    def __init__(self, config: ObserverConfig = ObserverConfig(), hist_edges: Tensor | None = None) -> None:
        edges = default_hist_edges() if hist_edges is None else hist_edges.detach().to("cpu", _F64)
        if edges.dim() != 1 or edges.numel() < 1:
            raise ValueError(f"hist_edges must be a non-empty 1-D tensor, got shape {tuple(edges.shape)}")
        if not bool(torch.isfinite(edges).all()) or not bool((edges[1:] > edges[:-1]).all()):
            raise ValueError("hist_edges must be finite and strictly increasing")
        self.config = config
        self.hist_edges = edges  # moved to the input's device on the first update
        self._edges_host: tuple[float, ...] = tuple(edges.tolist())  # so result() needs no extra sync
        self._pow2 = _is_default_pow2(self._edges_host)
        self._kernel = self._pow2 and kernels.available()  # fused CPU kernel; the torch path otherwise
        self._cpu: kernels.FusedCPU | None = None  # the kernel's views of the state (CPU, kernel on)
        self.moments = StreamingMoments()
        self.n_sequences = 0  # from shapes only, so a Python int costs no sync
        self._channels: int | None = None
        self._s: dict[str, Tensor] = {}
        self._pending: Tensor | None = None  # (_PENDING_ROWS, 6) float64, allocated with the state
        self._n_pending = 0  # rows of _pending in use
        self._pending_len = 0  # values per sequence of those rows

    def state_dict(self) -> dict[str, Tensor]:
        """All state tensors (empty before the first update)."""
        self._flush()
        return {**self._s, **{f"moments.{k}": v for k, v in self.moments.state_dict().items()}}

    def _init_state(self, channels: int, device: torch.device) -> None:
        self.hist_edges = self.hist_edges.to(device)
        self._channels = channels
        with torch.inference_mode(False):  # normal tensors: written in place in and out of inference mode
            self._pending = torch.empty((_PENDING_ROWS, 6), dtype=_F64, device=device)
            self._s = self._zero_state(channels, device)
        if self._kernel and device.type == "cpu":  # views of the state, which is only ever updated in place
            cfg = self.config
            self._cpu = kernels.FusedCPU(self._s, self._pending, cfg.threshold, cfg.sigma_k, _POW2_LO, len(self._edges_host))

    def _zero_state(self, channels: int, device: torch.device) -> dict[str, Tensor]:
        def zeros(*shape: int, dtype: torch.dtype = _F64) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        return {
            "paper_kurtosis_sum": zeros(),
            "paper_inf_norm_sum": zeros(),
            "max_abs": zeros(),
            "channel_absmax": zeros(channels),
            "n_gt_threshold": zeros(dtype=torch.int64),
            "n_gt_ksigma": zeros(dtype=torch.int64),
            "n_nonfinite": zeros(dtype=torch.int64),
            # fast path: one extra bin at the end counts NaN / inf (merged into overflow by result())
            "hist_counts": zeros(self.hist_edges.numel() + (2 if self._pow2 else 1), dtype=torch.int64),
        }

    def update(self, x: Tensor) -> None:
        """Accumulate one activation tensor (first dim = sequences, last = channels); x is not modified."""
        if x.dim() < 2:
            raise ValueError(f"expected (sequences, ..., channels) with >= 2 dims, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            return
        channels = x.shape[-1]
        if self._channels is None:
            self._init_state(channels, x.device)
        elif channels != self._channels:
            raise ValueError(f"channel dim changed from {self._channels} to {channels} between updates")
        elif x.device != self.hist_edges.device:
            raise ValueError(f"observer state is on {self.hist_edges.device}, input on {x.device}")
        seqs = x.detach().reshape(x.shape[0], -1)  # (B, n): sequence b = x[b] flattened
        n = seqs.shape[1]
        cpu = self._cpu if seqs.device.type == "cpu" else None
        rows_per_chunk = max(1, min(_PENDING_ROWS, _CHUNK_ELEMENTS // n))
        for chunk in (seqs,) if len(seqs) <= rows_per_chunk else seqs.split(rows_per_chunk):
            if self._n_pending and (n != self._pending_len or self._n_pending + len(chunk) > _PENDING_ROWS):
                self._flush()
            start = self._n_pending
            if cpu is None or not cpu.update(chunk, start):  # inf / NaN: the torch path propagates them exactly
                self._update_rows(chunk, channels, self._pending[start : start + len(chunk)])
            self._n_pending = start + len(chunk)
            self._pending_len = n
        self.n_sequences += x.shape[0]

    def _update_rows(self, rows: Tensor, channels: int, out: Tensor) -> None:
        """The torch path (any device). rows: (R, n) in the input's dtype, never written to (it may be the
        caller's own tensor); out: the (R, 6) pending rows to fill.

        Only the moments need float64; abs, maxima, comparisons and bucketing are exact in the input's
        own dtype, so they run there (half the memory traffic for float32 activations).
        """
        s, cfg = self._s, self.config
        n = rows.shape[1]
        rows64 = rows.to(_F64)
        mean = rows64.mean(dim=1)  # (R,)
        dev = rows64 - mean.unsqueeze(1)  # (R, n)
        dev2 = dev * dev
        m2, m3, m4 = dev2.sum(dim=1), (dev2 * dev).sum(dim=1), (dev2 * dev2).sum(dim=1)
        std = (m2 / (n - 1)).sqrt() if n > 1 else torch.full_like(m2, math.nan)  # unbiased, as the reference
        # |dev| > k*std  <=>  dev^2 > (k*std)^2 (std >= 0; NaN std compares False): reuses dev2
        s["n_gt_ksigma"].add_((dev2 > (cfg.sigma_k * std).square().unsqueeze(1)).sum())

        absx = rows.abs()  # (R, n), input dtype
        out.copy_(torch.stack([mean, m2, m3, m4, std, absx.amax(dim=1).to(_F64)], dim=1))
        torch.maximum(s["channel_absmax"], absx.reshape(-1, channels).amax(dim=0).to(_F64), out=s["channel_absmax"])
        s["n_gt_threshold"].add_((absx > cfg.threshold).sum())
        if self._pow2:
            idx = _octave_bins(absx).reshape(-1)
        else:
            s["n_nonfinite"].add_((~torch.isfinite(absx)).sum())
            # right=True: bin i holds edges[i-1] <= |x| < edges[i]; 0 and NaN/inf fall in the end bins.
            # bucketize compares against the float64 edges, so bins match the float64 computation exactly.
            idx = torch.bucketize(absx, self.hist_edges, right=True).reshape(-1)
        if idx.is_cuda:  # bincount would sync the host to size its output
            ones = torch.ones((), dtype=torch.int64, device=idx.device).expand(idx.numel())
            s["hist_counts"].index_add_(0, idx, ones)
        else:
            s["hist_counts"].add_(torch.bincount(idx, minlength=s["hist_counts"].numel()))

    def _flush(self) -> None:
        """Fold the pending per-sequence results into the running state (vectorised, no host sync)."""
        if not self._n_pending:
            return
        assert self._pending is not None
        s, n = self._s, self._pending_len
        mean, m2, m3, m4, std, seq_max = self._pending[: self._n_pending].unbind(1)
        self._n_pending = 0
        self.moments.add_central(n, mean, m2, m3, m4)  # copies: the buffer is reused
        k = (m4 / n) / (std**4 + PAPER_EPS)  # per-sequence paper kurtosis
        s["paper_kurtosis_sum"].add_(k.sum())
        s["paper_inf_norm_sum"].add_(seq_max.sum())
        torch.maximum(s["max_abs"], seq_max.amax(), out=s["max_abs"])

    def merge(self, other: OutlierObserver) -> None:
        """Fold in another observer of the same site (other batches / processes); `other` is unchanged."""
        self._flush()
        other._flush()  # a change of representation only: other's statistics stay the same
        if (other.config.threshold, other.config.sigma_k) != (self.config.threshold, self.config.sigma_k):
            raise ValueError("cannot merge observers with different threshold / sigma_k")
        if other._edges_host != self._edges_host:
            raise ValueError("cannot merge observers with different histogram edges")
        if other._channels is None:
            return
        if self._channels is None:
            self._init_state(other._channels, other.hist_edges.device)
        elif other._channels != self._channels:
            raise ValueError(f"cannot merge observers with {self._channels} and {other._channels} channels")
        device = self.hist_edges.device
        for name, mine in self._s.items():
            theirs = other._s[name].to(device)
            is_max = name in ("max_abs", "channel_absmax")
            torch.maximum(mine, theirs, out=mine) if is_max else mine.add_(theirs)
        self.moments.merge(other.moments)
        self.n_sequences += other.n_sequences

    def result(self, top_k: int | None = None) -> SiteStats:
        """Host-side summary, one device->host transfer. Empty observer: counts 0, NaN floats."""
        top_k = self.config.top_k if top_k is None else top_k
        self._flush()
        edges = self._edges_host
        if self._channels is None:
            nan = math.nan
            zeros = (0,) * (len(edges) + 1)
            return SiteStats(0, 0, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, (), edges, zeros, 0)
        s = self._s
        top_vals, top_ids = s["channel_absmax"].topk(min(top_k, self._channels))
        mom = self.moments.state_dict()
        scalars = [mom[k] for k in ("count", "mean", "m2", "m3", "m4")]
        scalars += [s[k].to(_F64) for k in ("paper_kurtosis_sum", "paper_inf_norm_sum", "max_abs")]
        scalars += [s[k].to(_F64) for k in ("n_gt_threshold", "n_gt_ksigma", "n_nonfinite")]
        # One transfer; int64 counters are exact in float64 below 2^53.
        packed = torch.cat([torch.stack(scalars), s["hist_counts"].to(_F64), top_vals, top_ids.to(_F64)])
        vals = packed.cpu().tolist()
        count, mean, m2, m3, m4, k_sum, inf_sum, max_abs, n_thr, n_ksig, n_bad = vals[:11]
        hist = vals[11 : 11 + s["hist_counts"].numel()]
        if self._pow2:  # the fast path keeps NaN / inf in a bin of their own: count them, then fold into overflow
            n_bad = hist[-1]
            hist = hist[:-2] + [hist[-2] + hist[-1]]
        k = len(top_vals)
        tv, ti = vals[-2 * k : -k] if k else [], vals[-k:] if k else []
        m = moments_result(count, mean, m2, m3, m4)
        return SiteStats(
            n_sequences=self.n_sequences,
            count=m.count,
            mean=m.mean,
            var=m.var,
            std=m.std,
            kurtosis=m.kurtosis,
            excess_kurtosis=m.excess_kurtosis,
            paper_kurtosis=k_sum / self.n_sequences,
            paper_inf_norm=inf_sum / self.n_sequences,
            max_abs=max_abs,
            frac_gt_threshold=n_thr / m.count,
            frac_gt_ksigma=n_ksig / m.count,
            top_channels=tuple((int(i), v) for i, v in zip(ti, tv)),
            hist_edges=edges,
            hist_counts=tuple(int(c) for c in hist),
            n_nonfinite=int(n_bad),
        )
