"""The stats pipeline: paper metrics against a direct computation, determinism, NaN, the real MiniLM."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from outlier_probe import arch
from outlier_probe.config import DataConfig, LoadConfig, SiteKind, SiteSelection, StatsConfig
from outlier_probe.data import batches_for_model
from outlier_probe.errors import ProbeError, UsageError
from outlier_probe.loading import load_model
from outlier_probe.report.stats_report import write_stats_report
from outlier_probe.stats.run import run_stats

SAMPLES, SEQ_LEN = 6, 24


def _cfg(folder: Path, text_file: Path, **kw) -> StatsConfig:
    data = DataConfig(path=text_file, samples=SAMPLES, seq_len=SEQ_LEN, batch_size=4, seed=kw.pop("seed", 0))
    return StatsConfig(load=LoadConfig(str(folder)), data=data, **kw)


def _paper_reference(captured: list[torch.Tensor]) -> tuple[float, float, int]:
    """DESIGN.md section 2, written out: per sequence b over all T*d values, then the mean over sequences."""
    ks, infs = [], []
    for x in captured:  # one tensor per batch, first dim = sequences
        for xb in x.double().reshape(x.shape[0], -1):
            centered = xb - xb.mean()
            std = xb.std(unbiased=True)
            ks.append(float((centered**4).mean() / (std**4 + 1e-6)))
            infs.append(float(xb.abs().max()))
    return sum(ks) / len(ks), sum(infs) / len(infs), len(ks)


@pytest.mark.parametrize("family", ["opt", "bert", "llama"])
def test_paper_metrics_equal_a_direct_computation(tiny_checkpoint, text_file: Path, family: str) -> None:
    cfg = _cfg(tiny_checkpoint(family), text_file, sites=SiteSelection(kinds=tuple(SiteKind)))
    loaded = load_model(cfg.load)
    result = run_stats(cfg, loaded=loaded)
    by_name = {r.site.name: r.stats for r in result.sites}
    sites = arch.find_sites(loaded.model, cfg.sites)
    assert set(by_name) == {s.name for s in sites}

    # the same tensors, captured by plain hooks in a separate pass over the same batches
    captured: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    handles = []
    for s in sites:
        def grab(tensor, name=s.name):
            t = tensor[0] if isinstance(tensor, tuple) else tensor
            captured[name].append(t.detach().clone())
        if s.capture == "output":
            handles.append(s.module.register_forward_hook(lambda m, a, out, g=grab: g(out)))
        else:
            handles.append(s.module.register_forward_pre_hook(lambda m, a, g=grab: g(a[0])))
    batches = batches_for_model(loaded.processor, loaded.info, cfg.data)
    try:
        with torch.no_grad():
            for b in batches.batches:
                loaded.model(**b)
    finally:
        for h in handles:
            h.remove()

    for name, tensors in captured.items():
        if tensors[0].dim() == 2:  # OPT flattens (B, T, d) to (B*T, d) inside its FFN
            tensors = [t.view(-1, SEQ_LEN, t.shape[-1]) for t in tensors]
        kurt, inf, n = _paper_reference(tensors)
        got = by_name[name]
        assert n == got.n_sequences == SAMPLES, name
        assert got.paper_kurtosis == pytest.approx(kurt, rel=1e-9, abs=1e-12), name
        assert got.paper_inf_norm == pytest.approx(inf, rel=1e-12), name
        assert got.max_abs == pytest.approx(max(float(t.abs().max()) for t in tensors), rel=1e-12), name
    assert result.summary["max_kurtosis"] == max(s.paper_kurtosis for s in by_name.values())
    assert result.summary["sites"] == len(sites)


def test_same_seed_gives_byte_identical_stats_csv(tiny_checkpoint, text_file: Path, tmp_path: Path) -> None:
    folder = tiny_checkpoint("gpt2")
    paths = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        written = write_stats_report(run_stats(_cfg(folder, text_file, seed=seed)), tmp_path / run, plots_on=False)
        paths.append(written["stats.csv"])
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c  # another seed picks other sequences
    assert a.count(b"\n") == 1 + len(arch.find_sites(load_model(LoadConfig(str(folder))).model))


def test_nan_activations_are_an_error(tiny_checkpoint, text_file: Path) -> None:
    cfg = _cfg(tiny_checkpoint("opt"), text_file)
    loaded = load_model(cfg.load)
    with torch.no_grad():
        loaded.model.get_submodule("model.decoder.layers.1.final_layer_norm").weight.fill_(math.nan)
    with pytest.raises(ProbeError, match=r"non-finite activations \(NaN/Inf\) at \d+ sites, first model.decoder.layers.1"):
        run_stats(cfg, loaded=loaded)


def test_generic_family_runs_on_linear_and_norm_sites(tiny_checkpoint, text_file: Path) -> None:
    result = run_stats(_cfg(tiny_checkpoint("generic"), text_file))
    kinds = {r.site.kind for r in result.sites}
    assert kinds == {SiteKind.linear_output, SiteKind.norm}
    assert all(r.stats.n_sequences == SAMPLES for r in result.sites)
    assert result.model["family"] == "generic" and result.model["model_type"] == "bloom"
    assert {r.site.layer for r in result.sites} == {0, 1, None}


def test_vit_runs_on_images(tiny_checkpoint, image_folder: Path) -> None:
    cfg = StatsConfig(load=LoadConfig(str(tiny_checkpoint("vit"))), data=DataConfig(path=image_folder, samples=5, batch_size=2))
    result = run_stats(cfg)
    tokens = (16 // 4) ** 2 + 1  # patches + CLS
    blocks = [r for r in result.sites if r.site.kind is SiteKind.block_output]
    assert len(blocks) == 2
    assert all(r.stats.n_sequences == 5 and r.stats.count == 5 * tokens * 32 for r in blocks)
    assert result.data["sequences"] == 5 and result.data["classes"] == ["cat", "dog", "fox"]


def test_no_matching_sites_is_a_usage_error(tiny_checkpoint, text_file: Path) -> None:
    cfg = _cfg(tiny_checkpoint("generic"), text_file, sites=SiteSelection(kinds=(SiteKind.block_output,)))
    with pytest.raises(UsageError, match="no generic sites match --sites block_output"):
        run_stats(cfg)


def test_progress_callback_sees_every_batch(tiny_checkpoint, text_file: Path) -> None:
    calls: list[tuple[int, int]] = []
    run_stats(_cfg(tiny_checkpoint("llama"), text_file), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(1, 2), (2, 2)]  # 6 samples in batches of 4


@pytest.mark.slow
def test_real_minilm_on_wikitext_end_to_end(minilm_path: Path, wikitext_path: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from outlier_probe.cli.main import app

    out = tmp_path / "minilm"
    res = CliRunner().invoke(app, ["stats", str(minilm_path), "--data", str(wikitext_path), "--samples", "8",
                                   "--seq-len", "128", "--out", str(out), "--quiet", "--no-plots"])
    assert res.exit_code == 0, res.output
    import pandas as pd

    frame = pd.read_csv(out / "stats.csv")
    numeric = frame.select_dtypes("number")
    assert numeric.notna().all().all() and (numeric.abs() < float("inf")).all().all()  # finite figures
    blocks = frame[frame.kind == "block_output"].set_index("layer")
    assert list(blocks.index) == list(range(6))
    assert ((blocks.max_abs > 1) & (blocks.max_abs < 100)).all(), blocks.max_abs.tolist()
    assert (frame.n_sequences == 8).all()
    doc = json.loads((out / "summary.json").read_text())
    assert {"versions", "settings", "data", "summary", "definitions", "model"} <= set(doc)
    assert doc["versions"]["torch"] == torch.__version__
    assert doc["versions"]["numba"] and "kernel" in doc["observers"]
    assert doc["settings"]["data"]["samples"] == 8 and doc["settings"]["data"]["seq_len"] == 128
    assert doc["data"]["sequences"] == 8 and doc["data"]["tokens"] == 8 * 128
    assert doc["model"]["family"] == "bert" and doc["model"]["layers"] == 6
    s = doc["summary"]
    assert all(math.isfinite(s[k]) for k in ("avg_kurtosis", "max_kurtosis", "max_inf_norm", "max_abs"))
    # the well-known BERT-family outlier: the residual sum entering the FFN LayerNorm is far above the block outputs
    assert s["max_inf_norm"] > 3 * s["max_inf_norm_block_output"]
