"""The console entry point in a real process: usage errors are one line that points at the right help."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "outlier_probe.cli.main", *args], capture_output=True, text=True,
                          timeout=120, env=env)


@pytest.mark.parametrize(("args", "line"), [
    (("bogus",), "outlier-probe: error: No such command 'bogus'. (see: outlier-probe --help)"),
    (("stats", "--samples", "x"), "(see: outlier-probe stats --help)"),
])
def test_usage_error_is_one_line_with_the_help_to_read(args: tuple[str, ...], line: str) -> None:
    proc = _cli(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("outlier-probe: error:"), proc.stderr
    assert line in proc.stderr


def test_no_arguments_prints_the_help_and_no_empty_error() -> None:
    proc = _cli()
    assert proc.returncode == 2 and proc.stderr == ""
    assert "Usage: outlier-probe [OPTIONS] COMMAND" in proc.stdout and "stats" in proc.stdout
