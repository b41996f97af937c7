"""Bad and hostile inputs, one table: each gives one stderr line, its exit code, and no file in --out.

Cases from issue 15 (weights lacking tensors, unreachable hub ids, gate's --junit, the gguf extra)
and the ones found while hunting (corrupt config.json, a train --out under a file).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from outlier_probe.cli.main import app

PREFIX = "outlier-probe: error:"
SMALL = ["--samples", "2", "--seq-len", "16", "--batch-size", "2"]


def _edited(tiny_checkpoint: Callable[..., Path], tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    folder = Path(shutil.copytree(tiny_checkpoint("bert"), tmp_path / "ckpt"))
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def _drop_half(t: dict[str, torch.Tensor]) -> None:
    for key in sorted(t)[::2]:
        del t[key]


def _reshape_one(t: dict[str, torch.Tensor]) -> None:
    key = "bert.encoder.layer.0.attention.self.query.weight"
    t[key] = torch.zeros(8, t[key].shape[1])


def _extra_layer(t: dict[str, torch.Tensor]) -> None:  # a checkpoint with more layers than its config.json says
    t["bert.encoder.layer.5.output.dense.weight"] = torch.zeros(32, 64)


def _harmless_extras(t: dict[str, torch.Tensor]) -> None:  # BERT pretraining head and old persistent buffers
    t["cls.seq_relationship.weight"] = torch.zeros(2, 32)
    t["bert.pooler.dense.weight"] = torch.zeros(32, 32)
    t["bert.embeddings.position_ids"] = torch.arange(128)[None]


def _gate_reports(tiny_checkpoint: Callable[..., Path], text_file: Path, tmp_path: Path) -> Path:
    reports = tmp_path / "reports"
    res = CliRunner().invoke(app, ["stats", str(tiny_checkpoint("bert")), "--data", str(text_file), *SMALL,
                                   "--out", str(reports), "--no-plots", "-q"])
    assert res.exit_code == 0, res.output
    return reports


def _offline_by_connection_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """No HF_HUB_OFFLINE, and every HTTP request fails as it does without network (DNS error)."""
    httpx2 = pytest.importorskip("httpx2", reason="huggingface_hub's HTTP client (its dependency) is simulated here")
    from huggingface_hub import constants

    from outlier_probe import hub

    def refuse(self: Any, request: Any, **kwargs: Any) -> Any:
        raise httpx2.ConnectError("[Errno -2] Name or service not known", request=request)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(httpx2.Client, "send", refuse)
    hub.offline_reason.cache_clear()
    monkeypatch.setattr(hub, "PROBE_TIMEOUT_S", 1.0)


# case -> (expected exit code, text the one stderr line must hold)
CASES: dict[str, tuple[int, str]] = {
    "half the tensors removed": (1, "does not match its config: 22 of 44 tensors missing (bert.embeddings.LayerNorm.bias, "),
    "a tensor of another shape": (1, "1 tensor of another shape (bert.encoder.layer.0.attention.self.query.weight (8, 32) vs (32, 32))"),
    "tensors of a layer the config lacks": (1, "1 unexpected tensor (bert.encoder.layer.5.output.dense.weight); measuring it would ignore the extra ones"),
    "hub id, HF_HUB_OFFLINE=1": (1, "HF_HUB_OFFLINE=1 is set and it is not in the local Hugging Face cache"),
    "hub id, no network": (1, "no network (https://huggingface.co unreachable"),
    "gguf extra missing": (1, "pip install 'outlier-probe[gguf]'"),
    "GGUF lacking a layer's tensors": (1, "does not match its config: 9 of "),
    "corrupt config.json": (1, "is not a valid JSON file"),
    "gate --junit under a file": (2, "cannot write --junit"),
    "gate --junit is a folder": (2, "--junit"),
    "gate --out under a file": (2, "cannot create output folder"),
    "gate measure --junit under a file": (2, "cannot write --junit"),
    "train --out under a file": (1, "cannot create output folder"),
    "train on an empty data file": (1, "contains no text"),
    "reproduce on an empty data file": (1, "contains no text"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case: str, tiny_checkpoint, text_file: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    code, needle = CASES[case]
    out = tmp_path / "out"
    (tmp_path / "file").write_text("x")
    data = ["--data", str(text_file), *SMALL]
    watched = out  # the folder that must stay empty (or untouched)
    if case == "half the tensors removed":
        args = ["stats", _edited(tiny_checkpoint, tmp_path, _drop_half), *data, "--out", out]
    elif case == "a tensor of another shape":
        args = ["quantize", _edited(tiny_checkpoint, tmp_path, _reshape_one), *data, "--out", out]
    elif case == "tensors of a layer the config lacks":
        args = ["stats", _edited(tiny_checkpoint, tmp_path, _extra_layer), *data, "--out", out]
    elif case == "hub id, HF_HUB_OFFLINE=1":
        args = ["stats", "outlier-probe-tests/not-cached", *data, "--out", out]
    elif case == "hub id, no network":
        _offline_by_connection_error(monkeypatch)
        args = ["stats", "outlier-probe-tests/not-cached", *data, "--out", out]
    elif case == "gguf extra missing":
        (tmp_path / "model.gguf").write_bytes(b"GGUF")
        monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
        args = ["stats", tmp_path / "model.gguf", *data, "--out", out]
    elif case == "GGUF lacking a layer's tensors":
        pytest.importorskip("gguf", reason="the `gguf` package writes the GGUF file")
        from types import SimpleNamespace

        from tests.conftest import make_model, write_tiny_gguf

        model = make_model("llama", vocab_size=320)
        kept = {k: v for k, v in model.state_dict().items() if ".layers.1." not in k}  # 9 tensors of layer 1 dropped
        shim = SimpleNamespace(config=model.config, state_dict=lambda: kept)
        tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(str(tiny_checkpoint("llama")))
        args = ["stats", write_tiny_gguf(shim, tok, tmp_path / "half.gguf"), *data, "--out", out]
    elif case == "corrupt config.json":
        folder = Path(shutil.copytree(tiny_checkpoint("bert"), tmp_path / "ckpt"))
        (folder / "config.json").write_text('{"model_type": "bert", "hidden_size": ')
        args = ["stats", folder, *data, "--out", out]
    elif case.startswith("gate --"):
        reports = _gate_reports(tiny_checkpoint, text_file, tmp_path)
        before = sorted(p.name for p in reports.iterdir())
        option = {"gate --junit under a file": ["--junit", tmp_path / "file" / "gate.xml"],
                  "gate --junit is a folder": ["--junit", tmp_path],
                  "gate --out under a file": ["--out", tmp_path / "file" / "gate"]}[case]
        args = ["gate", "--report", reports, "--max-kurtosis", "1000", *option]
        watched = reports
    elif case == "gate measure --junit under a file":
        args = ["gate", tiny_checkpoint("bert"), "--data", text_file, "--samples", "2", "--seq-len", "16",
                "--max-kurtosis", "1000", "--out", out, "--junit", tmp_path / "file" / "gate.xml"]
    elif case == "train --out under a file":
        args = ["train", "--data", text_file, "--steps", "1", "--size", "micro", "--out", tmp_path / "file" / "run"]
        watched = tmp_path / "file" / "run"
    elif case in ("train on an empty data file", "reproduce on an empty data file"):
        (tmp_path / "empty.txt").write_text("")
        monkeypatch.chdir(tmp_path)  # reproduce keeps its checkpoints under ./runs/
        command = ["train", "--steps", "1", "--size", "micro"] if case.startswith("train") else ["reproduce", "--scale", "smoke"]
        args = [*command, "--data", tmp_path / "empty.txt", "--out", out / "run"]
        watched = out
    else:
        raise AssertionError(case)

    res = CliRunner().invoke(app, [str(a) for a in args])
    lines = res.stderr.splitlines()
    assert res.exit_code == code, (res.exit_code, res.output)
    assert len(lines) == 1 and lines[0].startswith(PREFIX), res.stderr
    assert needle in lines[0], lines[0]
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    if case.startswith("gate --"):
        assert sorted(p.name for p in watched.iterdir()) == before  # no gate.json, no junit
    else:
        assert not watched.exists() or not any(watched.iterdir())
        assert not (tmp_path / "runs").exists()  # no empty run folders either


def test_legitimately_absent_or_extra_tensors_still_load(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:
    """Tied output embeddings are absent from every tiny checkpoint; a pretraining head, pooler and old
    position_ids buffer are extra here: none of them is an error."""
    ckpt = _edited(tiny_checkpoint, tmp_path, _harmless_extras)
    res = CliRunner().invoke(app, ["stats", str(ckpt), "--data", str(text_file), *SMALL, "--out", str(tmp_path / "out"),
                                   "--no-plots", "-q"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "vit", "generic"])
def test_tied_and_rebuilt_tensors_are_not_missing(tiny_checkpoint, family: str) -> None:
    from outlier_probe.config import LoadConfig
    from outlier_probe.loading import load_model

    load_model(LoadConfig(source=str(tiny_checkpoint(family))))  # raises if any tensor counted as missing


def test_missing_tensor_error_counts_and_names() -> None:
    from torch import nn

    from outlier_probe.errors import ProbeError
    from outlier_probe.load_report import check_loading_report

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    report = {"missing_keys": {"0.weight", "0.bias", "1.weight", "1.bias"}, "unexpected_keys": {"head.weight", "2.weight"},
              "mismatched_keys": set()}
    with pytest.raises(ProbeError) as err:
        check_loading_report("ckpt", model, report)
    text = str(err.value)
    assert "4 of 4 tensors missing (0.bias, 0.weight, 1.bias, ... 1 more)" in text
    assert "1 unexpected tensor (2.weight)" in text  # head.weight: a head the model does not have, not an error
    assert "would use random values for those and ignore the extra ones" in text
    check_loading_report("ckpt", model, {"missing_keys": set(), "unexpected_keys": {"pooler.dense.weight"}})


# command -> (arguments after the checkpoint / reports, the file whose rename fails, exit code)
LAST_FILE = {
    "stats": (["--no-plots"], "summary.json", 1),
    "quantize": (["--calib-batches", "1"], "summary.json", 1),
    "compare": (["--calib-batches", "1", "--no-plots"], "compare.md", 1),
    "gate": (["--max-kurtosis", "1000"], "gate.xml", 2),
}


@pytest.mark.parametrize("command", list(LAST_FILE))
def test_a_failing_last_file_takes_every_output_back(command: str, tiny_checkpoint, text_file: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up while the last output is moved into place: every earlier output is removed too."""
    import os

    options, last, code = LAST_FILE[command]
    ckpt = str(tiny_checkpoint("bert"))
    out = tmp_path / "out"
    args = {"stats": ["stats", ckpt], "quantize": ["quantize", ckpt], "compare": ["compare", f"a={ckpt}", f"b={ckpt}@softmax1"],
            "gate": ["gate", ckpt, "--junit", str(out / "junit" / "gate.xml")]}[command]
    args += [*options, "--data", str(text_file), *(SMALL if command != "gate" else SMALL[:4]), "--out", str(out)]
    real_replace = os.replace

    def disk_full_at_last(src: Any, dst: Any) -> None:
        if Path(dst).name == last:
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full_at_last)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == code, res.output
    assert len(res.stderr.splitlines()) == 1 and "No space left on device" in res.stderr, res.stderr
    assert not out.exists(), sorted(out.rglob("*"))  # the reports written before it, and their folders, are gone


def test_a_gguf_run_is_quiet_on_stderr(tiny_gguf, text_file: Path, tmp_path: Path) -> None:
    """transformers de-quantizes GGUF under a bare tqdm bar: three lines of noise on every run, now none."""
    path, _model = tiny_gguf
    res = CliRunner().invoke(app, ["stats", str(path), "--data", str(text_file), *SMALL, "--out", str(tmp_path / "out"),
                                   "--no-plots", "-q"])
    assert res.exit_code == 0, res.output
    assert res.stderr == ""
