"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, function-preserving.

Per input channel j of the Linears reading one tensor X,

    s_j = max|X_j|^alpha / max_consumers max_i |W_ij|^(1 - alpha)      (clamped below at 1e-5)

X is divided by s (folded into the norm / source Linear before it, or applied at the consumer's input
when the norm also feeds the residual stream, as in post-norm BERT) and each consumer's column j is
multiplied by s_j, so the float model computes the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from outlier_probe import arch
from outlier_probe.errors import UsageError
from outlier_probe.quant.mitigations.linear import InputMappedLinear

MIN_SCALE = 1e-5  # the reference implementation's clamp


def weight_matrix(module: nn.Module) -> Tensor:
    """The weight as (out, in), a view: nn.Linear stores it so, transformers' Conv1D (GPT-2) transposed."""
    return module.weight if isinstance(module, nn.Linear) else module.weight.t()


@torch.inference_mode()
def input_absmax(model: nn.Module, names: Iterable[str], batches: Iterable[dict[str, Tensor]],
                 run: Callable[[nn.Module, dict[str, Tensor]], object]) -> dict[str, Tensor]:
    """max |x_j| per input channel of each named module over the batches (one running max per module).

    Only the backbone runs when every named module lives in it (an LM head over a large vocabulary is
    a good part of a small model's forward, and nothing smoothing reads comes after it).
    """
    found: dict[str, Tensor] = {}
    handles = []
    names = list(dict.fromkeys(names))
    modules = [model.get_submodule(name) for name in names]
    backbone = getattr(model, "base_model", model)
    inside = {id(m) for m in backbone.modules()}
    runner = backbone if all(id(m) in inside for m in modules) else model

    def hook(name: str):  # noqa: ANN202
        def fn(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            rows = x.reshape(-1, x.shape[-1])
            # max(max x, -min x) = max |x| exactly, without a full-size |x| temporary
            m = torch.maximum(torch.amax(rows, dim=0), torch.amin(rows, dim=0).neg_()).float()
            found[name] = torch.maximum(found[name], m) if name in found else m
        return fn

    try:
        for name, module in zip(names, modules):
            handles.append(module.register_forward_pre_hook(hook(name)))
        for batch in batches:
            run(runner, batch)
    finally:
        for h in handles:
            h.remove()
    return found


def smoothing_scales(act_absmax: Tensor, weights: list[Tensor], alpha: float) -> Tensor:
    """s = max|X|^alpha / max|W|^(1 - alpha) per input channel (weights as (out, in))."""
    w_absmax = torch.stack([w.detach().abs().amax(dim=0).float() for w in weights]).amax(dim=0).clamp(min=MIN_SCALE)
    return (act_absmax.float().pow(alpha) / w_absmax.pow(1.0 - alpha)).clamp(min=MIN_SCALE)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def smooth_model(model: nn.Module, act_absmax: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """Apply SmoothQuant in place on `model` (a copy the caller owns); returns the scales per group."""
    scales: dict[str, Tensor] = {}
    for group in arch.smoothing_groups(model):
        consumers = [model.get_submodule(c) for c in group.consumers]
        xmax = act_absmax[group.consumers[0]]
        s = smoothing_scales(xmax, [weight_matrix(c) for c in consumers], alpha)
        scales[group.consumers[0]] = s
        for name, c in zip(group.consumers, consumers):
            w = weight_matrix(c)
            if group.fold == "online":
                if not isinstance(c, nn.Linear):
                    raise TypeError(f"online smoothing needs nn.Linear consumers, {name} is {type(c).__name__}")
                _set(model, name, InputMappedLinear.from_linear(c, w * s.to(w.dtype), (1.0 / s).to(w.dtype)))
            else:
                w.mul_(s.to(w.dtype))
        if group.fold == "norm":
            norm = model.get_submodule(group.source)
            norm.weight.div_(s.to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.div_(s.to(norm.bias.dtype))
        elif group.fold == "rows":
            src = model.get_submodule(group.source)
            w = weight_matrix(src)
            w.div_(s.to(w.dtype)[:, None])
            if src.bias is not None:
                src.bias.div_(s.to(src.bias.dtype))
    return scales


def smoothed_consumers(model: nn.Module) -> list[str]:
    """Every Linear whose input maximum smoothing needs."""
    return [c for g in arch.smoothing_groups(model) for c in g.consumers[:1]]


ACT_SCALES_FILE = "act_scales.safetensors"  # what `quantize --smoothquant` writes next to its reports


def load_act_scales(path: Path, model: nn.Module) -> dict[str, Tensor]:
    """Input maxima saved by an earlier `quantize --smoothquant` (its act_scales.safetensors, or the folder
    holding it), checked against `model`: one vector per smoothed consumer, of its input width.

    SmoothQuant's maxima are a one-off measurement per model and calibration set (the reference code
    ships them as act_scales/*.pt); reusing them skips the float pass over the calibration batches.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    file = path / ACT_SCALES_FILE if path.is_dir() else path
    if not file.is_file():
        raise UsageError(f"--act-scales: {file} does not exist (give the act_scales.safetensors an earlier "
                         f"`quantize --smoothquant` wrote, or its report folder)")
    try:
        found = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise UsageError(f"--act-scales: {file} is not a readable safetensors file ({err})") from None
    out = {}
    for name in smoothed_consumers(model):
        width = weight_matrix(model.get_submodule(name)).shape[1]
        vec = found.get(name)
        if vec is None or tuple(vec.shape) != (width,):
            got = "missing" if vec is None else f"shape {tuple(vec.shape)}"
            raise UsageError(f"--act-scales: {file} does not fit this model ({name}: {got}, expected ({width},)); "
                             f"it was measured on another model")
        if not bool(torch.isfinite(vec).all()) or bool((vec < 0).any()):
            raise UsageError(f"--act-scales: {file} holds negative or non-finite maxima for {name}")
        out[name] = vec.float()
    return out
