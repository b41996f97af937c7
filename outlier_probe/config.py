"""Typed, frozen settings. The CLI is the only place that reads argv; everything else takes these."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from pathlib import Path

from outlier_probe.errors import UsageError


class SiteKind(str, enum.Enum):
    """What a hooked activation is, independent of the model family."""

    block_output = "block_output"  # residual stream after the layer
    attn_output = "attn_output"  # attention output projection
    ffn_output = "ffn_output"  # fc2 / down_proj / output.dense
    norm = "norm"  # outputs of the layer norms inside a block, and the final norm
    residual = "residual"  # residual sum entering a post-norm (BERT-style) LayerNorm
    linear_input = "linear_input"  # input of every Linear (off by default)
    linear_output = "linear_output"  # every Linear output: what the generic fallback hooks


DEFAULT_SITE_KINDS: tuple[SiteKind, ...] = (
    SiteKind.block_output,
    SiteKind.attn_output,
    SiteKind.ffn_output,
    SiteKind.norm,
    SiteKind.residual,
    SiteKind.linear_output,  # only the generic fallback emits these
)


class AttentionVariant(str, enum.Enum):
    softmax = "softmax"  # vanilla
    softmax1 = "softmax1"  # OutEffHop: exp(x_i) / (1 + sum_j exp(x_j))
    clipped = "clipped"  # clip((zeta - gamma) * softmax(x) + gamma, 0, 1)
    gated = "gated"  # sigmoid(G(x)) * softmax attention, per head
    softpick = "softpick"  # ReLU(e^x - 1) / (sum |e^x - 1| + eps) (2025, rectified softmax)
    sigmoid_gate = "sigmoid-gate"  # Y * sigmoid(X W_g) per head and channel (Qwen3-Next output gate)
    sink = "sink"  # exp(x_i) / (exp(s_h) + sum_j exp(x_j)), learned per-head sink logit (gpt-oss)


class DType(str, enum.Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"

    @property
    def torch(self):  # noqa: ANN201 - torch imported lazily to keep `--help` fast
        import torch

        return getattr(torch, self.value)


class Device(str, enum.Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"

    def resolve(self) -> str:
        import torch

        if self is Device.auto:
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self is Device.cuda and not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for but no CUDA device is available; use --device cpu")
        return self.value


@dataclass(frozen=True)
class LoadConfig:
    """How to turn a checkpoint reference into a model."""

    source: str  # local folder, GGUF file, or hub id
    dtype: DType = DType.float32
    device: Device = Device.cpu
    trust_remote_code: bool = False
    attention: AttentionVariant | None = None  # None: the variant recorded in the checkpoint (or softmax)
    tokenizer: str | None = None  # tokenizer folder when the checkpoint ships none
    device_map: str | None = None  # accelerate placement: auto | cpu | cuda; None: whole model on `device`
    max_memory: str | None = None  # per-device budget with device_map auto ("20GiB" or "cpu=8GiB,0=20GiB")
    offload_folder: Path | None = None  # where weights beyond the budget go (default: a temporary folder)


@dataclass(frozen=True)
class Placement:
    """--device-map / --max-memory / --offload-folder (and --dtype): how a command places the weights it loads.

    Every command that loads a checkpoint carries one and applies it to each LoadConfig it builds, so the
    options mean the same everywhere and are checked in one place (before any work).
    """

    device_map: str | None = None  # accelerate placement: auto | cpu | cuda; None: the whole model on --device
    max_memory: str | None = None  # per-device budget with device_map auto; beyond it weights go to disk
    offload_folder: Path | None = None  # where offloaded weights go (default: a temporary folder)
    dtype: DType | None = None  # model dtype; None: the command's own default (float32)

    def __post_init__(self) -> None:
        if (self.device_map, self.max_memory, self.offload_folder) != (None, None, None):
            from outlier_probe.offload import from_pretrained_kwargs  # torch only when a map is asked for

            from_pretrained_kwargs(self.device_map, self.max_memory, self.offload_folder)  # bad combinations fail here

    def apply(self, load: LoadConfig) -> LoadConfig:
        """`load` with this placement (its dtype too, when one is given)."""
        out = replace(load, device_map=self.device_map, max_memory=self.max_memory, offload_folder=self.offload_folder)
        return out if self.dtype is None else replace(out, dtype=self.dtype)


@dataclass(frozen=True)
class DataConfig:
    """Where evaluation / calibration sequences come from and how they are packed."""

    path: Path | None = None  # text file, folder of text files, or image folder
    dataset: str | None = None  # Hugging Face dataset "name[:config[:split]]"
    include: str = "*.txt"  # glob for files inside a --data folder (recursive)
    samples: int = 32  # number of sequences (text) or images
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 8
    seed: int = 0
    offset: int = 0  # sequences to skip first (e.g. calibration from a different part of the data)

    def __post_init__(self) -> None:
        if self.path is not None and self.dataset is not None:
            raise UsageError("give either --data or --dataset, not both")
        for name in ("samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.offset < 0:
            raise UsageError(f"offset must be >= 0, got {self.offset}")


@dataclass(frozen=True)
class SiteSelection:
    """Which activations to hook."""

    kinds: tuple[SiteKind, ...] = DEFAULT_SITE_KINDS
    include: tuple[str, ...] = ()  # fnmatch patterns on module names; empty = all
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class ObserverConfig:
    """Knobs of the per-site outlier observers."""

    top_k: int = 8  # outlier channel ids kept per site
    threshold: float = 6.0  # LLM.int8 outlier magnitude
    sigma_k: float = 6.0  # "> k sigma" outlier fraction

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UsageError(f"--top-k must be >= 1, got {self.top_k}")
        if self.threshold <= 0 or self.sigma_k <= 0:
            raise UsageError("outlier thresholds must be > 0")


@dataclass(frozen=True)
class StatsConfig:
    load: LoadConfig
    data: DataConfig = field(default_factory=DataConfig)
    sites: SiteSelection = field(default_factory=SiteSelection)
    observer: ObserverConfig = field(default_factory=ObserverConfig)
    out: Path | None = None  # None: reports/<model-name>/
    plots: bool = True
