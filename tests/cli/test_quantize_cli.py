"""`outlier-probe quantize` through CliRunner: bad input -> one error line and exit 2, and the reports of a
successful run (quantize.csv, sites.csv, summary.json)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pytest
from typer.testing import CliRunner

from outlier_probe.cli.main import app
from outlier_probe.cli.quantize import recipes_from_options
from outlier_probe.errors import UsageError
from outlier_probe.quant.quantizer import Estimator
from outlier_probe.quant.recipes import Recipe, default_calib_batches

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]
SMALL = ["--samples", "8", "--seq-len", "32", "--batch-size", "4"]


pytestmark = pytest.mark.usefixtures("isolated_run")  # tests/conftest.py: temp working folder, one thread


def quantize(*args: Any) -> Any:
    return runner.invoke(app, ["quantize", *map(str, args)])


def _documented_columns(section: str) -> list[str]:
    """Column names of a table in docs/report-format.md, from the `quantize` section."""
    text = (REPO / "docs" / "report-format.md").read_text()
    body = text[text.index("## `quantize`"):]
    if section == "quantize.csv":
        table = body[body.index("| column |"): body.index("`sites.csv`: one row")]
        return [c for row in re.findall(r"^\| (`[^|]+`) \|", table, flags=re.M) for c in re.findall(r"`([^`]+)`", row)]
    line = body[body.index("`sites.csv`: one row"):].split("\n\n")[0]
    return re.findall(r"`([a-z_]+)`", line.split(":", 1)[1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bits", "0"], "--bits must be between 2 and 16, got 0"),
        (["--bits", "40"], "--bits must be between 2 and 16, got 40"),
        (["--w-bits", "0"], "--w-bits must be between 2 and 16, got 0"),
        (["--a-bits", "17"], "--a-bits must be between 2 and 16, got 17"),
        (["--recipe", "smooth"], "unknown --recipe 'smooth'; choose from paper, linear"),
        (["--percentile", "120"], "--percentile must be in (0, 100], got 120"),
        (["--calib-batches", "0"], "--calib-batches must be >= 1, got 0"),
        (["--metric", "perplexity"], "no LM head"),
    ],
)
def test_bad_input_is_one_error_line_and_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = quantize("minilm", *SMALL, "--out", out, *args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("outlier-probe: error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert not out.exists() or not any(out.iterdir()), "nothing is written to --out"


def test_bits_flags_resolve_into_recipes() -> None:
    (rec,) = recipes_from_options(None, 4, 8, None, True, None, Estimator.percentile, 99.9, 2, 32, 8)
    assert (rec.recipe, rec.w_bits, rec.a_bits, rec.per_channel) == (Recipe.paper, 8, 4, True)
    assert rec.a_estimator is Estimator.percentile and rec.percentile == 99.9 and rec.calib_batches == 2
    paper, linear = recipes_from_options(["paper", "linear"], None, None, None, False, None, None, 99.999, 4, 32, 8)
    assert (paper.w_bits, paper.a_bits, linear.recipe) == (8, 8, Recipe.linear)
    with pytest.raises(UsageError, match="--a-bits"):
        recipes_from_options(None, 8, None, 0, False, None, None, 99.999, 4, 32, 8)


@pytest.mark.parametrize(("samples", "batch_size", "expected"), [(32, 8, 4), (8, 8, 1), (9, 8, 2), (64, 8, 4), (1, 8, 1)])
def test_calibration_defaults_to_4_batches_but_never_more_than_are_evaluated(samples: int, batch_size: int,
                                                                             expected: int) -> None:
    assert default_calib_batches(samples, batch_size) == expected
    (rec,) = recipes_from_options(None, None, None, None, False, None, None, 99.999, None, samples, batch_size)
    assert rec.calib_batches == expected
    (rec,) = recipes_from_options(None, None, None, None, False, None, None, 99.999, 3, samples, batch_size)
    assert rec.calib_batches == 3, "an explicit --calib-batches wins"
    assert default_calib_batches(None, 8) == 4, "a forecaster's every-window default keeps the recipe's 4"


def test_a_quick_run_calibrates_on_as_many_sequences_as_it_evaluates(tiny_checkpoint: Callable[..., Path],
                                                                    tmp_path: Path) -> None:
    result = quantize(tiny_checkpoint("opt"), *SMALL, "--out", tmp_path / "q")  # 8 sequences in batches of 4
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "q" / "summary.json").read_text())
    assert doc["settings"]["recipes"][0]["calib_batches"] == 2
    assert doc["calibration"]["batches"] == 2 and doc["calibration"]["sequences"] == 8


def test_a_run_writes_the_documented_reports(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:  # not importorskip: importing it here would log
        pytest.skip("bitsandbytes is not installed")
    out = tmp_path / "q"
    result = quantize(tiny_checkpoint("opt"), *SMALL, "--calib-batches", "2", "--recipe", "paper", "--recipe", "linear",
                      "--backend", "bnb-int8", "--out", out)
    assert result.exit_code == 0, result.output
    assert "reports:" in result.stdout and "paper" in result.stdout
    assert "MatMul8bitLt" not in result.stderr and "kernels-community" not in result.stderr

    runs = pd.read_csv(out / "quantize.csv")
    documented = _documented_columns("quantize.csv")
    assert documented[:3] == ["run", "metric", "higher_is_better"] and "a_estimator" in documented
    assert [c for c in runs.columns if c in documented] == documented, "documented columns, in documented order"
    assert list(runs["run"]) == ["paper", "linear", "bnb-int8"]
    assert (runs["metric"] == "perplexity").all() and runs["float"].nunique() == 1
    assert runs["quantized"].map(lambda v: v > 0 and v < float("inf")).all()
    assert runs["rel_change"].tolist() == pytest.approx(((runs["quantized"] - runs["float"]) / runs["float"]).tolist())

    sites = pd.read_csv(out / "sites.csv")
    documented_sites = _documented_columns("sites.csv")
    assert documented_sites[:3] == ["run", "site", "kind"]
    assert [c for c in sites.columns if c in documented_sites] == documented_sites
    assert set(sites["run"]) == {"paper", "linear"}  # bnb-int8 has no simulated sites
    assert {"attn_scores", "attn_probs", "embedding_sum", "residual", "block_output"} <= set(sites["kind"])

    doc = json.loads((out / "summary.json").read_text())
    assert doc["tool"] == "outlier-probe" and doc["command"] == "quantize"
    assert {"outlier-probe", "torch", "transformers", "python", "bitsandbytes"} <= set(doc["versions"])
    recipes = doc["settings"]["recipes"]
    assert [r["recipe"] for r in recipes] == ["paper", "linear"]
    assert recipes[0] == {"recipe": "paper", "w_bits": 8, "a_bits": 8, "per_channel": False, "w_estimator": "minmax",
                          "a_estimator": "running_minmax", "percentile": 99.999, "momentum": 0.9, "calib_batches": 2, "per_token": False}
    assert doc["settings"]["backends"] == ["bnb-int8"] and doc["settings"]["data"]["samples"] == 8
    assert doc["calibration"]["batches"] == 2 and doc["calibration"]["offset"] == 8
    assert [r["run"] for r in doc["runs"]] == ["paper", "linear", "bnb-int8"]
    assert doc["runs"][0]["quantized"] == pytest.approx(runs["quantized"][0])
    assert doc["model"]["family"] == "opt" and "perplexity" in doc["metric_note"] and "sqnr_db" in doc["definitions"]


def test_json_output_is_pure_json(tiny_checkpoint: Callable[..., Path], tmp_path: Path) -> None:
    result = quantize(tiny_checkpoint("bert"), *SMALL, "--bits", "6", "--per-channel", "--out", tmp_path / "b", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    (run,) = doc["runs"]
    assert run["metric"] == "mlm_perplexity" and (run["w_bits"], run["a_bits"], run["per_channel"]) == (6, 6, True)
    assert (tmp_path / "b" / "quantize.csv").is_file()
