"""Run by tests/test_distributed.py, once alone and once under torchrun: the library's stats and
quantize on a checkpoint; rank 0 dumps every number (histograms and calibration ranges included)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from outlier_probe import distributed
from outlier_probe.config import DataConfig, LoadConfig, StatsConfig
from outlier_probe.loading import load_model
from outlier_probe.quant.modules import iter_act_quantizers
from outlier_probe.quant.recipes import QuantConfig, quantize_model
from outlier_probe.quant.calibration import calibrate, calibration_config
from outlier_probe.quant.run import QuantizeConfig, run_quantize
from outlier_probe.data import batches_for_model
from outlier_probe.stats.run import run_stats


def main(checkpoint: str, data: str, out: str) -> None:
    torch.set_num_threads(1)
    with distributed.session("stats"):
        load = LoadConfig(source=checkpoint)
        data_cfg = DataConfig(path=Path(data), samples=10, seq_len=16, batch_size=2)
        loaded = load_model(load)
        stats = run_stats(StatsConfig(load=load, data=data_cfg, plots=False), loaded=loaded)
        quant = run_quantize(QuantizeConfig(load=load, data=data_cfg, site_stats=False), loaded=loaded)
        recipe = QuantConfig(calib_batches=3)
        qmodel, _ = quantize_model(loaded.model, recipe)
        calibrate(qmodel, batches_for_model(loaded.processor, loaded.info, calibration_config(data_cfg, recipe)))
        ranges = {name: [float(q.min_val), float(q.max_val)] for name, q in iter_act_quantizers(qmodel)}
        if distributed.is_main():
            doc = {
                "world": distributed.world_size(),
                "sites": [{**r.row(), "hist_counts": list(r.stats.hist_counts)} for r in stats.sites],
                "float": quant.runs[0].float_score.value, "quantized": quant.runs[0].quant_score.value,
                "ranges": ranges,
            }
            Path(out).write_text(json.dumps(doc))


if __name__ == "__main__":
    main(*sys.argv[1:4])
