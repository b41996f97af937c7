"""`sensitivity`, `quantize --keep-float` and `attention` through CliRunner: reports, bit-for-bit plans,
bad input (one line, non-zero exit, nothing written), and the real MiniLM on WikiText-2 at small size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from outlier_probe.cli.main import app
from tests.diagnose.conftest import FRAGILE_LAYER, fragile_checkpoint  # noqa: F401 - fixture

runner = CliRunner()
SMALL = ["--samples", "8", "--seq-len", "32", "--batch-size", "4"]
RECIPE = ["--calib-batches", "1"]


pytestmark = pytest.mark.usefixtures("isolated_run")  # tests/conftest.py: temp working folder, one thread


def invoke(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args])


def _no_cut_cells(text: str) -> None:
    assert "…" not in text, "a table cell was cut at 80 columns"


@pytest.fixture(scope="module")
def plan_dir(fragile_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, text_file: Path) -> tuple[Path, Any]:  # noqa: F811
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("sens") / "report"
    result = invoke("sensitivity", fragile_checkpoint, "--data", text_file, *SMALL, *RECIPE, "--budget", "0.1%", "--out", out)
    return out, result


def test_sensitivity_writes_every_report_and_a_plan(plan_dir: tuple[Path, Any]) -> None:
    out, result = plan_dir
    assert result.exit_code == 0, result.output
    _no_cut_cells(result.stdout)
    assert {p.name for p in out.iterdir()} == {"sensitivity.csv", "sensitivity.png", "plan.json", "recipe.yaml", "summary.json"}
    table = pd.read_csv(out / "sensitivity.csv")
    assert table["group"].tolist()[0] == f"layer.{FRAGILE_LAYER}" and table["rank"].tolist() == list(range(1, len(table) + 1))
    plan = json.loads((out / "plan.json").read_text())
    assert plan["met"] and plan["kept_groups"] == [f"layer.{FRAGILE_LAYER}"]
    assert [s["step"] for s in plan["steps"]] == [0, 1] and plan["final_metric"] == plan["steps"][1]["metric"]
    assert all(p.startswith((f"encoder.layer.{FRAGILE_LAYER}.", f"encoder.layer.{FRAGILE_LAYER}:")) for p in plan["keep_float_points"])
    assert plan["ignore"][0] == "pooler.dense"  # the head: float in every recipe, and in llm-compressor's
    assert len(plan["ignore"]) == 7 and all(m.startswith(f"encoder.layer.{FRAGILE_LAYER}.") for m in plan["ignore"][1:])
    yaml = (out / "recipe.yaml").read_text()
    assert yaml.count("\n  - ") == len(plan["ignore"]) and "ignore:" in yaml
    doc = json.loads((out / "summary.json").read_text())
    assert doc["command"] == "sensitivity" and doc["cost"]["quantized_runs"] == 1 + 2 * len(table)
    assert doc["settings"]["recipe"]["calib_batches"] == 1 and "torch" in doc["versions"]


def test_quantize_keep_float_reproduces_the_plan_bit_for_bit(plan_dir: tuple[Path, Any], fragile_checkpoint: Path,  # noqa: F811
                                                            text_file: Path, tmp_path: Path) -> None:
    out, _ = plan_dir
    plan = json.loads((out / "plan.json").read_text())
    for keep in (out / "plan.json", f"encoder.layer.{FRAGILE_LAYER}"):  # the plan, or the same set as a pattern
        result = invoke("quantize", fragile_checkpoint, "--data", text_file, *SMALL, *RECIPE, "--keep-float", keep,
                        "--out", tmp_path / "q", "--json")
        assert result.exit_code == 0, result.output
        (run,) = json.loads(result.stdout)["runs"]
        assert run["quantized"] == plan["final_metric"]  # bit for bit, not approximately


def test_unmeetable_budget_writes_the_best_plan_and_exits_1(fragile_checkpoint: Path, text_file: Path, tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "r"
    result = invoke("sensitivity", fragile_checkpoint, "--data", text_file, *SMALL, *RECIPE, "--groups", "layer.*",
                    "--budget", "0", "--max-float", "1", "--out", out)
    assert result.exit_code == 1, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("outlier-probe: error: no plan") and "budget" in line
    plan = json.loads((out / "plan.json").read_text())
    assert not plan["met"] and plan["kept_groups"] == [f"layer.{FRAGILE_LAYER}"]


@pytest.mark.parametrize(("args", "message", "code"), [
    (["--groups", "block.*"], "selects no group", 2),
    (["--groups", ","], "--groups is empty", 2),
    (["--budget", "abc"], "is not a number", 2),
    (["--budget", "-1%"], ">= 0", 2),
    (["--max-float", "-1"], "--max-float must be >= 0", 2),
])
def test_sensitivity_bad_input(args: list[str], message: str, code: int, fragile_checkpoint: Path,  # noqa: F811
                               text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = invoke("sensitivity", fragile_checkpoint, "--data", text_file, *SMALL, *args, "--out", out)
    assert result.exit_code == code, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("outlier-probe: error: ") and message in line and "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize(("keep", "message"), [
    ("encoder.layer.9", "matches no quantization point"),
    (",", "--keep-float is empty"),
    ("missing-plan.json", "no such plan file"),
])
def test_quantize_keep_float_bad_input(keep: str, message: str, fragile_checkpoint: Path, text_file: Path,  # noqa: F811
                                       tmp_path: Path) -> None:
    out = tmp_path / "never"
    result = invoke("quantize", fragile_checkpoint, "--data", text_file, *SMALL, "--keep-float", keep, "--out", out)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert message in line and not out.exists()


def test_attention_writes_every_report(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "a"
    result = invoke("attention", tiny_checkpoint("llama"), "--data", text_file, *SMALL, "--attention", "softmax1", "--out", out)
    assert result.exit_code == 0, result.output
    _no_cut_cells(result.stdout)
    assert {p.name for p in out.iterdir()} == {"heads.csv", "layers.csv", "heatmap.png", "summary.json"}
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == 4 and (heads["null"] > 0).all() and (heads["null"] < 1).all()  # softmax_1 sends mass nowhere
    layers = pd.read_csv(out / "layers.csv")
    assert layers["layer"].tolist() == [0, 1] and (layers["ratio"] > 1).all()
    doc = json.loads((out / "summary.json").read_text())
    assert doc["command"] == "attention" and doc["summary"]["variant"] == "softmax1"
    assert 0 <= doc["summary"]["sink_rate"] <= 1 and doc["summary"]["null_mass"] > 0


def test_attention_bad_input(tmp_path: Path) -> None:
    result = invoke("attention", tmp_path / "nope", "--out", tmp_path / "never")
    assert result.exit_code != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("outlier-probe: error: ") and not (tmp_path / "never").exists()
    result = invoke("attention", "minilm", "--massive-ratio", "0", "--out", tmp_path / "never")
    assert result.exit_code == 2 and "--massive-ratio" in result.stderr


def test_real_minilm_end_to_end(minilm_path: Path, wikitext_path: Path, tmp_path: Path) -> None:
    small = ["--data", wikitext_path, "--samples", "4", "--seq-len", "32", "--batch-size", "4"]
    result = invoke("sensitivity", minilm_path, *small, "--calib-batches", "1", "--budget", "5%", "--out", tmp_path / "s")
    assert result.exit_code in (0, 1), result.output  # 1: no plan within the budget, still a full report
    _no_cut_cells(result.stdout)
    doc = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert [g["group"] for g in doc["groups"]][:1] and len(doc["groups"]) == 7  # embeddings + 6 layers
    assert doc["quantized"]["metric"] < 1.0 and doc["plan"]["steps"][0]["metric"] == doc["quantized"]["metric"]
    result = invoke("attention", minilm_path, *small, "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    _no_cut_cells(result.stdout)
    doc = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert len(doc["layers"]) == 6 and doc["summary"]["massive_token"] == "[CLS]"
    assert doc["summary"]["massive_abs"] > 100 and doc["summary"]["sink_rate"] > 0.1


def test_compare_shows_attention_figures_and_gate_checks_them(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:  # noqa: ANN001
    ckpt = tiny_checkpoint("llama")
    out = tmp_path / "cmp"
    result = invoke("compare", f"vanilla={ckpt}@softmax", f"outeffhop={ckpt}@softmax1", "--data", text_file,
                    "--samples", "4", "--seq-len", "32", "--batch-size", "4", "--calib-batches", "1", "--no-plots", "--out", out)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "compare.csv").set_index("name")
    for name in ("vanilla", "outeffhop"):
        summary = json.loads((out / name / "attention" / "summary.json").read_text())["summary"]
        for key in ("sink_rate", "null_mass", "massive_ratio"):
            assert table.loc[name, key] == pytest.approx(summary[key], rel=1e-12), (name, key)
    assert table.loc["outeffhop", "null_mass"] > 0.01 and abs(table.loc["vanilla", "null_mass"]) < 1e-5
    assert "sink" in result.stdout and "null" in result.stdout
    model = out / "outeffhop"
    ok = invoke("gate", "--report", model, "--max-sink-rate", "1", "--max-massive-ratio", "1e9")
    assert ok.exit_code == 0, ok.output
    bad = invoke("gate", "--report", model, "--max-massive-ratio", "1")
    assert bad.exit_code == 1 and "massive_ratio" in bad.stdout
    missing = invoke("gate", "--report", model / "stats", "--max-sink-rate", "0.5")
    assert missing.exit_code == 2 and "no attention report" in missing.stderr


def test_gate_measures_attention_when_a_threshold_needs_it(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:  # noqa: ANN001
    out = tmp_path / "g"
    result = invoke("gate", tiny_checkpoint("gpt2"), "--data", text_file, "--samples", "4", "--seq-len", "32",
                    "--batch-size", "4", "--max-sink-rate", "1.0", "--out", out)
    assert result.exit_code == 0, result.output
    assert (out / "attention" / "heads.csv").is_file() and (out / "gate.json").is_file()
    doc = json.loads((out / "gate.json").read_text())
    assert "sink_rate" in json.dumps(doc)


@pytest.mark.parametrize("family", ["distilbert", "opt", "vit", "generic"])
def test_attention_on_other_families(family: str, tiny_checkpoint, text_file: Path, image_folder: Path,  # noqa: ANN001
                                     tmp_path: Path) -> None:
    data = image_folder if family == "vit" else text_file
    out = tmp_path / "a"
    result = invoke("attention", tiny_checkpoint(family), "--data", data, "--samples", "4", "--seq-len", "16",
                    "--batch-size", "2", "--out", out)
    if family == "generic":
        assert result.exit_code == 2 and "needs a known family" in result.stderr and not out.exists()
        return
    assert result.exit_code == 0, result.output
    heads = pd.read_csv(out / "heads.csv")
    assert len(heads) == 4 and ((heads["first"] > 0) & (heads["first"] <= 1)).all()
    layers = pd.read_csv(out / "layers.csv")
    assert len(layers) == 2 and (layers["top_abs"] > 0).all()
