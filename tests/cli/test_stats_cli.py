"""`outlier-probe stats`: reports on success; one stderr line, the right exit code and no files on failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from outlier_probe.cli.main import app
from tests.conftest import REPO_ROOT

PREFIX = "outlier-probe: error:"
PNG = b"\x89PNG\r\n\x1a\n"


def _run(*args: str):
    return CliRunner().invoke(app, ["stats", *map(str, args)])


def _small(text_file: Path) -> list[str]:
    return ["--data", str(text_file), "--samples", "4", "--seq-len", "16", "--batch-size", "2"]


def _files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*")) if folder.exists() else []


def _assert_one_line_error(res, code: int, needle: str) -> None:
    lines = res.stderr.splitlines()
    assert res.exit_code == code, (res.exit_code, res.output)
    assert len(lines) == 1 and lines[0].startswith(PREFIX), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit)  # a clean exit, not an exception escaping the command


def test_success_writes_every_report(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    res = _run(tiny_checkpoint("opt"), *_small(text_file), "--out", out)
    assert res.exit_code == 0, res.output
    assert {p.name for p in _files(out)} == {"stats.csv", "summary.json", "layers.png", "histogram.png"}  # no temp files
    assert (out / "layers.png").read_bytes()[:8] == PNG and (out / "histogram.png").read_bytes()[:8] == PNG
    header = (out / "stats.csv").read_text().splitlines()[0]
    assert header.startswith("site,kind,layer,n_sequences,count,mean,var,std,kurtosis,excess_kurtosis,paper_kurtosis")
    doc = json.loads((out / "summary.json").read_text())
    assert doc["command"] == "stats" and doc["data"]["sequences"] == 4 and doc["data"]["tokens"] == 64
    assert "kurtosis per layer" in res.stdout and "inf-norm per layer" in res.stdout and "average kurtosis" in res.stdout
    assert res.stderr == ""


def test_json_prints_valid_json_and_default_out(tiny_checkpoint, text_file: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ckpt = tiny_checkpoint("llama")
    res = _run(ckpt, *_small(text_file), "--json", "--no-plots")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)  # stdout holds the JSON and nothing else
    assert doc["tool"] == "outlier-probe" and doc["model"]["family"] == "llama"
    assert doc["summary"]["sites"] == 13 and doc["settings"]["plots"] is False
    out = tmp_path / "reports" / ckpt.name
    assert {p.name for p in _files(out)} == {"stats.csv", "summary.json"}


def test_site_selection_options(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "r"
    res = _run(tiny_checkpoint("opt"), *_small(text_file), "--out", out, "--no-plots", "-q",
               "--sites", "block_output,ffn_output", "--exclude", "*layers.1*")
    assert res.exit_code == 0, res.output
    rows = [line.split(",")[:3] for line in (out / "stats.csv").read_text().splitlines()[1:]]
    assert rows == [["model.decoder.layers.0.fc2", "ffn_output", "0"], ["model.decoder.layers.0", "block_output", "0"]]
    assert res.stdout == ""  # --quiet


def _truncated(tiny_checkpoint, tmp_path: Path) -> Path:
    folder = shutil.copytree(tiny_checkpoint("opt"), tmp_path / "truncated")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


def _no_config(tmp_path: Path) -> Path:
    (tmp_path / "noconfig").mkdir()
    (tmp_path / "noconfig" / "model.safetensors").write_bytes(b"x")
    return tmp_path / "noconfig"


def _empty_text(tmp_path: Path) -> Path:
    (tmp_path / "empty.txt").write_text("")
    return tmp_path / "empty.txt"


@pytest.mark.parametrize("case,code,needle", [
    ("missing folder", 1, "does not exist"),
    ("no config.json", 1, "has no config.json"),
    ("truncated safetensors", 1, "corrupt or truncated"),
    ("unknown --sites", 2, "unknown site kind 'bogus'"),
    ("empty text file", 1, "contains no text"),
    ("seq-len too long", 2, "longer than the model's 128 positions"),
    ("out under a file", 1, "cannot create output folder"),
])
def test_bad_input_gives_one_line_and_leaves_no_files(tiny_checkpoint, text_file: Path, tmp_path: Path,
                                                      case: str, code: int, needle: str) -> None:
    ckpt = tiny_checkpoint("opt")
    out = tmp_path / "out"
    data = ["--data", str(text_file), "--samples", "2", "--seq-len", "16"]
    if case == "missing folder":
        ckpt = tmp_path / "missing"
    elif case == "no config.json":
        ckpt = _no_config(tmp_path)
    elif case == "truncated safetensors":
        ckpt = _truncated(tiny_checkpoint, tmp_path)
    elif case == "unknown --sites":
        data += ["--sites", "block_output,bogus"]
    elif case == "empty text file":
        data[1] = str(_empty_text(tmp_path))
    elif case == "seq-len too long":
        data[-1] = "129"
    elif case == "out under a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    res = _run(ckpt, *data, "--out", out)
    _assert_one_line_error(res, code, needle)
    assert _files(out) == []  # no reports, no temp files


def test_failed_plot_leaves_nothing(tiny_checkpoint, text_file: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    def broken_savefig(self, handle, **kwargs) -> None:
        handle.write(PNG)  # half a file, then the disk fills up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    out = tmp_path / "out"
    res = _run(tiny_checkpoint("gpt2"), *_small(text_file), "--out", out)
    _assert_one_line_error(res, 1, "No space left on device")
    assert not out.exists()  # all reports or none: the CSV and JSON written before the plot are rolled back


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into read-only folders")
def test_out_under_a_read_only_folder(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        res = _run(tiny_checkpoint("opt"), *_small(text_file), "--out", locked / "out")
        _assert_one_line_error(res, 1, "choose another --out")
        assert _files(locked) == []
    finally:
        locked.chmod(0o755)


def test_real_process_one_line_on_stderr(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("OUTLIER_PROBE_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "outlier_probe.cli.main", "stats", str(tiny_checkpoint("bert")), "--data", str(text_file),
         "--samples", "2", "--seq-len", "500", "--out", str(out)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"{PREFIX} --seq-len 500 is longer than the model's 128 positions; use --seq-len 128 or less"
    ]
    assert proc.stdout == "" and _files(out) == []
