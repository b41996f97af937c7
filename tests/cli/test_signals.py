"""Ctrl-C and SIGTERM at any moment of a real run: one stderr line, exit 130 / 143, nothing in --out.

The process is started for real (`python -m ...`) and signalled while it imports torch and
transformers, loads the model, or measures: the three phases of a `stats` run on MiniLM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
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


@pytest.fixture
def handlers(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """The CLI's signal handlers, installed in this process for one test, then the previous ones back."""
    from outlier_probe import interrupts

    monkeypatch.setattr(interrupts, "_received", [])
    monkeypatch.setattr(interrupts, "_held", [])
    previous = {s: signal.getsignal(s) for s in interrupts.SIGNALS}
    interrupts.install()
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _swallowed_sigint() -> None:
    """Ctrl-C inside a library that turns every exception into its own (transformers' lazy imports do)."""
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except BaseException as err:  # noqa: BLE001
        raise RuntimeError("Could not import module 'BertModel'") from err


def test_an_interrupt_turned_into_another_error_is_still_an_interrupt(handlers: None) -> None:
    from outlier_probe.cli.app import guarded
    from outlier_probe.errors import Interrupted

    with pytest.raises(Interrupted) as err:
        guarded(_swallowed_sigint)()
    assert err.value.exit_code == 130 and err.value.message == "interrupted"


def test_an_interrupt_swallowed_on_the_way_still_writes_no_report(handlers: None, tmp_path: Path) -> None:
    from outlier_probe.errors import Interrupted
    from outlier_probe.report.io import all_or_nothing, write_text

    with pytest.raises(Interrupted):
        with all_or_nothing():
            write_text(tmp_path / "stats.csv", "x")
            try:
                _swallowed_sigint()
            except RuntimeError:
                pass  # e.g. a tokenizer that fails to load is optional
    assert list(tmp_path.iterdir()) == []


def test_a_signal_between_a_rename_and_its_log_entry_still_rolls_back(handlers: None, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM lands just as a report is renamed into place (from any thread: torch has several)."""
    from outlier_probe.errors import Interrupted
    from outlier_probe.report.io import all_or_nothing, write_text

    real_replace = os.replace

    def replace_then_signal(src: str, dst: str) -> None:
        real_replace(src, dst)
        if Path(dst).name == "summary.json":
            threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGTERM)).start()
            time.sleep(0.2)  # the handler runs here, in the main thread; it is held until the entry is logged

    monkeypatch.setattr(os, "replace", replace_then_signal)
    with pytest.raises(Interrupted) as err:
        with all_or_nothing():
            write_text(tmp_path / "stats.csv", "x")
            write_text(tmp_path / "summary.json", "{}")
            write_text(tmp_path / "never.png", "")
    assert err.value.exit_code == 143
    assert list(tmp_path.iterdir()) == []


def test_a_signal_during_the_commit_comes_too_late_to_stop_the_run(handlers: None, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from outlier_probe import interrupts
    from outlier_probe.report import io

    real_commit = io._Undo.commit

    def commit_with_a_signal(self: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        real_commit(self)

    monkeypatch.setattr(io._Undo, "commit", commit_with_a_signal)
    with io.all_or_nothing():
        io.write_text(tmp_path / "stats.csv", "x")
    assert [p.name for p in tmp_path.iterdir()] == ["stats.csv"]  # complete, and kept
    assert interrupts.received() is None and signal.getsignal(signal.SIGINT) is interrupts._raise  # Ctrl-C works again


def test_a_signal_inside_a_finalizer_still_stops_the_run_with_one_line() -> None:
    """A signal handled inside `__del__` cannot raise there (Python prints "Exception ignored in" and goes
    on); the hook delivers it again so the run stops at the next ordinary instruction, silently."""
    code = textwrap.dedent('''
        import gc, os, signal, sys, time
        from outlier_probe import interrupts
        from outlier_probe.errors import Interrupted
        interrupts.install()

        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler runs here, inside the finalizer

        try:
            Finalized()
            gc.collect()
            for _ in range(100):
                time.sleep(0.01)
            print("not interrupted")
        except Interrupted as err:
            interrupts.exit_interrupted(err)
    ''')
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.splitlines() == ["outlier-probe: error: interrupted"]
    assert "not interrupted" not in proc.stdout
