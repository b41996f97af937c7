"""Calibration of a quantized copy: its sequences (after the evaluation ones), the calibrating forward
over them (ranges merged across ranks, then frozen), and the --keep-float check against its points."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from outlier_probe import distributed, distributed_merge
from outlier_probe.config import DataConfig
from outlier_probe.data import Batches
from outlier_probe.errors import UsageError
from outlier_probe.loading import LoadedModel
from outlier_probe.offload import execution_device
from outlier_probe.quant.keep import KeepFloat
from outlier_probe.quant.modules import ActMode, freeze_all, iter_act_quantizers, set_mode
from outlier_probe.quant.recipes import QuantConfig, QuantSite, quant_points, quantize_model
from outlier_probe.stats.run import forward


def calibration_config(data: DataConfig, recipe: QuantConfig) -> DataConfig:
    """Calibration sequences come from the same source, after the evaluation sequences (disjoint)."""
    return replace(data, samples=recipe.calib_batches * data.batch_size, offset=data.offset + data.samples)


@torch.inference_mode()
def calibrate(qmodel: nn.Module, batches: Batches) -> None:
    """Feed calibration batches through the quantizers in calibrating mode, then freeze every range."""
    set_mode(qmodel, ActMode.calibrating)
    device = execution_device(qmodel)
    quantizers = [q for _name, q in iter_act_quantizers(qmodel)]
    mine = distributed.shard(batches.batches)
    marks = []  # estimator history lengths after each batch: the per-batch ranges to merge
    # The heads stay in float (no quantizer there), so the backbone alone gives every range: an LM head
    # over a 50k vocabulary is a fifth of a small model's forward.
    backbone = getattr(qmodel, "base_model", qmodel)
    for batch in mine:
        forward(backbone, batch, device)
        marks.append([len(q.estimator.history) for q in quantizers])
    distributed_merge.merge_calibration(quantizers, distributed.global_indices(mine), marks, len(batches.batches))
    freeze_all(qmodel)


def build_calibrated(loaded: LoadedModel, recipe: QuantConfig, calib: Batches,
                     keep_float: KeepFloat | None = None, in_place: bool = False) -> tuple[nn.Module, list[QuantSite]]:
    """A quantized copy of the loaded model (points in `keep_float` left in float), ranges calibrated and frozen.

    quantize and sensitivity both build every quantized model they score through here, so a plan step
    and `quantize --keep-float PLAN` are the very same computation. in_place: the model is a throwaway
    copy (a mitigation's transform), quantized without copying it again.
    """
    qmodel, qsites = quantize_model(loaded.model, recipe, loaded.attention, loaded.attention_params, keep_float,
                                    in_place=in_place)
    if qsites:
        calibrate(qmodel, calib)
    return qmodel, qsites


def check_keep_float(loaded: LoadedModel, recipe: QuantConfig, keep_float: KeepFloat) -> None:
    """Every pattern / point of --keep-float must name a quantization point of this model and recipe."""
    full, sites = quantize_model(loaded.model, recipe, loaded.attention, loaded.attention_params)
    names = [p.name for p in quant_points(full, sites)]
    del full
    missing = keep_float.unmatched(names)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UsageError(f"--keep-float matches no quantization point of this model: {shown} "
                         f"(points look like {names[0]!r}; patterns match module names)")
