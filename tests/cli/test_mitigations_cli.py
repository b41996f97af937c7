"""`quantize --smoothquant / --rotate / --a-granularity` through CliRunner: bad input is one error line
and exit 2 with nothing written; a run writes plain + one row per mitigation with gap closed."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
from typer.testing import CliRunner

from outlier_probe.cli.main import app

runner = CliRunner()
SMALL = ["--samples", "4", "--seq-len", "32", "--batch-size", "4", "--calib-batches", "1", "--quiet"]


pytestmark = pytest.mark.usefixtures("isolated_run")  # tests/conftest.py: temp working folder, one thread


@pytest.mark.parametrize(("family", "args", "message"), [
    ("llama", ["--smoothquant", "1.5"], r"--smoothquant alpha must be in [0, 1], got 1.5"),
    ("llama", ["--smoothquant", "0.5,x"], "--smoothquant takes numbers in [0, 1]"),
    ("llama", ["--rotate", "givens"], "unknown --rotate 'givens'; choose from hadamard"),
    ("llama", ["--a-granularity", "per-row"], "unknown --a-granularity 'per-row'"),
    ("bert", ["--rotate", "hadamard"], "bert ('bert') cannot be rotated: post-norm blocks"),
    ("vit", ["--smoothquant", "0.5"], "--smoothquant is not supported for the vit family"),
])
def test_bad_mitigation_input_is_one_line_exit_2_nothing_written(family: str, args: list[str], message: str,
                                                                 tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(tiny_checkpoint(family)), *SMALL, *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("outlier-probe: error: ") and message in lines[0], result.stderr
    assert not out.exists()


def test_mitigated_runs_report_float_quantized_and_gap_closed(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(tiny_checkpoint("llama")), *SMALL, "--smoothquant", "0.5",
                                 "--rotate", "hadamard", "--a-granularity", "per-token", "--out", str(out)])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / "quantize.csv")
    assert list(df["mitigation"]) == ["plain", "smoothquant-0.5", "rotate-hadamard", "per-token"]
    assert df["gap_closed"][0] == 0.0 and df["gap_closed"].notna().all()
    # exact transforms: the transformed float model scores what the float model scores
    assert (df["transformed_float"] - df["float"]).abs().max() < 1e-4 * df["float"][0]
    plain_loss = df["quantized"][0] - df["float"][0]
    expected = (plain_loss - (df["quantized"] - df["float"])) / plain_loss
    pd.testing.assert_series_equal(df["gap_closed"], expected, check_names=False, atol=1e-12, rtol=0)


def test_quantize_mitigation_table_fits_80_columns() -> None:
    from types import SimpleNamespace

    from outlier_probe.report.quant_report import runs_table
    from tests.tablecheck import assert_no_cut

    rows = [{"run": "linear-w8a8-pt-running_minmax+smoothquant-0.85", "mitigation": "smoothquant-0.85",
             "metric": "mlm_perplexity", "higher_is_better": False, "transformed_float": 123456.789,
             "quantized": 1.5e9, "gap_closed": -41.4789},
            {"run": "paper", "mitigation": "plain", "metric": "mlm_perplexity", "higher_is_better": False,
             "transformed_float": 4.5, "quantized": 1294.0, "gap_closed": 0.0}]
    result = SimpleNamespace(rows=lambda: rows, model={"name": "a-long-model-name-for-the-title"}, metric_note="")
    text = assert_no_cut(runs_table(result))  # the shared 80-column check
    assert "-4148%" in text and "1.5e9" in text and "1.23e5" in text, text  # compact numbers, never cut
