"""Model + data for a transformer run: built from scratch, `--from` a checkpoint, or resumed."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from outlier_probe import arch, data
from outlier_probe.config import DataConfig, Device, LoadConfig
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.models import Arch, build_config, build_model, shape_for
from outlier_probe.train.batches import _Data
from outlier_probe.train.config import TrainConfig
from outlier_probe.train.lm import _load_tokenizer, _special_ids, _text_data, _train_tokenizer
from outlier_probe.train.vision import _image_data, _image_processor


@dataclass
class _Setup:
    model: nn.Module
    processor: Any | None  # tokenizer (text) or image processor (vit)
    tokenizer: Any | None
    data: _Data
    source: str  # what the weights started from: "scratch", the --from checkpoint, or the resumed folder


def _setup(cfg: TrainConfig, out: Path, device: str) -> _Setup:
    from outlier_probe.loading import load_model, set_attention
    from outlier_probe.offload import require_in_memory

    resumed = load_model(LoadConfig(source=str(out), device=Device.cpu)) if cfg.resume else None
    pretrained = (load_model(cfg.placement.apply(LoadConfig(source=cfg.init_from, device=Device.cpu)))
                  if cfg.init_from and not cfg.resume else None)
    if pretrained is not None:
        require_in_memory(pretrained.model, "train --from updates every weight")
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



def _disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (nn.Dropout modules and the float rates attention modules pass to sdpa)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout", "dropout_prob", "attn_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)


