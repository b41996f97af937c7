"""ETT-shaped CSVs -> the benchmark's standard split, a scaler fitted on training rows, sliding windows.

Split (Informer / Crossformer / STanHop, hourly ETT): train rows [0, 8640), validation
[8640 - in_len, 11520), test [11520 - in_len, 14400): 12 / 4 / 4 months of 30 days; each later split
starts in_len rows early so its first window's target follows the previous split directly. A file
shorter than 14400 rows uses the same 60 / 20 / 20 proportions of its length. Every window of
in_len + horizon consecutive rows, stride 1, is one sample; values are standardised with the mean and
(population) standard deviation of the training rows only (scikit-learn's StandardScaler).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from outlier_probe.errors import ProbeError, UsageError

ETT_HOUR_BORDERS = (12 * 30 * 24, 16 * 30 * 24, 20 * 30 * 24)  # 8640, 11520, 14400
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Series:
    """A CSV's numeric columns, standardised with the training rows' statistics."""

    path: str
    columns: tuple[str, ...]
    values: np.ndarray  # (rows, D) float32, standardised
    mean: np.ndarray  # (D,) of the training rows
    scale: np.ndarray  # (D,)
    borders: dict[str, tuple[int, int]]  # split -> [start, end) rows, windows included
    in_len: int
    horizon: int

    def windows(self, split: str) -> int:
        a, b = self.borders[split]
        return b - a - self.in_len - self.horizon + 1

    def tensors(self, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [N, in_len, D], y [N, horizon, D]) of every window of the split (the first `limit`)."""
        a, b = self.borders[split]
        block = torch.from_numpy(self.values[a:b])
        n = self.windows(split) if limit is None else min(limit, self.windows(split))
        w = block.unfold(0, self.in_len + self.horizon, 1)[:n].transpose(1, 2)  # (N, in+h, D)
        return w[:, : self.in_len].contiguous(), w[:, self.in_len :].contiguous()

    def describe(self) -> dict[str, Any]:
        return {"data": self.path, "columns": list(self.columns), "in_len": self.in_len, "horizon": self.horizon,
                "split_rows": {k: list(v) for k, v in self.borders.items()},
                "windows": {s: self.windows(s) for s in SPLITS}, "scaler": "StandardScaler fitted on the training rows"}


def split_borders(rows: int, in_len: int) -> dict[str, tuple[int, int]]:
    if rows >= ETT_HOUR_BORDERS[-1]:
        t, v, e = ETT_HOUR_BORDERS
    else:
        t, v, e = int(rows * 0.6), int(rows * 0.8), rows
    return {"train": (0, t), "val": (t - in_len, v), "test": (v - in_len, e)}


def read_series(path: Path, in_len: int, horizon: int) -> Series:
    """Read, validate and standardise; every failure is one clear line (UsageError)."""
    import pandas as pd
    from sklearn.preprocessing import StandardScaler

    if in_len < 1 or horizon < 1:
        raise UsageError(f"--in-len and --horizon must be >= 1, got {in_len} and {horizon}")
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--data {path}: no such file (a CSV with a date column and numeric columns)")
    try:
        frame = pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - pandas raises many types for unreadable files
        raise UsageError(f"--data {path}: not a readable CSV ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    columns = [c for c in frame.columns if str(c).lower() != "date"]
    if not columns or frame.shape[0] == 0:
        raise UsageError(f"--data {path}: no numeric columns besides 'date' (or no rows)")
    numeric = frame[columns].apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna()  # missing cells and cells that are not numbers
    if bad.to_numpy().any():
        row, col = np.argwhere(bad.to_numpy())[0]
        raise UsageError(f"--data {path}: non-numeric or missing value in column {columns[col]!r} at data row {row + 1}")
    values = numeric.to_numpy(dtype=np.float64)
    borders = split_borders(len(values), in_len)
    for split, (a, b) in borders.items():
        if b - max(a, 0) < in_len + horizon or a < 0:
            raise UsageError(f"--data {path}: the {split} split (rows {a}..{b}) is too short for in_len {in_len} + "
                             f"horizon {horizon} ({len(values)} rows in the file)")
    t0, t1 = borders["train"]
    scaler = StandardScaler().fit(values[t0:t1])  # a column constant on the training rows gets scale 1 (sklearn)
    out = scaler.transform(values).astype(np.float32)
    if not np.isfinite(out).all():
        raise ProbeError(f"--data {path}: values overflow after standardisation")
    return Series(str(path), tuple(str(c) for c in columns), out, scaler.mean_.astype(np.float32),
                  scaler.scale_.astype(np.float32), borders, in_len, horizon)
