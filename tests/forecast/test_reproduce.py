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


def test_jobs_give_the_same_results(tmp_path: Path, one_thread: None) -> None:
    """--jobs 2 (spawned workers, finishing in any order) writes the same results as --jobs 1."""
    if not ETTH1.is_file():
        pytest.skip(f"ETTh1 not found at {ETTH1}")
    frames = []
    for jobs in (1, 2):
        cfg = ForecastReproduceConfig(preset="stanhop-cpu", data=ETTH1, out=tmp_path / f"report{jobs}", work=tmp_path / f"work{jobs}",
                                      shrink=True, variants=(V.softmax, V.softmax1), seeds=(0,), jobs=jobs)
        run_forecast_reproduction(cfg, log=lambda m: None)
        frames.append((tmp_path / f"report{jobs}" / "results.csv").read_text())
        doc = json.loads((tmp_path / f"report{jobs}" / "results.json").read_text())
        assert doc["invocation"]["jobs"] == jobs and doc["invocation"]["trained"] == 2
    assert frames[0] == frames[1]
    assert [r["variant"] for r in json.loads((tmp_path / "report2" / "results.json").read_text())["results"]] == ["softmax", "softmax1"]
    with pytest.raises(UsageError, match="jobs"):
        ForecastReproduceConfig(jobs=0)
