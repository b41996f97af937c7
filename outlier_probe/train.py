"""`train`: small from-scratch (or fine-tune) training of vanilla / OutEffHop / clipped / gated models.

One call, `train(cfg)`: data -> tokenizer -> model (built, `--from` a checkpoint, or resumed) -> AdamW
loop with periodic eval and an outlier probe -> HF checkpoint + training_state.pt + train_log.csv.

Deterministic on CPU for a fixed seed: the batch of step s and its MLM mask depend only on (seed, s),
never on a global RNG, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import enum
import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from outlier_probe import arch, data
from outlier_probe.attention import DEFAULT_GAMMA, DEFAULT_GATE_INIT, DEFAULT_ZETA
from outlier_probe.config import AttentionVariant, DataConfig, Device, LoadConfig, SiteKind, SiteSelection, StatsConfig
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.models import PRESETS, Arch, build_config, build_model, shape_for

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


# ------------------------------------------------------------------------------------------- data


@dataclass
class _Data:
    task: arch.Task
    train: dict[str, torch.Tensor]  # "input_ids" (N, T) or "pixel_values" (N, C0, H, W) + "labels" (N,)
    eval_batches: list[dict[str, torch.Tensor]]  # fixed (MLM: masked once), with what the loss needs
    probe: dict[str, torch.Tensor]  # unmasked first eval batch: the outlier probe's input
    tokens_per_sample: int
    description: dict[str, Any]
    channels: int = 3  # vit: channels fed to the model (C0 = 1 is expanded to 3 per batch)

    @property
    def n_train(self) -> int:
        return len(next(iter(self.train.values())))


def _split(n: int) -> int:
    """How many of n items are held out for evaluation."""
    return max(1, math.ceil(n * EVAL_FRACTION))


def _eval_batches(items: dict[str, torch.Tensor], batch_size: int) -> list[dict[str, torch.Tensor]]:
    keys = list(items)
    return [dict(zip(keys, parts)) for parts in zip(*(items[k].split(batch_size) for k in keys))]


def _text_data(cfg: TrainConfig, tokenizer: Any, task: arch.Task, max_positions: int | None, text: str, desc: str) -> _Data:
    if max_positions is not None and cfg.seq_len > max_positions:
        raise UsageError(f"--seq-len {cfg.seq_len} is longer than the model's {max_positions} positions")
    prefix, suffix = data.special_tokens(tokenizer)
    body = cfg.seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise UsageError(f"--seq-len {cfg.seq_len} leaves no room next to the tokenizer's special tokens")
    ids = torch.tensor(data.tokenize_text(tokenizer, text), dtype=torch.long)
    n = len(ids) // body
    if n < 2:
        raise ProbeError(f"data has {len(ids):,} tokens: too few for a training and an eval sequence of {cfg.seq_len}; "
                         "use a shorter --seq-len or more data")
    chunks = ids[: n * body].view(n, body)
    parts = [torch.tensor(prefix, dtype=torch.long).expand(n, -1), chunks, torch.tensor(suffix, dtype=torch.long).expand(n, -1)]
    chunks = torch.cat(parts, dim=1).contiguous()  # (n, seq_len)
    n_eval = _split(n)
    train, held = chunks[: n - n_eval], chunks[n - n_eval :][: cfg.eval_samples]
    plain = _eval_batches({"input_ids": held}, cfg.batch_size)
    evals = plain
    if task is arch.Task.masked_lm:
        from outlier_probe.evaluation import mask_for_mlm

        evals = mask_for_mlm(plain, tokenizer, seed=cfg.seed)
    description = {"data": desc, "corpus_tokens": len(ids), "train_sequences": len(train), "eval_sequences": len(held),
                   "held_out_sequences": n_eval, "seq_len": cfg.seq_len}
    return _Data(task, {"input_ids": train}, evals, plain[0], cfg.seq_len, description)


def _image_data(cfg: TrainConfig) -> tuple[_Data, int, int]:
    """-> (data, num_labels, image_size)."""
    if cfg.data is None:
        raise UsageError("--arch vit needs --data: an image folder (one sub-folder per class) or MNIST-style idx files")
    path = cfg.data
    is_idx = (path.is_dir() and any(path.glob("*images-idx3-ubyte*"))) or "idx3" in path.name
    if is_idx:
        raw, labels, desc = data.read_idx_images(path)
        pixels = raw.unsqueeze(1).float().div(127.5).sub(1.0)  # (N, 1, H, W) in [-1, 1]
        size = cfg.image_size or raw.shape[-1]
        if pixels.shape[-2:] != (size, size):
            pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        images, labels, _classes, desc = data.load_images(path)
        size = cfg.image_size or 28
        pixels = data._preprocess(images, None, size)  # (N, 3, H, W) in [-1, 1]
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))  # class folders are sorted
        pixels, labels = pixels[order], labels[order]
    if size % cfg.patch_size:
        raise UsageError(f"image size {size} is not divisible by --patch-size {cfg.patch_size}; set --image-size")
    channels = cfg.channels or 3
    if channels == 1 and pixels.shape[1] == 3:
        pixels = pixels.mean(dim=1, keepdim=True)
    n = len(labels)
    if n < 2:
        raise ProbeError(f"{path} has {n} image(s): too few for a training and an eval split")
    n_eval = _split(n)
    train = {"pixel_values": pixels[: n - n_eval].contiguous(), "labels": labels[: n - n_eval].contiguous()}
    held = {"pixel_values": _channels(pixels[n - n_eval :][: cfg.eval_samples], channels), "labels": labels[n - n_eval :][: cfg.eval_samples]}
    evals = _eval_batches(held, cfg.batch_size)
    probe = {"pixel_values": evals[0]["pixel_values"]}
    tokens = (size // cfg.patch_size) ** 2 + 1  # patches + CLS
    description = {"data": desc, "train_images": n - n_eval, "eval_images": len(held["labels"]), "held_out_images": n_eval,
                   "image_size": size, "channels": channels, "tokens_per_image": tokens}
    return _Data(arch.Task.image_classification, train, evals, probe, tokens, description, channels), int(labels.max()) + 1, size


def _channels(pixels: torch.Tensor, channels: int) -> torch.Tensor:
    return pixels.expand(-1, channels, -1, -1) if pixels.shape[1] != channels else pixels


class _Sampler:
    """Batch of step s: items [s*B, (s+1)*B) of the concatenated per-epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=gen)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.batch_size, (step + 1) * self.batch_size)
        epochs = pos // self.n
        out = torch.empty_like(pos)
        for epoch in epochs.unique().tolist():
            sel = epochs == epoch
            out[sel] = self._perm(epoch)[pos[sel] % self.n]
        return out


def _train_batch(d: _Data, sampler: _Sampler, step: int, tokenizer: Any, seed: int) -> dict[str, torch.Tensor]:
    idx = sampler.indices(step)
    if d.task is arch.Task.image_classification:
        return {"pixel_values": _channels(d.train["pixel_values"][idx], d.channels), "labels": d.train["labels"][idx]}
    batch = {"input_ids": d.train["input_ids"][idx]}
    if d.task is arch.Task.masked_lm:
        from outlier_probe.evaluation import mask_for_mlm

        batch = mask_for_mlm([batch], tokenizer, seed=(seed + 1) * 2**32 + step)[0]  # a fresh mask every step
    return batch


# ------------------------------------------------------------------------------------------ model


def build_tokenizer(cfg: TrainConfig) -> Any:
    """The byte-level BPE tokenizer train() would fit on cfg's data (deterministic). Save it and pass its folder as
    `tokenizer=` to share one tokenizer between runs (e.g. vanilla / OutEffHop twins) without refitting it."""
    if cfg.arch is Arch.vit:
        raise UsageError("vit trains on images: it needs no tokenizer")
    text, _, _ = data.read_text(DataConfig(path=cfg.data, include=cfg.include), max_chars=cfg.max_chars)
    return _train_tokenizer(text[: cfg.max_chars] if cfg.max_chars else text, cfg.vocab_size, masked=cfg.arch is Arch.bert)


def _load_tokenizer(source: str) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - one clear line
        raise ProbeError(f"could not load a tokenizer from {source} ({str(err).splitlines()[0][:160] if str(err) else type(err).__name__})") from None


def _train_tokenizer(text: str, vocab_size: int, masked: bool) -> Any:
    from outlier_probe.tokenization import train_bpe_tokenizer

    lines = text.splitlines(keepends=True)
    blocks = ("".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000))
    return train_bpe_tokenizer(blocks, vocab_size=vocab_size, masked=masked)


def _image_processor(size: int) -> Any:
    import transformers

    cls = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)  # no torchvision needed
    return cls(size={"height": size, "width": size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def _disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (nn.Dropout modules and the float rates attention modules pass to sdpa)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout", "dropout_prob", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id}
    return {k: v for k, v in ids.items() if v is not None}


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def lr_factor(cfg: TrainConfig, step: int, progress: float) -> float:
    """lr / peak lr at `step` (0-based), `progress` in [0, 1] (the larger of the step and the time fraction)."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    p = min(max(progress, 0.0), 1.0)
    if cfg.schedule is Schedule.cosine:
        decay = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))
    elif cfg.schedule is Schedule.linear:
        decay = 1 - (1 - cfg.min_lr_ratio) * p
    else:
        decay = 1.0
    return warm * decay


def _loss(model: nn.Module, batch: dict[str, torch.Tensor], task: arch.Task, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, number of scored targets) for one batch already on the device; both stay on the device."""
    if task is arch.Task.image_classification:
        logits = model(pixel_values=batch["pixel_values"]).logits
        labels = batch["labels"]
    elif task is arch.Task.masked_lm:
        logits = model(input_ids=batch["input_ids"]).logits
        labels = batch["labels"]
    else:
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits  # (B, T, V)
        labels = F.pad(ids[:, 1:], (0, 1), value=-100)  # next token; the last position has none
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    count = (labels != -100).sum()
    if reduction == "sum":
        return total, count
    return total / count.clamp(min=1), count


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cuda":  # pinned host memory: the copy does not wait for the GPU to drain
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return batch


# ------------------------------------------------------------------------------------------ train


@dataclass
class _Setup:
    model: nn.Module
    processor: Any | None  # tokenizer (text) or image processor (vit)
    tokenizer: Any | None
    data: _Data
    source: str  # what the weights started from: "scratch", the --from checkpoint, or the resumed folder


def _setup(cfg: TrainConfig, out: Path, device: str) -> _Setup:
    from outlier_probe.loading import load_model, set_attention

    resumed = load_model(LoadConfig(source=str(out), device=Device.cpu)) if cfg.resume else None
    pretrained = load_model(LoadConfig(source=cfg.init_from, device=Device.cpu)) if cfg.init_from and not cfg.resume else None
    loaded = resumed or pretrained
    if loaded is not None:
        model, info = loaded.model, loaded.info
        if info.family.value not in {a.value for a in Arch}:
            raise UsageError(f"train supports the families {', '.join(a.value for a in Arch)}; {loaded.source} is {info.family.value}")
        if cfg.arch is not None and cfg.arch.value != info.family.value:
            raise UsageError(f"--arch {cfg.arch.value} does not match the checkpoint's family {info.family.value}")
        if info.task is arch.Task.encoder:
            raise UsageError(f"{loaded.source} has no LM, MLM or classification head to train ({type(model).__name__})")
        task = info.task
    else:
        family = cfg.arch or Arch.opt
        task = {Arch.bert: arch.Task.masked_lm, Arch.vit: arch.Task.image_classification}.get(family, arch.Task.causal_lm)

    if task is arch.Task.image_classification:
        d, num_labels, size = _image_data(cfg)
        tokenizer, processor = None, (loaded.processor if loaded and loaded.processor is not None else _image_processor(size))
        if loaded is None:
            shape = shape_for(cfg.size, cfg.layers, cfg.hidden, cfg.heads)
            config = build_config(Arch.vit, shape, image_size=size, patch_size=cfg.patch_size, num_labels=num_labels, num_channels=d.channels)
            model = build_model(config, seed=cfg.seed)
        elif (model.config.image_size, model.config.num_channels) != (size, d.channels) or model.config.num_labels < num_labels:
            raise UsageError(f"the data ({size}x{size}, {d.channels} channels, {num_labels} labels) does not fit {loaded.source} "
                             f"({model.config.image_size}x{model.config.image_size}, {model.config.num_channels} channels, "
                             f"{model.config.num_labels} labels); set --image-size / --channels")
    else:
        text, desc, _ = data.read_text(DataConfig(path=cfg.data, include=cfg.include), max_chars=cfg.max_chars)
        if cfg.max_chars is not None:
            text = text[: cfg.max_chars]
        if cfg.resume or (loaded is not None and cfg.tokenizer is None):
            tokenizer = loaded.processor if loaded is not None else None
            if tokenizer is None:
                raise ProbeError(f"{loaded.source if loaded else out} has no tokenizer; pass --tokenizer DIR")
        elif cfg.tokenizer is not None:
            tokenizer = _load_tokenizer(cfg.tokenizer)
        else:
            tokenizer = _train_tokenizer(text, cfg.vocab_size, masked=task is arch.Task.masked_lm)
        if task is arch.Task.masked_lm and tokenizer.mask_token_id is None:
            raise ProbeError("masked-LM training needs a tokenizer with a mask token ([MASK])")
        processor = tokenizer
        if loaded is None:
            shape = shape_for(cfg.size, cfg.layers, cfg.hidden, cfg.heads)
            config = build_config(cfg.arch or Arch.opt, shape, vocab_size=len(tokenizer), max_positions=max(512, cfg.seq_len),
                                  special_ids=_special_ids(tokenizer))
            model = build_model(config, seed=cfg.seed)
            max_positions = None
        else:
            if len(tokenizer) > model.config.vocab_size:
                raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but {loaded.source} only {model.config.vocab_size} embeddings")
            max_positions = loaded.info.max_positions
        d = _text_data(cfg, tokenizer, task, max_positions, text, desc)

    if resumed is not None:
        if resumed.attention is not cfg.attention:
            raise UsageError(f"{out} was trained with --attention {resumed.attention.value}, not {cfg.attention.value}")
    else:
        set_attention(model, cfg.attention, cfg.variant_params)
    _disable_dropout(model)
    model.to(device)
    source = str(out) if resumed else (cfg.init_from or "scratch")
    return _Setup(model, processor, tokenizer, d, source)


def _check_out(cfg: TrainConfig, out: Path) -> None:
    from outlier_probe.report.io import ensure_writable_dir

    if cfg.resume:
        if not (out / STATE_FILE).is_file() or not (out / "config.json").is_file():
            raise ProbeError(f"nothing to resume in {out}: it has no {STATE_FILE} and checkpoint; drop --resume or fix --out")
        saved_path = out / CONFIG_FILE
        if saved_path.is_file():
            from outlier_probe.stats.run import settings_of

            saved, now = json.loads(saved_path.read_text()).get("settings", {}), settings_of(cfg)
            diff = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {now.get(k)!r})" for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
            if diff:
                raise UsageError(f"--resume needs the settings of the run in {out}; differing: {'; '.join(diff)}")
        return
    if (out / "config.json").exists() or (out / STATE_FILE).exists():
        if not cfg.overwrite:
            raise UsageError(f"{out} already holds a checkpoint; pass --resume to continue it, --overwrite to replace it, or another --out")
        (out / STATE_FILE).unlink(missing_ok=True)
        (out / LOG_FILE).unlink(missing_ok=True)
    ensure_writable_dir(out)


def _threads(wanted: int | None) -> int:
    """CPU threads: `wanted`, else torch's default (the core count) capped at the CPU affinity (containers, taskset)."""
    if wanted is not None:
        return wanted
    try:
        return min(torch.get_num_threads(), len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return torch.get_num_threads()


def train(cfg: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Train one model as `cfg` says; save the checkpoint, training state and train_log.csv in cfg.out_dir."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from outlier_probe.report.io import no_empty_folders_on_error

    out = cfg.out_dir
    with no_empty_folders_on_error(out):  # bad data must not leave an empty run folder behind
        _check_out(cfg, out)
        device = cfg.device.resolve()
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(_threads(cfg.threads))
        try:
            return _train(cfg, progress, out, device)
        finally:
            torch.set_num_threads(previous_threads)


def _train(cfg: TrainConfig, progress: Progress | None, out: Path, device: str) -> TrainResult:
    import transformers

    from outlier_probe.stats.run import settings_of

    setup = _setup(cfg, out, device)
    model, d = setup.model, setup.data
    dev = torch.device(device)

    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, fused=device == "cuda" or None)
    step, tokens, elapsed_before, rows = 0, 0, 0.0, []
    if cfg.resume:
        state = torch.load(out / STATE_FILE, map_location=dev, weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step, tokens, elapsed_before = int(state["step"]), int(state["tokens"]), float(state["elapsed_s"])
        rows = _read_log(out / LOG_FILE)
    settings = {**settings_of(cfg), "run": cfg.run, "out": str(out), "device": device, "threads": torch.get_num_threads(), "source": setup.source,
                "data_description": d.description, "torch": torch.__version__, "transformers": transformers.__version__,
                "parameters": sum(p.numel() for p in model.parameters())}

    sampler = _Sampler(d.n_train, cfg.batch_size, cfg.seed)
    probe_sites = arch.find_sites(model, SiteSelection(kinds=(SiteKind.block_output,)))
    bf16 = cfg.precision is Precision.bf16 or (cfg.precision is Precision.auto and device == "cuda")
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    params = [p for g in opt.param_groups for p in g["params"]]
    acc = torch.zeros((), device=dev)  # summed train loss since the last log read, on the device
    acc_steps, window_loss, window_steps = 0, 0.0, 0  # host: summed losses since the last row
    last_train: float | None = None
    last_eval = rows[-1]["eval_loss"] if rows else None
    last_tps: float | None = None
    row_tokens, row_time = 0, 0.0  # training tokens and seconds since the last row (evals excluded)
    run_tokens, run_time = 0, 0.0
    start = time.perf_counter()
    stopped_by = "already_done" if cfg.steps is not None and step >= cfg.steps else "steps"

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - start

    def read_loss() -> None:
        nonlocal acc, acc_steps, window_loss, window_steps, last_train
        if acc_steps:
            total = float(acc)  # the host sync, once per log interval
            if not math.isfinite(total):
                raise ProbeError(f"training diverged at step {step} (loss {total}); lower --lr or raise --warmup")
            window_loss, window_steps, last_train = window_loss + total, window_steps + acc_steps, total / acc_steps
            acc, acc_steps = torch.zeros((), device=dev), 0

    def log_row() -> None:
        nonlocal window_loss, window_steps, row_tokens, row_time, last_eval, last_tps
        read_loss()
        last_eval = _eval_loss(model, d, dev, autocast)
        summary = _probe(model, d, probe_sites, setup)
        last_tps = row_tokens / row_time if row_time > 0 else float("nan")
        rows.append({"run": cfg.run, "step": step, "tokens": tokens, "train_loss": window_loss / max(window_steps, 1),
                     "eval_loss": last_eval, "avg_kurtosis": summary["avg_kurtosis"], "max_inf_norm": summary["max_inf_norm"],
                     "tokens_per_s": last_tps, "elapsed_s": elapsed()})
        window_loss, window_steps, row_tokens, row_time = 0.0, 0, 0, 0.0

    def save() -> None:
        _save(model, setup.processor, opt, out, rows, settings, step, tokens, elapsed(), d)

    model.train()
    consistent = True  # False while the weights and the step counter disagree (inside opt.step)
    sigint = _SigintFlag()
    try:
        with _deferred_sigint() as sigint:
            while stopped_by != "already_done":
                if cfg.steps is not None and step >= cfg.steps:
                    stopped_by = "steps"
                    break
                if cfg.time_budget is not None and elapsed() >= cfg.time_budget:
                    stopped_by = "time_budget"
                    break
                t0 = time.perf_counter()
                batch = _to(_train_batch(d, sampler, step, setup.tokenizer, cfg.seed), dev)
                frac = max(step / cfg.steps if cfg.steps else 0.0, elapsed() / cfg.time_budget if cfg.time_budget else 0.0)
                lr = cfg.lr * lr_factor(cfg, step, frac)
                for group in opt.param_groups:
                    group["lr"] = lr
                with autocast:
                    loss, _ = _loss(model, batch, d.task)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
                consistent = False
                opt.step()
                step += 1
                tokens += cfg.batch_size * d.tokens_per_sample
                consistent = True
                opt.zero_grad(set_to_none=True)
                acc += loss.detach()
                acc_steps += 1
                if step % cfg.log_every == 0:
                    read_loss()
                dt = time.perf_counter() - t0
                row_tokens, row_time = row_tokens + cfg.batch_size * d.tokens_per_sample, row_time + dt
                run_tokens, run_time = run_tokens + cfg.batch_size * d.tokens_per_sample, run_time + dt
                if step % cfg.eval_every == 0:
                    log_row()
                    model.train()
                if cfg.save_every and step % cfg.save_every == 0:
                    save()
                if progress is not None:
                    progress(TrainStatus(step, cfg.steps, elapsed(), cfg.time_budget, tokens, last_train, last_eval,
                                         run_tokens / run_time if run_time > 0 else None))
                if sigint.requested:
                    raise KeyboardInterrupt
        if stopped_by != "already_done":
            if not rows or rows[-1]["step"] != step:
                log_row()
            save()
    except KeyboardInterrupt:
        how = "terminated" if sigint.signum == signal.SIGTERM else "interrupted"
        if not consistent:  # a second Ctrl-C inside opt.step: the weights are half-updated, keep the last save
            raise TrainingInterrupted(f"{how} inside step {step + 1}; nothing saved since the last checkpoint in {out}", sigint.signum) from None
        save()
        raise TrainingInterrupted(f"{how} at step {step}; checkpoint and training state saved in {out}: continue with --resume", sigint.signum) from None
    model.eval()
    if cfg.plots and rows:
        from outlier_probe.report.plots import training_curves

        training_curves(rows, out / "outliers.png", title=f"{cfg.run}: outliers during training")
    final = rows[-1]["eval_loss"] if rows else float("nan")
    return TrainResult(out, step, tokens, final, tuple(rows), stopped_by,
                       run_tokens / run_time if run_time > 0 else float("nan"), settings, model, setup.processor)


class _SigintFlag:
    requested = False
    signum = signal.SIGINT


@contextmanager
def _deferred_sigint() -> Iterator[_SigintFlag]:
    """First Ctrl-C (or SIGTERM): finish the step, save, stop. A second one interrupts at once."""
    flag = _SigintFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be set from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested, flag.signum = True, signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@torch.no_grad()
def _eval_loss(model: nn.Module, d: _Data, device: torch.device, autocast: Any) -> float:
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    for batch in d.eval_batches:
        with autocast:
            loss, n = _loss(model, _to(batch, device), d.task, reduction="sum")
        total, count = total + loss.double(), count + n
    return float(total / count.clamp(min=1))


def _probe(model: nn.Module, d: _Data, sites: list[arch.Site], setup: _Setup) -> dict[str, Any]:
    """Average kurtosis and max inf-norm over the block outputs, on the fixed probe batch (float32, eval mode)."""
    from outlier_probe.data import Batches
    from outlier_probe.loading import LoadedModel
    from outlier_probe.stats.run import measure_sites
    from outlier_probe.stats.summary import summarize

    model.eval()
    loaded = LoadedModel(model, setup.processor, arch.model_info(model), "training", setup.source, AttentionVariant.softmax, {})
    results = measure_sites(loaded, Batches([d.probe], "training probe batch"), StatsConfig(load=LoadConfig(source=setup.source)), sites=sites)
    return summarize([r.row() for r in results])


def _save(model: nn.Module, processor: Any, opt: torch.optim.Optimizer, out: Path, rows: list[dict[str, Any]],
          settings: dict[str, Any], step: int, tokens: int, elapsed_s: float, d: _Data) -> None:
    """Checkpoint (safetensors + tokenizer + variant metadata), training_state.pt, train_log.csv, train_config.json."""
    import pandas as pd

    from outlier_probe.loading import save_checkpoint
    from outlier_probe.report.io import atomic_open, write_csv, write_json

    save_checkpoint(model, out, processor)
    state = {"step": step, "tokens": tokens, "elapsed_s": elapsed_s, "optimizer": opt.state_dict(), "format": 1}
    with atomic_open(out / STATE_FILE, "wb") as handle:
        torch.save(state, handle)
    write_csv(out / LOG_FILE, pd.DataFrame(rows, columns=list(LOG_COLUMNS)))
    write_json(out / CONFIG_FILE, {"settings": settings, "step": step, "tokens": tokens, "log_columns": list(LOG_COLUMNS)})


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    import pandas as pd

    frame = pd.read_csv(path)
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in frame.to_dict("records")]
