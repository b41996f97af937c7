"""Big-model loading through accelerate (--device-map / --max-memory / --offload-folder), and
half-precision models measured with float64 observers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import scipy.stats
import torch
from typer.testing import CliRunner

from outlier_probe import arch
from outlier_probe.cli.main import app
from outlier_probe.config import DataConfig, DType, LoadConfig, ObserverConfig, SiteSelection
from outlier_probe.data import batches_for_model
from outlier_probe.errors import UsageError
from outlier_probe.loading import load_model
from outlier_probe.offload import max_memory_map, parse_size
from outlier_probe.stats.hooks import observe
from outlier_probe.stats.observer import OutlierObserver

SMALL = ["--samples", "4", "--seq-len", "16", "--batch-size", "2", "-q"]


def test_sizes_and_budgets() -> None:
    assert parse_size("3GiB") == 3 * 2**30 and parse_size("1.5 GB") == 1_500_000_000 and parse_size("60KB") == 60_000
    assert max_memory_map("cpu=8GiB,0=2GiB") == {"cpu": 8 * 2**30, 0: 2 * 2**30}
    assert max_memory_map("20GiB")["cpu"] == 20 * 2**30
    with pytest.raises(UsageError, match="not a size"):
        parse_size("lots")


@pytest.mark.parametrize("command,files", [("stats", ("stats.csv",)), ("quantize", ("quantize.csv", "sites.csv"))])
def test_offloaded_model_gives_the_same_report(tiny_checkpoint, text_file: Path, tmp_path: Path, one_thread, command: str,
                                               files: tuple[str, ...]) -> None:
    """A 60 KB budget sends every weight to disk: hooks, observers and the quantizer run on an offloaded model."""
    ckpt = str(tiny_checkpoint("opt"))
    base = [command, ckpt, "--data", str(text_file), *SMALL] + (["--no-plots"] if command == "stats" else [])
    plain = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "plain")])
    assert plain.exit_code == 0, plain.output
    offload = tmp_path / "offload-weights"
    res = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "offloaded"), "--device-map", "auto",
                                   "--max-memory", "60KB", "--offload-folder", str(offload)])
    assert res.exit_code == 0, res.output
    for name in files:
        a, b = pd.read_csv(tmp_path / "plain" / name), pd.read_csv(tmp_path / "offloaded" / name)
        pd.testing.assert_frame_equal(a, b)  # bit-identical: the same weights, the same order of operations
    model = json.loads((tmp_path / "offloaded" / "summary.json").read_text())["model"]
    assert "disk" in model["device_map"], model
    # safetensors weights are read straight from the checkpoint at each forward: nothing is copied
    assert not offload.exists() or not any(offload.iterdir())


def test_offload_options_need_a_device_map(tiny_checkpoint, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["stats", str(tiny_checkpoint("opt")), "--max-memory", "3GiB", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "--device-map" in res.stderr, res.output
    res = CliRunner().invoke(app, ["stats", str(tiny_checkpoint("opt")), "--device-map", "auto", "--max-memory", "3 lots",
                                   "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "not a size" in res.stderr, res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("dtype", [DType.bfloat16, DType.float16])
def test_half_precision_model_statistics_equal_a_float64_recomputation(tiny_checkpoint, text_file: Path, one_thread,
                                                                         dtype: DType) -> None:
    loaded = load_model(LoadConfig(source=str(tiny_checkpoint("llama")), dtype=dtype))
    assert next(loaded.model.parameters()).dtype is dtype.torch
    sites = arch.find_sites(loaded.model, SiteSelection())[:6]
    captured: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites if s.capture == "output"}
    grabs = [s.module.register_forward_hook(lambda m, a, out, n=s.name: captured[n].append(
        (out[0] if isinstance(out, tuple) else out).detach().clone())) for s in sites if s.capture == "output"]
    batches = batches_for_model(loaded.processor, loaded.info, DataConfig(path=text_file, samples=6, seq_len=16, batch_size=3))
    try:
        with torch.inference_mode(), observe(sites, lambda _s: OutlierObserver(ObserverConfig())) as observers:
            for batch in batches.batches:
                observers.batch_size = len(batch["input_ids"])
                loaded.model(**batch)
    finally:
        for h in grabs:
            h.remove()
    checked = 0
    for name, tensors in captured.items():
        if not tensors or tensors[0].dim() != 3:
            continue
        assert tensors[0].dtype is dtype.torch
        x = torch.cat(tensors).double()  # exact: every half value is a float64 value
        got = observers[name].result()
        flat = x.flatten().numpy()
        assert got.count == flat.size and got.max_abs == float(x.abs().max())
        assert got.mean == pytest.approx(float(flat.mean()), rel=1e-12, abs=1e-15)
        assert got.var == pytest.approx(float(flat.var(ddof=1)), rel=1e-12)
        assert got.kurtosis == pytest.approx(float(scipy.stats.kurtosis(flat, fisher=False)), rel=1e-12)
        per_seq = x.reshape(len(x), -1)
        dev = per_seq - per_seq.mean(1, keepdim=True)
        k = (dev**4).mean(1) / (per_seq.std(1) ** 4 + 1e-6)
        assert got.paper_kurtosis == pytest.approx(float(k.mean()), rel=1e-12)
        checked += 1
    assert checked >= 3
