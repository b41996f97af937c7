"""Association maps against references: sparsemax (closed form of Martins & Astudillo) and 1.5-entmax
(the `entmax` package's bisection, a different algorithm from the sort-based entmax15 we call),
softmax_1 against exp(x) / (1 + sum exp(x)) in float64; every map's rows sum to <= 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from outlier_probe.forecast.hopfield import CLIP_ETA, CLIP_GAMMA, Hopfield, HopfieldVariant as V, association, parse_variant
from outlier_probe.errors import UsageError


def _scores(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 5, 9, generator=g, dtype=torch.float64) * 3


def _sparsemax_reference(z: np.ndarray) -> np.ndarray:
    """Martins & Astudillo (2016), algorithm 1, one row at a time."""
    out = np.empty_like(z)
    for idx in np.ndindex(z.shape[:-1]):
        row = z[idx]
        s = np.sort(row)[::-1]
        k = np.arange(1, len(row) + 1)
        cums = np.cumsum(s)
        kz = k[1 + k * s > cums].max()
        tau = (cums[kz - 1] - 1) / kz
        out[idx] = np.maximum(row - tau, 0)
    return out


def test_sparsemax_matches_closed_form() -> None:
    z = _scores()
    np.testing.assert_allclose(association(z, V.sparsemax).numpy(), _sparsemax_reference(z.numpy()), atol=1e-10)


def test_entmax_matches_bisection_reference() -> None:
    from entmax import entmax_bisect

    z = _scores(1)
    ref = entmax_bisect(z, alpha=1.5, dim=-1, n_iter=100)
    np.testing.assert_allclose(association(z, V.entmax).numpy(), ref.numpy(), atol=1e-6)
    assert (association(z, V.entmax) == 0).any(), "1.5-entmax of spread scores must give exact zeros"


def test_softmax1_closed_form_including_large_logits() -> None:
    z = _scores(2)
    z[0, 0, 0] += 500.0  # overflow territory for a naive exp
    e = np.exp(z.numpy() - 0)
    small = z.numpy() < 100
    p = association(z, V.softmax1).numpy()
    ref = e / (1 + e.sum(-1, keepdims=True))
    np.testing.assert_allclose(p[1], ref[1], rtol=1e-12)
    assert np.isfinite(p).all() and p[0, 0, 0].sum() == pytest.approx(1.0)
    assert small[1].all()


@pytest.mark.parametrize("variant", list(V))
def test_rows_sum_to_at_most_one(variant: V) -> None:
    p = association(_scores(3), variant)
    assert (p >= 0).all()
    assert (p.sum(-1) <= 1 + 1e-12).all()
    if variant in (V.softmax, V.sparsemax, V.entmax, V.gated):
        np.testing.assert_allclose(p.sum(-1).numpy(), 1.0, atol=1e-12)
    if variant.uses_softmax1 and not variant.has_clip:
        assert (p.sum(-1) < 1).all()


def test_clipped_is_the_stretched_clamp() -> None:
    z = _scores(4)
    for variant, base in ((V.clipped, torch.softmax(z, -1)), (V.clipped_softmax1, association(z, V.softmax1))):
        ref = torch.clamp((CLIP_ETA - CLIP_GAMMA) * base + CLIP_GAMMA, 0, 1)
        torch.testing.assert_close(association(z, variant), ref)
        assert (association(z, variant) == 0).any()


def test_hopfield_uses_its_values_and_beta() -> None:
    """Against an explicit reference: softmax(Q K^T / sqrt(d_head)) V per head (the public code ignored V)."""
    torch.manual_seed(0)
    layer = Hopfield(8, 2, V.softmax).double().eval()
    q, k, v = (torch.randn(3, n, 8, dtype=torch.float64) for n in (4, 6, 6))
    heads = lambda x, lin: lin(x).view(x.shape[0], x.shape[1], 2, 4).transpose(1, 2)  # noqa: E731
    Q, K, Vv = heads(q, layer.query_projection), heads(k, layer.key_projection), heads(v, layer.value_projection)
    ref = torch.softmax(Q @ K.transpose(-1, -2) / 2.0, -1) @ Vv
    ref = layer.out_projection(ref.transpose(1, 2).reshape(3, 4, 8))
    torch.testing.assert_close(layer(q, k, v), ref)
    assert not torch.allclose(layer(q, k, v), layer(q, k, v + 1.0))


def test_gated_starts_at_gate_init() -> None:
    torch.manual_seed(0)
    plain, gated = Hopfield(8, 2, V.softmax).eval(), Hopfield(8, 2, V.gated).eval()
    gated.load_state_dict(plain.state_dict(), strict=False)
    q = torch.randn(2, 3, 8)
    bias = plain.out_projection.bias
    torch.testing.assert_close(gated(q, q, q) - bias, 0.25 * (plain(q, q, q) - bias))


def test_unknown_variant_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="entmax"):
        parse_variant("bogus")
