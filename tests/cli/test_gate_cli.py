"""`outlier-probe gate` through CliRunner, as a real subprocess, and end to end on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from typer.testing import CliRunner

from outlier_probe.cli.main import app
from tests.test_gate import write_quantize, write_stats

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in an empty folder (no pyproject.toml above it) and outside GitHub Actions."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)


@pytest.fixture
def reports(tmp_path: Path) -> dict[str, Path]:
    return {"ok": write_stats(tmp_path / "ok"), "bad": write_stats(tmp_path / "bad", kurtosis_scale=10.0)}


def gate(*args: str):  # noqa: ANN201
    return runner.invoke(app, ["gate", *map(str, args)])


def test_help_documents_exit_codes() -> None:
    result = gate("--help")
    assert result.exit_code == 0
    assert "Exit codes" in result.output and "threshold is exceeded" in result.output and "--max-kurtosis" in result.output


def test_exit_1_when_kurtosis_exceeds_and_0_when_it_passes(reports: dict[str, Path]) -> None:
    bad = gate("--report", reports["bad"], "--max-kurtosis", "10")
    assert bad.exit_code == 1, bad.output
    assert "FAIL" in bad.stdout and "max_kurtosis" in bad.stdout and "gate failed" in bad.stdout
    ok = gate("--report", reports["ok"], "--max-kurtosis", "10")
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.stdout and "FAIL" not in ok.stdout


def test_thresholds_are_saved_in_gate_json(reports: dict[str, Path], tmp_path: Path) -> None:
    result = gate("--report", reports["ok"], "--max-kurtosis", "10", "--out", tmp_path / "gate-out")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "gate-out" / "gate.json").read_text())
    assert saved["config"]["max_kurtosis"] == 10.0 and saved["sources"]["max_kurtosis"] == "flag"
    assert saved["sources"]["max_inf_norm"] == "default" and saved["passed"] is True
    assert gate("--report", reports["ok"], "--max-kurtosis", "10").exit_code == 0
    assert (reports["ok"] / "gate.json").is_file()  # default: next to the report


def test_pyproject_found_by_walking_up(reports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.outlier-probe.gate]\nmax-kurtosis = 10\n")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "deep" / "er")
    assert gate("--report", reports["bad"]).exit_code == 1
    assert gate("--report", reports["ok"]).exit_code == 0
    # a flag wins over the file: raising the limit makes the bad report pass
    assert gate("--report", reports["bad"], "--max-kurtosis", "100").exit_code == 0


def test_config_file_wins_over_pyproject_and_flags_over_both(reports: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.outlier-probe.gate]\nmax-kurtosis = 100\n")
    strict = tmp_path / "strict.toml"
    strict.write_text("max_kurtosis = 10\n")
    assert gate("--report", reports["bad"]).exit_code == 0  # pyproject: 100
    assert gate("--report", reports["bad"], "--config", strict).exit_code == 1  # --config: 10
    assert gate("--report", reports["bad"], "--config", strict, "--max-kurtosis", "60").exit_code == 0  # flag: 60


@pytest.mark.parametrize(
    ("toml", "key"),
    [("max-kurtossis = 10\n", "max-kurtossis"), ('max-kurtosis = "10"\n', "max_kurtosis")],
)
def test_bad_toml_is_exit_2_naming_the_key(reports: dict[str, Path], tmp_path: Path, toml: str, key: str) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.outlier-probe.gate]\n" + toml)
    result = gate("--report", reports["ok"])
    assert result.exit_code == 2
    assert key in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.output


def test_usage_errors_are_exit_2(reports: dict[str, Path], tmp_path: Path) -> None:
    missing = gate("--report", tmp_path / "nowhere", "--max-kurtosis", "10")
    assert missing.exit_code == 2 and "nowhere" in missing.stderr
    assert gate("--report", reports["ok"]).exit_code == 2  # no thresholds at all
    assert gate("ckpt", "--report", reports["ok"], "--max-kurtosis", "1").exit_code == 2  # both
    mixed = gate("--report", reports["ok"], "--max-kurtosis", "1", "--samples", "4")
    assert mixed.exit_code == 2 and "--samples" in mixed.stderr
    assert gate("--report", reports["ok"], "--max-kurtosis", "ten").exit_code == 2  # typer's own type check
    assert gate("--report", reports["ok"], "--max-ppl-ratio", "1.1").exit_code == 2  # no quantize.csv
    assert gate("--report", reports["ok"], "--config", tmp_path / "none.toml", "--max-kurtosis", "1").exit_code == 2


def test_json_junit_and_annotations(reports: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    junit = tmp_path / "junit" / "gate.xml"  # the folder is created
    result = gate("--report", reports["bad"], "--max-kurtosis", "10", "--max-avg-kurtosis", "100", "--json", "--junit", junit)
    assert result.exit_code == 1
    data = json.loads(result.stdout)  # stdout is pure JSON
    assert {c["name"]: c["passed"] for c in data["checks"]} == {"max_avg_kurtosis": True, "max_kurtosis": False}
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and len(suite.findall("testcase")) == 2 and suite.get("failures") == "1"
    assert "::error" not in result.output  # not under GitHub Actions

    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    annotated = gate("--report", reports["bad"], "--max-kurtosis", "10", "--max-avg-kurtosis", "100")
    assert annotated.exit_code == 1
    lines = annotated.stdout.splitlines()
    assert sum(line.startswith("::error title=") for line in lines) == 1
    assert any(line.startswith("::notice title=") for line in lines)


def test_quantize_report_thresholds(tmp_path: Path) -> None:
    write_stats(tmp_path / "run" / "stats")
    write_quantize(tmp_path / "run" / "quantize", ppl_float=20.0, ppl_quant=30.0)
    assert gate("--report", tmp_path / "run", "--max-ppl-ratio", "1.2").exit_code == 1
    assert gate("--report", tmp_path / "run", "--max-ppl-ratio", "1.6", "--max-kurtosis", "10").exit_code == 0


def test_baseline_flag(tmp_path: Path) -> None:
    write_stats(tmp_path / "prev")
    write_stats(tmp_path / "now", kurtosis_scale=1.3)
    assert gate("--report", tmp_path / "now", "--baseline", tmp_path / "prev").exit_code == 1
    assert gate("--report", tmp_path / "now", "--baseline", tmp_path / "prev", "--baseline-tolerance", "0.5").exit_code == 0


def _subprocess_gate(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "GITHUB_ACTIONS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "outlier_probe.cli.main", "gate", *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_real_subprocess_exit_codes(reports: dict[str, Path], tmp_path: Path) -> None:
    bad = _subprocess_gate("--report", reports["bad"], "--max-kurtosis", "10", cwd=tmp_path)
    assert bad.returncode == 1, bad.stderr
    assert "FAIL" in bad.stdout
    ok = _subprocess_gate("--report", reports["ok"], "--max-kurtosis", "10", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    missing = _subprocess_gate("--report", tmp_path / "missing", "--max-kurtosis", "10", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("outlier-probe: error:")


# ----------------------------------------------------------------------------- end to end on a tiny model

OUTLIER_CHANNEL = 5
E2E_MEASURE = ["--samples", "4", "--seq-len", "32", "--batch-size", "4"]
E2E_MAX_KURTOSIS = "20"  # measured: random init <= 3 at every site; one channel x100 ~180 at the block outputs


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random OPT saved twice: as is, and with one hidden channel of the embeddings scaled by 100."""
    pytest.importorskip("outlier_probe.stats.run", reason="needs `stats` (outlier_probe.stats.run)")
    import torch

    from outlier_probe.data import builtin_text
    from outlier_probe.loading import save_checkpoint
    from outlier_probe.models import Arch, Shape, build_config, build_model
    from outlier_probe.tokenization import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("gate-e2e")
    text, _ = builtin_text()
    tokenizer = train_bpe_tokenizer([text[:200_000]], vocab_size=512)
    config = build_config(Arch.opt, Shape(2, 64, 2), vocab_size=len(tokenizer), max_positions=64)
    paths = {}
    for name, scale in (("clean", 1.0), ("outlier", 100.0)):
        model = build_model(config, seed=0).eval()
        with torch.no_grad():  # (vocab, hidden): one hidden channel of every token embedding
            model.get_input_embeddings().weight[:, OUTLIER_CHANNEL] *= scale
        paths[name] = save_checkpoint(model, root / name, tokenizer)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize(("name", "expected"), [("clean", 0), ("outlier", 1)])
def test_end_to_end_gate_on_tiny_opt(tiny_checkpoints: dict[str, Path], tmp_path: Path, name: str, expected: int) -> None:
    out = tmp_path / f"gate-{name}"
    full = gate(tiny_checkpoints[name], "--max-kurtosis", E2E_MAX_KURTOSIS, "--out", out, "--json", *E2E_MEASURE)
    assert full.exit_code == expected, full.output
    assert (out / "stats" / "stats.csv").is_file() and (out / "gate.json").is_file()
    measured = json.loads(full.stdout)["checks"][0]["measured"]
    # the same folder checked without loading a model gives the same verdict and value
    again = gate("--report", out, "--max-kurtosis", E2E_MAX_KURTOSIS, "--json")
    assert again.exit_code == expected, again.output
    assert json.loads(again.stdout)["checks"][0]["measured"] == pytest.approx(measured)


def test_example_workflow_installs_cpu_torch_gates_and_uploads_always() -> None:
    yaml = pytest.importorskip("yaml")
    workflow = yaml.safe_load((REPO / "examples" / "github-actions-gate.yml").read_text())
    steps = workflow["jobs"]["gate"]["steps"]
    install = next(s["run"] for s in steps if "pip install torch" in s.get("run", ""))
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in install
    assert install.index("pip install torch") < install.index("pip install .")
    gate_step = next(s["run"] for s in steps if "outlier-probe gate" in s.get("run", ""))
    options = [word for word in gate_step.split() if word.startswith("--")]
    help_text = gate("--help").output
    assert options and all(option in help_text for option in options)
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"


@pytest.mark.slow
def test_end_to_end_quantization_threshold(tiny_checkpoints: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("outlier_probe.quant.run", reason="needs `quantize` (outlier_probe.quant.run)")
    out = tmp_path / "gate-q"
    full = gate(tiny_checkpoints["clean"], "--max-ppl-ratio", "1000", "--out", out, "--json", *E2E_MEASURE)
    assert full.exit_code == 0, full.output
    assert (out / "quantize" / "quantize.csv").is_file()
    ratio = json.loads(full.stdout)["checks"][0]["measured"]
    assert ratio > 0
    # a limit just under the measured ratio fails, from the saved reports alone
    tight = gate("--report", out, "--max-ppl-ratio", str(ratio * 0.999), "--json")
    assert tight.exit_code == 1, tight.output
