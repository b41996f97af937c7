"""`reproduce --preset stanhop-*`: the pipeline at toy size writes its table, CSV and plots; runs resume."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from outlier_probe.errors import UsageError
from outlier_probe.forecast.hopfield import HopfieldVariant as V
from outlier_probe.forecast.reproduce import PAPER_TABLE1, PRESETS, ForecastReproduceConfig, run_forecast_reproduction
from outlier_probe.report.forecast_report import CSV_COLUMNS
from tests.forecast.test_data import ETTH1


def test_presets() -> None:
    cpu = PRESETS["stanhop-cpu"]
    assert cpu.seeds == (0, 1, 2) and cpu.model.horizon == 24 and cpu.train["threads"] == 1
    paper = PRESETS["stanhop-paper"]
    assert paper.train["lr"] == 1e-4 and paper.train["batch_size"] == 128 and paper.train["halve_at"] == (2, 4, 6, 8, 10)
    assert set(PAPER_TABLE1) == {V.softmax, V.softmax1, V.clipped, V.clipped_softmax1, V.gated, V.gated_softmax1}
    with pytest.raises(UsageError, match="preset"):
        ForecastReproduceConfig(preset="nope")
    with pytest.raises(UsageError, match="baseline"):
        ForecastReproduceConfig(variants=(V.softmax1,))


@pytest.mark.parametrize("preset", ["stanhop-paper", "stanhop-cpu"])
def test_tiny_reproduction(tmp_path: Path, preset: str, one_thread: None) -> None:
    if not ETTH1.is_file():
        pytest.skip(f"ETTh1 not found at {ETTH1}")
    cfg = ForecastReproduceConfig(preset=preset, data=ETTH1, out=tmp_path / "report", work=tmp_path / "work", shrink=True,
                                  variants=(V.softmax, V.softmax1), seeds=(0, 1) if preset == "stanhop-cpu" else (0,))
    logs: list[str] = []
    run_forecast_reproduction(cfg, log=logs.append)
    out = tmp_path / "report"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "results.csv", "results.json", "table1.png", "training.png"]
    frame = pd.read_csv(out / "results.csv")
    assert tuple(frame.columns) == CSV_COLUMNS and len(frame) == 2 * len(cfg.seeds)
    readme = (out / "README.md").read_text()
    for text in ("persistence", "linear (least squares", "| vanilla |", "2.954", "Reading", "OutEffHop lowers"):
        assert text in readme
    doc = json.loads((out / "results.json").read_text())
    assert doc["data"]["windows"] == {"train": 8449, "val": 2857, "test": 2857}
    # a second start reuses every finished run
    logs.clear()
    run_forecast_reproduction(cfg, log=logs.append)
    assert logs and all("reused" in m for m in logs)
