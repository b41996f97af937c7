"""Did the checkpoint fill the model? transformers' loading report, judged: random weights are an error.

Statistics of a randomly initialised tensor presented as the checkpoint's are the worst failure this
tool can have, so a weights file that lacks tensors (truncated, edited, from another model) is refused.
"""

from __future__ import annotations

import re
from typing import Any

from torch import nn

from outlier_probe.errors import ProbeError


def check_loading_report(source: str, model: nn.Module, report: dict[str, Any], restored_later: tuple[str, ...] = (),
                         shown: int = 3) -> None:
    """Refuse a checkpoint whose weights do not fill the model: those tensors would be random.

    transformers has already dropped what is legitimately absent (tied output embeddings, buffers the
    model rebuilds such as position_ids or rotary inv_freq, each class's ignore patterns). What is left:
    - missing tensors (the model would keep its random initialisation) -> error;
    - shape-mismatched tensors (loaded as random instead) -> error;
    - unexpected tensors -> error, except a head or pooler the loaded class does not have
      (`cls.seq_relationship.*` of a BERT pretraining checkpoint) and tensors whose name holds one of
      `restored_later` (attention gates: restored after the variant is set, and counted there).
    """
    missing = sorted(report.get("missing_keys") or ())
    mismatched = sorted(report.get("mismatched_keys") or (), key=lambda m: m[0])
    modules = dict(model.named_modules())
    unexpected = sorted(k for k in report.get("unexpected_keys") or ()
                        if not any(m in k for m in restored_later) and not _extra_but_harmless(k, modules))
    if not (missing or mismatched or unexpected):
        return

    def first(names: list[str]) -> str:
        more = f", ... {len(names) - shown} more" if len(names) > shown else ""
        return f" ({', '.join(names[:shown])}{more})" if names else ""

    shapes = [f"{k} {tuple(ckpt)} vs {tuple(mine)}" for k, ckpt, mine in mismatched]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of {len(model.state_dict())} tensors missing{first(missing)}")
    if mismatched:
        parts.append(f"{len(mismatched)} {_tensors(len(mismatched))} of another shape{first(shapes)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected {_tensors(len(unexpected))}{first(unexpected)}")
    effect = "measuring it would " + " and ".join(
        e for e, on in (("use random values for those", missing or mismatched), ("ignore the extra ones", unexpected)) if on
    )
    raise ProbeError(
        f"checkpoint {source} does not match its config: {', '.join(parts)}; {effect}. "
        f"Is the weights file truncated, or from another model than its config?"
    )


def _tensors(n: int) -> str:
    return "tensor" if n == 1 else "tensors"


def _extra_but_harmless(key: str, modules: dict[str, nn.Module]) -> bool:
    """An unexpected tensor that only a head or pooler the loaded model does not have would use."""
    parent = key.rsplit(".", 1)[0]
    return parent not in modules and not re.search(r"(^|\.)\d+(\.|$)", parent)  # a missing *layer* is not harmless
