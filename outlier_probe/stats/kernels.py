"""Fused CPU kernel for OutlierObserver: every per-value statistic in a few cache-resident passes.

The torch path of the observer costs ~20 elementwise passes per site (float64 copies, deviations,
powers, abs, compares, exponent bins), which is more time than the layer it observes on a CPU.
This kernel (numba) works on chunks of one sequence (a whole sequence when it is short enough):

    per chunk, in parallel:   sum, |x|, channel absmax, |x| > threshold; M2..M4 about the chunk's own
                              mean (two-pass, float64); histogram of the float exponent
    per sequence, serially:   pool the chunks into the sequence's mean, M2..M4 (exact shift of origin)
    per chunk, in parallel:   |x - mean_b| > k * std_b (needs the whole sequence's std; done in the
                              first pass when a chunk is the whole sequence)

The formulas are those of observer.py's torch path; tests/stats/test_kernels.py checks both agree.
Floating-point sums are reassociated (vectorised), so the last bits may differ from torch's order;
the work split depends on the shape only, so results do not depend on the thread count. Anything
unusual (non-finite values, custom histogram edges, non-CPU tensors, numba missing) goes through the
torch path instead.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency; a Python it does not support yet still works, on the torch path
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only where numba is unavailable
    numba = None

# numba's default OpenMP threading layer starts its own pool next to torch's; its idle threads spin after
# every parallel kernel and take the cores from torch's next operations, and (sharing torch's libgomp) it
# raised torch's thread count to its own (1 -> 2 with OMP_NUM_THREADS=1). Measured on the GGUF quantize
# benchmark (135M Llama, 1 torch thread), every forward after the first observed pass ran 2-5x slower
# (float eval 2.3 s -> 5.2 s, 4 calibration batches 7.6 s -> 42 s CPU). The workqueue layer's threads
# sleep between kernels. Chosen before the first parallel kernel launches the pool; a user's
# NUMBA_THREADING_LAYER still wins. (workqueue refuses concurrent launches from several Python threads;
# observers run in the forward's own thread.)
if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

# Values per work item: large enough to amortise the per-item bookkeeping, small enough that an
# item (and its float64 deviations) stays in L2 and that a single long sequence still spreads
# over every thread. Rounded down to whole rows of channels, so channel = offset % channels.
_ITEM_VALUES = 1 << 15
# A whole sequence is one work item (one parallel region does everything) when it is at most this
# long: it stays in L2 across the passes. Longer ones are split into chunks of _ITEM_VALUES.
_ROW_VALUES = 1 << 18
_LANES = 8  # interleaved sub-histograms: consecutive values of one bin do not wait on each other
_FASTMATH = {"reassoc", "contract"}  # vectorised sums; NaN/inf semantics are kept (and never reach here)


def available() -> bool:
    """True when the fused kernel can run (numba importable and not disabled by OUTLIER_PROBE_KERNEL=torch)."""
    return numba is not None and os.environ.get("OUTLIER_PROBE_KERNEL", "auto") != "torch"


if numba is not None:
    # Each per-value loop works on a contiguous 1-D (or (T, d)) slice starting at index 0: that is
    # the form LLVM vectorises (indexing a row from a variable start measured ~3x slower).

    @njit(fastmath=_FASTMATH, cache=True, boundscheck=False, nogil=True)
    def _abs_pass(chunk, cmax, threshold):  # pragma: no cover - compiled
        """chunk (T, d): sum of x, running channel max |x| (in place), count of |x| > threshold."""
        s = 0.0
        gt = 0
        for t in range(chunk.shape[0]):
            for c in range(chunk.shape[1]):
                v = chunk[t, c]
                a = abs(v)
                s += v
                cmax[c] = max(cmax[c], a)
                gt += a > threshold
        return s, gt

    @njit(fastmath=_FASTMATH, cache=True, boundscheck=False, nogil=True)
    def _central_sums(values, mean):  # pragma: no cover - compiled
        """sum (x - mean)^p for p = 2, 3, 4 in float64: the second pass of a two-pass moment."""
        m2 = 0.0
        m3 = 0.0
        m4 = 0.0
        for i in range(values.shape[0]):
            d = values[i] - mean
            d2 = d * d
            m2 += d2
            m3 += d2 * d
            m4 += d2 * d2
        return m2, m3, m4

    @njit(cache=True, boundscheck=False, nogil=True)
    def _exponent_hist(bits, shift, mask, hist):  # pragma: no cover - compiled
        """hist[e] += number of values whose raw exponent field is e."""
        lanes = np.zeros((_LANES, mask + 1), np.int32)  # a chunk holds far fewer than 2^31 values
        m = bits.shape[0]
        full = m - m % _LANES
        for i in range(0, full, _LANES):
            for q in range(_LANES):
                lanes[q, (bits[i + q] >> shift) & mask] += 1
        for i in range(full, m):
            lanes[0, (bits[i] >> shift) & mask] += 1
        for q in range(_LANES):
            for e in range(mask + 1):
                hist[e] += lanes[q, e]

    @njit(fastmath=_FASTMATH, cache=True, boundscheck=False, nogil=True)
    def _count_far(values, mean, limit):  # pragma: no cover - compiled
        """Values with (x - mean)^2 > limit; a NaN limit compares False, as in the torch path."""
        k = 0
        for i in range(values.shape[0]):
            d = values[i] - mean
            k += d * d > limit
        return k

    @njit(fastmath=_FASTMATH, cache=True, boundscheck=False, nogil=True)
    def _chunk(values, bits, channels, threshold, shift, mask, cmax, hist):  # pragma: no cover - compiled
        """One chunk (whole rows of channels) of one sequence: count, mean, M2, M3, M4 about its own
        mean, and |x| > threshold; channel max |x| and exponent counts accumulate in place."""
        s, gt = _abs_pass(values.reshape(-1, channels), cmax, threshold)
        mean = s / values.shape[0]
        m2, m3, m4 = _central_sums(values, mean)  # two-pass: exact when |mean| >> std
        _exponent_hist(bits, shift, mask, hist)
        return mean, m2, m3, m4, gt

    @njit(parallel=True, fastmath=_FASTMATH, cache=True, boundscheck=False, nogil=True)
    def _fused(x, bits, channels, item_len, threshold, sigma_k, shift, mask, bin_of_field,
               rows_out, state_cmax, state_n_gt, state_n_ksigma, state_hist):  # pragma: no cover - compiled
        """Fold the rows x (R, n) into the state arrays; returns the number of inf / NaN values.

        When that number is not 0 nothing is written: the caller's torch path takes the update.
        rows_out (R, 6) receives each sequence's mean, M2, M3, M4, unbiased std and max|x|.
        state_n_gt / state_n_ksigma are 1-element counters; state_hist uses the observer's bin layout.
        Work items are chunks of item_len values (whole rows of channels) of one sequence; with
        item_len == n an item is a whole sequence and one parallel region does everything.
        """
        n_rows, n = x.shape
        per_row = (n + item_len - 1) // item_len
        n_items = n_rows * per_row
        item_f = np.empty((n_items, 5))  # values, mean, M2, M3, M4 of each chunk
        item_cmax = np.zeros((n_items, channels), x.dtype)
        item_count = np.zeros((n_items, 2), np.int64)  # |x| > threshold, k-sigma outliers
        item_hist = np.zeros((n_items, mask + 1), np.int64)  # raw exponent field counts
        limit = np.empty(n_rows)

        for it in prange(n_items):  # region 1: everything a chunk gives on its own
            r = it // per_row
            start = (it % per_row) * item_len
            stop = min(start + item_len, n)
            values = x[r, start:stop]
            mean, m2, m3, m4, gt = _chunk(values, bits[r, start:stop], channels, threshold, shift, mask,
                                          item_cmax[it], item_hist[it])
            item_f[it, 0] = stop - start
            item_f[it, 1] = mean
            item_f[it, 2] = m2
            item_f[it, 3] = m3
            item_f[it, 4] = m4
            item_count[it, 0] = gt
            if per_row == 1 and item_hist[it, mask] == 0:  # the chunk is the sequence: k-sigma right away
                std = math.sqrt(m2 / (n - 1)) if n > 1 else math.nan  # unbiased, as the reference
                limit[r] = (sigma_k * std) ** 2
                item_count[it, 1] = _count_far(values, mean, limit[r])

        n_bad = 0
        for it in range(n_items):
            n_bad += item_hist[it, mask]
        if n_bad:
            return n_bad

        for r in range(n_rows):  # pool each sequence's chunks: exact shift of origin
            lo = r * per_row
            total = 0.0
            weighted = 0.0
            smax = 0.0
            for it in range(lo, lo + per_row):
                total += item_f[it, 0]
                weighted += item_f[it, 0] * item_f[it, 1]
                for c in range(channels):
                    smax = max(smax, item_cmax[it, c])
            mean = weighted / total if per_row > 1 else item_f[lo, 1]
            m2 = 0.0
            m3 = 0.0
            m4 = 0.0
            for it in range(lo, lo + per_row):
                ni = item_f[it, 0]
                d = item_f[it, 1] - mean  # deviations sum to 0 within a chunk, so these terms are exact
                a2 = item_f[it, 2]
                a3 = item_f[it, 3]
                d2 = d * d
                m2 += a2 + ni * d2
                m3 += a3 + 3.0 * d * a2 + ni * d2 * d
                m4 += item_f[it, 4] + 4.0 * d * a3 + 6.0 * d2 * a2 + ni * d2 * d2
            std = math.sqrt(m2 / (total - 1.0)) if total > 1.0 else math.nan
            rows_out[r, 0] = mean
            rows_out[r, 1] = m2
            rows_out[r, 2] = m3
            rows_out[r, 3] = m4
            rows_out[r, 4] = std
            rows_out[r, 5] = smax
            if per_row > 1:
                limit[r] = (sigma_k * std) ** 2

        if per_row > 1:  # region 2: |x - mean_b| > k std_b needs the whole sequence's std
            for it in prange(n_items):
                r = it // per_row
                start = (it % per_row) * item_len
                stop = min(start + item_len, n)
                item_count[it, 1] = _count_far(x[r, start:stop], rows_out[r, 0], limit[r])

        for it in range(n_items):  # fold into the observer's state, in place
            for c in range(channels):
                state_cmax[c] = max(state_cmax[c], item_cmax[it, c])
            state_n_gt[0] += item_count[it, 0]
            state_n_ksigma[0] += item_count[it, 1]
            for e in range(mask + 1):
                state_hist[bin_of_field[e]] += item_hist[it, e]
        return 0


_BITS = {torch.float32: (np.int32, 23, 0xFF, 127), torch.float64: (np.int64, 52, 0x7FF, 1023)}


def exponent_bin_table(dtype: torch.dtype, lo: int, n_edges: int) -> np.ndarray:
    """Observer bin of each raw exponent field: 0 below 2^lo (zero, subnormals), n_edges at or above
    2^(lo + n_edges - 1), n_edges + 1 for inf / NaN (exponent field all ones)."""
    _, _, mask, bias = _BITS[dtype]
    fields = np.arange(mask + 1, dtype=np.int64)
    table = np.clip(fields - bias - lo + 1, 0, n_edges)
    table[mask] = n_edges + 1
    return table


class FusedCPU:
    """The kernel's handle on one observer's CPU state: numpy views sharing the state tensors' memory.

    Built once, when the observer allocates its state (which is only ever updated in place), so no
    view is taken per batch; `update` folds rows into that state in place.
    """

    def __init__(self, state: dict[str, Tensor], pending: Tensor, threshold: float, sigma_k: float,
                 lo: int, n_edges: int) -> None:
        self.cmax = state["channel_absmax"].numpy()
        self.n_gt = state["n_gt_threshold"].view(1).numpy()
        self.n_ksigma = state["n_gt_ksigma"].view(1).numpy()
        self.hist = state["hist_counts"].numpy()
        self.pending = pending.numpy()  # (rows, 6) float64
        self.threshold, self.sigma_k = threshold, sigma_k
        self.tables = {dtype: exponent_bin_table(dtype, lo, n_edges) for dtype in _BITS}

    def update(self, rows: Tensor, start: int) -> bool:
        """Fold CPU rows (R, n), n a multiple of the channel count, into the state.

        pending[start:start + R] receives the per-sequence mean, M2, M3, M4, unbiased std and max|x|.
        Returns False, with the state untouched, when a value is inf / NaN, so that the observer's
        torch path handles it with its exact NaN propagation.
        """
        if rows.dtype not in _BITS:
            rows = rows.float()  # bfloat16 / float16 upcast exactly
        int_type, shift, mask, _ = _BITS[rows.dtype]
        x = rows.contiguous().numpy()
        n_rows, n = x.shape
        channels = self.cmax.shape[0]
        threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))  # follow torch's setting
        if numba.get_num_threads() != threads:
            numba.set_num_threads(threads)
        # The work split depends on the shape alone, never on the thread count, so the (reassociated)
        # sums and thus the results are the same whatever the number of threads.
        item_len = n if n <= _ROW_VALUES else max(1, _ITEM_VALUES // channels) * channels
        n_bad = _fused(x, x.view(int_type), channels, item_len, self.threshold, self.sigma_k, shift, mask,
                       self.tables[rows.dtype], self.pending[start : start + n_rows], self.cmax, self.n_gt,
                       self.n_ksigma, self.hist)
        return n_bad == 0


