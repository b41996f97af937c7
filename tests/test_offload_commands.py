"""--device-map / --max-memory / --offload-folder on every command that loads a checkpoint: the same numbers
with and without a cap that sends every weight to disk; commands that train refuse weights left on disk."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from outlier_probe.cli.main import app
from outlier_probe.config import AttentionVariant, Device, DType, LoadConfig, Placement
from outlier_probe.errors import UsageError

SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "-q"]
CAP = ["--device-map", "auto", "--max-memory", "60KB"]  # 60 KB: every weight of a tiny model goes to disk


def _invoke(*args: Any) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def _same_csv(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_csv(a), pd.read_csv(b))  # bit-identical: same weights, same order of operations


def test_placement_applies_to_a_load_and_checks_its_options(tmp_path: Path) -> None:
    load = Placement("auto", "1GiB", tmp_path, DType.bfloat16).apply(LoadConfig(source="x"))
    assert (load.device_map, load.max_memory, load.offload_folder, load.dtype) == ("auto", "1GiB", tmp_path, DType.bfloat16)
    assert Placement().apply(LoadConfig(source="x", dtype=DType.float16)).dtype is DType.float16  # no dtype: the load's own
    with pytest.raises(UsageError, match="need --device-map"):
        Placement(max_memory="1GiB")
    with pytest.raises(UsageError, match="not a size"):
        Placement("auto", "lots")


@pytest.mark.parametrize("command,extra,files", [
    ("sensitivity", ["--calib-batches", "1"], ("sensitivity.csv",)),
    ("attention", [], ("heads.csv", "layers.csv")),
])
def test_diagnosis_commands_give_the_same_report_offloaded(tiny_checkpoint, text_file: Path, tmp_path: Path, one_thread,
                                                           command: str, extra: list[str], files: tuple[str, ...]) -> None:
    base = [command, tiny_checkpoint("opt"), "--data", text_file, *SMALL, *extra]
    plain = _invoke(*base, "--out", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    capped = _invoke(*base, "--out", tmp_path / "capped", *CAP, "--offload-folder", tmp_path / "weights")
    assert capped.exit_code == 0, capped.output
    for name in files:
        _same_csv(tmp_path / "plain" / name, tmp_path / "capped" / name)
    assert "disk" in json.loads((tmp_path / "capped" / "summary.json").read_text())["model"]["device_map"]


def test_gate_measures_an_offloaded_checkpoint_alike(tiny_checkpoint, text_file: Path, tmp_path: Path, one_thread) -> None:
    base = ["gate", tiny_checkpoint("opt"), "--data", text_file, "--samples", "4", "--seq-len", "16", "--batch-size", "2",
            "--max-avg-kurtosis", "1e9", "--max-ppl-ratio", "1e9", "--json"]
    plain = _invoke(*base, "--out", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    capped = _invoke(*base, "--out", tmp_path / "capped", *CAP)
    assert capped.exit_code == 0, capped.output
    _same_csv(tmp_path / "plain" / "stats" / "stats.csv", tmp_path / "capped" / "stats" / "stats.csv")
    _same_csv(tmp_path / "plain" / "quantize" / "quantize.csv", tmp_path / "capped" / "quantize" / "quantize.csv")
    assert "disk" in json.loads((tmp_path / "capped" / "stats" / "summary.json").read_text())["model"]["device_map"]
    refused = _invoke("gate", "--report", tmp_path / "plain", "--max-avg-kurtosis", "1e9", *CAP)
    assert refused.exit_code == 2 and "--device-map" in refused.stderr and refused.stderr.count("\n") == 1, refused.output


def test_train_from_places_the_checkpoint_and_refuses_weights_on_disk(tiny_checkpoint, text_file: Path, tmp_path: Path,
                                                                       one_thread) -> None:
    ckpt = tiny_checkpoint("gpt2")
    base = ["train", "--from", ckpt, "--attention", "softmax1", "--data", text_file, "--seq-len", "16", "--batch-size", "2",
            "--steps", "2", "--warmup", "0", "--eval-every", "2", "--eval-samples", "4", "--threads", "1", "--device", "cpu",
            "--no-plots", "-q"]
    plain = _invoke(*base, "--out", tmp_path / "plain")
    assert plain.exit_code == 0, plain.output
    placed = _invoke(*base, "--out", tmp_path / "placed", "--device-map", "cpu")
    assert placed.exit_code == 0, placed.output
    log = [c for c in pd.read_csv(tmp_path / "plain" / "train_log.csv").columns if not c.endswith("_s")]  # not the timings
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "plain" / "train_log.csv")[log],
                                  pd.read_csv(tmp_path / "placed" / "train_log.csv")[log])
    capped = _invoke(*base, "--out", tmp_path / "capped", *CAP)
    assert capped.exit_code == 2 and capped.stderr.count("\n") == 1, capped.output
    assert "no weight can stay on disk" in capped.stderr and "--max-memory" in capped.stderr
    assert not (tmp_path / "capped" / "config.json").exists()
    scratch = _invoke("train", "--device-map", "cpu", "--out", tmp_path / "scratch")
    assert scratch.exit_code == 2 and "give --from" in scratch.stderr, scratch.output


def test_retrofit_places_the_checkpoint_and_refuses_weights_on_disk(tiny_checkpoint, text_file: Path, one_thread) -> None:
    from outlier_probe.retrofit import run_retrofit
    from outlier_probe.retrofit_config import RetrofitConfig

    def cfg(placement: Placement) -> RetrofitConfig:
        return RetrofitConfig(source=str(tiny_checkpoint("gpt2")), data=text_file, variants=("softmax1",), steps=1, batch_size=2,
                              seq_len=16, eval_every=1, eval_samples=4, threads=1, device=Device.cpu, warmup=0, lr=1e-3,
                              placement=placement)

    plain, placed = run_retrofit(cfg(Placement())), run_retrofit(cfg(Placement(device_map="cpu")))
    for a, b in zip(plain.twins, placed.twins, strict=True):
        assert a.before.row() == b.before.row() and a.after.row() == b.after.row()
    with pytest.raises(UsageError, match="no weight can stay on disk"):
        run_retrofit(cfg(Placement(device_map="auto", max_memory="60KB")))


def test_reproduce_compares_its_twins_offloaded_alike(tmp_path: Path, one_thread) -> None:
    """The second run resumes the finished twins (nothing is retrained) and only measures them again, offloaded."""
    from outlier_probe.models import Arch
    from outlier_probe.reproduce import ReproduceConfig, run_reproduction

    def run(name: str, placement: Placement) -> Path:
        cfg = ReproduceConfig(scale="smoke", out=tmp_path / name, families=(Arch.opt,), work=tmp_path / "runs",
                              variants=(AttentionVariant.softmax, AttentionVariant.softmax1), placement=placement)
        run_reproduction(cfg, log=lambda _m: None)
        return tmp_path / name / "opt" / "compare.csv"

    plain, capped = run("plain", Placement()), run("capped", Placement(device_map="auto", max_memory="60KB"))
    a, b = pd.read_csv(plain), pd.read_csv(capped)
    assert all(math.isfinite(v) for v in a["avg_kurtosis"])
    pd.testing.assert_frame_equal(a, b)
