"""Architecture adapter of the stanhop family: the only place that knows STanHopNet's module names.

Blocks: `encoder.{i}` (e_layers) then `decoder.{j}` (e_layers + 1); layer index = encoder i, decoder
e_layers + j. Inside a block's STHM layer (`encoder.{i}.sthm`, `decoder.{j}.sthm`): cross-time
Hopfield `cross_time`, its MLP `MLP1`, cross-series pooling `cross_series` and retrieval `hopfield`,
`MLP2`, norms `norm1`..`norm4`; a decoder block adds the cross-attention `hopfield`, `norm1`, `norm2`,
`MLP1` and the prediction head `linear_pred` (kept in float by the W8A8 recipes, as LM heads are).
"""

from __future__ import annotations

import re
from typing import Literal

from torch import nn

from outlier_probe.config import SiteKind

MODEL_TYPE = "stanhop"
HEADS = ("linear_pred",)
CONTEXT_LINEAR = "out_projection"  # input = the retrieved patterns (the "context" of the W8A8 recipe)
_BLOCK = re.compile(r"^(encoder|decoder)\.(\d+)(?:\.|$)")

# (relative name inside a block, kind) in forward order
_STHM = (("sthm.cross_time", SiteKind.attn_output), ("sthm.norm1", SiteKind.norm), ("sthm.MLP1", SiteKind.ffn_output),
         ("sthm.norm2", SiteKind.norm), ("sthm.hopfield", SiteKind.attn_output), ("sthm.norm3", SiteKind.norm),
         ("sthm.MLP2", SiteKind.ffn_output), ("sthm.norm4", SiteKind.norm))
_DECODER_EXTRA = (("hopfield", SiteKind.attn_output), ("norm1", SiteKind.norm), ("MLP1", SiteKind.ffn_output),
                  ("norm2", SiteKind.norm))


def is_stanhop(model: nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == MODEL_TYPE


def blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(f"encoder.{i}", b) for i, b in enumerate(model.encoder)] + [(f"decoder.{j}", b) for j, b in enumerate(model.decoder)]


def layer_of(model: nn.Module, name: str) -> int | None:
    m = _BLOCK.match(name)
    if not m:
        return None
    return int(m.group(2)) + (len(model.encoder) if m.group(1) == "decoder" else 0)


def site_specs(model: nn.Module) -> list[tuple[str, SiteKind, int | None, Literal["output", "input"]]]:
    """(module name, kind, layer, capture) of every stats site, in forward order."""
    out: list[tuple[str, SiteKind, int | None, Literal["output", "input"]]] = [("pre_norm", SiteKind.norm, None, "output")]
    for name, _ in blocks(model):
        layer = layer_of(model, name)
        rel = _STHM + (_DECODER_EXTRA if name.startswith("decoder") else ())
        for r, kind in rel:
            out.append((f"{name}.{r}", kind, layer, "output"))
            if kind is SiteKind.norm:  # post-norm: the norm's input is a residual sum
                out.append((f"{name}.{r}", SiteKind.residual, layer, "input"))
        out.append((name, SiteKind.block_output, layer, "output"))
    return out


def hopfield_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Hopfield retrieval (the modules whose association map the variant sets)."""
    from outlier_probe.forecast.hopfield import Hopfield

    return [(n, m) for n, m in model.named_modules() if isinstance(m, Hopfield)]


def is_head(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in HEADS


def is_context_linear(name: str) -> bool:
    return name.endswith("." + CONTEXT_LINEAR)


def embedding_params(model: nn.Module) -> list[str]:
    return ["enc_pos", "dec_pos"]
