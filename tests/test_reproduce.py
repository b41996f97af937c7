"""The reproduction pipeline end to end at smoke scale (numbers mean nothing; the plumbing must hold)."""

from __future__ import annotations

import csv
import math

import pytest

from outlier_probe.config import AttentionVariant
from outlier_probe.errors import UsageError
from outlier_probe.models import Arch
from outlier_probe.reproduce import ReproduceConfig, run_reproduction


def test_smoke_reproduction_writes_report_with_measured_tables(tmp_path):
    out = tmp_path / "report"
    cfg = ReproduceConfig(scale="smoke", out=out, families=(Arch.opt,),
                          variants=(AttentionVariant.softmax, AttentionVariant.softmax1), work=tmp_path / "runs")
    summary = run_reproduction(cfg, log=lambda _m: None)
    assert set(summary["opt"]) == {"softmax", "softmax1"}
    assert all(v["steps"] == 6 for v in summary["opt"].values())
    readme = (out / "README.md").read_text()
    assert "outlier-probe reproduce --scale smoke" in readme
    assert "softmax1" in readme and "average kurtosis" in readme
    rows = list(csv.DictReader(open(out / "opt" / "compare.csv")))
    assert [r["name"] for r in rows] == ["softmax", "softmax1"]
    assert all(math.isfinite(float(r["avg_kurtosis"])) for r in rows)
    # the figure quoted in the README is the one in compare.csv
    assert f"{float(rows[1]['avg_kurtosis']):.2f} vs {float(rows[0]['avg_kurtosis']):.2f}" in readme
    assert (out / "opt" / "training.png").stat().st_size > 0
    assert not (out / "checkpoints").exists()  # checkpoints are kept out of the report folder


def test_reproduction_rejects_unknown_scale_and_missing_baseline(tmp_path):
    with pytest.raises(UsageError, match="scale"):
        ReproduceConfig(scale="huge", out=tmp_path)
    with pytest.raises(UsageError, match="baseline"):
        ReproduceConfig(scale="smoke", out=tmp_path, variants=(AttentionVariant.softmax1,))


@pytest.mark.parametrize("scale", ["cpu-small", "gpu"])
def test_every_preset_builds_valid_training_configs(scale: str, tmp_path) -> None:
    """A preset that has never run (gpu: no machine lent so far) must at least configure every twin."""
    from outlier_probe.reproduce import SCALES
    from outlier_probe.train import TrainConfig

    preset = SCALES[scale]
    for plan in preset.families:
        for variant in preset.variants:
            cfg = TrainConfig(arch=plan.arch, size=plan.size, attention=variant, steps=plan.steps,
                              alpha=plan.clip_alpha if variant is AttentionVariant.clipped else None,
                              seq_len=plan.seq_len or 128, batch_size=plan.batch_size, vocab_size=preset.vocab_size,
                              time_budget=plan.time_budget, eval_every=plan.eval_every, out=tmp_path / "x")
            assert cfg.variant_params.get("alpha") == (plan.clip_alpha if variant is AttentionVariant.clipped else None)
    vit = next(p for p in preset.families if p.arch is Arch.vit)
    assert vit.clip_alpha is not None and vit.clip_alpha < 1  # uniform attention over 50 tokens survives the clip
