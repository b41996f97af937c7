"""The stanhop family through the CLI: train -> stats -> quantize -> compare on a small CSV, and bad
input (exit 2, one line on stderr, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from outlier_probe.cli.main import app

runner = CliRunner()
SMALL = ["--size", "micro", "--in-len", 24, "--horizon", 12, "--epochs", 1, "--threads", 1, "--quiet"]


def cli(*args: object):  # noqa: ANN201
    return runner.invoke(app, [*map(str, args)])


@pytest.fixture(scope="module")
def csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    t = np.arange(600)
    frame = pd.DataFrame({f"s{i}": np.sin(t / (5 + i)) + 0.1 * rng.normal(size=600) for i in range(3)})
    frame.insert(0, "date", pd.date_range("2021-01-01", periods=600, freq="h").astype(str))
    path = tmp_path_factory.mktemp("csv") / "series.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def checkpoint(csv: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "softmax1"
    result = cli("train", "--arch", "stanhop", "--data", csv, "--attention", "softmax1", "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    return out


def test_train_stats_quantize_compare(checkpoint: Path, csv: Path, tmp_path: Path) -> None:
    assert json.loads((checkpoint / "config.json").read_text())["attention"] == "softmax1"
    result = cli("stats", checkpoint, "--data", csv, "--batch-size", 32, "--out", tmp_path / "stats", "--quiet", "--no-plots")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "stats" / "summary.json").read_text())
    assert summary["data"]["windows"] == (600 - 480 + 24) - 24 - 12 + 1  # every test window: rows [480 - in_len, 600)
    assert summary["summary"]["time_series_avg_kurtosis"] > 1 and summary["summary"]["forecast_mse"] > 0
    result = cli("quantize", checkpoint, "--data", csv, "--samples", 40, "--batch-size", 20, "--out", tmp_path / "q", "--json")
    assert result.exit_code == 0, result.output
    runs = pd.read_csv(tmp_path / "q" / "quantize.csv")
    assert runs.loc[0, "metric"] == "forecast_mse" and runs.loc[0, "float"] > 0
    twin = tmp_path / "twin"
    assert cli("train", "--arch", "stanhop", "--data", csv, "--seed", 1, "--out", twin, *SMALL).exit_code == 0
    result = cli("compare", checkpoint, twin, "--data", csv, "--samples", 30, "--batch-size", 30, "--out", tmp_path / "cmp", "--quiet")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cmp" / "compare.csv").is_file()


def _bad_csv(tmp_path: Path, csv: Path) -> Path:
    frame = pd.read_csv(csv)
    frame["s1"] = frame["s1"].astype(object)
    frame.loc[5, "s1"] = "n/a"
    path = tmp_path / "bad.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("args, message", [
    (["--horizon", "0"], "--horizon and --in-len must be >= 1"),
    (["--in-len", "-5"], "--horizon and --in-len must be >= 1"),
    (["--attention", "relu"], "no attention variant 'relu'"),
    (["--in-len", "400"], "too short"),
    (["--size", "huge"], "unknown --size 'huge'"),
    (["BAD"], "non-numeric or missing value in column 's1'"),
    (["NODATA"], "needs --data FILE.csv"),
])
def test_bad_input_exit_2_nothing_written(args: list[str], message: str, csv: Path, tmp_path: Path) -> None:
    data = ["--data", _bad_csv(tmp_path, csv) if args == ["BAD"] else csv]
    if args in (["BAD"], ["NODATA"]):
        data, args = (data if args == ["BAD"] else []), []
    out = tmp_path / "never"
    result = cli("train", "--arch", "stanhop", *data, "--size", "micro", "--epochs", "1", "--quiet", *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("outlier-probe: error: ")
    assert message in result.stderr
    assert not out.exists()


def test_stats_with_a_csv_of_other_columns(checkpoint: Path, tmp_path: Path) -> None:
    other = tmp_path / "two.csv"
    pd.DataFrame({"date": range(600), "a": np.arange(600.0), "b": np.ones(600)}).to_csv(other, index=False)
    result = cli("stats", checkpoint, "--data", other, "--out", tmp_path / "s")
    assert result.exit_code == 2 and "has 2 numeric columns; the model forecasts 3" in result.stderr
    assert not (tmp_path / "s").exists()
    result = cli("reproduce", "--preset", "nope", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "unknown --preset 'nope'" in result.stderr
    assert not (tmp_path / "r").exists()


def test_jobs_needs_a_preset(tmp_path: Path) -> None:
    result = cli("reproduce", "--scale", "smoke", "--jobs", "2", "--out", tmp_path / "r")
    assert result.exit_code == 2 and "--jobs applies to --preset" in result.stderr and not (tmp_path / "r").exists()
    result = cli("reproduce", "--preset", "stanhop-cpu", "--jobs", "0", "--out", tmp_path / "r")
    assert result.exit_code == 2 and not (tmp_path / "r").exists()
