"""Recipes: which modules of a model get which fake quantizer (the model-level verb of quant/).

`paper`  W8A8 as in Bondarenko et al. / OutEffHop: weights of every Linear, norm and embedding
         (symmetric per-tensor min-max), activations at every Linear and norm output, the attention
         scores, the softmax output, the context before the output projection, both residual sums
         and the embedding sum (asymmetric per-tensor running min-max). Heads, the softmax itself and
         gates stay in float.
`linear` W8A8 on every Linear's weight and input only (what SmoothQuant-style tools simulate).
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from outlier_probe import arch
from outlier_probe.config import AttentionVariant, SiteKind, SiteSelection
from outlier_probe.errors import UsageError
from outlier_probe.quant.keep import KeepFloat
from outlier_probe.quant.modules import ActQuantizer, QuantEmbedding, QuantLinear, QuantNorm, _WeightCopyWrapper
from outlier_probe.quant.quantizer import Estimator, PerChannel, PerTensor, QuantSpec


class Recipe(str, enum.Enum):
    paper = "paper"
    linear = "linear"


class Backend(str, enum.Enum):
    fake = "fake"  # simulated quantization with a recipe
    bnb_int8 = "bnb-int8"  # bitsandbytes LLM.int8 (Linear8bitLt, threshold 6.0)


CALIB_BATCHES = 4  # DESIGN: "a few batches" (OPT: 4 x 512 tokens)


def default_calib_batches(samples: int | None, batch_size: int) -> int:
    """--calib-batches when not given: 4 batches, but no more batches than are evaluated.

    At the default 32 sequences in batches of 8 that is the 4 batches of the papers' recipe; a quick
    `--samples 8` check calibrates on one batch of 8 sequences instead of 32, so calibration never costs
    more than the evaluation it serves. samples None (a forecaster's "every test window"): 4.
    """
    if samples is None:
        return CALIB_BATCHES
    return max(1, min(CALIB_BATCHES, -(-samples // batch_size)))


@dataclass(frozen=True)
class QuantConfig:
    """A resolved quantization recipe."""

    recipe: Recipe = Recipe.paper
    w_bits: int = 8
    a_bits: int = 8
    per_channel: bool = False  # weights per output channel instead of per tensor
    w_estimator: Estimator = Estimator.minmax
    a_estimator: Estimator = Estimator.running_minmax
    percentile: float = 99.999
    momentum: float = 0.9
    calib_batches: int = CALIB_BATCHES
    per_token: bool = False  # activations: dynamic per-token min-max scales instead of a static per-tensor range

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if not 2 <= bits <= 16:
                raise UsageError(f"--{name.replace('_', '-')} must be between 2 and 16, got {bits}")
        if not 0.0 < self.percentile <= 100.0:
            raise UsageError(f"--percentile must be in (0, 100], got {self.percentile}")
        if self.percentile < 50.0:
            raise UsageError(f"--percentile is the upper percentile (e.g. 99.999), got {self.percentile}")
        if not 0.0 <= self.momentum < 1.0:
            raise UsageError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.calib_batches < 1:
            raise UsageError(f"--calib-batches must be >= 1, got {self.calib_batches}")

    @property
    def name(self) -> str:
        return self.recipe.value

    def w_spec(self) -> QuantSpec:
        return QuantSpec(self.w_bits, symmetric=True, granularity=PerChannel(0) if self.per_channel else PerTensor())

    def a_spec(self) -> QuantSpec:
        return QuantSpec(self.a_bits, symmetric=False, granularity=PerTensor())

    def act(self) -> ActQuantizer:
        from outlier_probe.quant.estimators import make_estimator

        spec = self.a_spec()
        est = make_estimator(self.a_estimator, spec=spec, momentum=self.momentum, percentile=self.percentile)
        if self.per_token:
            from outlier_probe.quant.mitigations.per_token import TokenActQuantizer

            return TokenActQuantizer(spec, est)
        return ActQuantizer(spec, est)

    def describe(self) -> str:
        gran = "per-channel" if self.per_channel else "per-tensor"
        act = "per-token dynamic" if self.per_token else f"per-tensor {self.a_estimator.value}"
        return (f"{self.recipe.value}: W{self.w_bits} sym {gran} {self.w_estimator.value}, "
                f"A{self.a_bits} asym {act}")


@dataclass(frozen=True)
class QuantSite:
    """One activation quantizer and the stats site it corresponds to (for the SQNR vs outliers table)."""

    name: str  # e.g. "model.decoder.layers.0.fc2:out"
    kind: str
    layer: int | None
    quantizer: ActQuantizer = field(compare=False)
    stats_site: str | None = None  # name of the matching `stats` site, when there is one


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _layer_of(name: str, blocks: list[str]) -> int | None:
    for i, block in enumerate(blocks):
        if name == block or name.startswith(block + "."):
            return i
    return None


def quantize_model(model: nn.Module, cfg: QuantConfig, variant: AttentionVariant = AttentionVariant.softmax,
                   variant_params: dict[str, Any] | None = None,
                   keep_float: KeepFloat | None = None, *, in_place: bool = False) -> tuple[nn.Module, list[QuantSite]]:
    """A fake-quantized deep copy of `model` (the float model is untouched) and its activation sites.

    keep_float: quantization points (quant/keep.py) left in float; the sites returned are the quantized ones.
    in_place: quantize `model` itself, a copy the caller owns and drops (a mitigation's transformed model):
    the same result without a second copy of every weight.
    """
    keep = keep_float.keeps if keep_float else (lambda _point: False)
    if cfg.recipe is Recipe.paper and arch.family_of(model) is arch.Family.generic:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise UsageError(
            f"--recipe paper needs a known model family to place its attention and residual quantizers; "
            f"model type {model_type!r} is not one (bert, distilbert, gpt2, opt, llama, vit): use --recipe linear"
        )
    qmodel = model if in_place else copy.deepcopy(model)
    heads = tuple(arch.head_module_names(qmodel))
    blocks = [n for n, _ in arch.layer_modules(qmodel)]
    sites: list[QuantSite] = []
    w_spec = cfg.w_spec()
    paper = cfg.recipe is Recipe.paper

    def keep_float(name: str) -> bool:
        return name.startswith(tuple(h + "." for h in heads)) or name in heads or ".op_gate" in name or name.endswith("op_gate")

    attn_out = {s.module_name for s in arch.find_sites(qmodel, SiteSelection(kinds=(SiteKind.attn_output,)))}
    modules = [(n, m) for n, m in qmodel.named_modules() if n and not keep_float(n)]
    for name, module in modules:
        layer = _layer_of(name, blocks)
        if arch._is_linear(module):  # noqa: SLF001 - the adapter's own classification
            act_in = cfg.act() if (not paper or name in attn_out) and not keep(f"{name}:in") else None
            act_out = cfg.act() if paper and not keep(f"{name}:out") else None
            wq = None if keep(f"{name}:weight") else w_spec
            if wq is None and act_in is None and act_out is None:
                continue
            new = QuantLinear.from_module(module, w_spec=wq, w_estimator=cfg.w_estimator,
                                          input_quantizer=act_in, output_quantizer=act_out)
            _set_module(qmodel, name, new)
            if act_in is not None:
                kind = "context" if paper else SiteKind.linear_input.value
                sites.append(QuantSite(f"{name}:in", kind, layer, act_in, f"{name}:input"))
            if act_out is not None:
                sites.append(QuantSite(f"{name}:out", "linear_output", layer, act_out, name))
        elif paper and isinstance(module, (nn.Embedding, nn.Conv2d)):  # Conv2d: ViT's patch embedding
            if not keep(f"{name}:weight"):
                _set_module(qmodel, name, QuantEmbedding.from_module(module, w_spec=w_spec, w_estimator=cfg.w_estimator))
        elif paper and arch._is_norm(module):  # noqa: SLF001
            act_out = None if keep(f"{name}:out") else cfg.act()
            wq = None if keep(f"{name}:weight") else w_spec
            if wq is None and act_out is None:
                continue
            _set_module(qmodel, name, QuantNorm.from_module(module, w_spec=wq, w_estimator=cfg.w_estimator,
                                                             output_quantizer=act_out))
            if act_out is not None:
                sites.append(QuantSite(f"{name}:out", "norm", layer, act_out, name))
    if paper:
        sites += _quantize_residuals_and_embeddings(qmodel, cfg, keep)
        sites += _quantize_attention(qmodel, cfg, variant, variant_params or {}, keep)
    return qmodel, sites


@dataclass(frozen=True)
class QuantPoint:
    """One place a recipe rounds something (quant/keep.py names them)."""

    name: str  # "<module>:weight" | ":in" | ":out" | ":scores" | ":probs"
    kind: str  # "weight" or the activation site's kind
    layer: int | None


def quant_points(qmodel: nn.Module, sites: list[QuantSite]) -> list[QuantPoint]:
    """Every quantization point of a quantized model: its fake-quantized weights, then its activation sites."""
    blocks = [n for n, _ in arch.layer_modules(qmodel)]
    points = []
    for name, module in qmodel.named_modules():
        if isinstance(module, (QuantLinear, _WeightCopyWrapper)) and module.w_spec is not None:
            points.append(QuantPoint(f"{name}:weight", "weight", _layer_of(name, blocks)))
    return points + [QuantPoint(s.name, s.kind, s.layer) for s in sites]


def _hook_quantizer(module: nn.Module, attr: str, quantizer: ActQuantizer, capture: Literal["input", "output"]) -> None:
    """Attach `quantizer` as a submodule and apply it to the module's first input or output via a hook."""
    setattr(module, attr, quantizer)
    if capture == "input":

        def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args and isinstance(args[0], torch.Tensor):
                return (quantizer(args[0]), *args[1:]), kwargs
            if isinstance(kwargs.get("hidden_states"), torch.Tensor):
                return args, {**kwargs, "hidden_states": quantizer(kwargs["hidden_states"])}
            return None

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:

        def hook(_m: nn.Module, _args: tuple, output: Any) -> Any:
            if isinstance(output, torch.Tensor):
                return quantizer(output)
            if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
                return (quantizer(output[0]), *output[1:])
            return None

        module.register_forward_hook(hook)


def _quantize_residuals_and_embeddings(qmodel: nn.Module, cfg: QuantConfig, keep: Any) -> list[QuantSite]:
    sites: list[QuantSite] = []
    selection = SiteSelection(kinds=(SiteKind.residual, SiteKind.block_output))
    found = arch.find_sites(qmodel, selection)
    emb = arch.embedding_sum_site(qmodel)
    for site in ([emb] if emb is not None else []) + found:
        attr = "op_act_in" if site.capture == "input" else "op_act_out"
        module = qmodel.get_submodule(site.module_name)
        if hasattr(module, attr):  # a block's input quantizer already set (embedding sum = block 0 input)
            continue
        if keep(f"{site.module_name}:{'in' if site.capture == 'input' else 'out'}"):
            setattr(module, attr, None)  # marks the point as handled (kept float)
            continue
        quantizer = cfg.act()
        _hook_quantizer(module, attr, quantizer, site.capture)
        kind = "embedding_sum" if site is emb else site.kind.value
        sites.append(QuantSite(f"{site.module_name}:{'in' if site.capture == 'input' else 'out'}", kind, site.layer,
                               quantizer, site.name if site is not emb else None))
    return sites


def _quantize_attention(qmodel: nn.Module, cfg: QuantConfig, variant: AttentionVariant, params: dict[str, Any],
                        keep: Any) -> list[QuantSite]:
    from outlier_probe import attention

    modules = arch.attention_modules(qmodel)
    info = arch.model_info(qmodel)
    sites: list[QuantSite] = []
    for i, (name, module) in enumerate(modules):
        for attr, point, kind in ((attention.SCORE_QUANTIZER, "scores", "attn_scores"),
                                  (attention.PROB_QUANTIZER, "probs", "attn_probs")):
            if keep(f"{name}:{point}"):
                continue
            quantizer = cfg.act()
            setattr(module, attr, quantizer)
            sites.append(QuantSite(f"{name}:{point}", kind, i, quantizer))
    attention.apply_attention_variant(qmodel, variant, modules=modules, hidden_size=info.hidden_size,
                                      num_heads=info.num_heads, hookable=True, **params)
    return sites
