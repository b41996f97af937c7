"""`retrofit`'s settings and results: the presets (cpu, gpu), the validated `RetrofitConfig` (preset values filled
in, the near-vanilla starts of the clipped and gated twins, the held-out / calibration / training split of the one
seeded data order), and the records a run returns (`Twin` per variant and seed, `RetrofitResult`). The run itself is
`retrofit.py`; `report/retrofit_report.py` renders the records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from outlier_probe.config import AttentionVariant, DataConfig, Device, Placement
from outlier_probe.errors import UsageError
from outlier_probe.retrofit_measure import Measurement
from outlier_probe.retrofit_objective import Objective

# Near-vanilla starts (see README "retrofit"): softmax1 has no new parameter (its extra "+1" only matters where
# every logit is small); clipping is 1/25 of Bondarenko et al.'s BERT gamma; gates start nearly open.
RETROFIT_GAMMA = -0.001
RETROFIT_GATE_INIT = 0.95


@dataclass(frozen=True)
class Preset:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    eval_every: int
    eval_samples: int
    head_steps: int = 200  # mlm-head: steps of head training on the frozen backbone


PRESETS: dict[str, Preset] = {
    "cpu": Preset(steps=60, batch_size=8, seq_len=128, lr=5e-5, warmup=6, eval_every=10, eval_samples=16),
    "gpu": Preset(steps=2000, batch_size=64, seq_len=256, lr=5e-5, warmup=200, eval_every=100, eval_samples=256, head_steps=2000),
}


@dataclass(frozen=True)
class RetrofitConfig:
    source: str
    variants: tuple[AttentionVariant, ...] = (AttentionVariant.softmax1, AttentionVariant.clipped, AttentionVariant.gated)
    data: Path | None = None
    include: str = "*.txt"
    objective: Objective = Objective.auto
    preset: str = "cpu"
    steps: int | None = None  # None: the preset's (and likewise below)
    batch_size: int | None = None
    seq_len: int | None = None
    lr: float | None = None
    warmup: int | None = None
    eval_every: int | None = None
    eval_samples: int | None = None
    head_steps: int | None = None
    seeds: tuple[int, ...] = (0,)
    gamma: float = RETROFIT_GAMMA
    gate_init: float = RETROFIT_GATE_INIT
    tokenizer: str | None = None
    device: Device = Device.auto
    threads: int | None = None
    out: Path | None = None
    save: Path | None = None  # each twin's final checkpoint in save/<twin>-s<seed>/ (with the mlm-head next to it)
    placement: Placement = field(default_factory=Placement)  # how CKPT is loaded (accelerate); no weight may stay on disk

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.preset not in PRESETS:
            raise UsageError(f"unknown --preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        try:
            set_(self, "objective", Objective(self.objective))
            set_(self, "device", Device(self.device))
            set_(self, "variants", tuple(dict.fromkeys(AttentionVariant(v) for v in self.variants)))
        except ValueError as err:
            raise UsageError(f"{err}; --attention takes softmax1, clipped, gated and --objective auto, lm, mlm, distill, mlm-head") from None
        set_(self, "variants", tuple(v for v in self.variants if v is not AttentionVariant.softmax))
        if not self.variants:
            raise UsageError("--attention needs at least one of softmax1, clipped, gated (the vanilla control always runs)")
        base = PRESETS[self.preset]
        for name in ("steps", "batch_size", "seq_len", "lr", "warmup", "eval_every", "eval_samples", "head_steps"):
            if getattr(self, name) is None:
                set_(self, name, getattr(base, name))
        for name in ("steps", "batch_size", "eval_every", "eval_samples", "head_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 4 or self.warmup < 0 or not self.lr > 0:
            raise UsageError("--seq-len must be >= 4, --warmup >= 0 and --lr > 0")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise UsageError("--seeds must list distinct integers")
        if not (self.gamma <= 0.0) or not 0.0 < self.gate_init < 1.0:
            raise UsageError(f"--gamma must be <= 0 and --gate-init in (0, 1) (got {self.gamma}, {self.gate_init})")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if self.data is not None:
            set_(self, "data", Path(self.data))
        for name in ("out", "save"):
            if getattr(self, name) is not None:
                set_(self, name, Path(getattr(self, name)))

    def params(self, variant: AttentionVariant) -> dict[str, float]:
        return {AttentionVariant.clipped: {"gamma": self.gamma}, AttentionVariant.gated: {"gate_init": self.gate_init}}.get(variant, {})

    def data_config(self, samples: int, offset: int) -> DataConfig:
        """Sequences [offset, offset + samples) of the one seeded order: held-out first, then calibration, then training."""
        return DataConfig(path=self.data, include=self.include, samples=samples, seq_len=self.seq_len,
                          batch_size=self.batch_size, seed=0, offset=offset)


@dataclass
class Twin:
    variant: AttentionVariant
    seed: int
    params: dict[str, float]
    before: Measurement
    after: Measurement | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)  # step, train_loss, eval_loss, avg_kurtosis, max_inf_norm
    step_s: float = math.nan  # mean seconds per optimizer step (probes and evals excluded)
    saved: str | None = None  # the final checkpoint's folder (--save)


@dataclass
class RetrofitResult:
    model: dict[str, Any]
    objective: Objective
    original: Measurement
    twins: list[Twin]
    settings: dict[str, Any]
    data: dict[str, Any]
    head: dict[str, Any] = field(default_factory=dict)  # mlm-head: its training and held-out perplexities
