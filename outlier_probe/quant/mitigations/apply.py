"""One post-training mitigation setting, and the verb that applies it to a copy of a float model."""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from outlier_probe.errors import UsageError


class Rotation(str, enum.Enum):
    hadamard = "hadamard"


class AGranularity(str, enum.Enum):
    per_tensor = "per-tensor"  # one static range per site, calibrated (the papers' recipe)
    per_token = "per-token"  # dynamic min-max per token at run time


@dataclass(frozen=True)
class Mitigation:
    """What is done to the model / quantizer before W8A8. The default is plain W8A8 (nothing)."""

    smoothquant: float | None = None  # SmoothQuant migration strength alpha in [0, 1]
    rotate: Rotation | None = None
    a_granularity: AGranularity = AGranularity.per_tensor

    def __post_init__(self) -> None:
        if self.smoothquant is not None and not 0.0 <= self.smoothquant <= 1.0:
            raise UsageError(f"--smoothquant alpha must be in [0, 1], got {self.smoothquant}")
        if self.smoothquant is not None and self.rotate is not None:
            raise UsageError("--smoothquant and --rotate in one run is not supported (the rotation's online map "
                             "sits where smoothing folds its scales); run them as separate mitigations")

    @property
    def plain(self) -> bool:
        return self == Mitigation()

    @property
    def transforms_weights(self) -> bool:
        return self.smoothquant is not None or self.rotate is not None

    @property
    def name(self) -> str:
        parts = []
        if self.rotate is not None:
            parts.append(f"rotate-{self.rotate.value}")
        if self.smoothquant is not None:
            parts.append(f"smoothquant-{self.smoothquant:g}")
        if self.a_granularity is AGranularity.per_token:
            parts.append("per-token")
        return "+".join(parts) or "plain"


def apply_mitigation(model: nn.Module, mitigation: Mitigation, calib: list[dict[str, Tensor]],
                     run: Callable[[nn.Module, dict[str, Tensor]], Any], seed: int = 0,
                     absmax_cache: dict[str, Tensor] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """A transformed copy of `model` (the same model when nothing transforms weights) and what was done.

    absmax_cache: input maxima of the untransformed model, reused across smoothing strengths.
    """
    if not mitigation.transforms_weights:
        return model, {}
    from outlier_probe.quant.mitigations import rotation, smoothing

    out = copy.deepcopy(model)
    done: dict[str, Any] = {}
    if mitigation.rotate is Rotation.hadamard:
        done["rotation"] = rotation.rotate_model(out, seed)
    if mitigation.smoothquant is not None:
        names = smoothing.smoothed_consumers(out)
        if absmax_cache is None:
            absmax = smoothing.input_absmax(model, names, calib, run)
        else:
            if not absmax_cache:
                absmax_cache.update(smoothing.input_absmax(model, names, calib, run))
            absmax = absmax_cache
        scales = smoothing.smooth_model(out, absmax, mitigation.smoothquant)
        done["smoothquant"] = {"alpha": mitigation.smoothquant, "groups": len(scales),
                               "max_scale": max(float(s.max()) for s in scales.values()),
                               "min_scale": min(float(s.min()) for s in scales.values())}
    return out, done


@torch.inference_mode()
def transform_error(original: nn.Module, transformed: nn.Module, batch: dict[str, Tensor],
                    run: Callable[[nn.Module, dict[str, Tensor]], Any]) -> float:
    """max |y' - y| / max |y| of the two models' outputs (logits, or the last hidden state) on the first
    sequence of `batch`: float32 rounding (~1e-6) for an exact transform, and a transform that changes the
    model shows at once, for two forwards of one sequence instead of a float evaluation."""
    one = {k: v[:1] for k, v in batch.items()}
    y, y_new = (_first_output(run(m, one)).float() for m in (original, transformed))
    return float((y_new - y).abs().max() / y.abs().max().clamp_min(torch.finfo(torch.float32).tiny))


def _first_output(out: Any) -> Tensor:
    return out if isinstance(out, Tensor) else out[0]  # a ModelOutput's first field: logits / last_hidden_state
