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
    # exact transforms: checked on one calibration sequence; the full float score only on request
    assert df["transform_error"].tolist()[::3] == [0.0, 0.0] and (df["transform_error"][1:3] < 1e-4).all()
    assert df["transformed_float"][1:3].isna().all() and (df["transformed_float"][::3] == df["float"][::3]).all()
    scored = tmp_path / "scored"
    result = runner.invoke(app, ["quantize", str(tiny_checkpoint("llama")), *SMALL, "--smoothquant", "0.5",
                                 "--score-transformed", "--out", str(scored)])
    assert result.exit_code == 0, result.output
    both = pd.read_csv(scored / "quantize.csv")
    assert (both["transformed_float"] - both["float"]).abs().max() < 1e-4 * both["float"][0]
    assert both["quantized"][1] == df["quantized"][1], "scoring the transformed model changes nothing else"
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


def test_act_scales_are_written_and_reused_to_the_same_result(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    """The input maxima a --smoothquant run measured are saved; --act-scales reuses them: the same scales,
    hence the same quantized model and score, without their float pass."""
    import json

    import torch
    from safetensors.torch import load_file

    from outlier_probe.config import DataConfig, LoadConfig
    from outlier_probe.data import batches_for_model
    from outlier_probe.loading import load_model
    from outlier_probe.quant.mitigations.smoothing import input_absmax, smoothed_consumers
    from outlier_probe.quant.recipes import QuantConfig
    from outlier_probe.quant.calibration import calibration_config

    ckpt = tiny_checkpoint("llama")
    first, second = tmp_path / "first", tmp_path / "second"
    result = runner.invoke(app, ["quantize", str(ckpt), *SMALL, "--smoothquant", "0.5,0.8", "--out", str(first)])
    assert result.exit_code == 0, result.output
    saved = load_file(str(first / "act_scales.safetensors"))
    loaded = load_model(LoadConfig(source=str(ckpt)))
    names = smoothed_consumers(loaded.model)
    assert sorted(saved) == sorted(names)
    calib = batches_for_model(loaded.processor, loaded.info, calibration_config(
        DataConfig(samples=4, seq_len=32, batch_size=4), QuantConfig(calib_batches=1)))
    expected = input_absmax(loaded.model, names, calib.batches, lambda m, b: m(**b))  # recomputed independently
    for name in names:
        torch.testing.assert_close(saved[name], expected[name], rtol=0, atol=0)
    assert "measured on the calibration batches" in json.loads((first / "summary.json").read_text())["act_scales"]["source"]

    result = runner.invoke(app, ["quantize", str(ckpt), *SMALL, "--smoothquant", "0.5,0.8", "--act-scales", str(first),
                                 "--out", str(second)])
    assert result.exit_code == 0, result.output
    a, b = pd.read_csv(first / "quantize.csv"), pd.read_csv(second / "quantize.csv")
    pd.testing.assert_frame_equal(a, b)
    doc = json.loads((second / "summary.json").read_text())
    assert doc["act_scales"]["source"].startswith("loaded from") and doc["settings"]["act_scales"] == str(first)


@pytest.mark.parametrize(("make", "extra", "message"), [
    (lambda d, other: d / "none.safetensors", ["--smoothquant", "0.5"], "does not exist"),
    (lambda d, other: (d / "bad.safetensors").write_text("not safetensors") and d / "bad.safetensors",
     ["--smoothquant", "0.5"], "is not a readable safetensors file"),
    (lambda d, other: other, ["--smoothquant", "0.5"], "does not fit this model"),
    (lambda d, other: other, [], "give it with --smoothquant"),
])
def test_bad_act_scales_are_one_line_exit_2(make: Callable[[Path, Path], Path], extra: list[str], message: str,
                                            tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    other = tmp_path / "other"  # the maxima of another model (a tiny OPT's)
    result = runner.invoke(app, ["quantize", str(tiny_checkpoint("opt")), *SMALL, "--smoothquant", "0.5", "--out", str(other)])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    result = runner.invoke(app, ["quantize", str(tiny_checkpoint("llama")), *SMALL, *extra,
                                 "--act-scales", str(make(tmp_path, other)), "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("outlier-probe: error: ") and message in lines[0], result.stderr
    assert not out.exists()
