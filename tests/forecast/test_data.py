"""The standard ETT split, window counts, the train-only scaler, and bad CSVs (one-line usage errors)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from outlier_probe.errors import UsageError
from outlier_probe.forecast.data import read_series, split_borders
from tests.conftest import SHARED

ETTH1 = SHARED / "data" / "ett" / "ETTh1.csv"


def _csv(tmp_path: Path, rows: int, cols: int = 3, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(rows, cols)) * [1, 10, 100][:cols] + np.arange(rows)[:, None] * 0.01,
                         columns=[f"c{i}" for i in range(cols)])
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=rows, freq="h").astype(str))
    path = tmp_path / "series.csv"
    frame.to_csv(path, index=False)
    return path


def test_hourly_ett_borders_and_window_counts() -> None:
    assert split_borders(17420, 168) == {"train": (0, 8640), "val": (8472, 11520), "test": (11352, 14400)}
    if not ETTH1.is_file():
        pytest.skip(f"ETTh1 not found at {ETTH1}")
    s = read_series(ETTH1, 168, 24)
    # windows = rows of the split - in_len - horizon + 1 (stride 1)
    assert {k: s.windows(k) for k in ("train", "val", "test")} == {"train": 8449, "val": 2857, "test": 2857}
    x, y = s.tensors("test")
    assert x.shape == (2857, 168, 7) and y.shape == (2857, 24, 7)
    raw = pd.read_csv(ETTH1).iloc[:, 1:].to_numpy()
    # the last test target is row 14399, the first test input row 11352
    np.testing.assert_allclose(y[-1, -1].numpy() * s.scale + s.mean, raw[14399], rtol=1e-5)
    np.testing.assert_allclose(x[0, 0].numpy() * s.scale + s.mean, raw[11352], rtol=1e-5)


def test_scaler_is_fitted_on_training_rows_only(tmp_path: Path) -> None:
    path = _csv(tmp_path, 400)
    s = read_series(path, 12, 4)
    raw = pd.read_csv(path).iloc[:, 1:].to_numpy()
    train = raw[:240]  # 60 % of a short file
    np.testing.assert_allclose(s.mean, train.mean(0), rtol=1e-5)
    np.testing.assert_allclose(s.scale, train.std(0), rtol=1e-5)  # population std, as StandardScaler
    assert not np.allclose(s.mean, raw.mean(0), rtol=1e-3)  # not fitted on every row
    assert s.borders == {"train": (0, 240), "val": (228, 320), "test": (308, 400)}
    assert s.windows("val") == 92 - 16 + 1


@pytest.mark.parametrize("edit, message", [
    (lambda f: f.assign(c1=f["c1"].astype(object).where(f.index != 7, "abc")), "non-numeric or missing value in column 'c1'"),
    (lambda f: f.assign(c0=f["c0"].where(f.index != 3)), "non-numeric or missing value in column 'c0'"),
    (lambda f: f[["date"]], "no numeric columns"),
    (lambda f: f.iloc[:20], "too short"),  # train split: 12 rows < 12 + 4
])
def test_bad_csv_is_one_usage_error(tmp_path: Path, edit, message: str) -> None:  # noqa: ANN001
    path = _csv(tmp_path, 400)
    edit(pd.read_csv(path)).to_csv(path, index=False)
    with pytest.raises(UsageError, match=message):
        read_series(path, 12, 4)


def test_non_positive_lengths(tmp_path: Path) -> None:
    path = _csv(tmp_path, 400)
    for in_len, horizon in ((0, 4), (12, 0), (12, -3)):
        with pytest.raises(UsageError, match="must be >= 1"):
            read_series(path, in_len, horizon)
