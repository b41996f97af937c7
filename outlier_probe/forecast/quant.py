"""W8A8 on the forecaster: the recipes of quant/ placed with the stanhop adapter.

`paper`: every Linear weight (symmetric per-tensor min-max) and output, every LayerNorm weight and
output, every norm's input (the residual sums and the embedding sum: the blocks are post-norm), the
input of each Hopfield output projection (the retrieved patterns), the scaled scores and the
association probabilities; position embeddings weight-quantized. The prediction heads
(`linear_pred`) stay in float, as LM heads do. `linear`: every Linear's weight and input only.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from outlier_probe import arch_stanhop as adapter
from outlier_probe.quant.modules import ActQuantizer, QuantLinear, QuantNorm, calibrating, quantize_weight
from outlier_probe.quant.recipes import QuantConfig, QuantSite, Recipe


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _quantize_input(module: nn.Module, q: ActQuantizer) -> None:
    module.add_module("op_act_in", q)
    module.register_forward_pre_hook(lambda _m, args: (q(args[0]), *args[1:]))


def quantize_forecaster(model: nn.Module, cfg: QuantConfig) -> tuple[nn.Module, list[QuantSite]]:
    """A fake-quantized deep copy (the float model is untouched) and its activation quantizers."""
    qmodel = copy.deepcopy(model).eval()
    paper = cfg.recipe is Recipe.paper
    w_spec = cfg.w_spec()
    sites: list[QuantSite] = []
    for name, module in list(qmodel.named_modules()):
        if not name or adapter.is_head(name) or name.endswith(".gate"):
            continue
        layer = adapter.layer_of(qmodel, name)
        if isinstance(module, nn.Linear):
            act_in = cfg.act() if (not paper or adapter.is_context_linear(name)) else None
            act_out = cfg.act() if paper else None
            _set(qmodel, name, QuantLinear.from_module(module, w_spec=w_spec, w_estimator=cfg.w_estimator,
                                                       input_quantizer=act_in, output_quantizer=act_out))
            if act_in is not None:
                sites.append(QuantSite(f"{name}:in", "context" if paper else "linear_input", layer, act_in, f"{name}:input"))
            if act_out is not None:
                sites.append(QuantSite(f"{name}:out", "linear_output", layer, act_out, name))
        elif paper and isinstance(module, nn.LayerNorm):
            act_out, act_in = cfg.act(), cfg.act()
            new = QuantNorm.from_module(module, w_spec=w_spec, w_estimator=cfg.w_estimator, output_quantizer=act_out)
            _quantize_input(new, act_in)
            _set(qmodel, name, new)
            sites.append(QuantSite(f"{name}:in", "residual", layer, act_in, f"{name}:input"))
            sites.append(QuantSite(f"{name}:out", "norm", layer, act_out, name))
    if paper:
        with torch.no_grad():
            for pname in adapter.embedding_params(qmodel):
                p = qmodel.get_parameter(pname)
                p.copy_(quantize_weight(p.detach(), w_spec, cfg.w_estimator)[0])
        for name, module in adapter.hopfield_modules(qmodel):
            module.score_quantizer, module.prob_quantizer = cfg.act(), cfg.act()
            layer = adapter.layer_of(qmodel, name)
            sites.append(QuantSite(f"{name}:scores", "attn_scores", layer, module.score_quantizer))
            sites.append(QuantSite(f"{name}:probs", "attn_probs", layer, module.prob_quantizer))
    return qmodel, sites


@torch.no_grad()
def calibrate_forecaster(qmodel: nn.Module, x: torch.Tensor, cfg: QuantConfig, batch_size: int) -> dict[str, Any]:
    """Ranges from `calib_batches` batches of `x` (training windows), then frozen."""
    qmodel.eval()
    n = 0
    with calibrating(qmodel):
        for i in range(cfg.calib_batches):
            xb = x[i * batch_size : (i + 1) * batch_size]
            if xb.shape[0] == 0:
                break
            qmodel(xb)
            n += xb.shape[0]
    return {"calibration_windows": n, "calibration_split": "train"}
