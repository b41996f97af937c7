"""The fused CPU kernel against the observer's torch path: same statistics on every layout it takes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from outlier_probe.config import ObserverConfig
from outlier_probe.stats import kernels
from outlier_probe.stats.observer import OutlierObserver, SiteStats

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not importable here")

EXACT = ("n_sequences", "count", "max_abs", "top_channels", "hist_counts", "n_nonfinite", "frac_gt_threshold",
         "frac_gt_ksigma")
CLOSE = ("mean", "var", "std", "kurtosis", "excess_kurtosis", "paper_kurtosis", "paper_inf_norm")


def _observer(monkeypatch: pytest.MonkeyPatch, path: str, **cfg: float) -> OutlierObserver:
    monkeypatch.setenv("OUTLIER_PROBE_KERNEL", "auto" if path == "fused" else "torch")
    obs = OutlierObserver(ObserverConfig(top_k=4, **cfg))  # type: ignore[arg-type]
    monkeypatch.delenv("OUTLIER_PROBE_KERNEL")
    return obs


def _assert_same(fused: SiteStats, ref: SiteStats, rel: float = 1e-12) -> None:
    for field in EXACT:
        assert repr(getattr(fused, field)) == repr(getattr(ref, field)), field  # repr: exact, and NaN == NaN
    for field in CLOSE:
        assert getattr(fused, field) == pytest.approx(getattr(ref, field), rel=rel, nan_ok=True), field


def _activations(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Heavy-tailed values, one outlier channel, and values exactly on the thresholds and bin edges."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) ** 3  # heavy tails
    x = x * torch.rand(shape[-1], generator=g, dtype=torch.float64) * 3
    x[..., 1] *= 40.0
    flat = x.view(-1)
    flat[:6] = torch.tensor([6.0, -6.0, 2.0**-14, 2.0**14, 0.0, 6.0000001], dtype=torch.float64)
    return x


LAYOUTS = {
    "whole sequences per thread": (8, 16, 12),
    "fewer sequences than threads x4": (3, 16, 12),
    "one sequence": (1, 50, 7),
    "matrix input": (6, 5),
    "four dims": (4, 3, 5, 6),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("item_values", [1 << 15, 40])  # 40: several chunks per sequence, a ragged last one
def test_fused_equals_torch_path(monkeypatch: pytest.MonkeyPatch, layout: str, dtype: torch.dtype,
                                 item_values: int) -> None:
    monkeypatch.setattr(kernels, "_ITEM_VALUES", item_values)
    if item_values < 1 << 15:
        monkeypatch.setattr(kernels, "_ROW_VALUES", 0)  # never whole sequences: pool chunks
    fused, ref = _observer(monkeypatch, "fused", sigma_k=2.0), _observer(monkeypatch, "torch", sigma_k=2.0)
    for seed in range(3):
        x = _activations(LAYOUTS[layout], seed).to(dtype)
        fused.update(x)
        ref.update(x)
    assert fused._cpu is not None and ref._cpu is None
    _assert_same(fused.result(), ref.result())
    if layout != "matrix input":  # 5 values a sequence can never reach 2 sigma ((n - 1) / sqrt(n) < 2)
        assert fused.result().frac_gt_ksigma > 0


@pytest.mark.parametrize("item_values", [1 << 15, 64])
def test_mean_much_larger_than_std_against_scipy(monkeypatch: pytest.MonkeyPatch, item_values: int) -> None:
    """Two-pass chunks pooled with the exact shift of origin: no cancellation at |mean| / std = 1e8."""
    monkeypatch.setattr(kernels, "_ITEM_VALUES", item_values)
    monkeypatch.setattr(kernels, "_ROW_VALUES", 1 << 18 if item_values > 64 else 0)
    rng = np.random.default_rng(1)
    x = 1e6 + rng.standard_t(5, (5, 40, 16)) * 1e-2
    obs = _observer(monkeypatch, "fused")
    for part in np.array_split(x, 3):
        obs.update(torch.from_numpy(part))
    r, flat = obs.result(), x.reshape(-1)
    assert r.mean == pytest.approx(flat.mean(), rel=1e-12)
    assert r.var == pytest.approx(np.var(flat, ddof=1), rel=1e-6)
    assert r.kurtosis == pytest.approx(scipy.stats.kurtosis(flat, fisher=False, bias=True), rel=1e-6)
    ks = [np.mean((s - s.mean()) ** 4) / (np.std(s, ddof=1) ** 4 + 1e-6) for s in x.reshape(5, -1)]
    assert r.paper_kurtosis == pytest.approx(np.mean(ks), rel=1e-6)


def test_nonfinite_update_takes_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bool] = []
    real = kernels.FusedCPU.update

    def spy(self: kernels.FusedCPU, rows: torch.Tensor, start: int) -> bool:
        calls.append(real(self, rows, start))
        return calls[-1]

    monkeypatch.setattr(kernels.FusedCPU, "update", spy)
    fused, ref = _observer(monkeypatch, "fused"), _observer(monkeypatch, "torch")
    bad = _activations((3, 8, 5), 1).float()
    bad[1, 2, 3], bad[2, 0, 0] = math.nan, -math.inf
    for x in (_activations((3, 8, 5), 0).float(), bad, _activations((3, 8, 5), 2).float()):
        fused.update(x)
        ref.update(x)
    assert calls == [True, False, True]  # only the update holding NaN / inf fell back
    r = fused.result()
    assert r.n_nonfinite == 2 and math.isnan(r.max_abs) and math.isnan(r.mean)
    _assert_same(r, ref.result())


def test_kernel_is_the_cpu_default_and_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(2, 4, 3)
    default = OutlierObserver()
    default.update(x)
    assert default._cpu is not None
    off = _observer(monkeypatch, "torch")
    off.update(x)
    assert off._cpu is None
    custom = OutlierObserver(hist_edges=torch.tensor([1.0, 10.0]))  # only the power-of-two bins are fused
    custom.update(x)
    assert custom._cpu is None


def test_merge_rebinds_the_kernel_to_the_new_state() -> None:
    x = _activations((4, 6, 5), 0)
    a, b, whole = OutlierObserver(), OutlierObserver(), OutlierObserver()
    a.update(x[:2])
    b.update(x[2:3])
    a.merge(b)  # replaces a's state tensors: later kernel updates must land in the new ones
    a.update(x[3:])
    whole.update(x)
    _assert_same(a.result(), whole.result(), rel=1e-9)


@pytest.mark.parametrize("item_values", [1 << 15, 40])
def test_results_do_not_depend_on_the_thread_count(monkeypatch: pytest.MonkeyPatch, item_values: int) -> None:
    import numba

    monkeypatch.setattr(kernels, "_ITEM_VALUES", item_values)
    monkeypatch.setattr(kernels, "_ROW_VALUES", 1 << 18 if item_values > 40 else 0)
    x = _activations((5, 16, 12), 3).float()
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            obs = OutlierObserver()
            obs.update(x)
            assert numba.get_num_threads() == min(threads, numba.config.NUMBA_NUM_THREADS)  # follows torch
            results.append(repr(obs.result()))
    finally:
        torch.set_num_threads(before)
    assert results[0] == results[1]  # bit for bit


def test_exponent_bin_table_edges() -> None:
    table = kernels.exponent_bin_table(torch.float32, -14, 29)
    bits = torch.tensor([0.0, 2.0**-15, 2.0**-14, 1.0, 1.99, 2.0**13, 2.0**14, 1e30, math.inf]).view(torch.int32)
    bins = [int(table[(b >> 23) & 0xFF]) for b in bits.tolist()]
    assert bins == [0, 0, 1, 15, 15, 28, 29, 29, 30]


@pytest.mark.parametrize("env, layer", [(None, "workqueue"), ("omp", "omp")])
def test_threading_layer_is_workqueue_unless_the_user_chose(env: str | None, layer: str) -> None:
    """numba's OpenMP pool spun beside torch's (every later forward 2-5x slower) and set torch's thread count to
    its own; workqueue leaves torch's setting alone. A user's NUMBA_THREADING_LAYER still wins."""
    import os
    import subprocess
    import sys

    code = ("import torch, numba; torch.set_num_threads(1); from outlier_probe.config import ObserverConfig; "
            "from outlier_probe.stats.observer import OutlierObserver; "
            "o = OutlierObserver(ObserverConfig()); o.update(torch.randn(2, 8, 16)); o.result(); "
            "print(numba.threading_layer(), torch.get_num_threads())")
    environ = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    if env is not None:
        environ["NUMBA_THREADING_LAYER"] = env
    try:
        import numba.np.ufunc.omppool  # noqa: F401 - the OpenMP layer may be missing from this build
    except ImportError:
        if layer == "omp":
            pytest.skip("numba's OpenMP threading layer is not built here")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    used, torch_threads = out.stdout.strip().splitlines()[-1].split()
    assert used == layer
    if layer == "workqueue":  # the OpenMP layer, sharing torch's libgomp, raised torch's 1 thread to numba's count
        assert torch_threads == "1"
