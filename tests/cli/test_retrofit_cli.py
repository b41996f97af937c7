"""`outlier-probe retrofit` through CliRunner: a tiny --preset gpu run, --resume, and one-line usage errors (exit 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
from typer.testing import CliRunner

from outlier_probe.cli.main import app
from outlier_probe.report.retrofit_report import OUTPUTS

runner = CliRunner()
TINY_OPTS = {"--steps": 2, "--batch-size": 2, "--seq-len": 32, "--eval-every": 1, "--eval-samples": 4, "--warmup": 0,
             "--threads": 1, "--device": "cpu"}
TINY = [x for kv in TINY_OPTS.items() for x in kv]


def run(*args: object):  # noqa: ANN201
    return runner.invoke(app, ["retrofit", *map(str, args)])


def test_gpu_preset_at_tiny_scale_then_resume(tiny_checkpoint: Callable[..., Path], text_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "rf"
    ckpt = tiny_checkpoint("opt")
    first = run(ckpt, "--attention", "softmax1", "--data", text_file, "--preset", "gpu", *TINY, "--out", out)
    assert first.exit_code == 0, first.output
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # and no leftover parts
    table = pd.read_csv(out / "retrofit.csv")
    assert table["phase"].tolist() == ["original", "start", "end", "start", "end"]
    assert table["twin"].tolist()[1:] == ["softmax", "softmax", "softmax1", "softmax1"]
    curves = pd.read_csv(out / "curves.csv")
    assert curves.groupby("twin")["step"].apply(list).to_dict() == {"softmax": [0, 1, 2], "softmax1": [0, 1, 2]}
    assert "lr" in (out / "retrofit.json").read_text() and "gpu" in (out / "summary.md").read_text()
    again = run(ckpt, "--attention", "softmax1", "--data", text_file, "--preset", "gpu", *TINY, "--out", out)
    assert again.exit_code == 2 and "already holds" in again.output


def test_interrupted_run_resumes(tiny_checkpoint: Callable[..., Path], text_file: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import outlier_probe.retrofit as rf
    from outlier_probe.cli.retrofit import PARTS

    out, real, calls = tmp_path / "rf", rf.fine_tune, []

    def interrupted(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    args = [tiny_checkpoint("gpt2"), "--attention", "gated", "--data", text_file, *TINY, "--out", out, "--quiet"]
    monkeypatch.setattr(rf, "fine_tune", interrupted)
    first = run(*args)
    assert first.exit_code == 130
    assert [p.name for p in out.iterdir()] == [PARTS]  # no half-written report, the finished control kept
    saved = json.loads((out / PARTS / "softmax-s0.json").read_text())
    monkeypatch.setattr(rf, "fine_tune", real)
    again = run(*args, "--resume")
    assert again.exit_code == 0, again.output
    table = pd.read_csv(out / "retrofit.csv")
    control = table[(table["twin"] == "softmax") & (table["phase"] == "end")].iloc[0]
    assert control["step_s"] == saved["step_s"] and control["w8a8_loss"] == pytest.approx(saved["after"]["w8a8_loss"])
    assert len(calls) == 2 and not (out / PARTS).exists()  # the control was not trained again


@pytest.mark.parametrize(
    ("family", "args", "message"),
    [
        ("gpt2", ["--attention", "softmax1,sparse"], "sparse"),
        ("gpt2", ["--objective", "mlm"], "needs a masked-LM head"),
        ("bert", ["--objective", "lm"], "needs a causal LM head"),
        ("gpt2", ["--preset", "tpu"], "--preset"),
        ("gpt2", ["--seeds", "0,x"], "--seeds"),
        ("gpt2", ["--data", "/nonexistent/file.txt"], "does not exist"),
        ("gpt2", ["--seq-len", "4096"], "positions"),
        ("bert", ["--objective", "mlm-head"], "use --objective mlm"),  # it has its own MLM head
        ("gpt2", ["--objective", "mlm-head"], "use --objective lm"),
        ("gpt2", ["--head-steps", "0"], "--head-steps"),
    ],
)
def test_bad_input_one_line_exit_2_nothing_written(tiny_checkpoint: Callable[..., Path], text_file: Path, tmp_path: Path,
                                                   family: str, args: list[str], message: str) -> None:
    out = tmp_path / "rf"
    opts = {**TINY_OPTS, "--data": text_file, **dict(zip(args[::2], args[1::2]))}
    result = run(tiny_checkpoint(family), *[x for kv in opts.items() for x in kv], "--out", out)
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("outlier-probe: error:") and message in lines[0]
    assert not out.exists()


def test_checkpoint_without_tokenizer(tiny_model: Callable, text_file: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "notok"
    tiny_model("gpt2").save_pretrained(ckpt)
    result = run(ckpt, "--data", text_file, *TINY, "--out", tmp_path / "rf")
    assert result.exit_code == 2 and "--tokenizer" in result.output
    assert not (tmp_path / "rf").exists()
