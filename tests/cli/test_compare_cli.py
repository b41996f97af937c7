"""`outlier-probe compare` through CliRunner on two tiny OPT checkpoints (vanilla and a softmax_1 twin)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pytest
from typer.testing import CliRunner

from outlier_probe.cli.main import app
from outlier_probe.compare import FIGURES
from tests.conftest import make_model

runner = CliRunner()
FAST = ["--samples", "2", "--seq-len", "16", "--batch-size", "2", "--calib-batches", "1"]


def compare(*args: Any):  # noqa: ANN201
    return runner.invoke(app, ["compare", *map(str, args)])


@pytest.fixture(scope="module")
def vanilla(tiny_checkpoint: Callable[..., Path]) -> Path:
    return tiny_checkpoint("opt")


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: Callable[[str], Any]) -> Path:
    """Another seed, trained-with-softmax_1 style: the variant is recorded in config.json."""
    from outlier_probe.config import AttentionVariant
    from outlier_probe.loading import save_checkpoint, set_attention

    tok = tiny_tokenizer("causal")
    model = make_model("opt", vocab_size=len(tok), seed=1)
    set_attention(model, AttentionVariant.softmax1)
    return save_checkpoint(model, tmp_path_factory.mktemp("twin") / "outeffhop", tok)


@pytest.fixture(scope="module")
def compared(vanilla: Path, twin: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    out = tmp_path_factory.mktemp("compare") / "out"
    result = compare(f"vanilla={vanilla}", f"outeffhop={twin}", *FAST, "--out", out)
    assert result.exit_code == 0, result.output
    return result, out


def _recomputed(folder: Path) -> dict[str, float]:
    """The table's figures, recomputed from the model's own stats.csv and quantize.csv."""
    stats = pd.read_csv(folder / "stats" / "stats.csv")
    run = pd.read_csv(folder / "quantize" / "quantize.csv").iloc[0]
    kurt = stats["paper_kurtosis"].dropna()
    return {
        "float": run["float"], "quantized": run["quantized"],
        "degradation": run["quantized"] - run["float"], "degradation_rel": (run["quantized"] - run["float"]) / run["float"],
        "avg_kurtosis": kurt.mean(), "max_kurtosis": kurt.max(),
        "max_inf_norm_block_output": stats.loc[stats["kind"] == "block_output", "paper_inf_norm"].max(),
        "max_inf_norm": stats["paper_inf_norm"].max(),
    }


def test_relative_changes_match_the_per_model_reports(compared: tuple[Any, Path]) -> None:
    result, out = compared
    base, ours = _recomputed(out / "vanilla"), _recomputed(out / "outeffhop")
    table = pd.read_csv(out / "compare.csv").set_index("name")
    assert list(table.index) == ["vanilla", "outeffhop"]
    assert table.loc["outeffhop", "attention"] == "softmax1" and table.loc["vanilla", "attention"] == "softmax"
    markdown = (out / "compare.md").read_text()
    for key in FIGURES:
        expected = (ours[key] - base[key]) / abs(base[key])
        assert table.loc["outeffhop", key] == pytest.approx(ours[key], rel=1e-9), key
        assert table.loc["outeffhop", f"{key}_vs_baseline"] == pytest.approx(expected, rel=1e-9), key
        assert table.loc["vanilla", f"{key}_vs_baseline"] == 0.0
        pct = 100 * expected
        shown = f"({pct:+.1f}%)" if abs(pct) < 100 else f"({pct:+.0f}%)"
        assert shown in markdown, (key, shown)
        assert shown in result.stdout, (key, shown)


def test_report_folder_holds_everything_and_each_model_passes_gate(compared: tuple[Any, Path]) -> None:
    _result, out = compared
    for name in ("compare.csv", "compare.json", "compare.md", "layers.png"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "compare.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in compare.json"))
    assert doc["command"] == "compare" and doc["baseline"] == "vanilla" and "torch" in doc["versions"]
    assert doc["settings"]["data"]["samples"] == 2 and doc["settings"]["recipe"]["recipe"] == "paper"
    assert doc["models"][0]["data"] == doc["models"][1]["data"]  # identical sequences for both
    assert "--calib-batches 1" in doc["command_line"] and "outeffhop=" in doc["command_line"]
    gate = runner.invoke(app, ["gate", "--report", str(out / "outeffhop"), "--max-kurtosis", "1000", "--max-ppl-ratio", "10"])
    assert gate.exit_code == 0, gate.output


def test_same_checkpoint_twice_with_variants_and_no_quantize(vanilla: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = compare(f"{vanilla}@softmax", f"{vanilla}@softmax1", *FAST, "--no-quantize", "--no-plots", "--out", out, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    a, b = doc["rows"]
    assert (a["attention"], b["attention"]) == ("softmax", "softmax1") and a["name"] != b["name"]
    assert b["name"].endswith("-softmax1")
    assert a["avg_kurtosis"] != pytest.approx(b["avg_kurtosis"], rel=1e-6)  # the variant was applied
    assert all(r[k] is None for r in (a, b) for k in ("float", "quantized", "degradation", "degradation_rel"))
    csv = pd.read_csv(out / "compare.csv")
    assert csv["quantized"].isna().all() and csv["float_vs_baseline"].isna().all()
    head = next(line for line in (out / "compare.md").read_text().splitlines() if line.startswith("| model"))
    assert "W8A8" not in head and "avg kurtosis" in head
    assert not (out / a["name"] / "quantize").exists() and (out / a["name"] / "stats" / "stats.csv").is_file()


def test_a_checkpoint_that_fails_to_load_writes_nothing(vanilla: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(vanilla, broken)
    (broken / "model.safetensors").write_bytes((vanilla / "model.safetensors").read_bytes()[:300])
    out = tmp_path / "out"
    for bad in (broken, tmp_path / "missing"):
        result = compare(vanilla, bad, *FAST, "--no-quantize", "--no-plots", "--out", out)
        assert result.exit_code == 1, result.output
        assert result.stderr.startswith("outlier-probe: error:") and result.stderr.count("\n") == 1, result.stderr
        assert str(bad.name) in result.stderr and "Traceback" not in result.output
        assert not out.exists()  # not even the first model's reports


@pytest.mark.parametrize(("args", "needle"), [
    (["only/"], "at least two"),
    (["a/", "b/@softmax2"], "unknown attention variant"),
    (["x=a/", "x=b/"], "given twice"),
    (["a/", "b/", "--recipe", "smooth"], "--recipe"),
])
def test_usage_errors_exit_2_before_loading(args: list[str], needle: str, tmp_path: Path) -> None:
    result = compare(*args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_help_documents_the_spec_syntax() -> None:
    result = compare("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    for needle in ("[NAME=]PATH[@VARIANT]", "ckpt/@softmax1", "--no-quantize", "first"):
        assert needle in text, needle
