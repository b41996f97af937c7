"""STanHopNet: shapes, checkpoints, the paper configuration, sites, and the W8A8 copy."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from outlier_probe import arch
from outlier_probe.config import SiteKind, SiteSelection
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.forecast import model as fmodel
from outlier_probe.forecast.hopfield import HopfieldVariant as V
from outlier_probe.forecast.metrics import evaluate
from outlier_probe.forecast.quant import calibrate_forecaster, quantize_forecaster
from outlier_probe.forecast.reproduce import PRESETS
from outlier_probe.quant.recipes import QuantConfig, Recipe

MICRO = fmodel.StanhopConfig(data_dim=3, in_len=20, horizon=7, seg_len=6, factor=2, d_model=8, d_ff=16, n_heads=2,
                             e_layers=2, dropout=0.0)


@pytest.mark.parametrize("variant", list(V))
def test_forward_shape_every_variant(variant: V, one_thread: None) -> None:
    model = fmodel.build(replace(MICRO, attention=variant)).eval()
    y = model(torch.randn(4, 20, 3))  # 20 steps pad to 24 = 4 segments; 7 steps cut from 2 segments
    assert y.shape == (4, 7, 3) and torch.isfinite(y).all()


def test_segment_merging(one_thread: None) -> None:
    model = fmodel.build(replace(MICRO, win=2, e_layers=3)).eval()
    assert model(torch.randn(2, 20, 3)).shape == (2, 7, 3)
    assert model.encoder[1].merge_layer is not None and model.encoder[0].merge_layer is None


def test_wrong_window_is_a_clear_error() -> None:
    with pytest.raises(ProbeError, match="20 steps x 3 series"):
        fmodel.build(MICRO)(torch.randn(1, 21, 3))


def test_checkpoint_roundtrip(tmp_path: Path, one_thread: None) -> None:
    model = fmodel.build(replace(MICRO, attention=V.gated_softmax1), seed=3).eval()
    fmodel.save(model, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    assert fmodel.is_checkpoint(tmp_path / "ck")
    again = fmodel.load(tmp_path / "ck")
    assert again.config == model.config
    x = torch.randn(2, 20, 3)
    torch.testing.assert_close(again(x), model(x))
    with pytest.raises(UsageError, match="retrain"):
        fmodel.load(tmp_path / "ck", V.softmax)
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ProbeError, match="cannot load"):
        fmodel.load(tmp_path / "ck")


def test_paper_configuration_builds_and_runs(one_thread: None) -> None:
    cfg = PRESETS["stanhop-paper"].model
    assert (cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.e_layers, cfg.factor, cfg.seg_len, cfg.dropout) == (256, 512, 4, 11, 10, 6, 0.5)
    model = fmodel.build(cfg).eval()
    assert len(model.encoder) == 11 and len(model.decoder) == 12
    with torch.no_grad():
        assert model(torch.randn(1, 168, 7)).shape == (1, 24, 7)


def test_adapter_sites_and_info() -> None:
    model = fmodel.build(MICRO)
    assert arch.family_of(model) is arch.Family.stanhop
    info = arch.model_info(model)
    assert info.task is arch.Task.forecasting and info.num_layers == 2 + 3
    sites = arch.find_sites(model)
    kinds = {s.kind for s in sites}
    assert kinds == {SiteKind.norm, SiteKind.attn_output, SiteKind.ffn_output, SiteKind.residual, SiteKind.block_output}
    blocks = [s for s in sites if s.kind is SiteKind.block_output]
    assert [s.name for s in blocks] == ["encoder.0", "encoder.1", "decoder.0", "decoder.1", "decoder.2"]
    assert [s.layer for s in blocks] == [0, 1, 2, 3, 4]
    only = arch.find_sites(model, SiteSelection(kinds=(SiteKind.attn_output,), include=("decoder.*",)))
    assert only and all(s.name.startswith("decoder.") and s.kind is SiteKind.attn_output for s in only)


def test_w8a8_copy_is_close_and_leaves_the_float_model(one_thread: None) -> None:
    model = fmodel.build(MICRO, seed=1).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(64, 20, 3), torch.randn(64, 7, 3)
    for recipe in (Recipe.paper, Recipe.linear):
        cfg = QuantConfig(recipe=recipe, calib_batches=2)
        q, sites = quantize_forecaster(model, cfg)
        calibrate_forecaster(q, x, cfg, 32)
        fp, w8 = evaluate(model, x, y), evaluate(q, x, y)
        assert w8.mse != fp.mse and abs(w8.mse - fp.mse) < 0.05 * fp.mse
        kinds = {s.kind for s in sites}
        assert kinds == ({"context", "linear_output", "residual", "norm", "attn_scores", "attn_probs"} if recipe is Recipe.paper
                         else {"linear_input"})
        assert not any("linear_pred" in s.name or s.name.endswith(".gate:out") for s in sites)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(UsageError):
        fmodel.StanhopConfig(d_model=10, n_heads=4)
