"""Image classification task (ViT): image folders or MNIST-style idx files."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from outlier_probe import arch, data
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.train.batches import _channels, _Data, _eval_batches, _split
from outlier_probe.train.config import TrainConfig


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



def _image_processor(size: int) -> Any:
    import transformers

    cls = getattr(transformers, "ViTImageProcessorPil", transformers.ViTImageProcessor)  # no torchvision needed
    return cls(size={"height": size, "width": size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])

