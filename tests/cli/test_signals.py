"""Ctrl-C and SIGTERM at any moment of a real run: one stderr line, exit 130 / 143, nothing in --out.

The process is started for real (`python -m ...`) and signalled while it imports torch and
transformers, loads the model, or measures: the three phases of a `stats` run on MiniLM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

CASES = [  # (signal, seconds after start, exit code, the one line)
    (signal.SIGINT, 0.4, 130, "outlier-probe: error: interrupted"),  # importing typer / torch
    (signal.SIGINT, 2.0, 130, "outlier-probe: error: interrupted"),  # importing transformers, loading
    (signal.SIGINT, 5.0, 130, "outlier-probe: error: interrupted"),  # loading, measuring
    (signal.SIGTERM, 0.4, 143, "outlier-probe: error: terminated"),
    (signal.SIGTERM, 3.0, 143, "outlier-probe: error: terminated"),
]


def _start(module: str, out: Path, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("OUTLIER_PROBE_DEBUG", None)
    return subprocess.Popen([sys.executable, "-m", module, "stats", "minilm", "--samples", "64", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env)


@pytest.mark.parametrize(("sig", "delay", "code", "line"), CASES,
                         ids=[f"{signal.Signals(s).name}-{d}s" for s, d, _c, _l in CASES])
def test_signal_is_one_line_and_leaves_nothing(minilm_path: Path, tmp_path: Path, sig: int, delay: float,
                                               code: int, line: str) -> None:
    out = tmp_path / "out"
    proc = _start("outlier_probe.cli.main", out, tmp_path)
    time.sleep(delay)
    assert proc.poll() is None, "the run ended before the signal; lengthen it"
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert stderr.splitlines() == [line], stderr
    assert stdout == "" and not out.exists()


def test_python_dash_m_outlier_probe_is_the_cli(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-m", "outlier_probe", "stats", "--samples", "0"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("outlier-probe: error:"), proc.stderr


def test_importing_the_entry_point_is_instant() -> None:
    """Signal handlers go in before the heavy imports: the entry module itself must not import them."""
    code = ("import sys; import outlier_probe.cli.main; "
            "heavy = [m for m in ('torch', 'transformers', 'typer', 'rich', 'numpy') if m in sys.modules]; print(heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr
