"""Fused CPU kernel for per-token fake quantization (quant/mitigations/per_token.py).

The torch path costs an aminmax over every row (torch's row-wise aminmax is not vectorised: ~5x an
amax) and seven elementwise passes (multiply, round, add, clamp, subtract, multiply, and the copy),
at every activation site of every forward. Here one numba pass per row finds the row's range (on
order-preserving int32 keys of the float bits: integer min / max vectorise, float ones do not without
fastmath) and, while the row is still in L1, computes its scale and zero point and writes the
fake-quantized row: the same float32 operations in the same order (multiply by the float32
reciprocal, round half to even, add the zero point, clamp, subtract, multiply), so the result is
bit-identical to the torch path (tests/quant/test_kernels.py). The pass is serial: a numba parallel
region here measured slower than the whole pass (its worker threads keep spinning between calls). A
row whose range is not finite (inf / NaN) is left to the torch path (torch's exact NaN propagation):
every row has its own range, so that row alone gives what the whole tensor would. The kernel can
write into its input, for a tensor the caller drops (a fresh linear output, attention scores): no
output allocation, whose fresh pages cost ~0.8 ms of page faults per 6 MB. While an SQNR meter is on
(quant/sqnr.py), it also sums each row's signal power x^2 and noise power (x - q(x))^2 in float64 as it
writes the row (in place: the row is quantized into an L1 scratch row first, then the sums read both and
copy it back), so the meter needs no forward hook and the in-place path stays on while scoring.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from outlier_probe.stats.kernels import available as _numba_enabled

try:
    import numba
    from numba import njit
except ImportError:  # pragma: no cover - exercised only where numba is unavailable
    numba = None


def available(x: Tensor) -> bool:
    """True when `x` can take the fused kernel: a float32 CPU tensor, numba on (OUTLIER_PROBE_KERNEL)."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 0 and _numba_enabled()


if numba is not None:

    @njit(cache=True, boundscheck=False, nogil=True)
    def _order_key(b):  # pragma: no cover - compiled
        """float32 bits -> an int32 ordered as the floats are (for non-NaN); its own inverse."""
        return np.int32(b ^ np.int32(np.int32(b >> np.int32(31)) & np.int32(0x7FFFFFFF)))

    @njit(cache=True, boundscheck=False, nogil=True, inline="always")
    def _fq(v, inv, zp, scale, qmin, qmax):  # pragma: no cover - compiled
        """One value through the torch path's operations, in its order (float32 throughout)."""
        q = np.rint(v * inv) + zp
        q = qmin if q < qmin else q
        q = qmax if q > qmax else q
        return (q - zp) * scale

    @njit(cache=True, boundscheck=False, nogil=True, fastmath={"reassoc", "contract", "nsz"})
    def _noise_sums(row, q, write_back):  # pragma: no cover - compiled
        """(sum row^2, sum (row - q)^2) in float64; write_back: then row[:] = q. Its own function for its
        fastmath flags (reassociation lets LLVM vectorise the sums; the quantizing loops keep strict
        float semantics, so their bits do not move)."""
        s = 0.0
        e = 0.0
        if write_back:
            for j in range(row.shape[0]):
                v = np.float64(row[j])
                d = v - np.float64(q[j])
                s += v * v
                e += d * d
                row[j] = q[j]
        else:
            for j in range(row.shape[0]):
                v = np.float64(row[j])
                d = v - np.float64(q[j])
                s += v * v
                e += d * d
        return s, e

    @njit(cache=True, boundscheck=False, nogil=True)
    def _per_token(x, bits, out, in_place, bad, qmin_i, qmax_i, eps, symmetric, sums, scratch):  # pragma: no cover - compiled
        """x, out (N, C) float32, bits the int32 view of x; in_place: write into x (out is ignored). The
        rows holding an inf or NaN are left unwritten, their indices stored in bad[:count]; returns count.
        sums: a float64 array of 3 (signal and noise power of the rows written, calls: added to) or of 0
        (not measured); scratch: C float32 values, where an in-place row is quantized before the sums read both.

        Rows go in blocks of up to 16 KB: 1. each row's range, 2. the scales and zero points of the block
        (the divisions of different rows overlap in the pipeline; one row at a time they formed a serial
        chain per row, ~25% of the pass on 128-value rows), 3. the quantizing loops, the rows still in L1.
        In place has its own loop: the same array read and written through two names makes LLVM's
        runtime alias check fail, and the loop then runs scalar (measured 2.6x slower)."""
        n, c = x.shape
        qmin = np.float32(qmin_i)
        qmax = np.float32(qmax_i)
        eps32 = np.float32(eps)
        one = np.float32(1.0)
        zero = np.float32(0.0)
        blk = max(1, min(32, 4096 // max(c, 1)))
        key = np.empty((2, blk), dtype=np.int32)  # the rows' min / max keys, bit-cast back to floats
        key_f = key.view(np.float32)
        finite = np.empty(blk, dtype=np.bool_)
        par = np.empty((3, blk), dtype=np.float32)  # scale, zero point, 1 / scale
        n_bad = 0
        measure = sums.shape[0] > 0
        sig = 0.0
        noise = 0.0
        for r0 in range(0, n, blk):
            m = min(blk, n - r0)
            for i in range(m):
                rb = bits[r0 + i]
                # min / max on order-preserving integer keys, every operation kept in int32 (numba widens
                # int32 arithmetic to int64, which halves the vector width: measured 2.3x slower), and the
                # largest |bits|: >= the bits of +inf exactly when the row holds an inf or a NaN
                klo = np.int32(0x7FFFFFFF)
                khi = np.int32(-0x80000000)
                amax = np.int32(0)
                for j in range(c):
                    b = rb[j]
                    k = _order_key(b)
                    klo = k if k < klo else klo
                    khi = k if k > khi else khi
                    a = np.int32(b & np.int32(0x7FFFFFFF))
                    amax = a if a > amax else amax
                key[0, i] = _order_key(klo)
                key[1, i] = _order_key(khi)
                finite[i] = amax < np.int32(0x7F800000)
            for i in range(m):
                lo = key_f[0, i]
                hi = key_f[1, i]
                lo = lo if lo < zero else zero  # the range includes 0, as compute_qparams
                hi = hi if hi > zero else zero
                if symmetric:
                    h = -lo if -lo > hi else hi
                    scale = h / qmax
                    scale = scale if scale > eps32 else eps32
                    zp = zero
                else:
                    scale = (hi - lo) / (qmax - qmin)
                    scale = scale if scale > eps32 else eps32
                    zp = qmin - np.rint(lo / scale)
                    zp = qmax if zp > qmax else zp
                    zp = qmin if zp < qmin else zp
                par[0, i] = scale
                par[1, i] = zp
                par[2, i] = one / scale
            for i in range(m):
                r = r0 + i
                if not finite[i]:
                    bad[n_bad] = r
                    n_bad += 1
                    continue
                scale = par[0, i]
                zp = par[1, i]
                inv = par[2, i]
                row = x[r]
                if in_place and measure:  # the row's values are needed after quantizing: via the scratch row
                    for j in range(c):
                        scratch[j] = _fq(row[j], inv, zp, scale, qmin, qmax)
                    s, e = _noise_sums(row, scratch, True)
                    sig += s
                    noise += e
                elif in_place:
                    for j in range(c):
                        row[j] = _fq(row[j], inv, zp, scale, qmin, qmax)
                else:
                    o = out[r]
                    for j in range(c):
                        o[j] = _fq(row[j], inv, zp, scale, qmin, qmax)
                    if measure:
                        s, e = _noise_sums(row, o, False)
                        sig += s
                        noise += e
        if measure:
            sums[0] += sig
            sums[1] += noise
            sums[2] += 1.0
        return n_bad


    @njit(cache=True, boundscheck=False, nogil=True)
    def _per_tensor(x, out, in_place, inv, zp, scale, qmin, qmax, sums, scratch):  # pragma: no cover - compiled
        """x, out 1-D float32 with one frozen scale / zero point (float32 scalars); in_place: write into x
        (out is ignored). sums, scratch: as _per_token's (scratch: up to 4096 values), in blocks of 4096
        values (16 KB, in L1 when the sums read them). inf / NaN go through _fq as through torch's chain
        (an inf clamps to the grid's end, a NaN stays NaN), so there is no torch fallback here."""
        n = x.shape[0]
        measure = sums.shape[0] > 0
        sig = 0.0
        noise = 0.0
        # the three branches below repeat _per_token's on a block instead of a row, on purpose: one shared
        # helper for both (inlined) measured 10-15% slower on the 128-value rows of scores / probabilities
        for b0 in range(0, n, 4096):
            m = min(4096, n - b0)
            xb = x[b0:b0 + m]
            if in_place and measure:
                sb = scratch[:m]
                for j in range(m):
                    sb[j] = _fq(xb[j], inv, zp, scale, qmin, qmax)
                s, e = _noise_sums(xb, sb, True)
                sig += s
                noise += e
            elif in_place:
                for j in range(m):
                    xb[j] = _fq(xb[j], inv, zp, scale, qmin, qmax)
            else:
                ob = out[b0:b0 + m]
                for j in range(m):
                    ob[j] = _fq(xb[j], inv, zp, scale, qmin, qmax)
                if measure:
                    s, e = _noise_sums(xb, ob, False)
                    sig += s
                    noise += e
        if measure:
            sums[0] += sig
            sums[1] += noise
            sums[2] += 1.0


_NO_SUMS = np.zeros(0, dtype=np.float64)


def per_tensor_fused(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                     *, in_place: bool = False, sums: Tensor | None = None) -> Tensor:
    """fake_quantize(x, scale, zero_point) for a float32 CPU tensor and a per-tensor (0-d) scale / zero
    point, bit for bit (the same float32 operations in the same order, the reciprocal computed by torch as
    there), in one pass. in_place: x may be overwritten (then the result is x's storage when x is
    contiguous). sums: as per_token_fused's (signal and noise power, float64, and the call)."""
    sc = scale.to(torch.float32).reshape(())
    inv = (1.0 / sc).numpy()[()]  # float32 scalars: the same values as fake_quantize's tensors
    zp = zero_point.to(torch.float32).reshape(()).numpy()[()]
    x1 = x.detach().reshape(-1).contiguous()
    inside = in_place or x1.data_ptr() != x.data_ptr()  # a copy of x is ours to write into
    out = x1 if inside else torch.empty_like(x1)
    acc = _NO_SUMS if sums is None else sums.numpy()
    scratch = np.empty(min(4096, x1.numel()) if inside and sums is not None else 0, dtype=np.float32)
    _per_tensor(x1.numpy(), out.numpy(), inside, inv, zp, sc.numpy()[()], np.float32(quant_min),
                np.float32(quant_max), acc, scratch)
    return out.view(x.shape)


def per_token_fused(x: Tensor, quant_min: int, quant_max: int, eps: float, symmetric: bool,
                    *, in_place: bool = False, sums: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row fake quantization of a float32 CPU tensor: (out shaped as x, the indices of the rows of
    out.view(-1, C) holding an inf or NaN, left unwritten there for the caller to fill).

    in_place: x may be overwritten (a tensor its caller owns and drops): out is then x itself when x
    is contiguous. A non-contiguous x is copied once and the copy quantized in place either way.
    sums: a contiguous float64 CPU tensor of 3: the signal power sum x^2 and the noise power sum (x - out)^2
    of the rows written (float64 sums, as the kernel goes; the caller adds the inf / NaN rows) and 1 (a call)
    are added to it.
    """
    x2 = x.detach().reshape(-1, x.shape[-1]).contiguous()
    copied = x2.data_ptr() != x.data_ptr()  # a view of x keeps its address; a copy cannot have it
    arr = x2.numpy()
    inside = in_place or copied
    out = x2 if inside else torch.empty_like(x2)
    bad = np.empty(arr.shape[0], dtype=np.int64)
    acc = _NO_SUMS if sums is None else sums.numpy()
    scratch = np.empty(arr.shape[1] if inside and sums is not None else 0, dtype=np.float32)
    n_bad = _per_token(arr, arr.view(np.int32), out.numpy(), inside, bad, quant_min, quant_max, eps, symmetric,
                       acc, scratch)
    return out.view(x.shape), torch.from_numpy(bad[:n_bad])
