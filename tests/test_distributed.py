"""Data-parallel runs: 2 CPU processes under torchrun (gloo) give the single-process results.

Counts, histograms and extremes exactly, moments to 1e-12 relative, perplexity to 1e-9, calibration
ranges (running min-max EMA, replayed in the global batch order) exactly; a failing rank stops every
rank with one line and no report.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO_ROOT

EXACT = ("n_sequences", "count", "max_abs", "top_channels")
CLOSE = ("mean", "var", "std", "kurtosis", "paper_kurtosis", "paper_inf_norm", "frac_gt_threshold", "frac_gt_ksigma")


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(*args: str, env: dict[str, str] | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), cwd=REPO_ROOT, timeout=timeout)


def _close(a: float, b: float, rel: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=rel, abs_tol=0.0) or a == b


def test_two_processes_merge_to_the_single_process_result(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:
    ckpt = str(tiny_checkpoint("opt"))
    worker = str(REPO_ROOT / "tests" / "distributed_worker.py")
    single = subprocess.run([sys.executable, worker, ckpt, str(text_file), str(tmp_path / "one.json")],
                            capture_output=True, text=True, env=_env(), timeout=240)
    assert single.returncode == 0, single.stderr[-2000:]
    run = _torchrun(worker, ckpt, str(text_file), str(tmp_path / "two.json"))
    assert run.returncode == 0, run.stderr[-2000:]
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world"], two["world"]) == (1, 2)
    assert [s["site"] for s in one["sites"]] == [s["site"] for s in two["sites"]] and len(one["sites"]) > 5
    for a, b in zip(one["sites"], two["sites"]):
        assert a["n_sequences"] == 10 and a["hist_counts"] == b["hist_counts"], a["site"]
        assert all(a[k] == b[k] for k in EXACT), (a["site"], {k: (a[k], b[k]) for k in EXACT})
        assert all(_close(a[k], b[k], 1e-12) for k in CLOSE), (a["site"], {k: (a[k], b[k]) for k in CLOSE})
    assert math.isclose(one["float"], two["float"], rel_tol=1e-9) and math.isclose(one["quantized"], two["quantized"], rel_tol=1e-9)
    assert one["ranges"] == two["ranges"] and len(one["ranges"]) > 10  # 3 calibration batches over 2 ranks, replayed


def test_cli_under_torchrun_rank0_writes_the_report(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from outlier_probe.cli.main import app

    ckpt = str(tiny_checkpoint("llama"))
    opts = ["--data", str(text_file), "--samples", "6", "--seq-len", "16", "--batch-size", "2", "--no-plots", "-q"]
    res = CliRunner().invoke(app, ["stats", ckpt, *opts, "--out", str(tmp_path / "one")])
    assert res.exit_code == 0, res.output
    run = _torchrun("-m", "outlier_probe", "stats", ckpt, *opts, "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["stats.csv", "summary.json"]
    one, two = pd.read_csv(tmp_path / "one" / "stats.csv"), pd.read_csv(tmp_path / "two" / "stats.csv")
    assert list(one["site"]) == list(two["site"])
    for col in EXACT:
        assert list(one[col]) == list(two[col]), col
    for col in CLOSE:
        assert all(_close(a, b, 1e-12) for a, b in zip(one[col], two[col])), col


def test_a_failing_rank_stops_every_rank_with_one_line_and_no_report(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:
    ckpt = str(tiny_checkpoint("opt"))
    env = {**_env(), "OUTLIER_PROBE_FAIL_RANK": "1"}  # fault injection: rank 1 raises before its first batch
    out = tmp_path / "report"
    run = _torchrun("-m", "outlier_probe", "stats", ckpt, "--data", str(text_file), "--samples", "4", "--seq-len", "16",
                    "--batch-size", "2", "--no-plots", "-q", "--out", str(out), env=env)
    assert run.returncode != 0
    ours = [line for line in run.stderr.splitlines() if "outlier-probe: error:" in line]
    assert len(ours) == 2, run.stderr[-3000:]  # one line from each rank
    assert any("injected failure" in line and "[1]" in line or "injected failure" in line for line in ours)
    assert any("rank 1 failed" in line for line in ours), ours
    assert "Traceback" not in "\n".join(line for line in run.stderr.splitlines() if "outlier-probe" in line)
    assert not out.exists() or not any(out.iterdir())
