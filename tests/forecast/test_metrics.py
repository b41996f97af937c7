"""MSE / MAE against hand computations, the baselines, and the paper's time-series summary vs scipy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps
from torch import nn

from outlier_probe.forecast.metrics import PaperSummary, evaluate, fit_linear, linear_forecast, persistence, score


def test_mse_mae_by_hand() -> None:
    pred = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    true = torch.tensor([[[0.0, 2.0], [5.0, 1.0]]])
    s = score(pred, true)
    assert s.mse == pytest.approx((1 + 0 + 4 + 9) / 4)
    assert s.mae == pytest.approx((1 + 0 + 2 + 3) / 4)
    assert s.windows == 1


def test_evaluate_batches_agree_with_one_pass() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(1), nn.Linear(12, 8), nn.Unflatten(1, (4, 2)))
    x, y = torch.randn(37, 6, 2), torch.randn(37, 4, 2)
    whole = score(model(x).detach(), y)
    batched = evaluate(model, x, y, batch_size=5)
    assert batched.mse == pytest.approx(whole.mse) and batched.mae == pytest.approx(whole.mae)


def test_persistence_and_linear_baselines() -> None:
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    p = persistence(x, 4)
    assert p.shape == (2, 4, 3) and torch.equal(p[:, 2], x[:, -1])
    # an exactly linear process: y_t = 2 * x_last - x_first + 1, shared by the columns
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(200, 5, 3, generator=g)
    ys = (2 * xs[:, -1:, :] - xs[:, :1, :] + 1).expand(-1, 4, -1)
    w, b = fit_linear(xs, ys)
    np.testing.assert_allclose(w[:, -1], 2.0, atol=1e-8)
    np.testing.assert_allclose(w[:, 0], -1.0, atol=1e-8)
    np.testing.assert_allclose(b, 1.0, atol=1e-8)
    assert score(linear_forecast(xs, w, b), ys).mse < 1e-10


def test_paper_summary_matches_scipy_per_sample() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU())
    x = torch.randn(10, 3, 6)
    s = PaperSummary(model)
    for i in (0, 4):  # two batches: the per-module figure is a mean over every sample
        s.batch(len(x[i : i + 4 if i == 0 else None]))
        model(x[i : i + 4] if i == 0 else x[4:])
    s.close()
    out = model[0](x).detach().reshape(10, -1).double().numpy()
    n = out.shape[1]
    # reference: population 4th moment over the unbiased variance squared (STanHop's test code, eps 1e-6)
    k = sps.moment(out, 4, axis=1) / (out.std(axis=1, ddof=1) ** 4 + 1e-6)
    rows = {r["module"]: r for r in s.per_module()}
    assert rows["0"]["kurtosis"] == pytest.approx(k.mean(), rel=1e-5)
    assert rows["0"]["inf_norm"] == pytest.approx(np.abs(out).max(axis=1).mean(), rel=1e-6)
    summ = s.summary()
    assert summ["modules"] == 2 and summ["samples"] == 10
    assert summ["avg_kurtosis"] == pytest.approx(np.mean([rows["0"]["kurtosis"], rows["1"]["kurtosis"]]))
    assert summ["max_inf_norm"] == max(rows["0"]["inf_norm"], rows["1"]["inf_norm"])
    assert n == 48
