"""`compare --mitigations`: one table of the vanilla model with each post-training mitigation and the other
checkpoints (architecture variants); gap closed against the vanilla plain W8A8 loss; CSV + Markdown;
readable at 80 columns with no cut cell."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from outlier_probe.cli.main import app
from outlier_probe.report.mitigation_report import COLUMNS, mitigation_table, num

runner = CliRunner()
SMALL = ["--samples", "4", "--seq-len", "32", "--batch-size", "4", "--calib-batches", "1", "--no-plots", "--quiet"]


pytestmark = pytest.mark.usefixtures("isolated_run")  # tests/conftest.py: temp working folder, one thread


def test_one_table_of_mitigations_and_variants(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", f"vanilla={ckpt}", f"softpick={ckpt}@softpick", "--mitigations", *SMALL,
                                 "--smoothquant", "0.5", "--rotate", "hadamard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "mitigations.csv")
    assert list(rows.columns) == COLUMNS
    assert list(rows["row"]) == ["vanilla", "vanilla+smoothquant-0.5", "vanilla+rotate-hadamard", "softpick"]
    assert list(rows["kind"]) == ["vanilla", "post-training", "post-training", "architecture (softpick)"]
    q = pd.read_csv(out / "vanilla" / "quantize" / "quantize.csv")
    plain_loss = q["quantized"][0] - q["float"][0]  # perplexity: lower is better
    for i in (1, 2):
        assert rows["gap_closed"][i] == pytest.approx((plain_loss - (q["quantized"][i] - q["float"][i])) / plain_loss)
    s = pd.read_csv(out / "compare.csv").set_index("name")
    sink_loss = s.loc["softpick", "quantized"] - s.loc["softpick", "float"]
    assert rows["gap_closed"][3] == pytest.approx((plain_loss - sink_loss) / plain_loss)
    # the rotated model's own statistics were measured (rotation changes the residual stream's statistics)
    assert rows["avg_kurtosis"][2] != rows["avg_kurtosis"][0]
    md = (out / "mitigations.md").read_text()
    assert "| vanilla+rotate-hadamard | post-training |" in md and "--mitigations" in md and "--rotate hadamard" in md


def test_mitigations_need_quantization_and_flags_need_the_table(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = str(tiny_checkpoint("llama"))
    for args, message in ((["--mitigations", "--no-quantize"], "cannot be combined with --no-quantize"),
                          (["--smoothquant", "0.5"], "need --mitigations")):
        result = runner.invoke(app, ["compare", ckpt, f"b={ckpt}", *args, *SMALL, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "x").exists()


def test_table_fits_80_columns_with_worst_case_cells() -> None:
    rows = [{"row": "a-very-long-checkpoint-name-that-must-wrap+smoothquant-0.85", "kind": "post-training",
             "float": 12345.678, "w8a8": 1.2345e9, "gap_closed": -123.456, "avg_kurtosis": 41061.8,
             "max_inf_norm": 219.1, "sink_rate": math.nan}]
    console = Console(width=80, record=True)
    console.print(mitigation_table(rows, "mlm_perplexity"))
    text = console.export_text()
    assert "…" not in text, text
    assert "1.23e9" in text and "-12345.6%" in text and "4.11e4" in text
    assert max(len(line) for line in text.splitlines()) <= 80
    assert num(0.123456) == "0.1235" and num(219.14) == "219.1" and num(float("nan")) == "-"


def test_keep_float_rows_match_quantize_and_keeping_everything_closes_the_whole_gap(
        tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = str(tiny_checkpoint("llama"))
    out = tmp_path / "cmp"
    result = runner.invoke(app, ["compare", f"vanilla={ckpt}", "--mitigations", "--smoothquant", "0.5", *SMALL,
                                 "--keep-float", "model.layers.0", "--keep-float", "all=*", "--no-attention",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "mitigations.csv").set_index("row")
    assert list(rows.index) == ["vanilla", "vanilla+smoothquant-0.5", "vanilla+keep-float model.layers.0",
                                "vanilla+keep-float all"]
    # every point in float: the "quantized" model is the float model, so the whole gap is closed
    assert rows.loc["vanilla+keep-float all", "w8a8"] == pytest.approx(rows.loc["vanilla", "float"], rel=1e-6)
    assert rows.loc["vanilla+keep-float all", "gap_closed"] == pytest.approx(1.0, abs=1e-4)
    # the same keep set through `quantize --keep-float` gives the same W8A8 figure
    q_out = tmp_path / "q"
    q = runner.invoke(app, ["quantize", ckpt, "--samples", "4", "--seq-len", "32", "--batch-size", "4",
                            "--calib-batches", "1", "--quiet", "--keep-float", "model.layers.0", "--out", str(q_out)])
    assert q.exit_code == 0, q.output
    assert rows.loc["vanilla+keep-float model.layers.0", "w8a8"] == pytest.approx(
        pd.read_csv(q_out / "quantize.csv")["quantized"][0], rel=1e-9)
    md = (out / "mitigations.md").read_text()
    assert "--keep-float model.layers.0 --keep-float 'all=*'" in md


def test_keep_float_needs_the_table_and_must_match(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    ckpt = str(tiny_checkpoint("llama"))
    for args, message in ((["--keep-float", "model.layers.0"], "needs --mitigations"),
                          (["--mitigations", "--keep-float", "no.such.module"], "no.such.module")):
        result = runner.invoke(app, ["compare", ckpt, f"b={ckpt}", *args, *SMALL, "--out", str(tmp_path / "x")])
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "x").exists()
