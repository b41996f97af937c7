"""Checkpoints larger than memory: accelerate's big-model loading (empty-weight init, then dispatch
with CPU / disk offload), configured by --device-map, --max-memory and --offload-folder.

transformers' `from_pretrained(device_map=..., max_memory=..., offload_folder=...)` is accelerate's
path: the model is built with empty (meta) weights, each weight is placed on a device by the map, and
modules whose weights do not fit are given accelerate hooks that load their weights from the offload
folder (or straight from the checkpoint's safetensors) just before their forward and drop them after.
Forward hooks, observers and the quantization simulator see ordinary modules and tensors.
"""

from __future__ import annotations

import atexit
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlier_probe.errors import UsageError

DEVICE_MAPS = ("auto", "cpu", "cuda")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'20GiB' / '3.5GB' / '512MiB' -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise UsageError(f"--max-memory {text!r} is not a size; write e.g. 20GiB, 3.5GB or 512MiB")
    value, unit = float(match.group(1)), match.group(2).lower()
    scale = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}[unit]
    return int(value * scale)


def max_memory_map(spec: str) -> dict[int | str, int]:
    """'20GiB' (the same budget for every device: each GPU and the CPU) or 'cpu=8GiB,0=20GiB' -> accelerate's map."""
    out: dict[int | str, int] = {}
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0]:
        size = parse_size(parts[0])
        out = {i: size for i in range(torch.cuda.device_count())}
        out["cpu"] = size
        return out
    for part in parts:
        device, _, size = part.partition("=")
        device = device.strip().lower().removeprefix("cuda:")
        if not size or not (device == "cpu" or device.isdigit()):
            raise UsageError(f"--max-memory {spec!r}: give one size (20GiB) or DEVICE=SIZE pairs (cpu=8GiB,0=20GiB)")
        out[int(device) if device.isdigit() else "cpu"] = parse_size(size)
    return out


def from_pretrained_kwargs(device_map: str | None, max_memory: str | None, offload_folder: Path | None) -> dict[str, Any]:
    """The from_pretrained arguments for the options; {} when no device map is asked for."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise UsageError("--max-memory and --offload-folder need --device-map auto (or cpu / cuda)")
        return {}
    if device_map not in DEVICE_MAPS:
        raise UsageError(f"--device-map {device_map!r}: choose auto, cpu or cuda")
    if device_map == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device-map cuda was asked for but no CUDA device is available; use --device-map auto or cpu")
    import logging

    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "Some parameters are on the meta device ...": expected here
    kwargs: dict[str, Any] = {"device_map": {"cpu": "cpu", "cuda": "cuda:0"}.get(device_map, "auto")}
    if max_memory is not None:
        if device_map != "auto":
            raise UsageError("--max-memory only applies to --device-map auto (cpu / cuda put every weight on that device)")
        kwargs["max_memory"] = max_memory_map(max_memory)
    if device_map == "auto":
        kwargs["offload_folder"] = str(offload_folder) if offload_folder is not None else _temporary_folder()
        kwargs["offload_buffers"] = True
    return kwargs


def require_in_memory(model: nn.Module, why: str) -> None:
    """Refuse a model whose device map left weights on disk (or meta): `why` says what needs them all."""
    off = {k: v for k, v in placement(model).items() if k in ("disk", "meta")}
    if off:
        raise UsageError(f"{why}, so no weight can stay on disk, but the device map offloaded {sum(off.values())} "
                         "module(s) there; raise --max-memory or leave it out (--device-map places the model without offload)")


def _temporary_folder() -> str:
    folder = tempfile.mkdtemp(prefix="outlier-probe-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def is_dispatched(model: nn.Module) -> bool:
    """True when accelerate placed the model (a device map: possibly offloaded)."""
    return getattr(model, "hf_device_map", None) is not None


def execution_device(model: nn.Module) -> torch.device:
    """Where inputs go: the device of the first module that runs (accelerate moves them on from there)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        for device in device_map.values():
            if device not in ("disk", "meta"):
                return torch.device(f"cuda:{device}" if isinstance(device, int) else device)
        return torch.device("cpu")
    for param in model.parameters():
        if param.device.type != "meta":
            return param.device
    return torch.device("cpu")


def placement(model: nn.Module) -> dict[str, int]:
    """How many modules of the device map sit on each device ('disk': loaded at each forward)."""
    counts: dict[str, int] = {}
    for device in (getattr(model, "hf_device_map", None) or {}).values():
        key = f"cuda:{device}" if isinstance(device, int) else str(device)
        counts[key] = counts.get(key, 0) + 1
    return counts
