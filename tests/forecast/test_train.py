"""A micro forecaster learns: after a short training on ETTh1 it beats the persistence forecast."""

from __future__ import annotations

from pathlib import Path

import pytest

from outlier_probe.forecast.data import read_series
from outlier_probe.forecast.metrics import evaluate, persistence, score
from outlier_probe.forecast.reproduce import recipe_for
from outlier_probe.train.forecasting import ForecastTrainConfig, train_forecaster
from tests.forecast.test_data import ETTH1


def test_micro_model_beats_persistence(tmp_path: Path, one_thread: None) -> None:
    if not ETTH1.is_file():
        pytest.skip(f"ETTh1 not found at {ETTH1}")
    model_cfg, recipe = recipe_for("micro", 24)
    recipe.update(epochs=2, train_windows=1024, val_windows=256)
    res = train_forecaster(ForecastTrainConfig(data=ETTH1, model=model_cfg, out=tmp_path / "ck", **recipe))
    assert len(res.rows) == 2 and res.best_epoch in (1, 2)
    assert (tmp_path / "ck" / "model.safetensors").is_file() and (tmp_path / "ck" / "train_log.csv").is_file()
    s = read_series(ETTH1, model_cfg.in_len, 24)
    x, y = s.tensors("test", 512)
    trained = evaluate(res.model, x, y)
    naive = score(persistence(x, 24), y)
    assert trained.mse < 0.8 * naive.mse, (trained, naive)
    # the kept checkpoint is the best validation epoch
    assert res.best_val_mse == min(r["val_mse"] for r in res.rows)
