"""Hopfield retrieval layers of STanHop-Net and their association (attention) maps.

Retrieval: Z = sep(beta * Q K^T) V with beta = 1 / sqrt(d_head); `sep` is the separation map of the
variant: softmax (modern Hopfield), softmax_1 (OutEffHop), sparsemax (SparseHopfield), 1.5-entmax
(STanHop's generalized sparse Hopfield, from the `entmax` package, the reference implementation),
clipped softmax (Bondarenko et al.: clamp((eta - gamma) * p + gamma, 0, 1)) and gated retrieval
(sigmoid(G(query)) per head times the retrieved pattern), plus clipped+softmax1 and gated+softmax1.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import nn

from outlier_probe.attention import softmax1
from outlier_probe.errors import UsageError

CLIP_ETA = 1.1  # STanHop's public code: --eta 1.1
CLIP_GAMMA = -0.1  # and --gamma -0.1
GATE_INIT = 0.25  # sigmoid(G(x)) at initialisation, as the transformer families' gated twin


class HopfieldVariant(str, enum.Enum):
    softmax = "softmax"
    softmax1 = "softmax1"
    sparsemax = "sparsemax"
    entmax = "entmax"
    clipped = "clipped"
    gated = "gated"
    clipped_softmax1 = "clipped+softmax1"
    gated_softmax1 = "gated+softmax1"

    @property
    def uses_softmax1(self) -> bool:
        return self in (HopfieldVariant.softmax1, HopfieldVariant.clipped_softmax1, HopfieldVariant.gated_softmax1)

    @property
    def has_gate(self) -> bool:
        return self in (HopfieldVariant.gated, HopfieldVariant.gated_softmax1)

    @property
    def has_clip(self) -> bool:
        return self in (HopfieldVariant.clipped, HopfieldVariant.clipped_softmax1)


def parse_variant(value: str) -> HopfieldVariant:
    try:
        return HopfieldVariant(value)
    except ValueError:
        valid = ", ".join(v.value for v in HopfieldVariant)
        raise UsageError(f"the stanhop family has no attention variant {value!r}; choose one of {valid}") from None


def association(scores: torch.Tensor, variant: HopfieldVariant, eta: float = CLIP_ETA, gamma: float = CLIP_GAMMA) -> torch.Tensor:
    """The separation map over the last axis (keys) of `scores` (already scaled by beta)."""
    if variant is HopfieldVariant.sparsemax:
        from entmax import sparsemax

        return sparsemax(scores, dim=-1)
    if variant is HopfieldVariant.entmax:
        from entmax import entmax15

        return entmax15(scores, dim=-1)
    p = softmax1(scores, dim=-1) if variant.uses_softmax1 else torch.softmax(scores, dim=-1)
    if variant.has_clip:
        # the public code's ClipSoftmax_1 called the wrong super().__init__ and could not be built;
        # here clipping applies to softmax_1 exactly as to softmax (the paper's clipped+OutEffHop)
        p = torch.clamp((eta - gamma) * p + gamma, 0.0, 1.0)
    return p


class Hopfield(nn.Module):
    """Multi-head Hopfield retrieval: queries R retrieve from stored patterns Y (keys) their values.

    The public code projected the values from `key_projection(keys)` and ignored its `values`
    argument; as in the paper (and in any attention layer), the values come from `values` here.
    """

    def __init__(self, d_model: int, n_heads: int, variant: HopfieldVariant, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise UsageError(f"d_model {d_model} is not divisible by {n_heads} heads")
        self.n_heads, self.d_head, self.variant = n_heads, d_model // n_heads, variant
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)
        self.gate: nn.Linear | None = None
        if variant.has_gate:
            self.gate = nn.Linear(d_model, n_heads)
            with torch.no_grad():  # input-independent at start: sigmoid(bias) = GATE_INIT
                self.gate.weight.zero_()
                self.gate.bias.fill_(math.log(GATE_INIT / (1.0 - GATE_INIT)))
        # W8A8 hooks (set by forecast.quant): called on the scaled scores and on the probabilities
        self.score_quantizer: nn.Module | None = None
        self.prob_quantizer: nn.Module | None = None

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        B, L, _ = queries.shape
        S = keys.shape[1]
        H, E = self.n_heads, self.d_head
        q = self.query_projection(queries).view(B, L, H, E).transpose(1, 2)
        k = self.key_projection(keys).view(B, S, H, E).transpose(1, 2)
        v = self.value_projection(values).view(B, S, H, E).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(E))  # beta = 1 / sqrt(d_head)
        if self.score_quantizer is not None:
            scores = self.score_quantizer(scores)
        probs = association(scores, self.variant)
        if self.prob_quantizer is not None:
            probs = self.prob_quantizer(probs)
        out = self.dropout(probs) @ v  # (B, H, L, E)
        if self.gate is not None:
            out = out * torch.sigmoid(self.gate(queries)).transpose(1, 2).unsqueeze(-1)
        return self.out_projection(out.transpose(1, 2).reshape(B, L, H * E))


class HopfieldPooling(nn.Module):
    """`factor` learned query patterns retrieve from the series: (N, D, d) -> (N, factor, d).

    The public code left its pattern tensor uninitialised (torch.empty) and used it as the keys; the
    paper (and Crossformer's router it follows) pools the series through learned queries, initialised
    here with N(0, 1) like the position embeddings.
    """

    def __init__(self, d_model: int, n_heads: int, factor: int, variant: HopfieldVariant, dropout: float = 0.0) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(factor, d_model))
        self.hopfield = Hopfield(d_model, n_heads, variant, dropout)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        queries = self.query.unsqueeze(0).expand(series.shape[0], -1, -1)
        return self.hopfield(queries, series, series)
