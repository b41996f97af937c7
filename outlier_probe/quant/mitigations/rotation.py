"""QuaRot-style rotation (Ashkboos et al., 2024): an orthogonal map Q of the residual stream, fused
into the weights, so outliers spread over every channel while the float model is unchanged.

Steps (pre-RMSNorm blocks only; arch.rotation_layout says why other families cannot be rotated):
1. fold each norm's scale into the Linears reading it (W <- W diag(gamma), gamma <- 1), the final
   norm's into the LM head, and untie the head from the embedding;
2. embeddings E <- E Q; readers W <- W Q; writers (out / down projections) W <- Q^T W, b <- Q^T b;
   the head W <- W Q. RMSNorm(x Q) = RMSNorm(x) Q once its scale is 1, so every block sees the
   rotated stream and the logits are unchanged;
3. an online rotation H before each down projection (x -> x H, W_down <- W_down H), which spreads the
   FFN's intermediate outliers too.

Q of size d = 2^k m (m odd) is the normalised Sylvester Hadamard matrix (scipy.linalg.hadamard) when
m = 1, else kron(H_{2^k}, R_m) with R_m a seeded random orthogonal m x m matrix (scipy.stats.ortho_group):
orthogonal, and every output channel still mixes every input channel.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from outlier_probe import arch
from outlier_probe.quant.mitigations.linear import InputMappedLinear
from outlier_probe.quant.mitigations.smoothing import weight_matrix


def orthogonal_matrix(d: int, seed: int = 0) -> Tensor:
    """A d x d orthogonal float64 matrix: Hadamard / sqrt(d) for powers of two, else kron(Hadamard, random)."""
    from scipy.linalg import hadamard
    from scipy.stats import ortho_group

    if d < 1:
        raise ValueError(f"rotation size must be >= 1, got {d}")
    p = d & -d  # largest power of two dividing d
    h = hadamard(p).astype(np.float64) / np.sqrt(p)
    m = d // p
    if m > 1:
        r = ortho_group.rvs(m, random_state=seed) if m > 1 else np.ones((1, 1))
        h = np.kron(h, r)
    return torch.from_numpy(h)


def describe_matrix(d: int) -> str:
    p = d & -d
    return f"Hadamard {d}" if p == d else f"kron(Hadamard {p}, random orthogonal {d // p})"


@torch.no_grad()
def _fold_norm(model: nn.Module, norm_name: str, readers: list[nn.Module]) -> None:
    norm = model.get_submodule(norm_name)
    gamma = norm.weight.detach().double()
    for r in readers:
        w = weight_matrix(r)
        w.copy_((w.double() * gamma).to(w.dtype))
    norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0) -> dict[str, str]:
    """Rotate `model` in place (a copy the caller owns); returns the matrices used, for the report."""
    layout = arch.rotation_layout(model)
    head = model.get_submodule(layout.head)
    emb = model.get_submodule(layout.embeddings)
    if head.weight is emb.weight:  # tied: the head gets its own copy before folding
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        if hasattr(model.config, "tie_word_embeddings"):
            model.config.tie_word_embeddings = False
    for norm, readers in layout.readers:
        _fold_norm(model, norm, [model.get_submodule(r) for r in readers])
    _fold_norm(model, layout.final_norm, [head])
    d = emb.weight.shape[1]
    q = orthogonal_matrix(d, seed)

    def right(m: nn.Module) -> None:  # W <- W Q (reads the stream)
        w = weight_matrix(m)
        w.copy_((w.double() @ q).to(w.dtype))

    emb.weight.copy_((emb.weight.double() @ q).to(emb.weight.dtype))
    for _, readers in layout.readers:
        for r in readers:
            right(model.get_submodule(r))
    right(head)
    for name in layout.writers:  # W <- Q^T W (writes the stream)
        m = model.get_submodule(name)
        w = weight_matrix(m)
        w.copy_((q.T @ w.double()).to(w.dtype))
        if getattr(m, "bias", None) is not None:
            m.bias.copy_((m.bias.double() @ q).to(m.bias.dtype))
    d_ff = weight_matrix(model.get_submodule(layout.downs[0])).shape[1]
    h = orthogonal_matrix(d_ff, seed + 1)
    for name in layout.downs:
        m = model.get_submodule(name)
        w = weight_matrix(m)
        parent, _, child = name.rpartition(".")
        new = InputMappedLinear.from_linear(m, (w.double() @ h).to(w.dtype), h.to(w.dtype))
        setattr(model.get_submodule(parent), child, new)
    return {"residual": describe_matrix(d), "down_input": describe_matrix(d_ff)}
