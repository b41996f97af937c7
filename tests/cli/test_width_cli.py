"""Every command's terminal output at 80 columns (no terminal: Rich's fallback width) has no cut cell."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from outlier_probe.cli.main import COMMANDS, app

FAST = ["--samples", "2", "--seq-len", "16", "--batch-size", "2"]


@pytest.fixture(scope="module")
def outputs(tiny_checkpoint, text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    runner = CliRunner(env={"COLUMNS": "80", "OMP_NUM_THREADS": "1"})
    ckpt = tiny_checkpoint("bert")
    out = tmp_path_factory.mktemp("width")
    data = ["--data", str(text_file)]
    commands = {
        "stats": ["stats", ckpt, *data, *FAST, "--out", out / "stats", "--no-plots", "--sites", "all"],
        "quantize": ["quantize", ckpt, *data, *FAST, "--calib-batches", "1", "--recipe", "paper", "--recipe", "linear",
                     "--out", out / "quantize"],
        "compare": ["compare", f"vanilla={ckpt}", f"outeffhop={ckpt}@softmax1", f"clipped={ckpt}@clipped", *data, *FAST,
                    "--calib-batches", "1", "--out", out / "compare", "--no-plots"],
        "gate": ["gate", "--report", out / "stats", "--max-kurtosis", "1", "--max-inf-norm", "1000", "--out", out / "gate"],
    }
    texts = {}
    for name, args in commands.items():
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code in (0, 1), (name, result.output)
        texts[name] = result.stdout
    return texts


# the last column of each table: a table wider than 80 columns loses its right edge silently (cropped, no "…")
LAST_COLUMNS = {"stats": ["lin-in", "global max"], "quantize": ["relative", "inf-norm"], "compare": ["all sites"],
                "gate": ["worst site"]}


@pytest.mark.parametrize("command", ["stats", "quantize", "compare", "gate"])
def test_no_cut_cell_at_80_columns(outputs: dict[str, str], command: str) -> None:
    text = outputs[command]
    for head in LAST_COLUMNS[command]:
        assert head in text, text
    assert "┃" in text or "━" in text or "─" in text, text  # a table was printed
    assert "…" not in text, text
    assert max(len(line) for line in text.splitlines()) <= 80, text


@pytest.mark.parametrize("command", [(), *[(name,) for name in COMMANDS]])
def test_help_at_80_columns_cuts_no_option_name_default_or_summary(command: tuple[str, ...]) -> None:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output and not any(line.rstrip().endswith("...") for line in lines if not line.startswith("Usage:")), result.output
    assert "\\[" not in result.output  # no Rich escape leaks into plain help
    if not command:  # the command list names every command with its summary
        assert all(f"  {name} " in result.output for name in COMMANDS)
