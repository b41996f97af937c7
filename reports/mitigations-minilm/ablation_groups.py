"""Which SmoothQuant group makes --recipe linear swing with alpha on MiniLM: smooth one group kind at a time
(q/k/v, FFN in, v -> out, FFN down) and score W8A8 (cosine of the last hidden state, 16 sequences, seed 0).
Run from the repository root: python3 reports/mitigations-minilm/ablation_groups.py > reports/mitigations-minilm/ablation_groups.txt"""
import torch
from pathlib import Path
from dataclasses import replace
from outlier_probe import arch
from outlier_probe.config import LoadConfig, DataConfig
from outlier_probe.loading import load_model, builtin_checkpoint
from outlier_probe.data import batches_for_model
from outlier_probe.evaluation import Evaluator
from outlier_probe.quant.recipes import QuantConfig, Recipe
from outlier_probe.quant.run import build_calibrated, calibration_config, forward
from outlier_probe.quant.mitigations import smoothing
import copy
torch.set_num_threads(1)
loaded = load_model(LoadConfig(source="minilm"))
data = DataConfig(path=Path(__file__).resolve().parents[3] / "shared/data/wikitext-2-raw/wiki.test.raw", samples=16)
b = batches_for_model(loaded.processor, loaded.info, data, None)
recipe = QuantConfig(recipe=Recipe.linear)
calib = batches_for_model(loaded.processor, loaded.info, calibration_config(data, recipe), None)
ev = Evaluator(loaded.info.task, b.batches, loaded.processor, 0, None)
ev(loaded.model)
q, _ = build_calibrated(loaded, recipe, calib); print("plain", ev(q).value)
groups = arch.smoothing_groups(loaded.model)
names = smoothing.smoothed_consumers(loaded.model)
absmax = smoothing.input_absmax(loaded.model, names, calib.batches, lambda m, x: forward(m, x, torch.device("cpu")))
orig = arch.smoothing_groups
for kind in ["qkv", "ffn_in", "vout", "down"]:
    def sel(g):
        c = g.consumers[0]
        return {"qkv": c.endswith("query"), "ffn_in": c.endswith("intermediate.dense"), "vout": c.endswith("attention.output.dense"), "down": c.endswith(".output.dense") and "attention" not in c}[kind]
    for alpha in (0.3, 0.5, 0.7):
        arch.smoothing_groups = lambda m: [g for g in orig(m) if sel(g)]
        smoothing.arch.smoothing_groups = arch.smoothing_groups
        m = copy.deepcopy(loaded.model)
        sc = smoothing.smooth_model(m, absmax, alpha)
        q, _ = build_calibrated(replace(loaded, model=m), recipe, calib)
        print(kind, alpha, round(ev(q).value, 4), "scale range", min(float(s.min()) for s in sc.values()), max(float(s.max()) for s in sc.values()))
