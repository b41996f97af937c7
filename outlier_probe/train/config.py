"""Settings and results of a training run (shared by every task)."""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from outlier_probe.attention import DEFAULT_GAMMA, DEFAULT_GATE_INIT, DEFAULT_ZETA
from outlier_probe.config import AttentionVariant, Device, Placement
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.models import PRESETS, Arch, shape_for

DEFAULT_STEPS = 1000  # when neither steps nor a time budget is given
EVAL_FRACTION = 0.02  # held-out tail of the packed chunks (or images)
STATE_FILE = "training_state.pt"
LOG_FILE = "train_log.csv"
CONFIG_FILE = "train_config.json"
LOG_COLUMNS = ("run", "step", "tokens", "train_loss", "eval_loss", "avg_kurtosis", "max_inf_norm", "tokens_per_s", "elapsed_s")
# settings a --resume must share with the run it continues (steps, budget, eval cadence may change)
_RESUME_KEYS = ("arch", "size", "layers", "hidden", "heads", "attention", "gamma", "zeta", "alpha", "gate_init", "init_from", "data",
                "include", "tokenizer", "vocab_size", "seq_len", "batch_size", "seed", "channels", "image_size", "patch_size")


class Schedule(str, enum.Enum):
    """Decay of the lr over the run's progress p in [0, 1], multiplied by the linear warmup ramp (lr_factor)."""

    cosine = "cosine"  # lr -> lr * min_lr_ratio along half a cosine
    linear = "linear"  # lr -> lr * min_lr_ratio linearly
    constant = "constant"  # lr


class Precision(str, enum.Enum):
    auto = "auto"  # bf16 autocast on CUDA, float32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"  # bf16 autocast (float32 weights and optimizer); ~2x faster matmuls on CPUs with avx512_bf16 / AMX


def _enum(cls: type[enum.Enum], value: Any, option: str) -> Any:
    try:
        return cls(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        raise UsageError(f"unknown {option} {value!r}; choose one of {', '.join(m.value for m in cls)}") from None


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; validated on construction (UsageError on bad values)."""

    arch: Arch | None = None  # model family; None: opt (or the family of init_from)
    size: str | None = None  # models.PRESETS name; None: tiny (layers/hidden/heads override it)
    layers: int | None = None
    hidden: int | None = None
    heads: int | None = None
    attention: AttentionVariant = AttentionVariant.softmax
    gamma: float = DEFAULT_GAMMA  # clipped softmax lower clip (<= 0)
    zeta: float = DEFAULT_ZETA  # clipped softmax upper stretch (>= 1)
    alpha: float | None = None  # clipped softmax: gamma = -alpha / T (T = keys per row) instead of gamma
    gate_init: float = DEFAULT_GATE_INIT  # gated attention: sigmoid(gate) at initialisation
    init_from: str | None = None  # --from: pretrained checkpoint to fine-tune (arch and shape come from it)
    placement: Placement = field(default_factory=Placement)  # --from read through accelerate (no weight may stay on disk)
    data: Path | None = None  # text file / folder (default: built-in text); vit: image folder or idx files
    include: str = "*.txt"  # glob for files inside a text --data folder (recursive)
    max_chars: int | None = None  # read at most this many characters of text
    tokenizer: str | None = None  # existing tokenizer folder; None: BPE trained on the data (or init_from's)
    vocab_size: int = 4096  # of the trained BPE tokenizer
    seq_len: int = 128  # tokens per packed training sequence
    batch_size: int = 16  # sequences (or images) per step
    steps: int | None = None  # optimizer steps in total (a resumed run continues up to it)
    time_budget: float | None = None  # seconds of training in total; stops at whichever of steps / budget comes first
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine / linear)
    warmup: int = 100  # linear warmup steps
    schedule: Schedule = Schedule.cosine
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1  # on matrices (dim >= 2) only
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 100  # steps between log rows (eval loss + outlier probe)
    eval_samples: int = 64  # held-out sequences (images) the eval loss is measured on
    log_every: int = 10  # steps between train-loss reads for the progress display (the only host syncs)
    save_every: int = 0  # steps between checkpoints; 0: only at the end (and on Ctrl-C)
    seed: int = 0
    device: Device = Device.auto
    precision: Precision = Precision.auto  # autocast for the forward/backward passes
    threads: int | None = None  # CPU threads for this run; None: torch's default, capped at the CPU affinity
    channels: int | None = None  # vit: 1 (grayscale) or 3; None: 3 (grayscale replicated)
    image_size: int | None = None  # vit: None = the idx files' size, 28 for image folders
    patch_size: int = 4  # vit
    out: Path | None = None  # output folder; None: runs/<run name>
    run_name: str | None = None  # the `run` column of train_log.csv; None: <arch>-<size>-<attention>
    resume: bool = False  # continue from the checkpoint and training_state.pt in `out`
    overwrite: bool = False  # allow writing into an `out` that already holds a checkpoint
    plots: bool = True  # write outliers.png

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        if self.arch is not None:
            set_(self, "arch", _enum(Arch, self.arch, "--arch"))
        set_(self, "attention", _enum(AttentionVariant, self.attention, "--attention"))
        set_(self, "schedule", _enum(Schedule, self.schedule, "--schedule"))
        set_(self, "device", _enum(Device, self.device, "--device"))
        set_(self, "precision", _enum(Precision, self.precision, "--precision"))
        if self.data is not None:
            set_(self, "data", Path(self.data))
        if self.out is not None:
            set_(self, "out", Path(self.out))
        set_(self, "betas", tuple(float(b) for b in self.betas))
        if self.steps is None and self.time_budget is None:
            set_(self, "steps", DEFAULT_STEPS)
        if self.init_from is not None:
            given = [f"--{n}" for n in ("size", "layers", "hidden", "heads") if getattr(self, n) is not None]
            if given:
                raise UsageError(f"{', '.join(given)} cannot be combined with --from: the shape comes from the checkpoint")
        else:
            if self.placement != Placement():
                raise UsageError("--device-map / --max-memory / --offload-folder place the --from checkpoint; give --from")
            if self.size is not None and self.size not in PRESETS:
                raise UsageError(f"unknown --size {self.size!r}; choose one of {', '.join(PRESETS)}")
            for name in ("layers", "hidden", "heads"):
                if getattr(self, name) is not None and getattr(self, name) < 1:
                    raise UsageError(f"--{name} must be >= 1, got {getattr(self, name)}")
            shape_for(self.size, self.layers, self.hidden, self.heads)  # hidden divisible by heads
        for name in ("seq_len", "batch_size", "eval_every", "eval_samples", "log_every", "patch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise UsageError(f"--steps must be >= 1, got {self.steps}")
        if self.time_budget is not None and not self.time_budget > 0:
            raise UsageError(f"--time-budget must be > 0 seconds, got {self.time_budget}")
        if self.seq_len < 2:
            raise UsageError("--seq-len must be >= 2 (a causal LM predicts each next token)")
        if self.vocab_size < 262:
            raise UsageError(f"--vocab-size must be >= 262 (256 byte symbols + special tokens), got {self.vocab_size}")
        if not self.lr > 0:
            raise UsageError(f"--lr must be > 0, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UsageError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise UsageError(f"--betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("warmup", "weight_decay", "grad_clip", "save_every"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {self.threads}")
        if self.max_chars is not None and self.max_chars < 1:
            raise UsageError(f"--max-chars must be >= 1, got {self.max_chars}")
        if self.channels not in (None, 1, 3):
            raise UsageError(f"--channels must be 1 or 3, got {self.channels}")
        if self.image_size is not None and self.image_size % self.patch_size:
            raise UsageError(f"--image-size {self.image_size} is not divisible by --patch-size {self.patch_size}")
        if self.attention is AttentionVariant.clipped and not (self.gamma <= 0.0 and self.zeta >= 1.0):
            raise UsageError(f"clipped softmax needs --gamma <= 0 and --zeta >= 1 (got {self.gamma}, {self.zeta})")
        if self.alpha is not None and not self.alpha >= 0.0:
            raise UsageError(f"--alpha must be >= 0 (gamma = -alpha / T), got {self.alpha}")
        if self.attention is AttentionVariant.gated and not 0.0 < self.gate_init < 1.0:
            raise UsageError(f"--gate-init must be in (0, 1), got {self.gate_init}")

    @property
    def variant_params(self) -> dict[str, float]:
        if self.attention is AttentionVariant.clipped:
            return {"gamma": self.gamma, "zeta": self.zeta, **({} if self.alpha is None else {"alpha": self.alpha})}
        if self.attention is AttentionVariant.gated:
            return {"gate_init": self.gate_init}
        return {}

    @property
    def run(self) -> str:
        if self.run_name:
            return self.run_name
        if self.init_from is not None:
            from outlier_probe.loading import model_name

            return f"{model_name(self.init_from)}-{self.attention.value}"
        return f"{(self.arch or Arch.opt).value}-{self.size or 'tiny'}-{self.attention.value}"

    @property
    def out_dir(self) -> Path:
        return self.out if self.out is not None else Path("runs") / self.run


@dataclass(frozen=True)
class TrainStatus:
    """What the progress callback sees after every step (losses are from the last log interval)."""

    step: int
    max_steps: int | None
    elapsed_s: float
    time_budget: float | None
    tokens: int
    train_loss: float | None
    eval_loss: float | None
    tokens_per_s: float | None

    @property
    def fraction(self) -> float:
        """Progress in [0, 1]: the larger of the step and the time fraction."""
        parts = [self.step / self.max_steps if self.max_steps else 0.0, self.elapsed_s / self.time_budget if self.time_budget else 0.0]
        return min(1.0, max(parts))


@dataclass(frozen=True)
class TrainResult:
    out: Path  # the checkpoint folder (config.json, model.safetensors, tokenizer, training_state.pt, train_log.csv)
    steps: int  # total optimizer steps (including those before a resume)
    tokens: int  # total training tokens (vit: images x (patches + 1))
    final_eval_loss: float
    rows: tuple[dict[str, Any], ...]  # train_log.csv rows
    stopped_by: str  # "steps", "time_budget" or "already_done"
    tokens_per_s: float  # training throughput of this call, evals excluded
    settings: dict[str, Any]
    model: nn.Module | None = field(default=None, repr=False, compare=False)  # the trained model (eval mode)
    processor: Any | None = field(default=None, repr=False, compare=False)  # its tokenizer / image processor


class TrainingInterrupted(ProbeError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143) during training: the state was saved first."""

    exit_code = 130

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


Progress = Callable[[TrainStatus], None]
