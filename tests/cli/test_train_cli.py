"""`outlier-probe train` through CliRunner: a run, --resume, --json, and one-line usage errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from outlier_probe.cli.main import app
from outlier_probe.train import LOG_COLUMNS, LOG_FILE
from tests.test_train import corpus, tokenizers  # noqa: F401 - module fixtures

runner = CliRunner()


def run(*args: object):  # noqa: ANN201
    return runner.invoke(app, ["train", *map(str, args)])


def micro_args(out: Path, corpus: Path, tokenizer: str, steps: int) -> list[object]:
    return ["--size", "micro", "--data", corpus, "--tokenizer", tokenizer, "--seq-len", 32, "--batch-size", 4,
            "--steps", steps, "--lr", 1e-2, "--warmup", 0, "--eval-every", 2, "--eval-samples", 4, "--threads", 1,
            "--no-plots", "--out", out]


def test_train_then_resume(corpus: Path, tokenizers: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    first = run(*micro_args(out, corpus, tokenizers["causal"], 2), "--attention", "softmax1", "--quiet")
    assert first.exit_code == 0, first.output
    assert first.stdout == ""  # --quiet: nothing on the terminal
    second = run(*micro_args(out, corpus, tokenizers["causal"], 4), "--attention", "softmax1", "--resume", "--json")
    assert second.exit_code == 0, second.output
    summary = json.loads(second.stdout)
    assert summary["steps"] == 4 and summary["stopped_by"] == "steps" and summary["out"] == str(out)
    log = pd.read_csv(out / LOG_FILE)
    assert tuple(log.columns) == LOG_COLUMNS and log["step"].tolist() == [2, 4]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_table_on_stdout(corpus: Path, tokenizers: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    result = run(*micro_args(tmp_path / "bert", corpus, tokenizers["masked"], 2), "--arch", "bert")
    assert result.exit_code == 0, result.output
    assert "final_eval_loss" in result.stdout and "max_inf_norm" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "t5"], "unknown --arch 't5'; choose one of opt, bert, gpt2, llama, vit"),
        (["--size", "huge"], "unknown --size 'huge'"),
        (["--hidden", "30", "--heads", "4"], "hidden size 30 is not divisible by 4 heads"),
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--attention", "relu"], "unknown --attention 'relu'"),
    ],
)
def test_bad_options_are_one_line_errors_with_exit_2(args: list[str], message: str, tmp_path: Path) -> None:
    result = run(*args, "--out", tmp_path / "x")
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("outlier-probe: error: ")
    assert message in result.stderr
    assert not (tmp_path / "x").exists()  # rejected before anything is written


def test_existing_checkpoint_needs_resume_or_overwrite(corpus: Path, tokenizers: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    out = tmp_path / "run"
    assert run(*micro_args(out, corpus, tokenizers["causal"], 2), "--quiet").exit_code == 0
    again = run(*micro_args(out, corpus, tokenizers["causal"], 2), "--quiet")
    assert again.exit_code == 2 and "--resume" in again.stderr and "--overwrite" in again.stderr
    assert run(*micro_args(out, corpus, tokenizers["causal"], 2), "--quiet", "--overwrite").exit_code == 0
