"""Quantization points -> the groups `sensitivity` switches on and off together."""

from __future__ import annotations

import enum
import fnmatch

from torch import nn

from outlier_probe import arch
from outlier_probe.errors import UsageError
from outlier_probe.quant.keep import module_of
from outlier_probe.quant.recipes import QuantPoint

EMBEDDINGS, HEAD = "embeddings", "head"


class GroupBy(str, enum.Enum):
    layer = "layer"  # one group per transformer block, plus embeddings and head
    site = "site"  # every quantization point on its own


def group_points(model: nn.Module, points: list[QuantPoint], by: GroupBy) -> dict[str, tuple[str, ...]]:
    """{group name: its point names}, in model order; groups without a point are left out.

    Layer groups: `embeddings` (embedding tables, the embedding sum and, BERT-style, its norm),
    `layer.<i>` (everything inside block i), `head` (what follows the last block: the final norm; the
    LM / classifier head itself stays float in every recipe).
    """
    if by is GroupBy.site:
        return {p.name: (p.name,) for p in points}
    embeddings = tuple(arch.embedding_module_names(model))
    groups: dict[str, list[str]] = {EMBEDDINGS: []}
    tail: list[str] = []
    for p in points:
        module = module_of(p.name)
        if p.kind == "embedding_sum" or any(module == e or module.startswith(e + ".") for e in embeddings):
            groups[EMBEDDINGS].append(p.name)
        elif (layer := p.layer if p.layer is not None else arch.layer_of_module(model, module)) is not None:
            groups.setdefault(f"layer.{layer}", []).append(p.name)
        else:
            tail.append(p.name)
    groups[HEAD] = tail
    return {name: tuple(members) for name, members in groups.items() if members}


def select_groups(groups: dict[str, tuple[str, ...]], patterns: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Groups whose name matches one of the fnmatch `patterns` (all when none are given)."""
    if not patterns:
        return groups
    chosen = {g: pts for g, pts in groups.items() if any(fnmatch.fnmatchcase(g, p) for p in patterns)}
    if not chosen:
        shown = ", ".join(list(groups)[:4])
        raise UsageError(f"--groups {','.join(patterns)} selects no group; groups are named like {shown}")
    return chosen
