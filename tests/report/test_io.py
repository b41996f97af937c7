"""Atomic writes and all-or-nothing output sets (report/io.py)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from outlier_probe.errors import Interrupted, ProbeError
from outlier_probe.report.io import all_or_nothing, check_out_file, ensure_writable_dir, write_json, write_text


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), Interrupted(signal.SIGTERM), KeyboardInterrupt()],
                         ids=["disk full", "SIGTERM", "Ctrl-C"])
def test_a_failure_undoes_every_file_and_folder(tmp_path: Path, error: BaseException) -> None:
    keep = tmp_path / "old"
    keep.mkdir()
    (keep / "stats.csv").write_text("old report\n")
    out = tmp_path / "new" / "deep"
    with pytest.raises(type(error)):
        with all_or_nothing():
            write_text(ensure_writable_dir(out) / "a.csv", "a")
            write_json(ensure_writable_dir(out / "sub") / "b.json", {"b": 1})
            write_text(keep / "stats.csv", "new report\n")  # overwrites an earlier run's file
            write_text(keep / "extra.txt", "x")
            assert (out / "a.csv").read_text() == "a"  # readable at its final path inside the block
            raise error
    assert not (tmp_path / "new").exists()  # the folders it made are gone too
    assert sorted(p.name for p in keep.iterdir()) == ["stats.csv"]  # no backups, no temp files
    assert (keep / "stats.csv").read_text() == "old report\n"  # the earlier report is restored


def test_success_keeps_every_file_and_no_backup(tmp_path: Path) -> None:
    (tmp_path / "stats.csv").write_text("old")
    with all_or_nothing():
        write_text(tmp_path / "stats.csv", "new")
        with all_or_nothing():  # nested blocks: the outer one decides
            write_text(tmp_path / "summary.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.csv", "summary.json"]
    assert (tmp_path / "stats.csv").read_text() == "new"


def test_check_out_file(tmp_path: Path) -> None:
    assert check_out_file(tmp_path / "new" / "gate.xml") == tmp_path / "new" / "gate.xml"  # creatable: fine, not created
    assert not (tmp_path / "new").exists()
    with pytest.raises(ProbeError, match="is a folder"):
        check_out_file(tmp_path, "--junit")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProbeError, match="not a writable folder"):
        check_out_file(tmp_path / "file" / "gate.xml", "--junit")
